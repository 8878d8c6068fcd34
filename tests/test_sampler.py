"""The paged-KV sampler on a tiny random Qwen2: greedy equals transformers' generate, log-probs equal the
training forward's, prefix reuse and forks compute a prompt once, seeds, stops, context limit, lifecycle."""
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from protege.kernels import dispatch as kernels
from protege.engine.model import Qwen2ForCausalLM
from protege.rollout.sampler import Sampler, SamplingParams

VOCAB = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import Qwen2Config
    from transformers import Qwen2ForCausalLM as HFQwen2
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, initializer_range=0.1, eos_token_id=None, bos_token_id=None)
    hf = HFQwen2(config).eval()
    path = tmp_path_factory.mktemp("tiny_qwen2")
    hf.save_pretrained(path)
    return path, hf


@pytest.fixture(scope="module")
def model(checkpoint):
    return Qwen2ForCausalLM.from_pretrained(checkpoint[0], dtype=torch.float32).eval()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt, new_tokens):
    ids = torch.tensor([prompt])  # an explicit mask: generate would take token 0 for padding otherwise
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def test_greedy_equals_transformers_generate_under_preemption(checkpoint, model):
    hf = checkpoint[1]
    prompts = prompts_of([3, 17, 30, 26, 9, 38])
    prompts += [prompts[2][:20] + [5, 6, 7], prompts[3], prompts[2][:8]]  # shared prefixes, a duplicate
    # 16 blocks of 4 tokens for 9 sequences of up to 62 tokens, 16-token steps: chunked prefill, prefix
    # sharing of blocks still being computed, preemption.
    sampler = Sampler(model, num_blocks=16, block_size=4, max_num_batched_tokens=16)
    outputs = sampler.generate(prompts, GREEDY)
    assert sampler.stats.preemptions > 0
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(hf, prompt, 24) and out.finish_reason == "length"


def test_greedy_samples_of_a_forked_prompt_are_identical(checkpoint, model):
    hf = checkpoint[1]
    prompt = prompts_of([14], seed=1)[0]  # ends inside a block: the forks copy it on write
    sampler = Sampler(model, num_blocks=32, block_size=4)
    outs = sampler.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=3))[0]
    assert [o.token_ids for o in outs] == [hf_greedy(hf, prompt, 12)] * 3


def training_logprobs(model, prompts, completions, temperature):
    """The trainer's view: the sequences packed in reverse order into one forward, then token_logprobs."""
    order = list(reversed(range(len(prompts))))
    seqs = [prompts[i] + completions[i] for i in order]
    cu = torch.tensor([0] + torch.tensor([len(s) for s in seqs]).cumsum(0).tolist(), dtype=torch.int32)
    with torch.no_grad():
        hidden = model(torch.tensor(sum(seqs, [])), cu_seqlens=cu, return_hidden=True)
        result = [None] * len(prompts)
        for j, i in enumerate(order):
            rows = torch.arange(len(prompts[i]) - 1, len(seqs[j]) - 1) + cu[j]
            result[i] = kernels.token_logprobs(hidden[rows], model.lm_head_weight,
                                               torch.tensor(completions[i]), temperature)
    return result


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_logprobs_equal_training_forward(model, temperature, top_k, top_p):
    prompts = prompts_of([5, 21, 12, 30], seed=2)
    sampler = Sampler(model, num_blocks=24, block_size=4, max_num_batched_tokens=24)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=16, seed=i,
                             ignore_eos=True, n=2 if i == 1 else 1) for i in range(4)]
    outs = sampler.generate(prompts, params)
    flat_prompts, completions, logprobs = [], [], []
    for prompt, out in zip(prompts, outs):
        for o in (out if isinstance(out, list) else [out]):
            flat_prompts.append(prompt)
            completions.append(o.token_ids)
            logprobs.append(torch.tensor(o.logprobs))
    expected = training_logprobs(model, flat_prompts, completions, temperature)
    for got, want in zip(logprobs, expected):
        assert (got - want).abs().max().item() <= 1e-5


def test_logprobs_bit_identical_to_training_on_triton_path(model, monkeypatch):
    monkeypatch.setenv("PROTEGE_KERNELS", "triton")
    monkeypatch.setattr(model, "exact", True)
    prompts = prompts_of([7, 11], seed=3)
    sampler = Sampler(model, num_blocks=16, block_size=4, max_num_batched_tokens=8)
    outs = sampler.generate(prompts, [SamplingParams(temperature=1.0, max_tokens=5, seed=i, ignore_eos=True)
                                      for i in range(2)])
    expected = training_logprobs(model, prompts, [o.token_ids for o in outs], 1.0)
    for out, want in zip(outs, expected):
        assert torch.equal(torch.tensor(out.logprobs), want)


