"""The protocol every agent environment speaks (Docker container, bubblewrap sandbox).

The agent loop and the evaluator only ever see this; model-written commands run only through `run`,
which executes them inside the sandbox of the backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass
class CommandResult:
    output: str           # stdout and stderr, interleaved, cut to the backend's output cap
    exit_code: int        # the command's exit status (124 when killed at its timeout)
    timed_out: bool = False
    truncated: bool = False  # output was longer than the cap


@runtime_checkable
class Environment(Protocol):
    repo_dir: str  # the repository's root, as seen by commands run in the environment

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        """Run a bash command (cwd = repo_dir) inside the sandbox."""

    def read_file(self, path: str) -> str:
        """Text of a file (relative paths are under repo_dir). FileNotFoundError if absent."""

    def write_file(self, path: str, content: str) -> None:
        """Create or overwrite a file (parents created)."""

    def diff(self) -> str:
        """The changes to the repository since the task's base commit, as a `git diff` patch."""

    def close(self) -> None:
        """Tear down (kill and remove the container / delete the workspace). Idempotent."""
