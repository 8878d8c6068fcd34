"""Continuous batching: which tokens of which sequences go through the model in the next step.

A step fills a token budget: running sequences first (one decode token, or a prefill chunk), then waiting ones
in arrival order while blocks (beyond a 1% reserve) and slots last. Out of blocks, the newest running sequence
is preempted and later recomputed (its full blocks usually survive in the prefix cache).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rollout.sampler.sequence import Sequence, Status


@dataclass
class Chunk:
    seq: Sequence
    start: int       # tokens [start, stop) of the sequence go through the model this step
    stop: int
    write_from: int  # their KV is written from here on; before it, it is already cached (recomputed for logits)

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the sequence: its last row gives the next token."""
        return self.stop == self.seq.num_tokens


@dataclass
class Schedule:
    chunks: list[Chunk] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) block copies to do first

    @property
    def num_tokens(self) -> int:
        return sum(c.stop - c.start for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs} and max_num_batched_tokens={max_num_batched_tokens} "
                             f"must be positive")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)  # as vLLM: 1% of the pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.cached_tokens = 0  # tokens whose KV was found in the cache instead of computed
        self.preemptions = 0
        self.on_free = lambda seq: None   # told when a sequence gives its blocks back (the runner's tables)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        out = Schedule()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            chunk = self._plan(seq, budget)
            if chunk is None:  # waiting for another sequence to compute a shared block
                i += 1
                continue
            copies = self.block_manager.prepare_write(seq.seq_id, chunk.write_from, chunk.stop)
            while copies is None:  # out of blocks: preempt the newest sequence, possibly this one
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
                copies = self.block_manager.prepare_write(seq.seq_id, chunk.write_from, chunk.stop)
            if copies is None:  # it preempted itself: it was the last running one
                break
            out.chunks.append(chunk)
            out.copies.extend(copies)
            budget -= chunk.stop - chunk.start
            i += 1

        while self.waiting and budget > 0 and \
                len(self.running) + 1 + self.waiting[0].forks_left <= self.max_num_seqs:
            seq = self.waiting[0]
            if self.running and self.block_manager.num_free_blocks - \
                    self.block_manager.blocks_to_allocate(seq.token_ids) < self.watermark_blocks:
                break  # keep a few blocks for the running sequences' growth, lest they preempt it next step
            if self.block_manager.allocate(seq.seq_id, seq.token_ids) < 0:
                if not self.running:
                    raise RuntimeError(f"sequence {seq.seq_id} of {seq.num_tokens} tokens does not fit in the "
                                       f"KV pool of {self.block_manager.num_blocks} blocks")
                break  # first come, first served: no later sequence jumps the queue
            self.waiting.popleft()
            seq.status, seq.num_computed = Status.RUNNING, 0
            self.running.append(seq)
            chunk = self._plan(seq, budget)
            if chunk is None:
                continue
            # Its blocks were just allocated: fresh, cached or pending ones it owns; nothing to grow or copy.
            copies = self.block_manager.prepare_write(seq.seq_id, chunk.write_from, chunk.stop)
            assert copies == [], f"fresh sequence {seq.seq_id} needed block copies {copies}"
            out.chunks.append(chunk)
            budget -= chunk.stop - chunk.start
        return out

    def _plan(self, seq: Sequence, budget: int) -> Chunk | None:
        """The next chunk of `seq` under the budget, or None while a shared block it needs is computed by
        another sequence. Cached KV is skipped, but the last token always runs (its row gives the logits)."""
        ready = self.block_manager.ready_until(seq.seq_id, seq.num_computed)
        if ready > seq.num_computed:
            skip_to = min(ready, seq.num_tokens - 1)
            self.cached_tokens += max(0, skip_to - seq.num_computed)
            seq.num_computed = max(seq.num_computed, skip_to)
        start = seq.num_computed
        limit = self.block_manager.computable_until(seq.seq_id, start)
        if limit <= start:
            return None
        stop = min(seq.num_tokens, limit, start + budget)
        return Chunk(seq, start, stop, write_from=max(start, min(ready, stop)))

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq.seq_id)
        self.on_free(seq)
        self.running.remove(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Take a finished sequence out of the batch and release its blocks (full ones stay cached)."""
        self.block_manager.free(seq.seq_id)
        self.on_free(seq)
        self.running.remove(seq)
        seq.status = Status.FINISHED
