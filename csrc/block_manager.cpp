// KV-cache block manager: hands out fixed-size blocks of the paged KV pool to sequences and keeps a prefix
// cache over full blocks.
//
// - A full block is identified by a chained hash (hash of the parent block's hash and the block's tokens);
//   a hit is confirmed by comparing the tokens, so a hash collision can never share wrong KV.
// - Full blocks of a new sequence are registered in the cache when they are allocated, before their KV is
//   computed ("pending"), so identical prompts admitted together share blocks and the KV is computed once:
//   the sequence that allocated a pending block owns its computation, the others wait for it (the scheduler
//   asks `computable_until`). A block becomes "ready" when its owner commits it.
// - Blocks whose reference count drops to zero keep their cached KV if ready and are reused least recently
//   freed first; a new allocation takes a never-cached block before evicting a cached one.
// - fork() shares all blocks of a sequence (n samples of one prompt); a write into a shared block copies it
//   first (copy-on-write), and the caller performs the returned (src, dst) copies on the KV pool.
// - bump_version() forgets every cached prefix (their KV was computed with older weights).
// - pack_step() writes a model step's inputs (token ids, positions, KV slots) and the block-table entries the
//   model runner's device copy lacks into one host buffer: the runner's per-step host work is one call.
#include <algorithm>
#include <cstdint>
#include <deque>
#include <list>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace {

constexpr uint64_t kNoHash = 0;  // hash value reserved for "not cached"

uint64_t mix(uint64_t h, uint64_t x) {
  // splitmix64 finaliser over the running state: cheap and well distributed.
  h ^= x + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ULL;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebULL;
  h ^= h >> 31;
  return h;
}

uint64_t block_hash(uint64_t parent, const int32_t* tokens, int n) {
  uint64_t h = mix(0x51ed270b27a1f3a5ULL, parent);
  for (int i = 0; i < n; ++i) h = mix(h, static_cast<uint32_t>(tokens[i]));
  return h == kNoHash ? 1 : h;
}

struct Block {  // the fields every step reads first, in one cache line
  int ref_count = 0;
  bool ready = false;           // KV computed (only meaningful for cached blocks)
  bool in_lru = false;
  int64_t owner = -1;           // sequence computing a pending cached block, -1 if none
  uint64_t hash = kNoHash;      // kNoHash: not in the prefix cache
  std::list<int>::iterator lru_pos;
  std::vector<int32_t> tokens;  // the block's tokens while cached (hit confirmation)
};

struct Seq {
  std::vector<int32_t> tokens;
  std::vector<int> table;  // block ids
  int num_hashed = 0;      // leading blocks whose chained hash is known
  int num_committed = 0;   // leading blocks commit() has settled (ready or uncached): never looked at again
  uint64_t last_hash = kNoHash;
  std::vector<int> uploaded;  // the table as pack_step last gave it to the runner's device row (empty: never)
};

class BlockManager {
 public:
  BlockManager(int num_blocks, int block_size) : block_size_(block_size) {
    if (num_blocks <= 0) throw std::invalid_argument("num_blocks must be positive, got " + std::to_string(num_blocks));
    if (block_size <= 0) throw std::invalid_argument("block_size must be positive, got " + std::to_string(block_size));
    blocks_.resize(num_blocks);
    for (int b = 0; b < num_blocks; ++b) uncached_free_.push_back(b);
  }

  int block_size() const { return block_size_; }
  int num_blocks() const { return static_cast<int>(blocks_.size()); }
  int num_free_blocks() const { return static_cast<int>(uncached_free_.size() + lru_.size()); }
  int num_cached_free_blocks() const { return static_cast<int>(lru_.size()); }
  int num_blocks_in_use() const { return num_blocks() - num_free_blocks(); }
  int64_t version() const { return version_; }
  bool has_sequence(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }

  // Creates sequence `seq_id` holding `tokens` with blocks covering all of them, sharing every cached full
  // block of its prefix. Returns the number of leading tokens whose KV is ready in the cache, or -1 (and
  // changes nothing) when the free blocks do not suffice.
  int allocate(int64_t seq_id, const std::vector<int32_t>& tokens) {
    if (seqs_.count(seq_id)) throw std::invalid_argument("sequence " + std::to_string(seq_id) + " already allocated");
    if (tokens.empty()) throw std::invalid_argument("sequence " + std::to_string(seq_id) + " has no tokens");
    const int n_blocks = blocks_for(static_cast<int>(tokens.size()));
    const int n_full = static_cast<int>(tokens.size()) / block_size_;
    std::vector<int> hits;
    std::vector<uint64_t> hashes;
    if (plan(tokens, hits, hashes) > num_free_blocks()) return -1;

    Seq seq;
    seq.tokens = tokens;
    int ready_tokens = 0;
    bool ready_chain = true;
    for (int b : hits) {
      take(b);
      seq.table.push_back(b);
      ready_chain = ready_chain && blocks_[b].ready;
      if (ready_chain) ready_tokens += block_size_;
    }
    for (int i = static_cast<int>(hits.size()); i < n_blocks; ++i) {
      int b = fresh_block();
      if (i < n_full && !hash_to_block_.count(hashes[i])) {
        Block& blk = blocks_[b];
        blk.hash = hashes[i];
        blk.tokens.assign(tokens.begin() + i * block_size_, tokens.begin() + (i + 1) * block_size_);
        blk.ready = false;
        blk.owner = seq_id;
        hash_to_block_[hashes[i]] = b;
      }
      seq.table.push_back(b);
    }
    seq.num_hashed = n_full;
    seq.last_hash = n_full ? hashes.back() : kNoHash;
    seqs_.emplace(seq_id, std::move(seq));
    return ready_tokens;
  }

  // Free blocks allocate(tokens) would take now (fewer than its blocks when its prefix is cached in use).
  int blocks_to_allocate(const std::vector<int32_t>& tokens) const {
    std::vector<int> hits;
    std::vector<uint64_t> hashes;
    return plan(tokens, hits, hashes);
  }

  // Appends generated tokens to the sequence's token list (blocks for them come from prepare_write).
  void append_tokens(int64_t seq_id, const std::vector<int32_t>& tokens) {
    Seq& s = seq(seq_id);
    s.tokens.insert(s.tokens.end(), tokens.begin(), tokens.end());
  }

  // Readies the sequence to write KV for token positions [start, stop): grows its block table to cover
  // `stop` tokens and un-shares (copy-on-write) every forked block the range touches. Returns the block
  // copies (src, dst) the caller must perform before writing, or nullopt (changing nothing) when the free
  // blocks do not suffice.
  std::optional<std::vector<std::pair<int, int>>> prepare_write(int64_t seq_id, int start, int stop) {
    Seq& s = seq(seq_id);
    if (start < 0 || stop < start || stop > static_cast<int>(s.tokens.size()))
      throw std::invalid_argument("write range [" + std::to_string(start) + ", " + std::to_string(stop) +
                                  ") outside sequence " + std::to_string(seq_id) + " of " +
                                  std::to_string(s.tokens.size()) + " tokens");
    std::vector<std::pair<int, int>> copies;
    if (stop == start) return copies;
    const int first = start / block_size_, last = (stop - 1) / block_size_;
    const int have = static_cast<int>(s.table.size());
    const int grow = std::max(0, last + 1 - have);
    int shared = 0;
    for (int i = first; i <= last && i < have; ++i) shared += needs_copy(s.table[i]);
    if (grow + shared > num_free_blocks()) return std::nullopt;
    for (int i = first; i <= last && i < have; ++i) {
      int b = s.table[i];
      if (!needs_copy(b)) continue;
      int c = fresh_block();
      release(b, seq_id);
      s.table[i] = c;
      copies.emplace_back(b, c);
    }
    for (int i = 0; i < grow; ++i) s.table.push_back(fresh_block());
    return copies;
  }

  // A step's bookkeeping in one call each: commit(seq_ids[i], num_computed[i]) for every i, and one new token
  // for each sequence.
  void commit_batch(const std::vector<int64_t>& seq_ids, const std::vector<int>& num_computed) {
    if (num_computed.size() != seq_ids.size())
      throw std::invalid_argument("commit_batch: seq_ids and num_computed differ in length");
    for (size_t i = 0; i < seq_ids.size(); ++i) commit(seq_ids[i], num_computed[i]);
  }
  void append_batch(const std::vector<int64_t>& seq_ids, const std::vector<int32_t>& tokens) {
    if (tokens.size() != seq_ids.size()) throw std::invalid_argument("append_batch: seq_ids and tokens differ in length");
    for (size_t i = 0; i < seq_ids.size(); ++i) seq(seq_ids[i]).tokens.push_back(tokens[i]);
  }

