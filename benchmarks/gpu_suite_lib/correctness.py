"""Sections: ops_correctness (Triton vs fp64), model_vs_hf, sampler_checks."""
from __future__ import annotations

import functools

import torch

import kernel_timings  # a benchmarks/ sibling: benchmarks/ is first on sys.path (the script's folder)
from protege.kernels.precision import fp64_error_and_bound

from .report import Section
from .suite import QWEN_0_5B, QWEN_7B, TINY_TIED, TINY_UNTIED, Suite, packed_ids, prompts_of, random_pair


# -- correctness -------------------------------------------------------------------------------------------------
def op_results(fn, args, dtype, upstream_seed=1):
    """Outputs and input gradients of fn on a copy of args in `dtype` (float tensors), with fixed upstream
    gradients drawn in fp64 (the same values for every dtype)."""
    copied = [a.detach().to(dtype).clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
              else a for a in args]
    outs = kernel_timings.outputs_of(fn(*copied))
    g = torch.Generator().manual_seed(upstream_seed)
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs] + [a.grad for a in kernel_timings.leaves(copied)]


def check_op(op, impl, shapes, dtype, device):
    torch.manual_seed(0)
    args = op.make_args(shapes, device, torch.float64)
    ref = op_results(getattr(kernel_timings.reference, op.name), args, torch.float64)
    base = op_results(getattr(kernel_timings.reference, op.name), args, dtype)
    got = op_results(impl, args, dtype)
    worst, margin = None, float("inf")
    for i, (x, t, r) in enumerate(zip(got, base, ref)):
        if r is None:
            continue
        if x is None:
            return dict(status="FAIL", detail=f"output/gradient {i} missing")
        err, bound = fp64_error_and_bound(x, t, r, dtype)
        if not err <= bound:
            return dict(status="FAIL", detail=f"tensor {i}: error {err:.3g} > allowed {bound:.3g}")
        if bound - err < margin:
            margin, worst = bound - err, (err, bound)
    return dict(status="PASS", max_err=worst[0], allowed=worst[1]) if worst else dict(status="FAIL", detail="nothing compared")


def ops_correctness_cases(suite: Suite) -> list[tuple[str, dict, object]]:
    """(check name, row fields, fn or None if the Triton op is missing) of every op_correctness check, in
    order: the section runs them, the warm-up (section_warm_up) runs them ahead to compile their kernels."""
    S = kernel_timings.Shapes
    shapes = suite.pick({"7B dims": S(tokens=1024), "odd": S(tokens=777, hidden=1000, heads=6, kv_heads=2,
                                                                 head_dim=80, intermediate=2731, vocab=5003, docs=3)},
                        dry={"tiny": S(tokens=37, hidden=80, heads=4, kv_heads=2, head_dim=32, intermediate=96,
                                       vocab=300, docs=2), "odd": S(tokens=23, hidden=72, heads=6, kv_heads=2, head_dim=24,
                                                        intermediate=50, vocab=333, docs=3)})
    cases = []
    for label, s in shapes.items():
        for op in kernel_timings.OPS:
            fn = kernel_timings.load_triton(op)
            for dtype in suite.dtype16() if not (suite.dry and label == "odd") else (torch.bfloat16,):
                run = functools.partial(check_op, op, fn, s, dtype, suite.device) if fn is not None else None
                cases.append((f"{op.name} [{label}]", dict(dtype=str(dtype)[6:]), run))
    # optional attention backends against our kernel (bf16, CUDA only)
    s = next(iter(shapes.values()))
    attention = next(op for op in kernel_timings.OPS if op.name == "varlen_attention")
    for impl, fn in kernel_timings.third_party(attention).items():
        cases.append((f"varlen_attention [{impl}]", dict(dtype="bfloat16"),
                      functools.partial(check_op, attention, fn, s, torch.bfloat16, suite.device)))
    cases += [("paged_attention (decode + prefill chunk), write_kv_cache", {}, functools.partial(check_paged, suite)),
              ("exact-mode bits: linear M tiles (benchmarks/gpu_exact_check.py)", {},
               functools.partial(check_linear_tiles, suite)),
              ("exact-mode bits: paged decode and prefill chunk == training attention; fast decode batch-invariant", {},
               functools.partial(check_exact_paged, suite)),
              ("sampler bits: fused token_logprobs batch-invariant; Philox kernel == PyTorch", {},
               functools.partial(check_sampler_head, suite))]
    return cases


