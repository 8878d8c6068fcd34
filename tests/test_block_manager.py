"""The C++ KV block manager: allocation, ref counts, prefix cache, LRU reuse, fork / copy-on-write, versions."""
import numpy as np
import pytest

from protege.engine._C import BlockManager

BS = 4


def test_allocate_and_free_return_blocks():
    bm = BlockManager(8, BS)
    assert bm.allocate(0, list(range(10))) == 0  # nothing cached yet
    assert len(bm.block_table(0)) == 3 and bm.num_free_blocks == 5
    assert all(bm.ref_count(b) == 1 for b in bm.block_table(0))
    bm.free(0)
    assert bm.num_free_blocks == 8 and not bm.has_sequence(0)


def test_allocate_fails_without_changes_when_pool_is_short():
    bm = BlockManager(3, BS)
    bm.allocate(0, list(range(8)))
    assert bm.allocate(1, list(range(100, 108))) == -1
    assert not bm.has_sequence(1) and bm.num_free_blocks == 1


def test_blocks_to_allocate_counts_only_blocks_taken_from_the_free_pool():
    bm = BlockManager(8, BS)
    prompt = list(range(10))
    assert bm.blocks_to_allocate(prompt) == 3
    bm.allocate(0, prompt)
    bm.commit(0, 10)
    assert bm.blocks_to_allocate(prompt) == 1  # two full blocks shared in use, a fresh partial one
    bm.free(0)
    assert bm.blocks_to_allocate(prompt) == 3  # cached but free: reviving them takes them off the free list
    assert bm.num_free_blocks == 8


def test_prefix_hit_after_commit_shares_blocks_and_counts_refs():
    bm = BlockManager(8, BS)
    prompt = list(range(10))
    bm.allocate(0, prompt)
    bm.commit(0, 10)  # two full blocks computed
    assert bm.allocate(1, prompt[:8] + [99, 98, 97]) == 8
    t0, t1 = bm.block_table(0), bm.block_table(1)
    assert t1[:2] == t0[:2] and t1[2] != t0[2]
    assert [bm.ref_count(b) for b in t0[:2]] == [2, 2]


def test_chained_hash_needs_the_whole_prefix():
    bm = BlockManager(8, BS)
    bm.allocate(0, [1, 2, 3, 4, 5, 6, 7, 8])
    bm.commit(0, 8)
    # Same second block after a different first block: no hit (its KV depends on the prefix).
    assert bm.allocate(1, [9, 9, 9, 9, 5, 6, 7, 8]) == 0
    assert set(bm.block_table(1)).isdisjoint(bm.block_table(0))


def test_pending_blocks_are_shared_and_computed_by_their_owner_only():
    bm = BlockManager(8, BS)
    prompt = list(range(9))
    assert bm.allocate(0, prompt) == 0
    assert bm.allocate(1, prompt) == 0  # registered at allocation, not computed yet
    assert bm.block_table(1)[:2] == bm.block_table(0)[:2]
    assert bm.computable_until(0, 0) == 9
    assert bm.computable_until(1, 0) == 0  # sequence 0 computes the shared blocks
    bm.commit(0, 9)
    assert bm.ready_until(1, 0) == 8 and bm.computable_until(1, 8) == 9


def test_orphaned_pending_block_is_claimed():
    bm = BlockManager(8, BS)
    prompt = list(range(8))
    bm.allocate(0, prompt)
    bm.allocate(1, prompt)
    bm.free(0)  # the owner left before computing
    assert bm.computable_until(1, 0) == 8
    assert bm.ready_until(1, 0) == 0


def test_abandoned_pending_blocks_are_not_cached():
    bm = BlockManager(4, BS)
    bm.allocate(0, list(range(8)))
    bm.free(0)
    assert bm.num_cached_free_blocks == 0
    assert bm.allocate(1, list(range(8))) == 0


def test_lru_evicts_least_recently_freed_cached_block():
    bm = BlockManager(3, BS)
    for seq, first in ((0, 0), (1, 100), (2, 200)):
        bm.allocate(seq, list(range(first, first + 4)))
        bm.commit(seq, 4)
        bm.free(seq)
    assert bm.num_cached_free_blocks == 3 and bm.num_free_blocks == 3
    assert bm.allocate(3, list(range(300, 304))) == 0  # evicts the block of sequence 0, freed first
    assert bm.allocate(4, list(range(100, 104))) == 4  # still cached (the caller recomputes the last token)
    assert bm.allocate(5, list(range(0, 4))) == 0      # evicted; takes the last cached free block
    assert bm.allocate(6, list(range(200, 204))) == -1