@pytest.mark.parametrize("exact", [True, False])
def test_exact_mode_reports_the_trainers_op(model, monkeypatch, exact):
    """Exact mode's log-probs come from token_logprobs itself, never from a reduction over the stored logits:
    on an H200 that reduction sums in another order than the fused op (bits differ); fast mode keeps the
    single pass over the LM head."""
    from protege.kernels import dispatch
    calls = []
    for name in ("token_logprobs", "logprobs_from_logits"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    monkeypatch.setattr(model, "exact", exact)
    sampler = Sampler(model, num_blocks=16, block_size=4, max_num_batched_tokens=8)
    sampler.generate(prompts_of([7], seed=4), SamplingParams(temperature=0.8, top_p=0.9, max_tokens=3, seed=1,
                                                             ignore_eos=True))
    assert calls and set(calls) == {"token_logprobs" if exact else "logprobs_from_logits"}


def run_request(sampler, prompt, params):
    request_id = sampler.add_request(prompt, params)
    while True:
        for out in sampler.step():
            assert out.request_id == request_id
            return out.completions


def test_multi_turn_conversation_computes_only_new_tokens(model):
    block_size = 16
    sampler = Sampler(model, num_blocks=128, block_size=block_size)
    history = []
    for turn in range(20):
        prompt = history + prompts_of([50], seed=100 + turn)[0]
        before = sampler.stats.prompt_tokens_computed
        completion = run_request(sampler, prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
        computed = sampler.stats.prompt_tokens_computed - before
        # New tokens (50, plus the last sampled token whose KV was never computed) and the partial block.
        assert computed <= 50 + block_size if turn else computed == 50
        history = prompt + completion.token_ids
    assert sampler.stats.cached_tokens >= sampler.stats.prompt_tokens - 20 * (50 + block_size)


def test_step_records_trace_every_step(model):
    """Sampler.on_step sees each step once: its sequences (the running batch), decode rows and tokens."""
    sampler = Sampler(model, num_blocks=128, max_num_batched_tokens=64)
    records = []
    sampler.on_step = records.append
    sampler.generate(prompts_of([100, 20, 5]), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(records) == sampler.stats.steps
    assert sum(r.tokens for r in records) == sampler.stats.computed_tokens
    assert all(0 <= r.decode_rows <= r.sequences <= 3 and r.tokens >= r.sequences and r.seconds >= 0
               for r in records)
    assert records[0].sequences == 1 and records[0].tokens == 64   # the 100-token prompt's first chunk alone
    assert max(r.sequences for r in records) == 3 and records[-1].decode_rows == records[-1].sequences
    assert [r.end for r in records] == sorted(r.end for r in records)


def test_n_samples_and_groups_compute_the_prompt_once(model):
    block_size = 4
    sampler = Sampler(model, num_blocks=64, block_size=block_size)
    prompt = prompts_of([30], seed=4)[0]
    samples = sampler.generate([prompt], SamplingParams(n=6, seed=1, max_tokens=8, ignore_eos=True))[0]
    assert sampler.stats.prompt_tokens_computed == 30
    assert len({tuple(s.token_ids) for s in samples}) > 1  # six samples, not six copies

    # A GRPO group: six identical requests submitted together share one prefill of the full blocks.
    before = sampler.stats.prompt_tokens_computed
    group = prompts_of([30], seed=5)[0]
    sampler.generate([group] * 6, SamplingParams(seed=2, max_tokens=8, ignore_eos=True))
    assert sampler.stats.prompt_tokens_computed - before == 30 + 5 * (30 % block_size)


def test_seeded_sampling_is_reproducible_whatever_the_batch(model):
    prompts = prompts_of([9, 15, 4], seed=6)
    params = SamplingParams(seed=123, max_tokens=10, ignore_eos=True)
    alone = Sampler(model, num_blocks=32, block_size=4).generate([prompts[1]], params)[0]
    batched = Sampler(model, num_blocks=32, block_size=4).generate(
        prompts, [SamplingParams(seed=7, max_tokens=6), params, SamplingParams(temperature=0, max_tokens=3)])[1]
    assert batched.token_ids == alone.token_ids
    other = Sampler(model, num_blocks=32, block_size=4).generate([prompts[1]], SamplingParams(
        seed=124, max_tokens=10, ignore_eos=True))[0]
    assert other.token_ids != alone.token_ids


@pytest.fixture(scope="module")
def word_tokenizer():
    """A real tokenizers.Tokenizer: token i is the word 'w{i}', decoded space-separated."""
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def test_stop_token_ids_and_stop_strings(model, word_tokenizer):
    sampler = Sampler(model, num_blocks=32, block_size=4, tokenizer=word_tokenizer)
    prompt = prompts_of([10], seed=7)[0]
    free = sampler.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].token_ids
    # Several stop ids: the first occurrence of either ends the completion, stop token included.
    stops = (free[12], free[7])
    first = min(free.index(t) for t in stops)
    out = sampler.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=stops))[0]
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop" and out.stop_reason == free[first]
    # A stop string spanning two tokens: generation ends with the token that completes it.
    stop = word_tokenizer.decode(free[9:11])
    end = next(k for k in range(1, 21) if stop in word_tokenizer.decode(free[:k]))
    out = sampler.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop=[stop, "zzz"]))[0]
    assert out.token_ids == free[:end] and out.finish_reason == "stop" and out.stop_reason == stop
    # The model's EOS ends a completion unless ignore_eos.
    eos_sampler = Sampler(model, num_blocks=32, block_size=4, eos_token_ids=[free[3]])
    assert eos_sampler.generate([prompt], SamplingParams(temperature=0, max_tokens=20))[0].token_ids == \
        free[:free.index(free[3]) + 1]