def section_ops_correctness(suite: Suite, sec: Section):
    sec.note("Rule (tests/numerics.py): error vs fp64 <= 2 x the error of PyTorch eager at the same dtype + a "
             "floor (1 bf16 ulp / 1e-5 for fp16) x the reference's scale, for every output and input gradient; "
             "the row shows the tensor closest to its bound.")
    with suite.triton_kernels():
        for name, fields, run in ops_correctness_cases(suite):
            if run is None:
                sec.add(dict(check=name, **fields, status="FAIL", detail="Triton op missing"))
            else:
                sec.check(name, run, **fields)
        for name in ("flash_attn", "xformers"):
            if suite.report.meta["versions"][name] == "not installed":
                sec.skip(f"varlen_attention [{name}]", f"{name} not installed")


def check_linear_tiles(suite: Suite):
    """Every M tile the exact-mode linear may pick on this device gives the 128-row tile's bits."""
    import gpu_exact_check
    from protege.kernels.ops import linear
    dtype, shape = suite.pick(torch.bfloat16, dry=torch.float32), suite.pick((300, 512, 3584), dry=(40, 160, 80))
    r = gpu_exact_check.linear_tiles(suite.device, dtype, *shape)
    allowed = list(linear._device_tiles(suite.device, dtype)[0])
    bad = [bm for bm in allowed if not (r["same_as_128"][bm] and r["row_alone_same_as_128"][bm])]
    others = {bm: r["same_as_128"][bm] for bm in linear.BLOCK_MS if bm not in allowed}
    return dict(status="FAIL" if bad else "PASS", dtype=str(dtype)[6:],
                detail=f"tiles in use {allowed}: {'all equal' if not bad else f'{bad} DIFFER'}; "
                       f"tiles kept out, equal to 128: {others or 'none'}")


def check_sampler_head(suite: Suite):
    import gpu_exact_check
    dtype = suite.pick(torch.bfloat16, dry=torch.float32)
    r = gpu_exact_check.sampler_head_checks(suite.device, dtype, *suite.pick((256, 152064, 3584), dry=(5, 300, 64)))
    ok = r["fused_rows_equal_batch"] and r["philox_equals_reference"]
    return dict(status="PASS" if ok else "FAIL", dtype=str(dtype)[6:],
                detail=f"fused token_logprobs, rows alone == batch: {r['fused_rows_equal_batch']}; Philox kernel == "
                       f"PyTorch: {r['philox_equals_reference']}; fast mode's log p from stored logits == fused: "
                       f"{r['from_logits_equals_fused']} (max abs diff {r['from_logits_max_abs_diff']:.3g}; "
                       f"not required)")


def check_exact_paged(suite: Suite):
    import gpu_exact_check
    dtype = suite.pick(torch.bfloat16, dry=torch.float32)
    lengths = suite.pick(gpu_exact_check.PAGED_LENGTHS, dry=[1, 17, 40])
    runs = [gpu_exact_check.paged_checks(suite.device, dtype, lengths, heads, chunk=suite.pick(64, dry=5))
            for heads in suite.pick(gpu_exact_check.PAGED_HEADS, dry=[(4, 2, 32)])]
    keys = ("exact_decode_equals_training", "exact_chunk_equals_training", "fast_row_alone_equals_batch")
    ok = all(all(r[k]) for r in runs for k in keys)
    detail = "; ".join(f"head_dim {r['heads'][2]}: " + ", ".join(f"{k} {r[k]}" for k in keys) for r in runs)
    return dict(status="PASS" if ok else "FAIL", dtype=str(dtype)[6:], detail=f"contexts {lengths}; {detail}")