  // Records that the KV of the first `num_computed` tokens is in the cache: their full blocks become ready
  // and cached (registered under their chained hash unless an equal block is cached already).
  void commit(int64_t seq_id, int num_computed) {
    Seq& s = seq(seq_id);
    // KV can only have been written into blocks the sequence holds (prepare_write grows the table).
    const int covered = std::min(static_cast<int>(s.tokens.size()), static_cast<int>(s.table.size()) * block_size_);
    if (num_computed < 0 || num_computed > covered)
      throw std::invalid_argument("commit of " + std::to_string(num_computed) + " tokens outside sequence " +
                                  std::to_string(seq_id) + " (" + std::to_string(s.tokens.size()) + " tokens, " +
                                  std::to_string(covered) + " covered by its blocks)");
    const int n_full = num_computed / block_size_;
    for (int i = s.num_committed; i < n_full; ++i) {
      Block& blk = blocks_[s.table[i]];
      if (i >= s.num_hashed) {
        s.last_hash = block_hash(s.last_hash, s.tokens.data() + i * block_size_, block_size_);
        s.num_hashed = i + 1;
        if (blk.hash == kNoHash && !hash_to_block_.count(s.last_hash)) {
          blk.hash = s.last_hash;
          blk.tokens.assign(s.tokens.begin() + i * block_size_, s.tokens.begin() + (i + 1) * block_size_);
          hash_to_block_[blk.hash] = s.table[i];
        }
      }
      if (blk.hash != kNoHash && !blk.ready) {
        blk.ready = true;
        blk.owner = -1;
      }
    }
    s.num_committed = std::max(s.num_committed, n_full);
  }

  // The position (>= start) up to which the sequence can compute now: it stops at the first pending cached
  // block another live sequence is computing. Orphaned pending blocks (owner gone) are claimed.
  int computable_until(int64_t seq_id, int start) {
    Seq& s = seq(seq_id);
    const int n = static_cast<int>(s.tokens.size());
    check_position(seq_id, s, start);
    for (int i = start / block_size_; i < static_cast<int>(s.table.size()); ++i) {
      Block& blk = blocks_[s.table[i]];
      if (blk.hash == kNoHash || blk.ready) continue;
      if (blk.owner == -1) blk.owner = seq_id;
      if (blk.owner != seq_id) return std::max(start, i * block_size_);
    }
    return n;
  }

  // Number of leading tokens (from `start` on, block aligned) whose KV is ready in shared cached blocks.
  int ready_until(int64_t seq_id, int start) const {
    const Seq& s = seq(seq_id);
    check_position(seq_id, s, start);
    int pos = start;
    for (int i = start / block_size_; i < static_cast<int>(s.table.size()); ++i) {
      if (pos != i * block_size_) break;  // only whole blocks count
      const Block& blk = blocks_[s.table[i]];
      if (blk.hash == kNoHash || !blk.ready || (i + 1) * block_size_ > static_cast<int>(s.tokens.size())) break;
      pos = (i + 1) * block_size_;
    }
    return pos;
  }

  // A new sequence sharing every block (and the tokens) of `parent_id`.
  void fork(int64_t parent_id, int64_t child_id) {
    if (seqs_.count(child_id)) throw std::invalid_argument("sequence " + std::to_string(child_id) + " already allocated");
    Seq child = seq(parent_id);
    child.uploaded.clear();  // the child gets a device row of its own
    for (int b : child.table) take(b);
    seqs_.emplace(child_id, std::move(child));
  }

  void free(int64_t seq_id) {
    Seq& s = seq(seq_id);
    // Free the tail first, so the LRU evicts a sequence's last blocks before its prefix.
    for (auto it = s.table.rbegin(); it != s.table.rend(); ++it) release(*it, seq_id);
    seqs_.erase(seq_id);
  }

