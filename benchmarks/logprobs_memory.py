"""Peak extra memory of token log-probs, forward + backward, on the CPU: the chunked fused path
(kernels.reference.token_logprobs_chunked) against the unfused logits + log_softmax path
(kernels.reference.token_logprobs), at Qwen2.5-0.5B's head (H=896, V=151936), fp32.

How memory is measured: every run is a fresh Python process that creates its inputs, resets the kernel's
high-water mark of its resident set (/proc/self/clear_refs), reads its resident set size (VmRSS), runs one
forward + backward, then reads the high-water mark (VmHWM). Peak extra = high-water mark - resident size
before the op: every byte the op touched (tensors, allocator slack, BLAS buffers, the returned gradients),
nothing it did not. The gradient outputs
(d hidden, d weight) are listed too, since both paths must return them.

The unfused path needs several [T, V] fp32 tensors (about 20 GB at T=8192), more than the shared 24 GB
machine can spare, so by default it is measured at smaller T and extrapolated linearly to T (the peak is
affine in T; the table shows the points and the fit); --unfused-tokens 1024 8192 measures it directly
where memory allows (~11 GB; that is how the stored results were made). Values are checked: fused vs unfused on the same inputs (log-probs, d hidden, d weight).

    python benchmarks/logprobs_memory.py --unfused-tokens 1024 8192    # ~15 min on 2 cores, ~11 GB
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def status_bytes(field: str) -> int:
    """VmRSS (resident set) or VmHWM (its high-water mark) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_high_water_mark() -> None:
    # Linux: writing 5 to clear_refs sets VmHWM to the current resident set (it is otherwise inherited
    # from the parent process and from whatever ran before the op).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_inputs(tokens: int, drawn: int, hidden_size: int, vocab: int, dtype: torch.dtype):
    """Deterministic inputs: the first `tokens` of `drawn` rows, so runs at different T share their rows."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=dtype).mul_(2.0 / hidden_size ** 0.5)
    hidden = torch.randn(drawn, hidden_size, generator=gen, dtype=dtype)[:tokens].clone()
    targets = torch.randint(0, vocab, (drawn,), generator=gen)[:tokens].clone()
    upstream = torch.rand(drawn, generator=gen)[:tokens].clone()  # per-token loss weights (SFT mask / n, RL)
    return hidden, weight, targets, upstream


def worker(args) -> None:
    from protege.kernels.reference import token_logprobs as unfused
    from protege.kernels.reference import token_logprobs_chunked as fused

    dtype = getattr(torch, args.dtype)
    hidden, weight, targets, upstream = make_inputs(args.worker_tokens, args.tokens, args.hidden, args.vocab,
                                                    dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    fn = fused if args.worker == "fused" else unfused
    reset_high_water_mark()
    before, high_before = status_bytes("VmRSS"), status_bytes("VmHWM")
    start = time.perf_counter()
    logp = fn(hidden, weight, targets, 1.0)
    (logp * upstream).sum().backward()
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    torch.save({"logp": logp.detach(), "grad_hidden": hidden.grad, "grad_weight": weight.grad}, args.save)
    print(json.dumps({"path": args.worker, "tokens": args.worker_tokens, "peak_extra_bytes": peak - before,
                      "rss_before_bytes": before, "high_water_before_bytes": high_before,
                      "grad_bytes": hidden.grad.nbytes + weight.grad.nbytes, "seconds": round(seconds, 2)}))


def measure(path: str, tokens: int, args, save: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--worker-tokens", str(tokens), "--tokens", str(args.tokens),
           "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--dtype", args.dtype, "--save", save]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "PROTEGE_KERNELS": "torch"}).stdout
    result = json.loads(out.strip().splitlines()[-1])
    # Valid only if the high-water mark really was reset to the resident set before the op.
    assert result["high_water_before_bytes"] <= result["rss_before_bytes"] + (16 << 20), result
    print(f"  {path:8s} T={tokens:5d}: peak extra {result['peak_extra_bytes'] / 2**30:7.3f} GiB "
          f"({result['seconds']:.0f} s)", flush=True)
    return result


def max_rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def compare(fused_file: str, unfused_file: str, rows: int) -> dict:
    """Fused vs unfused values; for the rows both runs share (the fused run may have more rows: per-row values
    only, the weight gradient is a sum over all rows)."""
    a, b = torch.load(fused_file), torch.load(unfused_file)
    out = {"rows": rows,
           "logp_max_abs_diff": (a["logp"][:rows] - b["logp"][:rows]).abs().max().item(),
           "grad_hidden_max_rel_diff": max_rel(a["grad_hidden"][:rows], b["grad_hidden"][:rows])}
    if a["logp"].shape[0] == rows:
        out["grad_weight_max_rel_diff"] = max_rel(a["grad_weight"], b["grad_weight"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--unfused-tokens", type=int, nargs="+", default=[1024, 2048],
                   help="T values at which the unfused path is measured (the largest must be <= --tokens)")
    p.add_argument("--worker", choices=["fused", "unfused"], help=argparse.SUPPRESS)
    p.add_argument("--worker-tokens", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    unfused_tokens = sorted(args.unfused_tokens)
    if unfused_tokens[-1] > args.tokens:
        p.error(f"--unfused-tokens {unfused_tokens[-1]} > --tokens {args.tokens}")
    print(f"token log-probs, forward + backward, H={args.hidden} V={args.vocab} {args.dtype}, CPU "
          f"({torch.get_num_threads()} threads)")
    with tempfile.TemporaryDirectory() as tmp:
        runs, checks = [], []
        for t in unfused_tokens:
            for path in ("unfused", "fused"):
                runs.append(measure(path, t, args, f"{tmp}/{path}_{t}.pt"))
            checks.append(compare(f"{tmp}/fused_{t}.pt", f"{tmp}/unfused_{t}.pt", t))
        if args.tokens != unfused_tokens[-1]:
            runs.append(measure("fused", args.tokens, args, f"{tmp}/fused_{args.tokens}.pt"))
            checks.append(compare(f"{tmp}/fused_{args.tokens}.pt", f"{tmp}/unfused_{unfused_tokens[-1]}.pt",
                                  unfused_tokens[-1]))

    fused_run = runs[-1]
    unfused_runs = [r for r in runs if r["path"] == "unfused"]
    if unfused_runs[-1]["tokens"] == args.tokens:
        unfused_peak, how = unfused_runs[-1]["peak_extra_bytes"], "measured"
    else:  # affine fit through the two largest measured points
        (t0, m0), (t1, m1) = [(r["tokens"], r["peak_extra_bytes"]) for r in unfused_runs[-2:]]
        unfused_peak = m1 + (m1 - m0) / (t1 - t0) * (args.tokens - t1)
        how = f"extrapolated from T={t0}, {t1}"
    grads = fused_run["grad_bytes"]
    summary = {
        "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype,
        "fused_peak_extra_bytes": fused_run["peak_extra_bytes"],
        "unfused_peak_extra_bytes": int(unfused_peak), "unfused_how": how,
        "ratio": unfused_peak / fused_run["peak_extra_bytes"],
        "gradient_output_bytes": grads,
        "ratio_excluding_gradient_outputs": (unfused_peak - grads) / (fused_run["peak_extra_bytes"] - grads),
        "logits_tensor_bytes_at_T": args.tokens * args.vocab * 4,
    }
    command = "python benchmarks/logprobs_memory.py " + " ".join(sys.argv[1:])
    report = {"command": command.strip(), "summary": summary, "runs": runs, "value_checks": checks,
              "method": "fresh process per run; peak extra = VmHWM after fwd+bwd - VmRSS before, "
                        "VmHWM reset via /proc/self/clear_refs before the op"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "logprobs_memory.json").write_text(json.dumps(report, indent=2) + "\n")

    gib = 2 ** 30
    lines = [
        f"# Token log-probs: peak extra memory, forward + backward (CPU, {args.dtype})",
        "",
        f"`{command.strip()}` ({torch.get_num_threads()} threads)",
        "",
        f"T={args.tokens}, H={args.hidden}, V={args.vocab}. Fresh process per run; peak extra = high-water "
        "mark of the resident set (VmHWM, reset just before the op) after forward + backward minus the "
        "resident set before (inputs already allocated). Includes the returned gradients "
        f"(d hidden + d weight = {grads / gib:.3f} GiB), which both paths must produce.",
        "",
        "| path | T | peak extra (GiB) | time (s) |",
        "|---|---:|---:|---:|",
        *[f"| {r['path']} | {r['tokens']} | {r['peak_extra_bytes'] / gib:.3f} | {r['seconds']:.0f} |"
          for r in runs],
        "",
        f"At T={args.tokens}: fused {summary['fused_peak_extra_bytes'] / gib:.3f} GiB, unfused "
        f"{unfused_peak / gib:.2f} GiB ({how}): **{summary['ratio']:.1f}x less**; "
        f"{summary['ratio_excluding_gradient_outputs']:.0f}x less excluding the gradient outputs. "
        f"(The [T, V] fp32 logits alone are {summary['logits_tensor_bytes_at_T'] / gib:.2f} GiB.)",
        "",
        "Values, fused vs unfused on the same inputs:",
        "",
        "| rows compared | log-prob max abs diff | d hidden max rel diff | d weight max rel diff |",
        "|---:|---:|---:|---:|",
        *[f"| {c['rows']} | {c['logp_max_abs_diff']:.2e} | {c['grad_hidden_max_rel_diff']:.2e} | "
          + (f"{c['grad_weight_max_rel_diff']:.2e} |" if "grad_weight_max_rel_diff" in c
             else f"(fused run has T={args.tokens}) |") for c in checks],
        "",
    ]
    (RESULTS / "logprobs_memory.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
