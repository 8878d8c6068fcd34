"""Sections: op speed, token_logprobs time and memory, sampler speed, SFT step speed."""
from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch

import generation  # benchmarks/ siblings: benchmarks/ is first on sys.path (the script's folder)
import kernel_timings
import logprobs_memory

from .report import Section
from .suite import (COMMON, QWEN_7B, TINY_UNTIED, Suite, default_dtype, hf_config, max_rel, packed_ids, prompts_of,
                    random_model)


# -- speed ---------------------------------------------------------------------------------------------------------
def section_ops_speed(suite: Suite, sec: Section):
    S = kernel_timings.Shapes
    tiny = S(tokens=16, hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=32, vocab=64, docs=2)
    shapes = suite.pick(S(tokens=8192), dry=tiny)
    attention_8k = suite.pick(S(tokens=8192, docs=1), dry=S(**dict(vars(tiny), tokens=32, docs=1)))
    use_compile = not suite.quick and not suite.dry
    if not use_compile:
        sec.note("torch.compile: not timed in this mode (" + ("dry run: compiling on the CPU takes minutes"
                 if suite.dry else "--quick") + ").")
    dtype = suite.pick(torch.bfloat16, dry=torch.float32)
    sec.note(f"dtype {str(dtype)[6:]}, {'7B' if not suite.dry else 'tiny'} shapes at {shapes.tokens} tokens "
             f"({shapes.docs} documents for attention); medians of triton.testing.do_bench (host timer on the CPU); "
             f"share = rate / datasheet peak (n/a: unknown device); speedup = eager ms / ms.")
    rows = []

    def on_row(r):
        r = dict(r)
        eager = next((x["ms"] for x in rows if x["op"] == r["op"] and x["impl"] == "eager"
                      and x.get("mode") == r.get("mode") and "ms" in x), None)
        if eager and "ms" in r:
            r["speedup_vs_eager"] = eager / r["ms"]
        if r["status"] != "ok":  # a time cap: SKIP; our kernel failing: ERROR; a baseline failing: UNMEASURED
            r["detail"] = r["status"]
            r["status"] = "SKIP" if r["status"].startswith("UNMEASURED") else \
                "ERROR" if r["impl"] == "triton" else "UNMEASURED"
        rows.append(r)
        sec.add(r)

    kernel_timings.bench_ops(kernel_timings.OPS, shapes, suite.device, dtype, suite.limits, use_compile, sec.out_of_time,
                           on_row)
    attention = [op for op in kernel_timings.OPS if op.name == "varlen_attention"]
    sec.note(f"varlen_attention also at {attention_8k.tokens} tokens in one document (the '8K' rows).")
    kernel_timings.bench_ops(attention, attention_8k, suite.device, dtype, suite.limits, False, sec.out_of_time,
                           lambda r: on_row({**r, "op": f"{r['op']} 8K"}))


def section_logprobs_memory(suite: Suite, sec: Section):
    from protege.kernels import reference
    from protege.kernels.ops.token_logprobs import token_logprobs_triton
    t, h, v = suite.pick(8192, dry=32), suite.pick(3584, dry=32), suite.pick(152064, dry=700)
    dtype = suite.pick(torch.bfloat16, dry=torch.float32)
    sec.note(f"Forward + backward at T={t}, H={h}, V={v} ({str(dtype)[6:]}). Peak extra = "
             + ("torch.cuda.max_memory_allocated during the op - allocated before." if suite.device.type == "cuda"
                else "VmHWM after the op - VmRSS before (logprobs_memory.py's method, in-process)."))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(t, h, generator=g).to(suite.device, dtype)
    weight = (torch.randn(v, h, generator=g) * 2 / h ** 0.5).to(suite.device, dtype)
    targets = torch.randint(0, v, (t,), generator=g).to(suite.device)
    upstream = torch.rand(t, generator=g).to(suite.device)
    results = {}

    def fwd_bwd(fn):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp = fn(x, w, targets, 1.0)
        (logp * upstream).sum().backward()
        return logp.detach(), x.grad, w.grad

    def measure(label, fn):
        def run():
            if not suite.dry:
                fwd_bwd(fn)  # warm-up (compiles)
            suite.sync()
            if suite.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                out = fwd_bwd(fn)
                peak = torch.cuda.max_memory_allocated() - before
            else:
                logprobs_memory.reset_high_water_mark()
                before = logprobs_memory.status_bytes("VmRSS")
                out = fwd_bwd(fn)
                peak = logprobs_memory.status_bytes("VmHWM") - before
            results[label] = out
            ms = kernel_timings.time_ms(lambda: fwd_bwd(fn), suite.device)
            return dict(status="PASS", ms=ms, peak_extra_gib=peak / 2 ** 30)
        return sec.check(f"token_logprobs {label}", run)

    with suite.triton_kernels():
        fused = measure("fused (Triton)", token_logprobs_triton)
        unfused = measure("unfused (logits + log_softmax)", reference.token_logprobs)
    if fused and unfused and "ms" in fused and "ms" in unfused:
        a, b = results["fused (Triton)"], results["unfused (logits + log_softmax)"]
        sec.add(dict(check="fused / unfused", status="PASS", time_ratio=fused["ms"] / unfused["ms"],
                     memory_ratio=fused["peak_extra_gib"] / max(unfused["peak_extra_gib"], 1e-12),
                     logp_max_abs_diff=(a[0] - b[0]).abs().max().item(), grad_hidden_max_rel=max_rel(a[1], b[1])))


