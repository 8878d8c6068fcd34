"""Generation throughput of the paged-KV sampler against Hugging Face transformers' generate (and vLLM when it
is installed on a GPU), on two fixed-seed workloads:

- throughput: nano-vllm's benchmark shape -- N prompts of random tokens, input and output lengths uniform in
  [lo, hi], temperature 0.6, EOS ignored (full scale: 256 prompts, [100, 1024]).
- agent: GRPO-shaped multi-turn rollouts -- groups of 6 trajectories sharing a task prompt; each turn appends
  an observation (30-70 tokens) and generates 20-40 tokens. The sampler runs all trajectories concurrently
  through its incremental interface (a finished turn is resubmitted with its observation while the others keep
  decoding) and serves shared prefixes from its cache; generate runs each turn as one left-padded batch and
  recomputes every history.

Token counts are fixed by the workload (EOS ignored), so both sides do the same useful work; transformers
batches pad to the longest output of a batch, and only the requested tokens count. Output tokens/s are
medians over --repeats runs after a warm-up; the ratio is ours / baseline, measured side by side.

    python benchmarks/generation.py                      # CPU scale on a tiny random Qwen2 (~3 min, 2 cores)
    python benchmarks/generation.py --scale full --model /path/to/Qwen2.5-0.5B-Instruct   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from protege.engine.model import Qwen2ForCausalLM
from protege.rollout.sampler import Sampler, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
SCALES = {
    # prompts, length range, HF batch size, agent groups, turns, task prompt length
    "cpu": dict(prompts=32, lo=32, hi=256, hf_batch=16, groups=2, turns=8, task_len=300),
    "full": dict(prompts=256, lo=100, hi=1024, hf_batch=64, groups=16, turns=10, task_len=1000),
}
TEMPERATURE = 0.6


def tiny_checkpoint(directory: str) -> str:
    from transformers import Qwen2Config
    from transformers import Qwen2ForCausalLM as HFQwen2
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=None, bos_token_id=None)
    HFQwen2(config).save_pretrained(directory)
    return directory


def throughput_workload(scale: dict, vocab: int):
    g = torch.Generator().manual_seed(0)
    n, lo, hi = scale["prompts"], scale["lo"], scale["hi"]
    in_lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    out_lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(0, vocab, (k,), generator=g).tolist() for k in in_lens]
    return prompts, out_lens


def agent_workload(scale: dict, vocab: int):
    """Per trajectory: the task prompt (shared by its group of 6), then per turn (observation, output length)."""
    g = torch.Generator().manual_seed(1)
    obs, out = scale.get("observation", (30, 70)), scale.get("output", (20, 40))  # token ranges per turn
    trajectories = []
    for _ in range(scale["groups"]):
        task = torch.randint(0, vocab, (scale["task_len"],), generator=g).tolist()
        for _ in range(6):
            turns = [(torch.randint(0, vocab, (int(torch.randint(obs[0], obs[1] + 1, (1,), generator=g)),),
                                    generator=g).tolist() if t else [],
                      int(torch.randint(out[0], out[1] + 1, (1,), generator=g))) for t in range(scale["turns"])]
            trajectories.append((task, turns))
    return trajectories


def run_ours_throughput(sampler, prompts, out_lens, logprobs=True):
    params = [SamplingParams(temperature=TEMPERATURE, max_tokens=k, ignore_eos=True, seed=i, logprobs=logprobs)
              for i, k in enumerate(out_lens)]
    start = time.perf_counter()
    outs = sampler.generate(prompts, params)
    wall = time.perf_counter() - start
    assert [len(o.token_ids) for o in outs] == out_lens
    return sum(out_lens), wall


def run_ours_agent(sampler, trajectories):
    """All trajectories concurrently: a finished turn is resubmitted with its next observation at once."""
    histories = [list(task) for task, _ in trajectories]
    turn_of = [0] * len(trajectories)
    owner = {}
    produced = 0

    def submit(i):
        obs, out_len = trajectories[i][1][turn_of[i]]
        histories[i] += obs
        owner[sampler.add_request(histories[i], SamplingParams(temperature=TEMPERATURE, max_tokens=out_len,
                                                               ignore_eos=True, seed=1000 * i + turn_of[i]))] = i

    start = time.perf_counter()
    for i in range(len(trajectories)):
        submit(i)
    while owner:
        for out in sampler.step():
            i = owner.pop(out.request_id)
            histories[i] += out.completions[0].token_ids
            produced += len(out.completions[0].token_ids)
            turn_of[i] += 1
            if turn_of[i] < len(trajectories[i][1]):
                submit(i)
    return produced, time.perf_counter() - start


def hf_generate(hf, prompts, max_new, pad_id=0):
    width = max(len(p) for p in prompts)
    device = next(hf.parameters()).device
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding, as generation needs
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    out = hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new, do_sample=True,
                      temperature=TEMPERATURE, top_k=None, top_p=None, eos_token_id=None, pad_token_id=pad_id)
    return [out[r, width:].tolist() for r in range(len(prompts))], len(prompts) * width


def run_hf_throughput(hf, prompts, out_lens, batch):
    start = time.perf_counter()
    for b in range(0, len(prompts), batch):
        hf_generate(hf, prompts[b:b + batch], max(out_lens[b:b + batch]))
    return sum(out_lens), time.perf_counter() - start


def run_hf_agent(hf, trajectories):
    """Turn by turn, all trajectories in one batch; every turn recomputes the whole histories."""
    histories = [list(task) for task, _ in trajectories]
    produced, prefilled = 0, 0
    start = time.perf_counter()
    for t in range(len(trajectories[0][1])):
        wanted = []
        for i, (_, turns) in enumerate(trajectories):
            histories[i] += turns[t][0]
            wanted.append(turns[t][1])
        outs, padded = hf_generate(hf, histories, max(wanted))
        prefilled += padded
        for i, (o, k) in enumerate(zip(outs, wanted)):
            histories[i] += o[:k]
            produced += k
    return produced, time.perf_counter() - start, prefilled


def run_vllm_throughput(path, prompts, out_lens, dtype):
    from vllm import LLM
    from vllm import SamplingParams as VllmParams
    llm = LLM(model=path, dtype=str(dtype).removeprefix("torch."), seed=0)
    params = [VllmParams(temperature=TEMPERATURE, max_tokens=k, ignore_eos=True) for k in out_lens]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs[:2], params[:2])  # warm-up
    start = time.perf_counter()
    llm.generate(inputs, params)
    return sum(out_lens), time.perf_counter() - start


def median_rate(runs):
    """runs: [(tokens, seconds), ...] -> (median tokens/s, median seconds)."""
    return statistics.median(t / s for t, s in runs), statistics.median(s for _, s in runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--model", help="a Qwen2 checkpoint directory (default: a tiny random one)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared 2-core machines: 1)")
    parser.add_argument("--kv-blocks", type=int, default=None, help="KV pool blocks (default: 85%% of free GPU "
                        "memory on CUDA, all sequences at once on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    scale = SCALES[args.scale]
    tmp = tempfile.TemporaryDirectory()
    path = args.model or tiny_checkpoint(tmp.name)

    from transformers import AutoModelForCausalLM
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=dtype, device=device).eval()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    vocab = min(model.config.vocab_size, 151643)  # regular tokens only
    prompts, out_lens = throughput_workload(scale, vocab)
    trajectories = agent_workload(scale, vocab)

    block_size = 16
    if args.kv_blocks:
        pool = dict(num_blocks=args.kv_blocks)
    elif device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        pool = dict(kv_cache_bytes=int(0.85 * free))
    else:
        longest = 2 * scale["hi"] + scale["task_len"] + scale["turns"] * 110
        pool = dict(num_blocks=(len(prompts) + len(trajectories)) * (-(-longest // block_size)))
    sampler = Sampler(model, block_size=block_size, max_num_seqs=256, max_num_batched_tokens=4096, **pool)

    results = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", dtype=str(dtype),
                   threads=args.threads, model=args.model or "tiny random Qwen2 (4 layers, hidden 256, vocab 8192)",
                   scale=dict(scale, name=args.scale), repeats=args.repeats, workloads={})

    run_ours_throughput(sampler, prompts[:4], [8] * 4)  # warm-up: kernels, graphs, pool
    with torch.inference_mode():
        hf_generate(hf, prompts[:2], 4)
    stats_before = dict(vars(sampler.stats))
    ours = [run_ours_throughput(sampler, prompts, out_lens) for _ in range(args.repeats)]
    st = sampler.stats
    steps = st.steps - stats_before["steps"]
    host = st.host_seconds - stats_before["host_seconds"]
    preemptions = st.preemptions - stats_before["preemptions"]
    ours_no_logprobs = [run_ours_throughput(sampler, prompts, out_lens, False) for _ in range(args.repeats)]
    with torch.inference_mode():
        theirs = [run_hf_throughput(hf, prompts, out_lens, scale["hf_batch"]) for _ in range(args.repeats)]
    entry = dict(output_tokens=sum(out_lens), prompt_tokens=sum(map(len, prompts)),
                 ours=dict(zip(("tokens_per_s", "seconds"), median_rate(ours))),
                 ours_no_logprobs=dict(zip(("tokens_per_s", "seconds"), median_rate(ours_no_logprobs))),
                 transformers=dict(zip(("tokens_per_s", "seconds"), median_rate(theirs)), batch=scale["hf_batch"]),
                 sampler=dict(steps=steps // args.repeats, preemptions=preemptions,
                              host_ms_per_step=1e3 * host / steps))
    entry["ratio_vs_transformers"] = entry["ours"]["tokens_per_s"] / entry["transformers"]["tokens_per_s"]
    entry["ratio_no_logprobs_vs_transformers"] = \
        entry["ours_no_logprobs"]["tokens_per_s"] / entry["transformers"]["tokens_per_s"]
    results["workloads"]["throughput"] = entry

    sampler.new_weight_version()  # cold prefix cache, as after a weight update
    agent_runs, agent_stats = [], []
    for _ in range(args.repeats):
        sampler.new_weight_version()
        before = dict(vars(sampler.stats))
        agent_runs.append(run_ours_agent(sampler, trajectories))
        agent_stats.append({k: getattr(sampler.stats, k) - before[k] for k in
                            ("prompt_tokens", "cached_tokens", "computed_tokens", "prompt_tokens_computed",
                             "preemptions", "steps", "host_seconds")})
    with torch.inference_mode():
        hf_runs = [run_hf_agent(hf, trajectories) for _ in range(args.repeats)]
    a = agent_stats[-1]
    entry = dict(trajectories=len(trajectories), turns=scale["turns"], output_tokens=agent_runs[0][0],
                 ours=dict(zip(("tokens_per_s", "seconds"), median_rate(agent_runs))),
                 transformers=dict(zip(("tokens_per_s", "seconds"), median_rate([r[:2] for r in hf_runs]))),
                 sampler=dict(prompt_tokens=a["prompt_tokens"], served_from_prefix_cache=a["cached_tokens"],
                              prompt_tokens_computed=a["prompt_tokens_computed"], preemptions=a["preemptions"],
                              host_ms_per_step=1e3 * a["host_seconds"] / a["steps"]),
                 transformers_prefill_tokens=hf_runs[0][2])
    entry["ratio_vs_transformers"] = entry["ours"]["tokens_per_s"] / entry["transformers"]["tokens_per_s"]
    results["workloads"]["agent"] = entry

    if device == "cuda":  # last: vLLM takes most of the GPU memory
        throughput = results["workloads"]["throughput"]
        try:
            import vllm  # noqa: F401
        except ImportError:
            throughput["vllm"] = "not installed"
        else:
            sampler.release()
            rate = median_rate([run_vllm_throughput(path, prompts, out_lens, dtype)])
            throughput["vllm"] = dict(zip(("tokens_per_s", "seconds"), rate))
            throughput["ratio_vs_vllm"] = throughput["ours"]["tokens_per_s"] / rate[0]

    RESULTS.mkdir(exist_ok=True)
    name = f"generation_{args.scale}_{device}"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    t, a = r["workloads"]["throughput"], r["workloads"]["agent"]
    s = r["scale"]
    lines = [f"# Generation throughput ({r['device']}, {r['dtype']}, {r['threads']} CPU thread(s))", "",
             f"Model: {r['model']}. Medians over {r['repeats']} runs after a warm-up; ratio = ours / baseline, "
             f"measured side by side in one process. Ours reports the log-prob of every sampled token "
             f"(kernels.token_logprobs, a second pass over the LM head: the trainer's code) unless noted.", "",
             "| workload | ours (tok/s) | transformers generate (tok/s) | ratio | vLLM (tok/s) |",
             "|---|---:|---:|---:|---:|"]
    vllm = t.get("vllm", "n/a (CPU)")
    vllm_cell = f"{vllm['tokens_per_s']:.0f}" if isinstance(vllm, dict) else vllm
    lines.append(f"| throughput: {s['prompts']} prompts, in/out U[{s['lo']}, {s['hi']}], T={TEMPERATURE}, "
                 f"ignore EOS | {t['ours']['tokens_per_s']:.0f} | {t['transformers']['tokens_per_s']:.0f} "
                 f"(batches of {t['transformers']['batch']}) | {t['ratio_vs_transformers']:.2f}x | {vllm_cell} |")
    lines.append(f"| same, without log-probs | {t['ours_no_logprobs']['tokens_per_s']:.0f} | | "
                 f"{t['ratio_no_logprobs_vs_transformers']:.2f}x | |")
    lines.append(f"| agent: {a['trajectories']} trajectories (groups of 6), {a['turns']} turns | "
                 f"{a['ours']['tokens_per_s']:.0f} | {a['transformers']['tokens_per_s']:.0f} (one batch per turn) | "
                 f"{a['ratio_vs_transformers']:.2f}x | |")
    sa = a["sampler"]
    lines += ["", "Hardware-independent figures:", "",
              f"- throughput: {t['sampler']['steps']} scheduler steps per run, host time "
              f"{t['sampler']['host_ms_per_step']:.2f} ms/step (scheduling + bookkeeping), "
              f"{t['sampler']['preemptions']} preemptions.",
              f"- agent: {sa['prompt_tokens']} prompt tokens submitted, {sa['served_from_prefix_cache']} served "
              f"from the prefix cache, {sa['prompt_tokens_computed']} computed "
              f"({sa['prompt_tokens_computed'] / sa['prompt_tokens']:.1%}); transformers prefilled "
              f"{a['transformers_prefill_tokens']} (padded) tokens. Host time {sa['host_ms_per_step']:.2f} ms/step.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
