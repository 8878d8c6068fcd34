"""The step graphs' logic on the CPU (rollout/sampler/cuda_graphs.py, capture=False: no CUDA graph, the same
buckets, padding and static buffers run eagerly): a padded step gives bit for bit the rows of the unpadded
step, for decode-only and decode + prefill-chunk steps: the whole model in exact mode, the paged attention in
fast mode (its projections, F.linear, round a row differently with the number of rows on the host's BLAS as on
cuBLAS: fast mode promises no batch invariance there); a sampler on the graph path samples the same tokens and
log-probs as one without; graphs refuse other weights."""
import pytest
import torch

from protege.engine.config import ModelConfig
from protege.engine.model import Qwen2ForCausalLM
from protege.rollout.sampler import Sampler, SamplingParams
from protege.rollout.sampler.attention import AttentionMetadata, PagedAttention
from protege.rollout.sampler.cuda_graphs import graph_buckets, pick_bucket

VOCAB = 128
SIZES, CHUNK = (1, 2, 4, 8), 8   # graphs of 1..8 decode rows, and of 1..8 rows plus up to 8 tokens per sequence


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.1)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture
def triton(monkeypatch):
    monkeypatch.setenv("PROTEGE_KERNELS", "triton")


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def graph_sampler(model, **kw):
    return Sampler(model, num_blocks=64, block_size=4, max_num_batched_tokens=11, cuda_graph_sizes=SIZES,
                   cuda_graph_max_query_len=CHUNK, **kw)


def test_buckets_and_their_choice():
    buckets = graph_buckets(SIZES, CHUNK)
    assert buckets == [(1, 1), (2, 1), (4, 1), (8, 1), (9, 8), (10, 8), (12, 8), (16, 8)]
    assert graph_buckets(SIZES, 1) == [(1, 1), (2, 1), (4, 1), (8, 1)]
    assert pick_bucket(buckets, 3, 1) == (4, 1)     # 3 decode rows: one padding token
    assert pick_bucket(buckets, 11, 8) == (12, 8)   # 3 decode rows and an 8-token chunk
    assert pick_bucket(buckets, 9, 2) == (9, 8)
    assert pick_bucket(buckets, 9, 1) == (9, 8)     # no decode graph of 9 rows: the mixed one takes it
    assert pick_bucket(buckets, 11, 9) is None      # a longer chunk than any graph takes: eager
    assert pick_bucket(buckets, 17, 1) is None