def bandwidth_bound(config, dtype, prompt_lens, out_lens, steps, bytes_per_s) -> float:
    """Tokens/s if every decode step only read the weights once and each sequence's KV once (prefill and all
    compute ignored): a ceiling, not an estimate of what is reachable."""
    from protege.engine.training.metrics import matmul_params
    from protege.rollout.sampler.kv_cache import bytes_per_block
    weight_bytes = (matmul_params(config)) * torch.finfo(dtype).bits // 8
    kv_per_token = bytes_per_block(config, 1, dtype)
    kv_reads = sum(o * p + o * (o - 1) // 2 for p, o in zip(prompt_lens, out_lens)) * kv_per_token
    seconds = (steps * weight_bytes + kv_reads) / bytes_per_s
    return sum(out_lens) / seconds


def section_sampler_speed(suite: Suite, sec: Section):
    from transformers import Qwen2ForCausalLM as HFQwen2
    from protege.rollout.sampler import Sampler, SamplingParams
    dtype = suite.pick(torch.bfloat16, dry=torch.float32)
    shape = suite.pick(QWEN_7B, dry=TINY_UNTIED)
    model = random_model(suite, shape, None, dtype)
    config = model.config
    vocab = min(config.vocab_size, 151643)
    scale = suite.pick(dict(generation.SCALES["full"], groups=4, turns=8),
                       dict(generation.SCALES["full"], prompts=64, groups=2, turns=6),
                       dict(prompts=4, lo=4, hi=12, hf_batch=4, groups=1, turns=2, task_len=40,
                            observation=(3, 6), output=(2, 4)))
    repeats = suite.pick(3, 2, 1)
    hf_subset = suite.pick(32, 16, 2)
    prompts, out_lens = generation.throughput_workload(scale, vocab)
    trajectories = generation.agent_workload(scale, vocab)
    pool = dict(kv_cache_bytes=int(0.45 * torch.cuda.mem_get_info()[0])) if suite.device.type == "cuda" \
        else dict(num_blocks=256)

    def make_sampler():
        return Sampler(model, block_size=16, max_num_seqs=256, max_num_batched_tokens=suite.pick(8192, dry=64), **pool)
    sampler = make_sampler()
    bw = suite.limits["bytes_per_s"] if suite.limits else None
    sec.note(f"Random weights at the {'Qwen2.5-7B' if not suite.dry else 'tiny'} shape, {str(dtype)[6:]}. Workloads "
             f"of benchmarks/generation.py: throughput {scale['prompts']} prompts, in/out U[{scale['lo']}, "
             f"{scale['hi']}], T={generation.TEMPERATURE}, EOS ignored; agent {scale['groups']} groups of 6, "
             f"{scale['turns']} turns. Medians over up to {repeats} runs after a warm-up (fewer if the cap is "
             f"reached: 'runs' says how many). transformers generate runs the first {hf_subset} prompts as one "
             f"batch (outputs capped at 256 tokens, to fit the budget); ours is timed on the same subset, for that "
             f"ratio and for exact vs fast mode. Bandwidth bound: weights once per step + "
             f"each sequence's KV once per step, at the datasheet HBM rate; compute ignored (a ceiling).")
    generation.run_ours_throughput(sampler, prompts[:4], [8] * 4)  # warm-up: kernels, graphs, pool

    def timed(run, n=repeats):
        runs = []
        for _ in range(n):
            if runs and sec.out_of_time():
                break
            runs.append(run())
        rate, seconds = generation.median_rate(runs)
        return dict(tokens_per_s=rate, seconds=seconds, runs=len(runs))

    results = {}

    def throughput():
        before = sampler.stats.steps
        r = timed(lambda: generation.run_ours_throughput(sampler, prompts, out_lens))
        steps = (sampler.stats.steps - before) / r["runs"]
        if bw:
            r["bandwidth_bound_tokens_per_s"] = bandwidth_bound(config, dtype, list(map(len, prompts)), out_lens, steps, bw)
            r["share_of_bound"] = r["tokens_per_s"] / r["bandwidth_bound_tokens_per_s"]
        else:
            r["share_of_bound"] = "UNMEASURED (unknown device peak)"
        return dict(status="PASS", output_tokens=sum(out_lens), **r)
    sec.check(f"throughput: {scale['prompts']} prompts (nano-vllm workload)", throughput)

    sub_p, sub_o = prompts[:hf_subset], [min(o, suite.pick(256, dry=o)) for o in out_lens[:hf_subset]]

    def subset(exact: bool):
        def run():
            # CUDA graphs capture the projections of the mode they were made in: exact mode gets its own sampler
            if not exact:
                r = timed(lambda: generation.run_ours_throughput(sampler, sub_p, sub_o))
            else:
                sampler.release()
                model.exact = True
                try:
                    exact_sampler = make_sampler()
                    generation.run_ours_throughput(exact_sampler, sub_p[:4], [8] * len(sub_p[:4]))  # warm-up
                    r = timed(lambda: generation.run_ours_throughput(exact_sampler, sub_p, sub_o))
                    exact_sampler.release()
                finally:
                    model.exact = False
            results["exact" if exact else "fast"] = r["tokens_per_s"]
            return dict(status="PASS", output_tokens=sum(sub_o), **r)
        return run
    sec.check(f"throughput subset ({hf_subset} prompts), fast mode", subset(False))

    def agent():
        def run():
            sampler.new_weight_version()  # cold prefix cache, as after a weight update
            before = dict(vars(sampler.stats))
            out = generation.run_ours_agent(sampler, trajectories)
            results["agent_cache"] = (sampler.stats.cached_tokens - before["cached_tokens"],
                                      sampler.stats.prompt_tokens - before["prompt_tokens"])
            return out
        r = timed(run)
        cached, submitted = results["agent_cache"]
        results["agent"] = r["tokens_per_s"]
        return dict(status="PASS", trajectories=len(trajectories), prompt_tokens=submitted,
                    served_from_prefix_cache=cached, **r)
    sec.check(f"agent: {len(trajectories)} trajectories", agent)

    single_prompt, single_out = prompts_of([suite.pick(128, dry=8)], vocab, seed=3), suite.pick(256, dry=4)

    def single_stream():
        params = SamplingParams(temperature=0, max_tokens=single_out, ignore_eos=True)

        def run():
            start = time.perf_counter()
            sampler.generate(single_prompt, params)
            return single_out, time.perf_counter() - start
        r = timed(run)
        results["single"] = r["tokens_per_s"]
        if bw:
            r["bandwidth_bound_tokens_per_s"] = bandwidth_bound(config, dtype, [len(single_prompt[0])], [single_out],
                                                                single_out, bw)
            r["share_of_bound"] = r["tokens_per_s"] / r["bandwidth_bound_tokens_per_s"]
        return dict(status="PASS", prompt=len(single_prompt[0]), output_tokens=single_out, **r)
    sec.check("single-stream decode (CUDA graphs)" if suite.device.type == "cuda" else "single-stream decode", single_stream)
    sec.check(f"throughput subset ({hf_subset} prompts), exact mode", subset(True))
    if "exact" in results and "fast" in results:
        sec.add(dict(check="exact / fast mode (subset)", status="PASS", ratio=results["exact"] / results["fast"]))

    sampler.release()
    hf_state = {}

    def build_hf():
        with torch.device(suite.device), default_dtype(dtype):
            hf = HFQwen2(hf_config(shape, None)).eval()
        missing, _ = hf.load_state_dict(model.state_dict(), strict=False)
        if missing:
            raise RuntimeError(f"transformers' model has weights ours lacks: {missing[:5]}")
        hf_state["hf"] = hf

    def hf_throughput():
        build_hf()
        hf = hf_state["hf"]
        with torch.inference_mode():
            generation.hf_generate(hf, prompts[:2], 4)
            r = timed(lambda: generation.run_hf_throughput(hf, sub_p, sub_o, hf_subset), suite.pick(2, 1, 1))
        out = dict(status="PASS", output_tokens=sum(sub_o), **r)
        if "fast" in results:
            out["ours_over_transformers"] = results["fast"] / r["tokens_per_s"]
        return out
    sec.check(f"transformers generate: throughput subset ({hf_subset} prompts)", hf_throughput)

    def hf_agent():
        with torch.inference_mode():
            r = timed(lambda: generation.run_hf_agent(hf_state["hf"], trajectories)[:2], 1)
        out = dict(status="PASS", trajectories=len(trajectories), **r)
        if "agent" in results:
            out["ours_over_transformers"] = results["agent"] / r["tokens_per_s"]
        return out
    sec.check("transformers generate: agent", hf_agent) if "hf" in hf_state else sec.skip(
        "transformers generate: agent", "transformers model not built")

    def hf_single():
        with torch.inference_mode():
            r = timed(lambda: (single_out, _timed_call(lambda: generation.hf_generate(hf_state["hf"], single_prompt,
                                                                                    single_out))), 1)
        out = dict(status="PASS", **r)
        if "single" in results:
            out["ours_over_transformers"] = results["single"] / r["tokens_per_s"]
        return out
    sec.check("transformers generate: single stream", hf_single) if "hf" in hf_state else sec.skip(
        "transformers generate: single stream", "transformers model not built")
    hf_state.clear()

    if suite.report.meta["versions"]["vllm"] == "not installed":
        sec.skip("vLLM offline API: throughput workload", "vLLM not installed: no comparison (see README, GPU suite)")
    else:
        def vllm():
            path = Path(suite.tmp.name) / "vllm_ckpt"
            model.save_pretrained(path)
            rate, seconds = generation.median_rate([generation.run_vllm_throughput(str(path), prompts, out_lens, dtype)])
            throughput_row = next((r for r in sec.data["rows"] if r["check"].startswith("throughput:")), {})
            out = dict(status="PASS", tokens_per_s=rate, seconds=seconds, runs=1)
            if "tokens_per_s" in throughput_row:
                out["ours_over_vllm"] = throughput_row["tokens_per_s"] / rate
            return out
        sec.check("vLLM offline API: throughput workload", vllm)


def _timed_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def section_sft_speed(suite: Suite, sec: Section):
    from protege.engine.config import ModelConfig
    from protege.engine.training.metrics import matmul_params, training_flops
    from protege.engine.training.parallelize import apply_activation_checkpointing, shard
    from protege.engine.training.sft import TokenNLL
    shape = suite.pick(QWEN_7B, dry=TINY_UNTIED)
    full_layers = shape["num_hidden_layers"]
    docs, doc_len = suite.pick(4, dry=2), suite.pick(2048, dry=16)
    steps = suite.pick(3, 2, 1)
    runtime = suite.process_group()
    compute = suite.pick(torch.bfloat16, dry=torch.float32)
    cfg_full = ModelConfig(**dict(shape, **COMMON))
    one = ModelConfig(**dict(shape, **COMMON, num_hidden_layers=1))
    embedding = shape["vocab_size"] * shape["hidden_size"]
    layer_params = matmul_params(one) - embedding  # (biases and norms: negligible)
    fixed_params = embedding * (1 if shape["tie_word_embeddings"] else 2)
    bytes_per_param = 4 + 4 + 8 + 2  # fp32 master, fp32 grad, AdamW moments, bf16 gathered copy
    if suite.device.type == "cuda":
        free = torch.cuda.mem_get_info()[0]
        fits = int((0.7 * free - fixed_params * bytes_per_param) // (layer_params * bytes_per_param))
        big = max(2, min(full_layers, fits))
    else:
        big = 2
    small = 1
    sec.note(f"Method: the {'Qwen2.5-7B' if not suite.dry else 'tiny'} shape (random weights) with L layers, FSDP2 "
             f"on one rank ({'NCCL' if suite.device.type == 'cuda' else 'gloo'}), {str(compute)[6:]} compute / fp32 master, "
             f"activation checkpointing, AdamW, {docs} documents of {doc_len} tokens per step; median step time at "
             f"L={small} and L={big} (as many as fit: 18 bytes per parameter and 30% of the free memory for "
             f"activations). Per layer = (t(L={big}) - t(L={small})) / {big - small}; the rest = embedding, head, "
             f"loss and their optimizer. 28-layer step time = rest + 28 x per layer: EXTRAPOLATED, not measured.")
    times = {}

    def run_at(layers):
        def run():
            gc.collect()  # the previous build's FSDP modules (their hooks make reference cycles)
            if suite.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model = random_model(suite, shape, layers, torch.float32)
            apply_activation_checkpointing(model)
            root = TokenNLL(model)
            shard(root, list(model.model.layers), runtime, compute)
            opt = torch.optim.AdamW(root.parameters(), lr=1e-5, fused=suite.device.type == "cuda")  # as sft.py
            ids, cu = packed_ids([doc_len] * docs, shape["vocab_size"], suite.device, seed=layers)
            targets, weights = torch.roll(ids, -1), torch.full((docs * doc_len,), 1.0 / (docs * doc_len), device=suite.device)
            durations = []
            for s in range(steps + 1):
                suite.sync()
                start = time.perf_counter()
                root(ids, cu, targets, weights).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                suite.sync()
                if s:  # the first step compiles and allocates
                    durations.append(time.perf_counter() - start)
                if s and sec.out_of_time():
                    break
            t = statistics.median(durations)
            times[layers] = t
            cfg = ModelConfig(**dict(shape, **COMMON, num_hidden_layers=layers))
            flops = training_flops(cfg, [doc_len] * docs)
            out = dict(status="PASS", layers=layers, step_s=t, tokens_per_s=docs * doc_len / t, steps=len(durations))
            out["mfu"] = flops / t / suite.limits["flop_per_s"] if suite.limits else "UNMEASURED (unknown peak)"
            if suite.device.type == "cuda":
                out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            if layers == big:
                rollout_switch(suite, sec, model, root)
            del opt, root, model
            return out
        return run

    sec.check(f"SFT step, {small} layer(s)", run_at(small))
    sec.check(f"SFT step, {big} layers", run_at(big))
    if small in times and big in times:
        per = (times[big] - times[small]) / (big - small)
        rest = times[small] - small * per
        t_full = rest + full_layers * per
        flops = training_flops(cfg_full, [doc_len] * docs)
        sec.add(dict(check=f"extrapolated to {full_layers} layers", status="PASS", per_layer_s=per, rest_s=rest,
                     step_s=t_full, tokens_per_s=docs * doc_len / t_full,
                     mfu=flops / t_full / suite.limits["flop_per_s"] if suite.limits else "UNMEASURED (unknown peak)",
                     how="EXTRAPOLATED"))


def rollout_switch(suite: Suite, sec: Section, model, root):
    try:
        from protege.engine.training.parallelize import RolloutMode
    except ImportError:
        sec.skip("rollout-mode switch", "not available on this commit (RolloutMode is not importable)")
        return
    from protege.rollout.sampler import Sampler, SamplingParams

    def run():
        sampler = Sampler(model, num_blocks=64, block_size=16)
        rollout = RolloutMode(root, model, sampler)
        with rollout:
            sampler.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        s = rollout.last_switch
        return dict(status="PASS", enter_s=s.enter_seconds, leave_s=s.leave_seconds, switch_s=s.seconds,
                    gathered_gib=s.gathered_bytes / 2 ** 30, copied_bytes=s.copied_bytes)
    sec.check("rollout-mode switch", run)
