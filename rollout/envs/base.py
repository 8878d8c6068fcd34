"""The protocol every agent environment speaks (Docker container, bubblewrap sandbox).

The agent loop and the evaluator only ever see this; model-written commands run only through `run`,
which executes them inside the sandbox of the backend."""
from __future__ import annotations

import shlex
import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class EnvironmentLost(RuntimeError):
    """The machine under an environment failed (its Docker daemon is gone or does not answer): nothing the
    policy did. The trajectory is run again from the start elsewhere and the loss is counted as an
    infrastructure failure. Not an OSError, so that no tool turns it into an observation."""


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


# ---------------------------------------------------------------------------------- shared by the backends

DEFAULT_TIMEOUT = 120.0       # seconds per command
DEFAULT_OUTPUT_CAP = 64_000   # bytes of command output kept (head and tail)
DIFF_EXCLUDES = ("**/__pycache__/**", "**/*.pyc", "**/.pytest_cache/**", "**/.coverage", "**/.coverage.*")  # test-run litter


class OutputBuffer:
    """The first and last cap/2 bytes of a stream, and how many bytes went missing in between."""

    def __init__(self, cap: int | None):
        self.cap = cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.cap is None:
            self.head += chunk
            return
        room = self.cap // 2 - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        keep = self.cap - self.cap // 2
        if len(self.tail) > keep:
            del self.tail[:len(self.tail) - keep]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def text(self) -> str:
        middle = f"\n[... {self.total - len(self.head) - len(self.tail)} bytes of output elided ...]\n" \
            if self.truncated else ""
        return self.head.decode("utf-8", "replace") + middle + self.tail.decode("utf-8", "replace")


def collect_output(chunks, cap: int | None, timeout: float, kill) -> tuple[OutputBuffer, bool]:
    """Drain `chunks` (an iterator of bytes) into an OutputBuffer on a thread; if it is not exhausted
    within `timeout` seconds call kill() (which must end the stream) and report a timeout."""
    out = OutputBuffer(cap)
    done = threading.Event()

    def drain():
        try:
            for chunk in chunks:
                out.add(chunk)
        finally:
            done.set()

    threading.Thread(target=drain, daemon=True).start()
    if done.wait(timeout):
        return out, False
    kill()
    if not done.wait(30):
        raise RuntimeError("a timed-out command's output did not end after it was killed")
    return out, True


def diff_script(base_commit: str) -> str:
    """Shell that prints the repository's changes since base_commit (new untracked files included) as a
    patch, through a scratch index so that the repository's own index is left untouched."""
    excludes = " ".join(f"':(exclude,glob){pattern}'" for pattern in DIFF_EXCLUDES)
    base_commit = shlex.quote(base_commit)
    return (
        "set -e\n"
        'scratch="$(mktemp -d)"\n'
        # git's warnings must not end up in the patch: stderr is shown only when something fails.
        'trap \'status=$?; [ $status -eq 0 ] || cat "$scratch/err" >&3; rm -rf "$scratch"\' EXIT\n'
        'exec 3>&2 2>"$scratch/err"\n'
        'index="$(git rev-parse --git-path index)"\n'
        'export GIT_INDEX_FILE="$scratch/index"\n'
        f'cp "$index" "$GIT_INDEX_FILE" 2>/dev/null || git read-tree {base_commit}\n'
        f"git add -A -- . {excludes}\n"
        "git -c diff.noprefix=false -c diff.mnemonicPrefix=false -c core.quotePath=true "
        f"diff --cached --binary --no-color --no-ext-diff --no-renames {base_commit}\n"
    )


def git_diff(run, task) -> str:
    """The patch of the task's repository since its base commit, where `run(script, timeout, output_cap)`
    executes inside the environment (a repository's git config is model-writable: core.fsmonitor runs
    commands, so git never runs outside the sandbox)."""
    result = run(diff_script(task.base_commit), 300, None)
    if result.exit_code != 0:
        raise RuntimeError(f"{task.instance_id}: git diff failed (exit {result.exit_code}): "
                           f"{result.output[-2000:]}")
    return result.output


def open_environment(task, backend: str = "docker", **options) -> Environment:
    """A fresh environment for a task (rollout.tasks.Task): backend "docker" or "sandbox" (bubblewrap)."""
    if backend == "docker":
        pool = options.pop("pool", None)   # a HostPool (rollout/envs/hosts.py): placed on its hosts
        if pool is not None:
            return pool.open(task, **options)
        from protege.rollout.envs.docker import DockerEnvironment
        return DockerEnvironment(task, **options)
    options.pop("pool", None)
    if backend == "sandbox":
        from protege.rollout.envs.sandbox import SandboxEnvironment
        return SandboxEnvironment(task, **options)
    raise ValueError(f"unknown environment backend {backend!r} (docker, sandbox)")
