"""Pack variable-length sequences into micro-batches under a token budget (C++ best-fit decreasing)."""
from __future__ import annotations

from dataclasses import dataclass

from protege.engine import _C


@dataclass(frozen=True)
class Packing:
    bins: list[list[int]]  # indices into the input lengths, one list per micro-batch
    tokens: int            # sum of all lengths
    budget: int            # tokens per bin

    @property
    def padding_waste(self) -> float:
        """Share of the bins' token capacity left empty (0 = perfect packing)."""
        capacity = len(self.bins) * self.budget
        return 0.0 if capacity == 0 else 1.0 - self.tokens / capacity


def pack(lengths: list[int], budget: int) -> Packing:
    """Assign sequences to as few bins of `budget` tokens as best-fit decreasing finds."""
    lengths = [int(n) for n in lengths]
    return Packing(bins=_C.pack_sequences(lengths, int(budget)), tokens=sum(lengths), budget=int(budget))