def test_context_limit(model):
    sampler = Sampler(model, num_blocks=32, block_size=4, max_model_len=40)
    with pytest.raises(ValueError, match="prompt of 40 tokens .* context limit of 40"):
        sampler.add_request(prompts_of([40])[0], SamplingParams())
    over = sampler.generate(prompts_of([45]), SamplingParams(on_context_overflow="finish", n=2))[0]
    assert [(o.token_ids, o.finish_reason) for o in over] == [([], "context limit")] * 2
    out = sampler.generate(prompts_of([35]), SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "context limit"


def test_new_weight_version_and_release(model):
    sampler = Sampler(model, num_blocks=32, block_size=4)
    prompt = prompts_of([21], seed=8)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = sampler.generate([prompt], params)[0]
    computed = sampler.stats.prompt_tokens_computed
    sampler.generate([prompt], params)
    assert sampler.stats.prompt_tokens_computed - computed == 1  # all cached but the last token
    sampler.new_weight_version()
    computed = sampler.stats.prompt_tokens_computed
    sampler.generate([prompt], params)
    assert sampler.stats.prompt_tokens_computed - computed == 21
    sampler.add_request(prompt, params)
    with pytest.raises(RuntimeError, match="1 requests are still running"):
        sampler.release()
    while sampler.has_unfinished():
        sampler.step()
    sampler.release()
    assert sampler.kv_cache is None
    # Between rollout phases (training runs in the freed memory) a weight update must not rebuild the pool;
    # versions keep counting across releases.
    assert sampler.new_weight_version() == 2 and sampler.kv_cache is None
    assert sampler.generate([prompt], params)[0].token_ids == first.token_ids
    assert sampler.new_weight_version() == 3


def test_bad_input_is_refused_clearly(model):
    sampler = Sampler(model, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match=r"prompt token 1 is 128: expected an int in \[0, vocab_size=128\)"):
        sampler.add_request([1, VOCAB, 2])
    with pytest.raises(ValueError, match="empty prompt"):
        sampler.add_request([])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        sampler.add_request([1], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="n=9 exceeds the sampler's max_num_seqs=8"):
        Sampler(model, num_blocks=8, block_size=4, max_num_seqs=8).add_request([1], SamplingParams(n=9))
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        sampler.generate([[1]], [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="temperature=-1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p=0"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="on_context_overflow='truncate'"):
        SamplingParams(on_context_overflow="truncate")
    with pytest.raises(ValueError, match="at most one of num_blocks and kv_cache_bytes"):
        Sampler(model, num_blocks=8, kv_cache_bytes=1 << 20)
    with pytest.raises(ValueError, match="holds no block"):
        Sampler(model, kv_cache_bytes=100, block_size=4)


def test_defaults_for_everything_but_the_model(model):
    # CPU default: 8 sequences of max_position_embeddings tokens; 1024 bytes per 4-token block here.
    sampler = Sampler(model)
    per_token = 1024 // 4
    assert sampler.num_blocks == 8 * model.config.max_position_embeddings * per_token // (16 * per_token)
    out = sampler.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].token_ids) == 5 and out[0].finish_reason == "length"