def check_paged(suite: Suite):
    """Decode and a chunk of prefill over a paged cache, Triton vs the PyTorch reference (bf16, fp32 compare)."""
    from protege.kernels import dispatch as kernels
    from protege.kernels import reference
    d, hq, hkv, page = suite.pick(128, dry=32), suite.pick(28, dry=4), suite.pick(4, dry=2), 16
    contexts, queries = [suite.pick(1000, dry=40), suite.pick(37, dry=9), suite.pick(300, dry=20)], [1, 5, 1]
    blocks = sum(-(-c // page) for c in contexts) + 1
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(blocks, page, hkv, d, generator=g).to(suite.device, torch.bfloat16)
    vc = torch.randn(blocks, page, hkv, d, generator=g).to(suite.device, torch.bfloat16)
    perm = torch.randperm(blocks, generator=g).tolist()
    tables, at = [], 0
    for c in contexts:
        n = -(-c // page)
        tables.append(perm[at:at + n])
        at += n
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=suite.device)
    cu = torch.tensor([0] + torch.tensor(queries).cumsum(0).tolist(), dtype=torch.int32, device=suite.device)
    q = torch.randn(sum(queries), hq, d, generator=g).to(suite.device, torch.bfloat16)
    ctx = torch.tensor(contexts, dtype=torch.int32, device=suite.device)
    got = kernels.paged_attention(q, kc, vc, bt, cu, ctx, max(queries))
    ref = reference.paged_attention(q.double(), kc.double(), vc.double(), bt, cu, ctx, max(queries))
    base = reference.paged_attention(q, kc, vc, bt, cu, ctx, max(queries))
    err, bound = fp64_error_and_bound(got, base, ref, torch.bfloat16)
    # write_kv_cache: new K/V rows into free slots (-1: skipped), Triton vs reference, bit for bit
    n = sum(queries)
    slots = torch.randperm(blocks * page, generator=g)[:n].to(suite.device)
    slots[0] = -1
    k, v = (torch.randn(n, hkv, d, generator=g).to(suite.device, torch.bfloat16) for _ in range(2))
    caches = [(kc.clone(), vc.clone()) for _ in range(2)]
    kernels.write_kv_cache(k, v, *caches[0], slots)
    reference.write_kv_cache(k, v, *caches[1], slots)
    same = all(torch.equal(a, b) for a, b in zip(caches[0], caches[1]))
    return dict(status="PASS" if err <= bound and same else "FAIL", max_err=err, allowed=bound, dtype="bfloat16",
                detail=f"write_kv_cache {'bit-identical to' if same else 'DIFFERS from'} the reference")


def section_model_vs_hf(suite: Suite, sec: Section):
    configs = suite.pick({"Qwen2.5-0.5B (24 layers)": (QWEN_0_5B, None), "Qwen2.5-7B shape, 2 layers": (QWEN_7B, 2)},
                         dry={"tiny tied (0.5B-like)": (TINY_TIED, 1), "tiny untied (7B-like)": (TINY_UNTIED, 1)})
    lengths = suite.pick([300, 1, 700, 47], dry=[5, 1, 7])
    sec.note("Random weights (norms and biases randomised). Reference: transformers fp32, each sequence alone; "
             "ours runs the sequences packed. fp32: logits within 1e-4 x their scale, and every parameter's "
             "gradient of the summed cross-entropy within 1e-4 x max(1, its scale) (as tests/test_model.py); "
             "bf16 logits: error <= 2 x transformers' own bf16 error + 1 bf16 ulp x scale.")
    with suite.triton_kernels():
        for label, (shape, layers) in configs.items():
            def run(label=label, shape=shape, layers=layers):
                hf, ours = random_pair(suite, shape, layers, torch.float32)
                ids, cu = packed_ids(lengths, shape["vocab_size"], suite.device)
                bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
                targets = torch.roll(ids, -1)

                def hf_logits():
                    return torch.cat([hf(ids[a:b][None]).logits[0] for a, b in bounds])
                # fp32: logits and every parameter's gradient of the summed cross-entropy
                ref = hf_logits()
                torch.nn.functional.cross_entropy(ref, targets, reduction="sum").backward()
                ours32 = ours(ids, cu_seqlens=cu)
                torch.nn.functional.cross_entropy(ours32, targets, reduction="sum").backward()
                ref = ref.detach().double()
                rows = [("fp32 logits", *fp64_error_and_bound(ours32.detach(), ours32, ref, torch.float32))]
                hf_params = dict(hf.named_parameters())
                worst = (0.0, 1.0, "")
                for name, p in ours.named_parameters():
                    g = hf_params[name].grad
                    err, bound = (p.grad - g).abs().max().item(), 1e-4 * max(1.0, g.abs().max().item())
                    if err / bound >= worst[0] / worst[1]:
                        worst = (err, bound, name)
                rows.append((f"fp32 gradients (worst: {worst[2]})", worst[0], worst[1]))
                del ours32
                hf.zero_grad(set_to_none=True)
                ours.zero_grad(set_to_none=True)
                with torch.no_grad():  # bf16 logits
                    hf.to(torch.bfloat16)
                    ours.to(torch.bfloat16)
                    base = hf_logits()
                    got = ours(ids, cu_seqlens=cu)
                    rows.append(("bf16 logits", *fp64_error_and_bound(got, base, ref, torch.bfloat16)))
                del hf, ours
                ok = all(e <= b for _, e, b in rows)
                return dict(status="PASS" if ok else "FAIL",
                            detail="; ".join(f"{d}: error {e:.3g} (allowed {b:.3g})" for d, e, b in rows))
            sec.check(f"logits and gradients: {label}", run, tokens=sum(lengths))


def training_logprobs(model, prompts, completions, temperature):
    """The trainer's view: the sequences packed in reverse order into one forward, then token_logprobs."""
    from protege.kernels import dispatch as kernels
    order = list(reversed(range(len(prompts))))
    seqs = [prompts[i] + completions[i] for i in order]
    device = model.lm_head_weight.device
    ids, cu = torch.tensor(sum(seqs, []), device=device), [0]
    for s in seqs:
        cu.append(cu[-1] + len(s))
    result = [None] * len(prompts)
    with torch.no_grad():
        hidden = model(ids, cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device), return_hidden=True)
        for j, i in enumerate(order):
            rows = torch.arange(len(prompts[i]) - 1, len(seqs[j]) - 1, device=device) + cu[j]
            result[i] = kernels.token_logprobs(hidden[rows], model.lm_head_weight,
                                               torch.tensor(completions[i], device=device), temperature).cpu()
    return result


def section_sampler_checks(suite: Suite, sec: Section):
    from protege.rollout.sampler import Sampler, SamplingParams
    shape, layers = suite.pick(QWEN_0_5B, dry=TINY_TIED), suite.pick(4, dry=2)
    vocab = shape["vocab_size"]
    new = suite.pick(32, dry=4)
    prompts = prompts_of(suite.pick([5, 37, 128, 300], dry=[3, 9]), vocab)
    pool = dict(num_blocks=suite.pick(256, dry=32), block_size=16, max_num_batched_tokens=suite.pick(256, dry=16))
    sec.note(f"Random weights, Qwen2.5-0.5B shape with {layers} layers. Greedy in fp32 (bf16 ties flip greedy "
             f"tokens between any two implementations); bit-identity and CUDA graphs in "
             f"{'bf16' if not suite.dry else 'fp32 (interpreter)'}, exact mode.")
    state = {}
    if suite.dry:
        sec.note("Dry run: only the bit-identity check forces the Triton path (interpreter); the others run the "
                 "CPU's PyTorch path to save time (on a GPU all run the Triton kernels).")

    def get_model():  # the fp32 model of the greedy check, made again if that check failed before making it
        if "ours" not in state:
            state["ours"] = random_pair(suite, shape, layers, torch.float32)[1]
        return state["ours"]

    def greedy():
        hf, ours = random_pair(suite, shape, layers, torch.float32)
        state["ours"] = ours
        outs = Sampler(ours, **pool).generate(prompts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
        mismatches = []
        for i, (p, o) in enumerate(zip(prompts, outs)):
            ids = torch.tensor([p], device=suite.device)
            with torch.no_grad():
                want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            if o.token_ids != want:
                first = next(j for j, (a, b) in enumerate(zip(o.token_ids, want)) if a != b)
                mismatches.append(f"prompt {i} differs from token {first}")
        del hf
        return dict(status="FAIL" if mismatches else "PASS", prompts=len(prompts), new_tokens=new,
                    detail="; ".join(mismatches) or "all tokens equal")
    sec.check("greedy sampler == transformers generate (fp32)", greedy)

    def exact_bits():
        model = get_model().to(suite.pick(torch.bfloat16, dry=torch.float32))
        model.exact = True
        params = [SamplingParams(temperature=1.0, max_tokens=new, seed=i, ignore_eos=True) for i in range(len(prompts))]
        with suite.triton_kernels():
            outs = Sampler(model, **pool).generate(prompts, params)
            expected = training_logprobs(model, prompts, [o.token_ids for o in outs], 1.0)
        differ = sum(not torch.equal(torch.tensor(o.logprobs), w) for o, w in zip(outs, expected))
        worst = max((torch.tensor(o.logprobs) - w).abs().max().item() for o, w in zip(outs, expected))
        out = dict(status="FAIL" if differ else "PASS", dtype=str(model.lm_head_weight.dtype)[6:],
                   detail=f"{differ} of {len(outs)} sequences differ (max abs diff {worst:.3g})")
        return out
    sec.check("exact-mode sampler log-probs bit-identical to training forward", exact_bits)

    def graphs():
        model = get_model().to(suite.pick(torch.bfloat16, dry=torch.float32))
        model.exact = not suite.dry  # dry run: both runs are eager anyway; fast mode saves interpreter time
        many = prompts_of(suite.pick([20, 3, 50, 7, 90, 11, 64, 2], dry=[4, 7]), vocab, seed=5)
        params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        with_graphs = Sampler(model, **pool).generate(many, params)  # default: graphs on CUDA
        eager = Sampler(model, cuda_graph_sizes=(), **pool).generate(many, params)
        same_tokens = all(a.token_ids == b.token_ids for a, b in zip(with_graphs, eager))
        same_logp = all(a.logprobs == b.logprobs for a, b in zip(with_graphs, eager))
        detail = f"tokens {'equal' if same_tokens else 'DIFFER'}, log-probs {'bit-identical' if same_logp else 'DIFFER'}"
        if suite.device.type != "cuda":
            detail += " (dry run: no CUDA graphs on the CPU, both runs eager)"
        return dict(status="PASS" if same_tokens and same_logp else "FAIL", detail=detail)
    sec.check("CUDA-graph decode == eager decode (exact mode)", graphs)

    def mixed_graphs():
        # The agent loop's step: requests arrive while others decode, so steps carry decode rows plus a prefill
        # chunk, which the (B + C tokens, C per sequence) graphs take. Dry run: the same graph path, run eagerly
        # through the padded buffers (no CUDA graphs on the CPU), in the interpreter.
        model = get_model().to(suite.pick(torch.bfloat16, dry=torch.float32))
        model.exact = True
        arriving = prompts_of(suite.pick([20, 3, 50, 7, 90, 11, 64, 2], dry=[5, 9, 3]), vocab, seed=6)
        params = [SamplingParams(temperature=1.0, max_tokens=new, seed=i, ignore_eos=True) for i in range(len(arriving))]
        chunk = suite.pick(64, dry=8)
        graph_pool = dict(pool, max_num_batched_tokens=suite.pick(256, dry=12), cuda_graph_max_query_len=chunk)

        def run(sampler):
            ids, results = [], {}
            for prompt, p in zip(arriving, params):
                ids.append(sampler.add_request(prompt, p))
                for _ in range(2):
                    results.update((o.request_id, o.completions[0]) for o in sampler.step())
            while sampler.has_unfinished():
                results.update((o.request_id, o.completions[0]) for o in sampler.step())
            return [results[i] for i in ids], sampler

        with suite.triton_kernels():
            with_graphs, sampler = run(Sampler(model, cuda_graph_sizes=suite.pick((1, 2, 4, 8, 16), dry=(1, 2, 4)),
                                               **graph_pool))
            eager, _ = run(Sampler(model, cuda_graph_sizes=(), **graph_pool))
        replays = sampler.runner.graphs.replays
        mixed = sum(n for (_, q), n in replays.items() if q > 1)
        same = all(a.token_ids == b.token_ids and a.logprobs == b.logprobs for a, b in zip(with_graphs, eager))
        detail = (f"tokens and log-probs {'bit-identical' if same else 'DIFFER'}; {sum(replays.values())} graph "
                  f"steps, {mixed} of them decode + prefill chunk (up to {chunk} tokens per sequence)")
        if suite.device.type != "cuda":
            detail += " (dry run: graph path without CUDA graphs)"
        return dict(status="PASS" if same and mixed else "FAIL", detail=detail)
    sec.check("CUDA-graph decode + prefill chunk == eager (exact mode)", mixed_graphs)
    state.clear()
