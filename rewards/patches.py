"""The one unified-diff parser (git or plain format), and what is built on it: the files a patch touches,
its hunks, and the patch that undoes it. Pure text; rewards (similarity) and rollout (tasks, experts) use it."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_HUNK_HEADER = re.compile(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@(.*)")


@dataclass
class Hunk:
    path: str                  # the file, relative to the repository root
    old_start: int             # first line of the hunk in the current file (0: the file is new)
    old_count: int
    new_start: int
    new_count: int
    header: str                # the @@ line as written
    lines: list[str]           # " context", "-removed", "+added" and "\ No newline at end of file" markers

    @property
    def context(self) -> str:
        """The enclosing definition git prints after the closing @@ (may be empty)."""
        return self.header.split("@@", 2)[2].strip()

    @property
    def body(self) -> list[str]:
        return [line for line in self.lines if line[:1] != "\\"]

    @property
    def first_changed_line(self) -> int:
        """Line number, in the current file, where the hunk's first change is."""
        body = self.body
        return self.old_start + next((i for i, line in enumerate(body) if line[:1] != " "), len(body))

    @property
    def removed(self) -> list[str]:
        return [line[1:] for line in self.body if line[:1] == "-"]

    @property
    def added(self) -> list[str]:
        return [line[1:] for line in self.body if line[:1] == "+"]

    @property
    def old_text(self) -> str:
        return "\n".join(line[1:] for line in self.body if line[:1] in (" ", "-"))

    @property
    def new_text(self) -> str:
        return "\n".join(line[1:] for line in self.body if line[:1] in (" ", "+"))


@dataclass
class FilePatch:
    path: str                                         # new side; the old side for a deleted file
    header: list[str] = field(default_factory=list)   # the lines before the first hunk, as written
    hunks: list[Hunk] = field(default_factory=list)
    trailer: list[str] = field(default_factory=list)  # other lines after the hunks, as written
    old_path: str | None = None                       # None: /dev/null (a new file)

    @property
    def is_new(self) -> bool:
        return self.old_path is None or any(line.startswith("new file mode") for line in self.header)


def parse_patch(patch: str, strict: bool = True) -> list[FilePatch]:
    return [f for f in _parse(patch, strict) if f.path]


def _parse(patch: str, strict: bool) -> list[FilePatch]:
    """The files of a unified diff, each with its header lines and hunks. Hunk bodies are read by the line
    counts in their headers, so a removed "--- x" or added "+++ x" line is never taken for a file header.
    strict: ValueError on a malformed or cut-short patch; otherwise read what is there (odd lines inside a
    hunk count as context)."""
    files: list[FilePatch] = []
    current: FilePatch | None = None
    old_left = new_left = 0

    def start_file() -> FilePatch:
        files.append(FilePatch(path=""))
        return files[-1]

    for line in patch.splitlines():
        if old_left > 0 or new_left > 0:
            tag = line[:1] or " "   # some tools strip the space of an empty context line
            if tag == "\\":       # "\ No newline at end of file"
                current.hunks[-1].lines.append(line)
                continue
            if tag not in " -+":
                if strict:
                    raise ValueError(f"hunk ends early: {current.path} at {line!r}")
                tag = " "
            current.hunks[-1].lines.append(tag + line[1:])
            old_left -= tag in " -"
            new_left -= tag in " +"
        elif line.startswith("\\") and current is not None and current.hunks:
            current.hunks[-1].lines.append(line)   # the marker after a hunk's last line
        elif line.startswith("@@"):
            match = _HUNK_HEADER.match(line)
            if match is None or current is None or not current.path:
                if strict:
                    raise ValueError(f"malformed hunk header {line!r}")
                continue
            old_left, new_left = int(match.group(2) or 1), int(match.group(4) or 1)
            current.hunks.append(Hunk(current.path, int(match.group(1)), old_left, int(match.group(3)), new_left,
                                      line, []))
        else:
            # A header line: "diff --git" starts a file; so does "---" after a file's hunks (plain format).
            if current is None or line.startswith("diff --git ") or (line.startswith("--- ") and current.hunks):
                current = start_file()
            elif current.hunks:
                current.trailer.append(line)
                continue
            current.header.append(line)
            if line.startswith("diff --git ") and " b/" in line:
                current.path = line.split(" b/", 1)[1]
                current.old_path = line[len("diff --git "):].split(" b/", 1)[0].removeprefix("a/")
            elif line.startswith("--- "):
                name = line[4:].split("\t")[0].strip()
                current.old_path = None if name == "/dev/null" else name.removeprefix("a/")
            elif line.startswith("+++ "):   # a deleted file's +++ is /dev/null: name it by its old path
                name = line[4:].split("\t")[0].strip()
                current.path = current.old_path if name == "/dev/null" else name.removeprefix("b/")
    if strict and (old_left > 0 or new_left > 0):
        raise ValueError(f"hunk ends early: the last hunk of {current.path} is cut short")
    return files


