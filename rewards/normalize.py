"""Normalised actions and their streaks (method.md, R_loop).

A bash command normalises to its *base*: leading VAR=value assignments dropped; of a chain joined by
&& or ; (or newlines) the last command; of a pipeline the first command; the first word, except two-word
bases (git <sub>, pip install, python -m X). Navigation (grep, find, ls-like listing, file viewing and the
editor's view) is one class. Splitting is quote-, escape- and parenthesis-aware; a command that cannot be
parsed is its own class (keyed by its text), never an exception."""
from __future__ import annotations

import os
import re
import shlex

NAVIGATION = "<navigation>"
NAVIGATION_COMMANDS = frozenset({
    "grep", "egrep", "fgrep", "rg", "ag", "ack", "find", "fd", "locate", "ls", "ll", "la", "tree", "dir",
    "pwd", "cd", "cat", "head", "tail", "less", "more", "nl",
})
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PYTHON = re.compile(r"^python(\d+(\.\d+)*)?$")
_PIP = re.compile(r"^pip(\d+(\.\d+)*)?$")


class _Unparsable(ValueError):
    pass


def _split_top_level(command: str, separators: tuple[str, ...]) -> list[str]:
    """Split on separators that stand outside quotes, escapes and (...) / $(...) groups."""
    parts, current, i, depth, quote = [], [], 0, 0, None
    while i < len(command):
        c = command[i]
        if quote:
            if c == "\\" and quote == '"' and i + 1 < len(command):
                current.append(command[i:i + 2])
                i += 2
                continue
            if c == quote:
                quote = None
            current.append(c)
            i += 1
            continue
        if c == "\\" and i + 1 < len(command):
            current.append(command[i:i + 2])
            i += 2
            continue
        if c in "'\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth = max(0, depth - 1)
        elif depth == 0:
            sep = next((s for s in separators if command.startswith(s, i)), None)
            # A lone "|" or "&" must not eat half of "||" / "&&".
            if sep in ("|", "&") and command.startswith(sep * 2, i):
                sep = None
            if sep is not None:
                parts.append("".join(current))
                current = []
                i += len(sep)
                continue
        current.append(c)
        i += 1
    if quote:
        raise _Unparsable(f"unclosed {quote} quote")
    parts.append("".join(current))
    return parts


def _base(words: list[str]) -> str:
    while words and _ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return "<assignment>"
    head = os.path.basename(words[0])
    rest = words[1:]
    if head in NAVIGATION_COMMANDS:
        return NAVIGATION
    if head == "git":
        while rest and rest[0].startswith("-"):  # global options; -C and -c take a value
            rest = rest[2:] if rest[0] in ("-C", "-c") else rest[1:]
        return f"git {rest[0]}" if rest else "git"
    if _PYTHON.match(head):
        if len(rest) >= 2 and rest[0] == "-m":
            return f"python -m {rest[1]}"
        return "python"
    if _PIP.match(head) and rest and not rest[0].startswith("-"):
        return f"pip {rest[0]}"
    return head


def normalize_command(command: str) -> str:
    """The class of a bash command for loop detection (see the module docstring)."""
    text = command.strip()
    if not text:
        return "<empty>"
    try:
        chain = [c for c in _split_top_level(text, ("&&", ";", "\n")) if c.strip()]
        if not chain:
            return "<empty>"
        first_of_pipeline = _split_top_level(chain[-1], ("|",))[0].strip()
        if first_of_pipeline.startswith("(") and first_of_pipeline.endswith(")"):  # a subshell
            return normalize_command(first_of_pipeline[1:-1])
        words = shlex.split(first_of_pipeline)
    except ValueError:  # unclosed quotes, dangling escapes: shlex and our splitter both raise ValueError
        return f"<unparsable> {text}"
    return _base(words)


def normalize_action(tool: str, arguments: dict) -> str:
    """The class of any agent action: bash commands as above, editor edits by operation and file."""
    if tool == "bash":
        return normalize_command(str(arguments.get("command", "")))
    if tool in ("str_replace_editor", "editor", "file_editor"):
        operation = str(arguments.get("command") or arguments.get("operation") or "")
        if operation == "view":
            return NAVIGATION
        return f"edit {operation} {arguments.get('path', '')}"
    return tool


def streaks(commands: list[str]) -> list[int]:
    """Lengths, in order, of the maximal runs of identical normalised commands."""
    return run_lengths([normalize_command(c) for c in commands])


def run_lengths(classes: list[str]) -> list[int]:
    runs: list[int] = []
    previous = object()
    for c in classes:
        if c == previous:
            runs[-1] += 1
        else:
            runs.append(1)
            previous = c
    return runs