def test_hit_on_cached_free_block_revives_it():
    bm = BlockManager(2, BS)
    bm.allocate(0, list(range(4)))
    bm.commit(0, 4)
    block = bm.block_table(0)[0]
    bm.free(0)
    assert bm.allocate(1, list(range(4)) + [7]) == 4
    assert bm.block_table(1)[0] == block and bm.ref_count(block) == 1 and bm.num_cached_free_blocks == 0


def test_fork_shares_blocks_and_copies_partial_block_on_write():
    bm = BlockManager(8, BS)
    bm.allocate(0, list(range(6)))  # one full block, one partial
    bm.commit(0, 6)
    bm.fork(0, 1)
    table = bm.block_table(0)
    assert bm.block_table(1) == table and all(bm.ref_count(b) == 2 for b in table)
    bm.append_tokens(1, [42])
    copies = bm.prepare_write(1, 6, 7)  # the child writes into the shared partial block
    assert copies == [(table[1], bm.block_table(1)[1])] and bm.block_table(1)[1] != table[1]
    assert bm.ref_count(table[1]) == 1 and bm.block_table(1)[0] == table[0]
    bm.append_tokens(0, [43])
    assert bm.prepare_write(0, 6, 7) == []  # now the parent's own


def test_prepare_write_grows_and_reports_shortage_without_changes():
    bm = BlockManager(2, BS)
    bm.allocate(0, list(range(4)))
    bm.append_tokens(0, [1, 2, 3, 4, 5])
    assert bm.prepare_write(0, 4, 9) is None
    assert len(bm.block_table(0)) == 1 and bm.num_free_blocks == 1
    assert bm.prepare_write(0, 4, 8) == [] and len(bm.block_table(0)) == 2


def test_decoded_blocks_are_cached_on_commit():
    bm = BlockManager(8, BS)
    bm.allocate(0, [1, 2, 3])
    bm.append_tokens(0, [4, 5, 6])
    bm.prepare_write(0, 3, 6)
    bm.commit(0, 6)
    bm.free(0)
    assert bm.allocate(1, [1, 2, 3, 4, 5, 6, 7]) == 4


def test_version_bump_drops_prefix_cache():
    bm = BlockManager(4, BS)
    bm.allocate(0, list(range(8)))
    bm.commit(0, 8)
    with pytest.raises(RuntimeError, match="live sequences"):
        bm.bump_version()
    bm.free(0)
    assert bm.num_cached_free_blocks == 2
    assert bm.bump_version() == 1 and bm.version == 1
    assert bm.num_cached_free_blocks == 0 and bm.num_free_blocks == 4
    assert bm.allocate(1, list(range(8))) == 0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, BS)
    bm = BlockManager(4, BS)
    with pytest.raises(IndexError, match="unknown sequence 7"):
        bm.free(7)
    bm.allocate(0, [1])
    with pytest.raises(ValueError, match="already allocated"):
        bm.allocate(0, [1])
    with pytest.raises(ValueError, match="no tokens"):
        bm.allocate(1, [])
    with pytest.raises(ValueError, match="outside sequence 0"):
        bm.prepare_write(0, 0, 5)
    with pytest.raises(ValueError, match="num_blocks must be positive, got -1"):
        BlockManager(-1, BS)
    with pytest.raises(IndexError, match="unknown sequence 7"):
        bm.block_table(7)
    with pytest.raises(IndexError, match="unknown sequence 7"):
        bm.ready_until(7, 0)


def test_positions_outside_the_sequence_or_its_blocks_are_refused():
    """A commit past the blocks the sequence holds (tokens appended, no prepare_write yet) or a negative
    position would index past the block table: refused, nothing changed."""
    bm = BlockManager(4, BS)
    bm.allocate(0, [1, 2, 3])
    bm.append_tokens(0, list(range(4, 14)))
    with pytest.raises(ValueError, match="commit of 12 tokens outside sequence 0 .13 tokens, 4 covered"):
        bm.commit(0, 12)
    with pytest.raises(ValueError, match="commit of -1 tokens"):
        bm.commit(0, -1)
    for method in (bm.computable_until, bm.ready_until):
        with pytest.raises(ValueError, match="position -5 outside sequence 0 of 13 tokens"):
            method(0, -5)
        with pytest.raises(ValueError, match="position 14 outside sequence 0"):
            method(0, 14)
    assert bm.block_table(0) == [bm.block_table(0)[0]] and bm.num_free_blocks == 3
    bm.prepare_write(0, 3, 12)
    bm.commit(0, 12)  # now covered
    assert bm.num_free_blocks == 1