  // The block table from entry `start` on (the sampler keeps the entries before a step's write range: they
  // never change while the sequence lives).
  std::vector<int> block_table(int64_t seq_id, int start) const {
    const std::vector<int>& t = seq(seq_id).table;
    return std::vector<int>(t.begin() + std::min<size_t>(std::max(start, 0), t.size()), t.end());
  }
  int ref_count(int block) const { return blocks_.at(block).ref_count; }

  // The scheduler's pass over its running sequences, in order, under a token budget: for each, skip the
  // prefix whose KV is ready in the cache (the last token always runs: its row gives the logits), stop at a
  // block another sequence is computing, cap the chunk by the budget and make its write range private
  // (prepare_write). Returns (indices, starts, stops, write_froms: the chunks; skipped: flat (index,
  // num_computed) of every sequence whose cached prefix was skipped; the block copies; the tokens skipped;
  // failed): failed is the index of the first sequence whose blocks do not fit (its chunk, planned but not
  // prepared, is the last one: the caller preempts and retries it), or -1.
  py::tuple plan_chunks(const std::vector<int64_t>& seq_ids, const std::vector<int>& num_computed, int budget) {
    if (num_computed.size() != seq_ids.size())
      throw std::invalid_argument("plan_chunks: seq_ids and num_computed differ in length");
    std::vector<int> indices, starts, stops, write_froms, skipped;
    std::vector<std::pair<int, int>> copies;
    int64_t cached = 0;
    int failed = -1;
    for (size_t i = 0; i < seq_ids.size() && budget > 0; ++i) {
      const int64_t id = seq_ids[i];
      const int n_tokens = static_cast<int>(seq(id).tokens.size());
      int start = num_computed[i];
      const int ready = ready_until(id, start);
      if (ready > start) {
        const int skip_to = std::min(ready, n_tokens - 1);
        if (skip_to > start) {
          cached += skip_to - start;
          start = skip_to;
          skipped.push_back(static_cast<int>(i));
          skipped.push_back(start);
        }
      }
      const int limit = computable_until(id, start);
      if (limit <= start) continue;  // waiting for another sequence to compute a shared block
      const int stop = std::min({n_tokens, limit, start + budget});
      const int write_from = std::max(start, std::min(ready, stop));
      indices.push_back(static_cast<int>(i));
      starts.push_back(start);
      stops.push_back(stop);
      write_froms.push_back(write_from);
      auto prepared = prepare_write(id, write_from, stop);
      if (!prepared) {
        failed = static_cast<int>(i);
        break;
      }
      copies.insert(copies.end(), prepared->begin(), prepared->end());
      budget -= stop - start;
    }
    return py::make_tuple(indices, starts, stops, write_froms, skipped, copies, cached, failed);
  }