def hunks(patch: str) -> list[Hunk]:
    return [h for f in parse_patch(patch) for h in f.hunks]


def patch_files(patch: str) -> list[str]:
    """Paths a patch touches (new side; old side for deletions), in order, once each."""
    return list(dict.fromkeys(f.path for f in parse_patch(patch)))


def new_files(patch: str) -> set[str]:
    return {f.path for f in parse_patch(patch) if f.is_new}


_SWAP_HEADER = {"old mode ": "new mode ", "new mode ": "old mode ", "deleted file mode ": "new file mode ",
                "new file mode ": "deleted file mode ", "rename from ": "rename to ", "rename to ": "rename from "}


def reverse_patch(patch: str) -> str:
    """The patch that undoes `patch` (like `git apply -R`), for text patches in git or plain unified format.
    Within each block of changed lines the removals are written before the additions, as git writes them."""
    out: list[str] = []
    for f in _parse(patch, strict=True):
        out += _reverse_header(f.header)
        for h in f.hunks:
            out.append(re.sub(r"^@@ -(\S+) \+(\S+) @@", r"@@ -\2 +\1 @@", h.header))
            removed: list[str] = []   # the original additions, each with its "\ No newline" marker
            added: list[str] = []
            last: list[str] = out
            for line in h.lines:
                if line[:1] == "\\":
                    last.append(line)
                    continue
                if line[:1] == " ":
                    out += removed + added
                    removed, added, last = [], [], out
                    out.append(line)
                else:
                    last = added if line[:1] == "-" else removed
                    last.append(("+" if line[:1] == "-" else "-") + line[1:])
            out += removed + added
        out += f.trailer
    return "".join(line + "\n" for line in out)


def _reverse_header(lines: list[str]) -> list[str]:
    out = [_reverse_header_line(line) for line in lines]
    for i in range(len(lines) - 1):   # "--- old" / "+++ new" become "--- new" / "+++ old", in that order
        if lines[i].startswith("--- ") and lines[i + 1].startswith("+++ "):
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _reverse_header_line(line: str) -> str:
    if line.startswith("diff --git "):
        a, b = line[len("diff --git a/"):].split(" b/", 1)
        return f"diff --git a/{b} b/{a}"
    if line.startswith(("GIT binary patch", "Binary files ", "copy ")):
        raise ValueError("cannot reverse binary or copy patches")
    if line.startswith("index "):
        ids, *mode = line[len("index "):].split(" ", 1)
        old, new = ids.split("..")
        return f"index {new}..{old}" + (" " + mode[0] if mode else "")
    if line.startswith("--- "):
        return "+++ " + _swap_prefix(line[4:])
    if line.startswith("+++ "):
        return "--- " + _swap_prefix(line[4:])
    prefix = next((p for p in _SWAP_HEADER if line.startswith(p)), None)
    return _SWAP_HEADER[prefix] + line[len(prefix):] if prefix else line


def _swap_prefix(path: str) -> str:
    if path.startswith("a/"):
        return "b/" + path[2:]
    if path.startswith("b/"):
        return "a/" + path[2:]
    return path