class _Seq:
    def __init__(self, tokens, computed):
        self.tokens, self.computed = list(tokens), computed


def _compute(bm, seqs, kv, sid, block_size):
    """Play the scheduler and the model for one sequence: compute what it may, writing into `kv` (block ->
    offset -> the token prefix that KV slot encodes), performing the block copies asked for first."""
    s = seqs[sid]
    s.computed = max(s.computed, bm.ready_until(sid, s.computed))
    stop = bm.computable_until(sid, s.computed)
    if stop <= s.computed:
        return
    copies = bm.prepare_write(sid, s.computed, stop)
    if copies is None:
        return
    for src, dst in copies:
        kv[dst] = dict(kv.get(src, {}))
    table = bm.block_table(sid)
    for p in range(s.computed, stop):
        kv.setdefault(table[p // block_size], {})[p % block_size] = tuple(s.tokens[:p + 1])
    bm.commit(sid, stop)
    s.computed = stop


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_never_serves_wrong_kv(seed):
    """Random allocations over a tiny alphabet (many prefix hits), decoding, forks and frees on a tiny pool
    (evictions): every computed position of every live sequence must hold the KV of exactly its own prefix,
    and ref counts must equal the number of tables holding a block."""
    import random
    rng = random.Random(seed)
    block_size, num_blocks = 4, 12
    bm = BlockManager(num_blocks, block_size)
    seqs, kv, history, next_id = {}, {}, [[]], 0
    for _ in range(400):
        op = rng.choice(["new", "new", "compute", "compute", "compute", "append", "fork", "free"])
        live = sorted(seqs)
        if op == "new":
            base = rng.choice(history)
            tokens = base[:rng.randint(0, len(base))] + [rng.randint(0, 2) for _ in range(rng.randint(1, 10))]
            ready = bm.allocate(next_id, tokens)
            if ready >= 0:
                seqs[next_id] = _Seq(tokens, ready)
                history.append(tokens)
                next_id += 1
        elif op == "compute" and live:
            _compute(bm, seqs, kv, rng.choice(live), block_size)
        elif op == "append" and live:
            sid = rng.choice(live)
            if seqs[sid].computed == len(seqs[sid].tokens) and len(seqs[sid].tokens) < 30:
                new = [rng.randint(0, 2) for _ in range(rng.randint(1, 3))]
                seqs[sid].tokens += new
                bm.append_tokens(sid, new)
        elif op == "fork" and live:
            sid = rng.choice(live)
            bm.fork(sid, next_id)
            seqs[next_id] = _Seq(seqs[sid].tokens, seqs[sid].computed)
            next_id += 1
        elif op == "free" and live:
            sid = rng.choice(live)
            history.append(seqs.pop(sid).tokens)
            bm.free(sid)

        holders = {}
        for sid, s in seqs.items():
            table = bm.block_table(sid)
            assert len(table) * block_size >= s.computed
            for b in table:
                holders[b] = holders.get(b, 0) + 1
            for p in range(s.computed):
                assert kv[table[p // block_size]][p % block_size] == tuple(s.tokens[:p + 1]), (sid, p)
        assert all(bm.ref_count(b) == holders.get(b, 0) for b in range(num_blocks))
        assert bm.num_blocks_in_use == len(holders)


def unpack(out, n_tokens, n_seqs, n_samples, n_copies, n_changes):
    """pack_step's layout, part by part."""
    sizes = [n_tokens] * 3 + [n_seqs + 1, n_seqs, n_seqs, n_samples, n_copies, n_copies, 3 * n_changes]
    parts, at = [], 0
    for n in sizes:
        parts.append(out[at:at + n].tolist())
        at += n
    return parts


def test_pack_step_writes_a_step_and_the_table_entries_the_device_lacks():
    bm = BlockManager(16, BS)
    tokens = list(range(10, 20))
    bm.allocate(0, tokens)
    bm.prepare_write(0, 0, 10)
    table = bm.block_table(0)
    out = np.full(64, -7, dtype=np.int64)
    # One chunk: tokens [0, 10) of sequence 0, cached up to 4, device row 5, sampled by 2 (a fork), a copy.
    size, n_samples, n_changes, width = bm.pack_step([0], [0], [10], [4], [5], [2], [(1, 2)], out)
    assert (size, n_samples, n_changes, width) == (30 + 4 + 2 + 2 + 9, 2, 3, 3)
    ids, positions, slots, cu, contexts, rows, last, src, dst, changes = unpack(out, 10, 1, 2, 1, 3)
    assert ids == tokens and positions == list(range(10)) and cu == [0, 10] and contexts == [10] and rows == [5]
    assert slots == [-1] * 4 + [table[p // BS] * BS + p % BS for p in range(4, 10)]
    assert last == [9, 9] and (src, dst) == ([1], [2])
    assert changes == [5, 0, table[0], 5, 1, table[1], 5, 2, table[2]]   # a new row: its whole table
    assert (out[size:] == -7).all()
    # The next token fits the last block: the device row lacks nothing.
    bm.append_tokens(0, [20])
    bm.prepare_write(0, 10, 11)
    assert bm.pack_step([0], [10], [11], [10], [5], [1], [], out)[2] == 0
    assert unpack(out, 1, 1, 1, 0, 0)[2] == [table[2] * BS + 2]
    # Two more: a new block, the only entry uploaded; a buffer too short is refused, nothing changed.
    bm.append_tokens(0, [21, 22])
    bm.prepare_write(0, 11, 13)
    assert bm.pack_step([0], [11], [13], [11], [5], [1], [], np.zeros(8, dtype=np.int64)) == (-14, 0, 0, 0)
    size, n_samples, n_changes, width = bm.pack_step([0], [11], [13], [11], [5], [1], [], out)
    assert (n_changes, width) == (1, 4) and unpack(out, 2, 1, 1, 0, 1)[-1] == [5, 3, bm.block_table(0)[3]]
    # A fork has a device row of its own: its first pack uploads its whole table.
    bm.fork(0, 1)
    assert bm.pack_step([1], [12], [13], [12], [6], [1], [], out)[2] == 4
    with pytest.raises(ValueError, match="out must be a writable contiguous 1-D int64 array"):
        bm.pack_step([0], [12], [13], [12], [5], [1], [], np.zeros(64, dtype=np.int32))
    with pytest.raises(ValueError, match=r"chunk \[12, 14\) writing from 12 is outside sequence 0 \(13 tokens"):
        bm.pack_step([0], [12], [14], [12], [5], [1], [], out)


def test_plan_chunks_skips_cached_prefixes_waits_for_pending_blocks_and_reports_shortage():
    bm = BlockManager(6, BS)
    prompt = list(range(9))
    bm.allocate(0, prompt)
    bm.allocate(1, prompt)   # shares sequence 0's two pending full blocks
    # Sequence 0 computes its prompt under a 6-token budget; sequence 1 waits for 0's pending blocks.
    indices, starts, stops, write_froms, skipped, copies, cached, failed = bm.plan_chunks([0, 1], [0, 0], 6)
    assert (indices, starts, stops, write_froms, skipped, copies, cached, failed) == \
        ([0], [0], [6], [0], [], [], 0, -1)
    bm.commit(0, 8)
    # Sequence 1 skips the ready prefix (8 tokens) and computes its last token only.
    indices, starts, stops, write_froms, skipped, copies, cached, failed = bm.plan_chunks([1], [0], 16)
    assert (indices, starts, stops, write_froms, skipped, cached, failed) == ([0], [8], [9], [8], [0, 8], 8, -1)
    # Out of blocks: the chunk that does not fit is planned, not prepared, and reported.
    bm.allocate(2, list(range(100, 104)))
    bm.commit(1, 9)
    bm.append_tokens(2, [1, 2, 3, 4, 5])
    indices, starts, stops, write_froms, skipped, copies, cached, failed = bm.plan_chunks([2], [0], 16)
    assert failed == 0 and (starts, stops) == ([0], [9]) and bm.num_free_blocks == 1   # needs 2: none taken