  // One model step's inputs, packed into `out` (int64: the runner's host staging buffer) for one copy to the
  // device. Chunk i runs tokens [starts[i], stops[i]) of sequence seq_ids[i], writing their KV from
  // write_froms[i] on (the earlier ones are cached: slot -1); its block table is row rows[i] of the runner's
  // device tables; if it reaches the end of the sequence, its last row gives samples[i] sampled sequences (1,
  // or more for a prompt whose forks start now). Layout, T tokens, B chunks, S samples, C copies, K entries:
  //   ids[T] positions[T] slots[T] cu_seqlens[B+1] context_lens[B] rows[B] last_rows[S] copies[2][C]
  //   changes[K][3]: (row, column, block) of each table entry the device row lacks (only entries from the
  //   write range on can change while a sequence lives; a new row gets them all).
  // -> (elements written, S, K, widest table), or (-elements needed, 0, 0, 0) if `out` is too short (then
  // nothing changed).
  std::tuple<int64_t, int64_t, int64_t, int> pack_step(
      const std::vector<int64_t>& seq_ids, const std::vector<int>& starts, const std::vector<int>& stops,
      const std::vector<int>& write_froms, const std::vector<int>& rows, const std::vector<int>& samples,
      const std::vector<std::pair<int, int>>& copies, py::array out) {
    // Written in place: an array pybind11 would convert (another dtype, strided) would take the writes instead.
    if (!py::isinstance<py::array_t<int64_t>>(out) || out.ndim() != 1 || !(out.flags() & py::array::c_style) ||
        !out.writeable())
      throw std::invalid_argument("pack_step: out must be a writable contiguous 1-D int64 array");
    const size_t n = seq_ids.size();
    if (starts.size() != n || stops.size() != n || write_froms.size() != n || rows.size() != n || samples.size() != n)
      throw std::invalid_argument("pack_step: seq_ids, starts, stops, write_froms, rows and samples differ in length");
    std::vector<Seq*> seqs(n);
    std::vector<size_t> firsts(n);  // first table entry that may differ from the device row
    int64_t n_tokens = 0, n_samples = 0, n_changes = 0;
    for (size_t i = 0; i < n; ++i) {
      Seq& s = *(seqs[i] = &seq(seq_ids[i]));
      const int n_seq = static_cast<int>(s.tokens.size());
      const int covered = std::min(n_seq, static_cast<int>(s.table.size()) * block_size_);
      if (starts[i] < 0 || write_froms[i] < starts[i] || stops[i] < write_froms[i] || stops[i] > covered)
        throw std::invalid_argument("pack_step: chunk [" + std::to_string(starts[i]) + ", " +
                                    std::to_string(stops[i]) + ") writing from " + std::to_string(write_froms[i]) +
                                    " is outside sequence " + std::to_string(seq_ids[i]) + " (" +
                                    std::to_string(n_seq) + " tokens, " + std::to_string(covered) +
                                    " covered by its blocks)");
      n_tokens += stops[i] - starts[i];
      if (stops[i] == n_seq) n_samples += samples[i];
      firsts[i] = s.uploaded.empty() ? 0 : std::min<size_t>(write_froms[i] / block_size_, s.uploaded.size());
      for (size_t j = firsts[i]; j < s.table.size(); ++j)
        n_changes += j >= s.uploaded.size() || s.uploaded[j] != s.table[j];
    }
    const int64_t size = 3 * n_tokens + 3 * static_cast<int64_t>(n) + 1 + n_samples +
                         2 * static_cast<int64_t>(copies.size()) + 3 * n_changes;
    if (out.shape(0) < size) return {-size, 0, 0, 0};
    int64_t* ids = static_cast<int64_t*>(out.mutable_data());
    int64_t *positions = ids + n_tokens, *slots = positions + n_tokens, *cu = slots + n_tokens;
    int64_t *contexts = cu + n + 1, *row_out = contexts + n, *last_rows = row_out + n;
    int64_t *copy_src = last_rows + n_samples, *copy_dst = copy_src + copies.size();
    int64_t* changes = copy_dst + copies.size();
    int width = 1;
    cu[0] = 0;
    for (size_t i = 0; i < n; ++i) {
      Seq& s = *seqs[i];
      for (int p = starts[i], t = static_cast<int>(cu[i]); p < stops[i]; ++p, ++t) {
        ids[t] = s.tokens[p];
        positions[t] = p;
        slots[t] = p < write_froms[i] ? -1 : int64_t{s.table[p / block_size_]} * block_size_ + p % block_size_;
      }
      cu[i + 1] = cu[i] + stops[i] - starts[i];
      contexts[i] = stops[i];
      row_out[i] = rows[i];
      if (stops[i] == static_cast<int>(s.tokens.size()))
        for (int k = 0; k < samples[i]; ++k) *last_rows++ = cu[i + 1] - 1;
      width = std::max(width, static_cast<int>(s.table.size()));
      s.uploaded.resize(s.table.size(), -1);
      for (size_t j = firsts[i]; j < s.table.size(); ++j) {
        if (s.uploaded[j] == s.table[j]) continue;
        s.uploaded[j] = s.table[j];
        *changes++ = rows[i];
        *changes++ = static_cast<int64_t>(j);
        *changes++ = s.table[j];
      }
    }
    for (size_t c = 0; c < copies.size(); ++c) {
      copy_src[c] = copies[c].first;
      copy_dst[c] = copies[c].second;
    }
    return {size, n_samples, n_changes, width};
  }