def next_step(sampler, mixed: bool, long: bool = False):
    """Three sequences decoding (long: past 32 keys, so fast mode splits them into pieces), and with `mixed`
    an agent's next turn arriving, prefilled beside them: the next step's inputs on the device and its bucket."""
    for prompt in prompts_of([37, 41, 35] if long else [5, 9, 3]):
        sampler.add_request(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(14 if long else 4):   # prefill, chunked by the 11-token budget, then decode steps
        sampler.step()
    if mixed:
        sampler.add_request(prompts_of([20], seed=1)[0], SamplingParams(temperature=0, max_tokens=4))
    runner = sampler.runner
    inputs = runner.unpack(runner.prepare(sampler.scheduler.schedule()))
    assert (inputs.num_seqs, inputs.num_tokens, inputs.max_query_len) == ((4, 11, 8) if mixed else (3, 3, 1))
    assert min(inputs.context_lens.tolist()[:3]) > 32 or not long
    if runner.graphs is None:
        return inputs, None
    bucket = runner.graphs.bucket_for(inputs)
    assert bucket == ((12, 8) if mixed else (4, 1))   # one padding token, and empty sequence slots
    return inputs, bucket


def unpadded_metadata(inputs):
    return AttentionMetadata(inputs.slots, inputs.tables, inputs.cu_seqlens, inputs.context_lens,
                             inputs.max_query_len)


@pytest.mark.parametrize("mixed", [False, True], ids=["decode", "decode+prefill"])
def test_padded_step_equals_unpadded_step_bitwise_exact_mode(model, triton, monkeypatch, mixed):
    """The same requests on a sampler whose every step took the graph path and on one without graphs: the
    next step, padded, gives the unpadded step's hidden rows bit for bit."""
    monkeypatch.setattr(model, "exact", True)
    sampler = graph_sampler(model)
    inputs, bucket = next_step(sampler, mixed)
    plain = Sampler(model, num_blocks=64, block_size=4, max_num_batched_tokens=11, cuda_graph_sizes=())
    plain_inputs, _ = next_step(plain, mixed)
    assert torch.equal(plain_inputs.ids, inputs.ids) and torch.equal(plain_inputs.slots, inputs.slots)
    with torch.inference_mode():
        eager = model(plain_inputs.ids, positions=plain_inputs.positions, return_hidden=True,
                      attention=PagedAttention(plain.kv_cache, unpadded_metadata(plain_inputs), True))
        padded = sampler.runner.graphs.run(inputs, bucket)
    assert padded.shape == eager.shape and torch.equal(padded, eager)


def test_padded_step_attention_equals_unpadded_bitwise_fast_mode(model, triton):
    """Fast mode's paged attention (split-KV decode tiles, sized by the block-table width: the graphs' full
    width against the step's own) over the graph path's padded buffers, on the same q/k/v rows: three decode
    rows and a prefill chunk (both of fast mode's launches)."""
    sampler = graph_sampler(model)
    inputs, bucket = next_step(sampler, True, long=True)
    static = sampler.runner.graphs.static
    static.fill(inputs, bucket[0])
    config, g = model.config, torch.Generator().manual_seed(4)
    q = torch.randn(bucket[0], config.num_attention_heads, config.head_dim, generator=g)
    k, v = (torch.randn(bucket[0], config.num_key_value_heads, config.head_dim, generator=g) for _ in "kv")
    t = inputs.num_tokens
    for layer in range(config.num_hidden_layers):
        eager = PagedAttention(sampler.kv_cache, unpadded_metadata(inputs), False)(layer, q[:t], k[:t], v[:t])
        padded = PagedAttention(sampler.kv_cache, static.metadata(*bucket), False)(layer, q, k, v)
        assert torch.equal(padded[:t], eager)


def test_sampler_on_the_graph_path_equals_eager(model, triton, monkeypatch):
    """An agent-like load (requests arriving while others decode, so steps mix decode rows and prefill
    chunks), exact mode: the same tokens and bit-identical log-probs with and without the graph path."""
    monkeypatch.setattr(model, "exact", True)
    prompts = prompts_of([6, 13, 4, 21], seed=2)
    params = [SamplingParams(temperature=1.0, max_tokens=7, seed=i, ignore_eos=True) for i in range(len(prompts))]

    def run(sampler):
        ids, results = [], {}
        for prompt, p in zip(prompts, params):
            ids.append(sampler.add_request(prompt, p))
            for _ in range(3):
                results.update((out.request_id, out.completions[0]) for out in sampler.step())
        while sampler.has_unfinished():
            results.update((out.request_id, out.completions[0]) for out in sampler.step())
        return [results[i] for i in ids]

    with_graphs = graph_sampler(model)
    got = run(with_graphs)
    want = run(Sampler(model, num_blocks=64, block_size=4, max_num_batched_tokens=11, cuda_graph_sizes=()))
    replays = with_graphs.runner.graphs.replays
    assert any(q == 1 for _, q in replays) and any(q == CHUNK for _, q in replays), replays
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        assert torch.equal(torch.tensor(a.logprobs), torch.tensor(b.logprobs))


def test_graphs_are_tied_to_the_weights(model, triton):
    sampler = graph_sampler(model)
    prompt = prompts_of([7], seed=3)[0]
    sampler.generate([prompt], SamplingParams(temperature=0, max_tokens=3))
    graphs = sampler.runner.graphs
    assert graphs.weight_version == model.weight_version and graphs.replays
    assert graphs.parameters == tuple(p.data_ptr() for p in model.parameters())
    # New parameter storage (a load, a rollout-mode switch): the sampler sees it at the next request and
    # builds new graphs on the new addresses.
    saved = [p.data for p in model.parameters()]
    try:
        for p in model.parameters():
            p.data = p.data.clone()
        sampler.generate([prompt], SamplingParams(temperature=0, max_tokens=3))
        assert sampler.runner.graphs is not graphs
        assert sampler.runner.graphs.parameters == tuple(p.data_ptr() for p in model.parameters())
    finally:
        for p, data in zip(model.parameters(), saved):
            p.data = data
    # Graphs never replay for another weight version or projection mode.
    graphs = sampler.runner.graphs
    sampler.add_request(prompt, SamplingParams(temperature=0, max_tokens=3))
    inputs = sampler.runner.unpack(sampler.runner.prepare(sampler.scheduler.schedule()))
    model.weight_version += 1
    try:
        with pytest.raises(RuntimeError, match=r"captured for weight version 0 \(exact=False\) cannot run the "
                                               r"model at version 1"):
            graphs.run(inputs, graphs.bucket_for(inputs))
    finally:
        model.weight_version -= 1
