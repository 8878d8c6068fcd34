"""Continuous batching: which tokens of which sequences go through the model in the next step.

A step fills a token budget: running sequences first (one decode token, or a prefill chunk), then waiting ones
in arrival order while blocks (beyond a 1% reserve) and slots last. Out of blocks, the newest running sequence
is preempted and later recomputed (its full blocks usually survive in the prefix cache).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from protege.rollout.sampler.sequence import Sequence, Status


@dataclass
class Schedule:
    """The step's chunks as parallel lists (the runner hands them to C++ as they are): sequence seqs[i] runs
    tokens [starts[i], stops[i]) through the model, writing their KV from write_froms[i] on (before it, it is
    already cached: recomputed for the logits); a chunk whose stop is the sequence's end samples its next
    token."""
    seqs: list[Sequence] = field(default_factory=list)
    seq_ids: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    stops: list[int] = field(default_factory=list)
    write_froms: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) block copies to do first

    def add(self, seqs, starts, stops, write_froms) -> None:
        self.seqs += seqs
        self.seq_ids += [s.seq_id for s in seqs]
        self.starts += starts
        self.stops += stops
        self.write_froms += write_froms

    @property
    def num_tokens(self) -> int:
        return sum(self.stops) - sum(self.starts)


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
        i = 0   # running sequences before i are planned; one C++ pass over the rest until one does not fit
        while i < len(self.running) and budget > 0:
            rest = self.running[i:]
            failed, planned = self._plan(rest, [s.num_computed for s in rest], budget, out)
            budget -= planned
            if failed < 0:
                break
            seq, start, stop, write_from = out.seqs[-1], out.starts[-1], out.stops[-1], out.write_froms[-1]
            copies = None
            while copies is None:  # out of blocks: preempt the newest sequence, possibly this one
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
                copies = self.block_manager.prepare_write(seq.seq_id, write_from, stop)
            if copies is None:  # it preempted itself (it was the last running one): drop its chunk
                for planned_list in (out.seqs, out.seq_ids, out.starts, out.stops, out.write_froms):
                    planned_list.pop()
                break
            out.copies.extend(copies)
            budget -= stop - start
            i += failed + 1

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
            # Its blocks were just allocated: fresh, cached or pending ones it owns; nothing to grow or copy.
            copies = len(out.copies)
            failed, planned = self._plan([seq], [0], budget, out)
            assert failed < 0 and len(out.copies) == copies, f"fresh sequence {seq.seq_id} needed block copies"
            budget -= planned
        return out

    def _plan(self, seqs: list[Sequence], num_computed: list[int], budget: int, out: Schedule) -> tuple[int, int]:
        """The next chunks of `seqs`, in order, into `out` (BlockManager.plan_chunks: cached KV is skipped but
        the last token always runs, for its logits; a sequence waiting for another to compute a shared block
        gets none; each write range is made private). -> (index of the first sequence whose blocks do not
        fit, its chunk being the last in `out` and not prepared, or -1; tokens of the prepared chunks)."""
        indices, starts, stops, write_froms, skipped, copies, cached, failed = \
            self.block_manager.plan_chunks([s.seq_id for s in seqs], num_computed, budget)
        self.cached_tokens += cached
        for k in range(0, len(skipped), 2):
            seqs[skipped[k]].num_computed = skipped[k + 1]
        out.add(seqs if len(indices) == len(seqs) else [seqs[k] for k in indices], starts, stops, write_froms)
        out.copies += copies
        planned = sum(stops) - sum(starts)
        if failed >= 0:
            planned -= stops[-1] - starts[-1]
        return failed, planned

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq.seq_id)
        self.on_free(seq)
        self.running.remove(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seqs: list[Sequence]) -> None:
        """Take finished sequences out of the batch and release their blocks (full ones stay cached); one pass
        over the batch for all of them (a step may finish every sequence)."""
        for seq in seqs:
            self.block_manager.free(seq.seq_id)
            self.on_free(seq)
            seq.status = Status.FINISHED
        if seqs:
            self.running[:] = [s for s in self.running if s.status is not Status.FINISHED]