  // New weights: cached KV was computed with the old ones, so no prefix may be served from it again.
  int64_t bump_version() {
    if (!seqs_.empty())
      throw std::logic_error("bump_version with " + std::to_string(seqs_.size()) +
                             " live sequences: finish or free them first");
    for (auto& [h, b] : hash_to_block_) {
      Block& blk = blocks_[b];
      blk.hash = kNoHash;
      blk.tokens.clear();
      blk.ready = false;
      blk.owner = -1;
      if (blk.in_lru) {
        lru_.erase(blk.lru_pos);
        blk.in_lru = false;
        uncached_free_.push_back(b);
      }
    }
    hash_to_block_.clear();
    return ++version_;
  }

 private:
  int blocks_for(int n_tokens) const { return (n_tokens + block_size_ - 1) / block_size_; }

  Seq& seq(int64_t seq_id) { return const_cast<Seq&>(std::as_const(*this).seq(seq_id)); }

  const Seq& seq(int64_t seq_id) const {
    auto it = seqs_.find(seq_id);
    if (it == seqs_.end()) throw std::out_of_range("unknown sequence " + std::to_string(seq_id));
    return it->second;
  }

  static void check_position(int64_t seq_id, const Seq& s, int pos) {
    if (pos < 0 || pos > static_cast<int>(s.tokens.size()))
      throw std::invalid_argument("position " + std::to_string(pos) + " outside sequence " +
                                  std::to_string(seq_id) + " of " + std::to_string(s.tokens.size()) + " tokens");
  }

  // Written while someone else holds it: a forked partial block. (A cached block is either ready -- nobody
  // writes it again -- or pending, and then its owner fills it in place for everyone.)
  bool needs_copy(int b) const { return blocks_[b].ref_count > 1 && blocks_[b].hash == kNoHash; }

  // The longest chain of cache hits over the full blocks of `tokens` (and every full block's chained hash).
  // Returns the number of blocks the allocation takes from the free pool.
  int plan(const std::vector<int32_t>& tokens, std::vector<int>& hits, std::vector<uint64_t>& hashes) const {
    const int n_full = static_cast<int>(tokens.size()) / block_size_;
    int need_free = blocks_for(static_cast<int>(tokens.size()));
    uint64_t h = kNoHash;
    for (int i = 0; i < n_full; ++i) {
      h = block_hash(h, tokens.data() + i * block_size_, block_size_);
      hashes.push_back(h);
      if (hits.size() != static_cast<size_t>(i)) continue;  // the chain broke earlier
      int b = lookup(h, tokens.data() + i * block_size_);
      if (b < 0) continue;
      hits.push_back(b);
      if (blocks_[b].ref_count > 0) --need_free;  // a hit on a free cached block still takes it off the free list
    }
    return need_free;
  }

  int lookup(uint64_t h, const int32_t* tokens) const {
    auto it = hash_to_block_.find(h);
    if (it == hash_to_block_.end()) return -1;
    const Block& blk = blocks_[it->second];
    for (int i = 0; i < block_size_; ++i)
      if (blk.tokens[i] != tokens[i]) return -1;
    return it->second;
  }

  void take(int b) {
    Block& blk = blocks_[b];
    if (blk.in_lru) {
      lru_.erase(blk.lru_pos);
      blk.in_lru = false;
    }
    ++blk.ref_count;
  }

  int fresh_block() {
    int b;
    if (!uncached_free_.empty()) {
      b = uncached_free_.front();
      uncached_free_.pop_front();
    } else {
      if (lru_.empty()) throw std::runtime_error("KV block pool exhausted");
      b = lru_.front();  // least recently freed cached block: evict its prefix entry
      lru_.pop_front();
      Block& old = blocks_[b];
      old.in_lru = false;
      hash_to_block_.erase(old.hash);
    }
    Block& blk = blocks_[b];
    blk.hash = kNoHash;
    blk.tokens.clear();
    blk.ready = false;
    blk.owner = -1;
    blk.ref_count = 1;
    return b;
  }