def test_pool_sized_from_a_memory_budget(model):
    # k and v, 2 layers, 4 tokens, 2 kv heads of 8 dims, fp32: 1024 bytes per block.
    sampler = Sampler(model, kv_cache_bytes=1024 * 10 + 100, block_size=4)
    assert sampler.num_blocks == 10 and sampler.max_model_len == 40
    sampler.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
    assert sampler.kv_cache.pool.numel() * 4 == 1024 * 10


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.6)])
def test_sample_tokens_follows_the_truncated_distribution(top_k, top_p):
    from protege.rollout.sampler.sampling import sample_tokens
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -9.0])
    temperature, draws = 0.8, 20000
    probs = (logits.double() / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros(8, dtype=torch.bool)
    mass = 0.0
    for rank, token in enumerate(order.tolist()):  # the independent truncation rule: top-k, then nucleus
        if (top_k and rank >= top_k) or mass >= top_p:
            break
        keep[token] = True
        mass += probs[token].item()
    expected = torch.where(keep, probs, 0.0)
    expected /= expected.sum()
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * draws
    uniforms = kernels.philox_uniforms(torch.arange(draws), torch.zeros(draws, dtype=torch.int64))
    tokens, complete = sample_tokens((logits / temperature).expand(draws, 8).clone(), params, uniforms)
    assert complete.all()
    freq = torch.bincount(tokens, minlength=8).double() / draws
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-12), (freq, expected)


def test_top_p_over_candidates_is_the_full_draw_or_says_incomplete():
    from protege.rollout.sampler.sampling import sample_tokens
    g = torch.Generator().manual_seed(0)
    rows = 64
    z = torch.randn(rows, 200, generator=g) * torch.linspace(0.2, 6, rows)[:, None]   # flat to peaked rows
    params = [SamplingParams(top_p=0.9)] * rows
    uniforms = kernels.philox_uniforms(torch.arange(rows), torch.zeros(rows, dtype=torch.int64))
    full, every = sample_tokens(z, params, uniforms, candidates=None)
    assert every.all()
    part, complete = sample_tokens(z, params, uniforms, candidates=16)
    # Independently: the nucleus closes within the 16 most likely tokens iff they hold >= 0.9 of the mass.
    top16 = z.double().softmax(-1).topk(16).values.sum(-1)
    clear = (top16 - 0.9).abs() > 1e-5
    assert torch.equal(complete[clear], (top16 >= 0.9)[clear])
    assert 0 < int(complete.sum()) < rows
    assert torch.equal(part[complete], full[complete])


def test_a_nucleus_wider_than_the_candidates_is_drawn_over_every_token(model):
    prompts = prompts_of([6, 9, 13], seed=8)
    params = [SamplingParams(top_p=0.98, seed=i, max_tokens=8, ignore_eos=True) for i in range(3)]
    outs = {}
    for candidates in (2, None):   # 2: every draw's nucleus is wider, so every draw takes the fallback
        sampler = Sampler(model, num_blocks=32, block_size=4)
        sampler.top_p_candidates = candidates
        outs[candidates] = sampler.generate(prompts, params)
    assert [o.token_ids for o in outs[2]] == [o.token_ids for o in outs[None]]
    assert [o.logprobs for o in outs[2]] == [o.logprobs for o in outs[None]]


class CachingAllocator:
    """What torch.cuda reports of a GPU with PyTorch's caching allocator: memory a freed tensor held stays
    reserved (used, to the driver) until empty_cache() hands back the idle blocks."""

    def __init__(self, total, allocated):
        self.total, self.allocated, self.reserved = total, allocated, allocated

    def malloc(self, size):
        self.allocated += size
        self.reserved = max(self.reserved, self.allocated)

    def free(self, size):
        self.allocated -= size

    def mem_get_info(self, device=None):
        return self.total - self.reserved, self.total

    def empty_cache(self):
        self.reserved = self.allocated


def test_kv_pool_is_sized_the_same_at_every_rollout(model, monkeypatch):
    """From the second rollout on, the memory of the last pool and of training's activations sits in the
    allocator's cache; sized from mem_get_info alone, the pool would shrink at every step."""
    from protege.rollout.sampler.kv_cache import bytes_per_block
    gpu = CachingAllocator(total=80 << 30, allocated=30 << 30)   # weights and optimizer state stay
    monkeypatch.setattr(torch.cuda, "mem_get_info", gpu.mem_get_info)
    monkeypatch.setattr(torch.cuda, "empty_cache", gpu.empty_cache)
    sampler = Sampler(model, kv_cache_fraction=0.8)
    sampler.device = torch.device("cuda", 0)   # a CUDA sampler's sizing rule (no GPU here to build its pool on)
    sizes = []
    for _ in range(3):
        sampler._size_pool()                   # what the first request of a rollout does
        sizes.append(sampler.num_blocks)
        pool = sampler.num_blocks * bytes_per_block(model.config, sampler.block_size, sampler.dtype)
        gpu.malloc(pool)
        gpu.free(pool)                         # leaving rollout mode frees the pool...
        gpu.malloc(20 << 30)
        gpu.free(20 << 30)                     # ...and training's activations come and go
    assert sizes[0] == int(0.8 * (50 << 30)) // bytes_per_block(model.config, sampler.block_size, sampler.dtype)
    assert sizes == [sizes[0]] * 3
