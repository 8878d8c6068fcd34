"""Diff-aware patch similarity for R_sim: compares what two patches change, not how the diffs look."""
from __future__ import annotations

from collections import Counter

from protege.rewards.patches import parse_patch


def changed_lines(patch: str) -> Counter:
    """Multiset of (file, sign, line with whitespace collapsed) over the patch's added/removed lines.

    Whitespace-only changes are ignored: a line removed and re-added with only its whitespace changed cancels
    out, as do blank lines. Read leniently (a cut-short patch counts what is there)."""
    lines: Counter = Counter()
    for f in parse_patch(patch, strict=False):
        for h in f.hunks:
            for line in h.body:
                text = " ".join(line[1:].split())
                if line[0] in "+-" and text:
                    lines[(f.path, line[:1], text)] += 1
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
