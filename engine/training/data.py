"""SFT data: JSONL files -> (token ids, loss mask) samples -> per-rank packed micro-batches.

A line is either a trajectory record (rollout.agent.trajectory.Trajectory: token ids and loss masks used
verbatim) or a chat sample {"messages": [...], "tools": [...]} rendered with engine.chat. Malformed
lines are reported with file:line and either stop the run or are skipped and counted. The order of samples
is a seeded permutation per epoch; a global batch is the next `global_batch_size` positions of it, so the
data position of a run is one integer and a resumed run continues exactly where it stopped."""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from protege.engine.chat import render
from protege.engine.training.packing import pack
from protege.engine.tokenizer import Tokenizer
from protege.rollout.agent.trajectory import Trajectory


class DataError(ValueError):
    pass


@dataclass
class Sample:
    ids: list[int]
    mask: list[int]    # 1 on tokens the policy produced (trained on)
    where: str         # file:line


@dataclass
class MicroBatch:
    """Packed sequences: the model's input, the next-token targets and per-token loss weights."""
    input_ids: torch.Tensor   # [T] int64
    cu_seqlens: torch.Tensor  # [B + 1] int32
    targets: torch.Tensor     # [T] int64 (the next token within each sequence; 0 where none)
    weights: torch.Tensor     # [T] float32: 1 where the target is a trained token, else 0
    seqlens: list[int]


class SFTDataset:
    def __init__(self, files: list[str], tokenizer: Tokenizer, max_seq_len: int, long_policy: str = "truncate",
                 bad_line_policy: str = "error", vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.long_policy = long_policy
        self.vocab_size = vocab_size
        self.counts: Counter = Counter()  # skipped_bad_lines, truncated, dropped_long, no_trainable_tokens
        self.lines: list[tuple[Path, int, int]] = []  # (file, 1-based line, byte offset)
        for name in files:
            self._index(Path(name), bad_line_policy)
        if not self.lines:
            raise DataError(f"no usable samples in {files}")

    def _index(self, path: Path, bad_line_policy: str) -> None:
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        with path.open("rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                problem = _check_line(raw)
                if problem is None:
                    self.lines.append((path, lineno, start))
                elif bad_line_policy == "skip":
                    self.counts["skipped_bad_lines"] += 1
                else:
                    raise DataError(f"{path}:{lineno}: {problem} (set data.bad_line_policy=\"skip\" to skip "
                                    f"such lines)")

    def __len__(self) -> int:
        return len(self.lines)

    def sample(self, index: int) -> Sample | None:
        """The sample at `index`, or None when the configured policy drops it (counted)."""
        path, lineno, offset = self.lines[index]
        where = f"{path}:{lineno}"
        with path.open("rb") as f:
            f.seek(offset)
            record = json.loads(f.readline())
        if "schema_version" in record:  # a trajectory record
            try:
                trajectory = Trajectory.from_dict(record, where)
            except ValueError as e:   # names file:line and the field
                raise DataError(str(e)) from None
            ids, mask = trajectory.input_ids(), trajectory.loss_mask()
        else:
            try:
                ids, mask = render(self.tokenizer, record["messages"], record.get("tools"))
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{where}: {e}") from None
        # Recorded ids and masks are used verbatim: a float id would be truncated by torch.tensor and a mask
        # of 2 would double a token's loss, silently. bool is an int subclass: refuse it too.
        bad_id = next((t for t in ids if type(t) is not int or t < 0), None)
        if bad_id is not None:
            raise DataError(f"{where}: token id {bad_id!r} is not a non-negative integer")
        bad_mask = next((x for x in mask if type(x) is not int or x not in (0, 1)), None)
        if bad_mask is not None:
            raise DataError(f"{where}: loss mask value {bad_mask!r} is not 0 or 1")
        if self.vocab_size is not None and ids and max(ids) >= self.vocab_size:
            raise DataError(f"{where}: token id {max(ids)} >= the model's vocab_size {self.vocab_size} "
                            f"(trajectory tokenised with another tokenizer?)")
        if len(ids) > self.max_seq_len:
            if self.long_policy == "drop":
                self.counts["dropped_long"] += 1
                return None
            self.counts["truncated"] += 1
            ids, mask = ids[:self.max_seq_len], mask[:self.max_seq_len]
        if sum(mask[1:]) == 0:  # the first token is never a target
            self.counts["no_trainable_tokens"] += 1
            return None
        return Sample(ids, mask, where)


def _check_line(raw: bytes) -> str | None:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"not valid JSON ({e})"
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "no 'messages' list"
    if "schema_version" in record:
        try:
            Trajectory.from_dict(record, where="trajectory")
        except ValueError as e:
            return str(e).removeprefix("trajectory: ")
    return None


class GlobalBatches:
    """Seeded per-epoch permutations of sample indices, consumed `batch_size` positions at a time."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, shuffle: bool = True):
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle

    def indices(self, position: int) -> list[int]:
        """Sample indices of the global batch that starts at `position` (counted over all epochs)."""
        out = []
        for p in range(position, position + self.batch_size):
            epoch, i = divmod(p, self.num_samples)
            out.append(self._order(epoch)[i])
        return out

    def _order(self, epoch: int) -> list[int]:
        if getattr(self, "_cached_epoch", None) != epoch:
            order = list(range(self.num_samples))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._cached_epoch, self._cached_order = epoch, order
        return self._cached_order


def make_micro_batch(samples: list[Sample]) -> MicroBatch:
    ids, targets, weights, lens = [], [], [], []
    for s in samples:
        ids += s.ids
        targets += s.ids[1:] + [0]
        weights += [float(m) for m in s.mask[1:]] + [0.0]
        lens.append(len(s.ids))
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
    return MicroBatch(torch.tensor(ids, dtype=torch.int64), cu, torch.tensor(targets, dtype=torch.int64),
                      torch.tensor(weights, dtype=torch.float32), lens)


def pack_micro_batches(samples: list[Sample], token_budget: int) -> tuple[list[MicroBatch], float]:
    """Best-fit-decreasing packing of samples into micro-batches; returns them and the padding waste."""
    if not samples:
        return [], 0.0
    packing = pack([len(s.ids) for s in samples], token_budget)
    return [make_micro_batch([samples[i] for i in b]) for b in packing.bins], packing.padding_waste