  void release(int b, int64_t seq_id) {
    Block& blk = blocks_[b];
    if (blk.ref_count <= 0) throw std::logic_error("block " + std::to_string(b) + " freed twice");
    if (blk.owner == seq_id) blk.owner = -1;  // a pending block left behind: whoever holds it next computes it
    if (--blk.ref_count > 0) return;
    if (blk.hash != kNoHash && blk.ready) {
      lru_.push_back(b);
      blk.lru_pos = std::prev(lru_.end());
      blk.in_lru = true;
      return;
    }
    if (blk.hash != kNoHash) {  // pending and abandoned: its KV was never computed
      hash_to_block_.erase(blk.hash);
      blk.hash = kNoHash;
      blk.tokens.clear();
    }
    uncached_free_.push_back(b);
  }

  int block_size_;
  std::vector<Block> blocks_;
  std::deque<int> uncached_free_;
  std::list<int> lru_;  // free blocks with cached KV, least recently freed first
  std::unordered_map<uint64_t, int> hash_to_block_;
  std::unordered_map<int64_t, Seq> seqs_;
  int64_t version_ = 0;
};

}  // namespace

void bind_block_manager(py::module_& m) {
  py::class_<BlockManager>(m, "BlockManager",
                           "Paged KV block allocator with ref counts, a chained-hash prefix cache over full "
                           "blocks, LRU reuse of cached free blocks, fork and copy-on-write.")
      .def(py::init<int, int>(), py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
      .def_property_readonly("num_cached_free_blocks", &BlockManager::num_cached_free_blocks)
      .def_property_readonly("num_blocks_in_use", &BlockManager::num_blocks_in_use)
      .def_property_readonly("version", &BlockManager::version)
      .def("has_sequence", &BlockManager::has_sequence, py::arg("seq_id"))
      .def("allocate", &BlockManager::allocate, py::arg("seq_id"), py::arg("tokens"),
           "Blocks for a new sequence, sharing cached prefix blocks. -> ready prefix tokens, or -1 if the "
           "pool is too small now (nothing changed).")
      .def("blocks_to_allocate", &BlockManager::blocks_to_allocate, py::arg("tokens"),
           "Free blocks allocate(tokens) would take now.")
      .def("append_tokens", &BlockManager::append_tokens, py::arg("seq_id"), py::arg("tokens"))
      .def("prepare_write", &BlockManager::prepare_write, py::arg("seq_id"), py::arg("start"), py::arg("stop"),
           "Cover positions [start, stop) with private blocks. -> list of (src, dst) block copies to do "
           "first, or None if the pool is too small now (nothing changed).")
      .def("commit", &BlockManager::commit, py::arg("seq_id"), py::arg("num_computed"))
      .def("commit_batch", &BlockManager::commit_batch, py::arg("seq_ids"), py::arg("num_computed"))
      .def("append_batch", &BlockManager::append_batch, py::arg("seq_ids"), py::arg("tokens"),
           "One new token for each sequence.")
      .def("computable_until", &BlockManager::computable_until, py::arg("seq_id"), py::arg("start"))
      .def("ready_until", &BlockManager::ready_until, py::arg("seq_id"), py::arg("start"))
      .def("fork", &BlockManager::fork, py::arg("parent_id"), py::arg("child_id"))
      .def("free", &BlockManager::free, py::arg("seq_id"))
      .def("block_table", &BlockManager::block_table, py::arg("seq_id"), py::arg("start") = 0)
      .def("ref_count", &BlockManager::ref_count, py::arg("block"))
      .def("plan_chunks", &BlockManager::plan_chunks, py::arg("seq_ids"), py::arg("num_computed"), py::arg("budget"),
           "The scheduler's pass over running sequences: -> (indices, starts, stops, write_froms, flat (index, "
           "num_computed) skips, block copies, skipped tokens, index of the first that does not fit or -1).")
      .def("pack_step", &BlockManager::pack_step, py::arg("seq_ids"), py::arg("starts"), py::arg("stops"),
           py::arg("write_froms"), py::arg("rows"), py::arg("samples"), py::arg("copies"), py::arg("out"),
           "A model step's ids, positions, slots, cu_seqlens, context lens, rows, sampled rows, block copies and "
           "the block-table entries the runner's device rows lack, packed into `out` (int64). -> (elements, "
           "sampled rows, table entries, widest table), or (-elements needed, 0, 0, 0) if `out` is too short.")
      .def("bump_version", &BlockManager::bump_version,
           "Forget the prefix cache (KV from older weights). -> the new version.");
}
