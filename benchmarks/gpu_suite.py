"""One command that checks and times the whole engine on one CUDA device, and writes a report as it goes.

    python benchmarks/gpu_suite.py --out benchmarks/results/<gpu-name>/ [--quick]   # <= 9 min (quick <= 5)
    python benchmarks/gpu_suite.py --dry-run [--out DIR]     # the same sections on the CPU, tiny shapes

Sections, in order (each with its own time cap; a check that starts after its section's cap is reported as
SKIP, and a crash inside a check is an ERROR row, after which the suite goes on):
  environment       device, driver, torch/triton/transformers versions, git commit, optional packages
  warm_up           op_correctness's checks run first in parallel worker processes, to compile their Triton
                    kernels into the shared disk cache (with the cold-compile plan: an ESTIMATE)
  ceilings          measured copy bandwidth and bf16 matmul rate beside the datasheet peaks
  ops_correctness   every Triton op forward + backward in bf16 and fp16 vs the fp64 reference (precision rule
                    of tests/numerics.py), at Qwen2.5-7B shapes and odd shapes; flash-attn / xformers vs ours;
                    paged attention and the KV write; exact mode's bit checks (benchmarks/gpu_exact_check.py)
  model_vs_hf       the model's logits (fp32, bf16) and gradients (fp32) vs transformers' Qwen2 (random weights;
                    Qwen2.5-0.5B, 2-layer Qwen2.5-7B shape)
  sampler_checks    greedy == transformers generate (fp32); exact-mode sampler log-probs bit-identical to the
                    training forward (bf16); CUDA-graph decode == eager decode; CUDA-graph decode + prefill
                    chunk (the agent loop's step) == eager
  rollout_fsdp      rollout mode on a one-rank FSDP2 model (NCCL) == unsharded, with its switch cost
  grpo              a GRPO update through engine/training/rl.py's path on a tiny model (FSDP2, rollout mode,
                    exact mode: the first ratio is 1)
  grpo_7b_flags     one rank of configs/grpo-qwen2.5-coder-7b.toml (2 layers at the 7B width): activation
                    checkpointing, bf16 compute / fp32 masters, CUDA-graph sampler, the reference offloaded to
                    the CPU; rollout mode samples with no checkpoint call and no FSDP2 hook, the reference keeps
                    nothing gathered after its forward, one rl._update (exact mode: the first ratio is 1)
  ops_speed         each op vs eager / torch.compile / Liger / flash-attn / xformers at 7B shapes; varlen
                    attention at 8K tokens (benchmarks/kernel_timings.py)
  logprobs_memory   token_logprobs time and peak memory, fused vs unfused, forward + backward
  sampler_speed     nano-vllm workload, agent workload, single-stream decode, exact vs fast, vs transformers
                    generate (and vLLM when importable), vs the bandwidth limit (benchmarks/generation.py)
  sft_speed         SFT step tokens/s and MFU at the 7B shape on one GPU (per layer, extrapolated to 28
                    layers: the method is in the report); rollout-mode switch seconds

The report (DIR/report.json and DIR/report.md) is rewritten after every check, so a timeout or a crash leaves
everything finished so far. The dry run uses the Triton interpreter (TRITON_INTERPRET=1, set by gpu_suite_lib), tiny shapes
and few repeats: its numbers mean nothing, its purpose is that every section's code runs before a GPU sees it
(tests/test_gpu_suite.py runs it). Exit status: 1 if any check FAILed or ERRed, else 0.

The code: this file is the command; benchmarks/gpu_suite_lib/ holds the parts (report.py, suite.py with the
section list and the Suite, and one module per group of sections: environment, warm_up, correctness, training,
speed).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import gpu_suite_lib  # noqa: F401  (first: it picks the Triton interpreter on the CPU before any kernel loads)
import kernel_timings
import torch
from gpu_suite_lib import correctness, environment, speed, training, warm_up
from gpu_suite_lib.suite import REPO, SECTIONS, Suite
from gpu_suite_lib.warm_up import warm_up_worker

# Each section of SECTIONS (suite.py: order, titles, caps) and the function that runs it.
FUNCTIONS = {
    "environment": environment.section_environment, "warm_up": warm_up.section_warm_up,
    "ceilings": environment.section_ceilings, "ops_correctness": correctness.section_ops_correctness,
    "model_vs_hf": correctness.section_model_vs_hf, "sampler_checks": correctness.section_sampler_checks,
    "rollout_fsdp": training.section_rollout_fsdp, "grpo": training.section_grpo,
    "grpo_7b_flags": training.section_grpo_7b_flags, "ops_speed": speed.section_ops_speed,
    "logprobs_memory": speed.section_logprobs_memory, "sampler_speed": speed.section_sampler_speed,
    "sft_speed": speed.section_sft_speed,
}
assert FUNCTIONS.keys() == SECTIONS.keys(), "gpu_suite.FUNCTIONS and suite.SECTIONS name the same sections"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="report folder (default: benchmarks/results/<device name>/, or a temporary "
                                 "folder for --dry-run)")
    p.add_argument("--quick", action="store_true", help="smaller workloads and caps (<= 5 minutes)")
    p.add_argument("--dry-run", action="store_true", help="the same sections on the CPU at tiny shapes")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), help="only these sections")
    p.add_argument("--budget", type=float, help="seconds for the whole suite (default 525, quick 285)")
    p.add_argument("--warm-up-worker", metavar="K/N", help=argparse.SUPPRESS)   # section_warm_up's workers
    args = p.parse_args()
    if args.warm_up_worker:
        return warm_up_worker(args)
    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        kernel_timings.CPU_REPEATS, kernel_timings.CPU_WARMUP = 1, False
    if not args.out:
        name = "cpu-dry-run" if args.dry_run else torch.cuda.get_device_name().replace(" ", "-") if \
            torch.cuda.is_available() else "none"
        args.out = str(REPO / "benchmarks" / "results" / name) if not args.dry_run else tempfile.mkdtemp(prefix="gpu_suite_")
    args.out = str(Path(args.out).resolve())
    print(f"gpu_suite: the report goes to {args.out} (made if missing)", flush=True)
    suite = Suite(args)
    total = suite.run(FUNCTIONS, args.sections)
    summary = json.loads((Path(args.out) / "report.json").read_text())["summary"]
    print(f"\n{summary} in {total:.0f} s; report: {Path(args.out) / 'report.md'}")
    if suite.runtime is not None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    return 1 if summary["FAIL"] or summary["ERROR"] else 0


if __name__ == "__main__":
    sys.exit(main())
