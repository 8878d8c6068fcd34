"""Diff-aware patch similarity for R_sim: compares what two patches change, not how the diffs look."""
from __future__ import annotations

import re
from collections import Counter

_HUNK = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def changed_lines(patch: str) -> Counter:
    """Multiset of (file, sign, line with whitespace collapsed) over the patch's added/removed lines.

    Hunk bodies are read by their line counts, so a removed line that itself starts with "--" is not
    mistaken for a header; diff headers, index lines and hunk markers are ignored, and so are whitespace-only
    changes: a line removed and re-added with only its whitespace changed cancels out, as do blank lines."""
    lines: Counter = Counter()
    path, old_left, new_left = "", 0, 0
    for raw in patch.splitlines():
        if old_left > 0 or new_left > 0:  # inside a hunk
            sign, text = raw[:1], " ".join(raw[1:].split())
            if sign == "-":
                old_left -= 1
            elif sign == "+":
                new_left -= 1
            elif sign == "\\":  # "\ No newline at end of file"
                continue
            else:
                old_left, new_left = old_left - 1, new_left - 1
            if sign in "+-" and sign and text:
                lines[(path, sign, text)] += 1
            continue
        if raw.startswith("diff --git"):
            path = ""
        elif raw.startswith(("--- ", "+++ ")):
            name = raw[4:].split("\t")[0].strip()
            if name != "/dev/null":  # a created or deleted file keeps the name from its other side
                path = name[2:] if name[:2] in ("a/", "b/") else name
        elif match := _HUNK.match(raw):
            old_left = int(match.group(1) or 1)
            new_left = int(match.group(2) or 1)
    for (file, sign, text), count in list(lines.items()):
        if sign == "-":
            paired = min(count, lines[(file, "+", text)])
            lines[(file, "-", text)] -= paired
            lines[(file, "+", text)] -= paired
    return +lines  # drops zero counts


def patch_similarity(patch: str, reference: str) -> float:
    """Dice coefficient of the two multisets of changed lines, in [0, 1]; 1.0 when both change nothing."""
    a, b = changed_lines(patch), changed_lines(reference)
    total = sum(a.values()) + sum(b.values())
    if total == 0:
        return 1.0
    return 2.0 * sum((a & b).values()) / total
