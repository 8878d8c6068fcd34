"""Speed of every op in kernels/ at Qwen2.5-7B shapes on a CUDA device: the engine's Triton kernel against
PyTorch eager (kernels/reference.py), torch.compile of it, and Liger-Kernel / flash-attn where installed;
forward and forward + backward, medians of triton.testing.do_bench. Reports GB/s (memory-bound ops) or
TFLOP/s (matmul-bound ops) and the share of the device's datasheet limit (DEVICE_PEAKS: H100, H200, A100), and
writes benchmarks/results/kernels.json + kernels.md.

Without a GPU it says so and runs each op once at tiny shapes in the Triton interpreter against the reference
(a correctness smoke check, fp32); it exits 0 unless an op errs or mismatches. An op whose module is not
written yet is reported as missing.

    python benchmarks/kernel_timings.py [--tokens 8192] [--ops rms_norm swiglu ...]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():  # the interpreter must be on before any @triton.jit is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from protege.kernels import reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Datasheet peaks (dense bf16, HBM), by a substring of torch.cuda.get_device_name(); most specific first.
DEVICE_PEAKS = [
    ("H200", dict(bytes_per_s=4.8e12, flop_per_s=989e12)),
    ("H100 PCIe", dict(bytes_per_s=2.0e12, flop_per_s=756e12)),
    ("H100", dict(bytes_per_s=3.35e12, flop_per_s=989e12)),  # SXM
    ("A100", dict(bytes_per_s=2.0e12, flop_per_s=312e12)),  # 80 GB SXM
]


def device_limits(name: str) -> dict | None:
    """{"bytes_per_s", "flop_per_s", "source"} from the datasheet of the named device, None if unknown."""
    for key, peaks in DEVICE_PEAKS:
        if key in name:
            return dict(peaks, source=f"datasheet ({key})")
    return None


@dataclass(frozen=True)
class Shapes:
    tokens: int
    hidden: int = 3584
    heads: int = 28
    kv_heads: int = 4
    head_dim: int = 128
    intermediate: int = 18944
    vocab: int = 152064
    docs: int = 4  # packed sequences of tokens / docs each, for attention

    @staticmethod
    def tiny() -> "Shapes":
        return Shapes(tokens=37, hidden=80, heads=4, kv_heads=2, head_dim=32, intermediate=96, vocab=1000, docs=2)


@dataclass(frozen=True)
class Op:
    name: str
    module: str  # kernels/ops/<module>.py or kernels/<module>.py holds the Triton version
    triton_fn: str
    make_args: Callable  # (shapes, device, dtype) -> tuple of arguments; float tensors get gradients
    cost: Callable  # (shapes, backward: bool) -> (flops, bytes); the bound is whichever is larger in time
    compile_ok: bool = True  # torch.compile of the reference (not for the per-sequence attention loop)


def _t(*shape, device, dtype, scale=1.0):
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)


def _cu_seqlens(s: Shapes, device):
    bounds = [round(i * s.tokens / s.docs) for i in range(s.docs + 1)]
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def _attention_flops(s: Shapes, backward: bool) -> float:
    lengths = _cu_seqlens(s, "cpu").diff().tolist()
    fwd = sum(4 * l * l * s.head_dim * s.heads / 2 for l in lengths)  # causal: half the score matrix
    return fwd * (3.5 if backward else 1.0)  # backward = 2.5 x forward (FlashAttention's count)


def _bytes(n_elements: float, dtype_bytes: int = 2) -> float:
    return n_elements * dtype_bytes


OPS = [
    Op("rms_norm", "rms_norm", "rms_norm_triton",
       lambda s, d, t: (_t(s.tokens, s.hidden, device=d, dtype=t), 1 + 0.1 * _t(s.hidden, device=d, dtype=t),
                        1e-6),
       lambda s, b: (0.0, _bytes(s.tokens * s.hidden * (5 if b else 2)))),  # fwd x->y; bwd dy, x -> dx
    Op("add_rms_norm", "rms_norm", "add_rms_norm_triton",
       lambda s, d, t: (_t(s.tokens, s.hidden, device=d, dtype=t), _t(s.tokens, s.hidden, device=d, dtype=t),
                        1 + 0.1 * _t(s.hidden, device=d, dtype=t), 1e-6),
       lambda s, b: (0.0, _bytes(s.tokens * s.hidden * (8 if b else 4)))),  # fwd x, r -> y, x+r
    Op("apply_rope", "rope", "apply_rope_triton",
       lambda s, d, t: (_t(s.tokens, s.heads, s.head_dim, device=d, dtype=t),
                        _t(s.tokens, s.kv_heads, s.head_dim, device=d, dtype=t),
                        torch.arange(s.tokens, device=d) % 4096, 1e6),
       lambda s, b: (0.0, _bytes(s.tokens * (s.heads + s.kv_heads) * s.head_dim * (4 if b else 2)))),
    Op("swiglu", "swiglu", "swiglu_triton",
       lambda s, d, t: (_t(s.tokens, s.intermediate, device=d, dtype=t),
                        _t(s.tokens, s.intermediate, device=d, dtype=t)),
       lambda s, b: (0.0, _bytes(s.tokens * s.intermediate * (8 if b else 3)))),
    Op("token_logprobs", "token_logprobs", "token_logprobs_triton",
       lambda s, d, t: (_t(s.tokens, s.hidden, device=d, dtype=t),
                        _t(s.vocab, s.hidden, device=d, dtype=t, scale=2 / s.hidden ** 0.5),
                        torch.randint(0, s.vocab, (s.tokens,), device=d), 1.0),
       lambda s, b: (2.0 * s.tokens * s.hidden * s.vocab * (3 if b else 1), 0.0)),
    Op("varlen_attention", "attention", "varlen_attention_triton",
       lambda s, d, t: (_t(s.tokens, s.heads, s.head_dim, device=d, dtype=t),
                        _t(s.tokens, s.kv_heads, s.head_dim, device=d, dtype=t),
                        _t(s.tokens, s.kv_heads, s.head_dim, device=d, dtype=t), _cu_seqlens(s, d),
                        s.tokens // s.docs + 1),
       lambda s, b: (_attention_flops(s, b), 0.0), compile_ok=False),
    Op("linear", "linear", "linear_triton",  # the MLP up projection
       lambda s, d, t: (_t(s.tokens, s.hidden, device=d, dtype=t),
                        _t(s.intermediate, s.hidden, device=d, dtype=t, scale=s.hidden ** -0.5)),
       lambda s, b: (2.0 * s.tokens * s.hidden * s.intermediate * (3 if b else 1), 0.0), compile_ok=False),
]


def load_triton(op: Op):
    """The Triton function from kernels/ops/<module>.py or kernels/<module>.py, or None if not there (yet)."""
    for name in (f"protege.kernels.ops.{op.module}", f"protege.kernels.{op.module}"):
        try:
            return getattr(importlib.import_module(name), op.triton_fn, None)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return None


def third_party(op: Op) -> dict:
    """Liger-Kernel / flash-attn versions of the op, where installed (imported lazily, never required)."""
    found = {}
    try:
        if op.name == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            found["liger"] = lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps)
        elif op.name == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            found["liger"] = LigerSiLUMulFunction.apply
        elif op.name == "token_logprobs":  # Liger's op returns the mean loss, not per-token values
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
            found["liger (FLCE loss)"] = lambda h, w, t, temp: LigerFusedLinearCrossEntropyFunction.apply(h, w, t)
    except ImportError:
        pass
    if op.name == "varlen_attention":
        try:
            from flash_attn import flash_attn_varlen_func
            found["flash-attn"] = lambda q, k, v, cu, max_len: flash_attn_varlen_func(
                q, k, v, cu, cu, max_len, max_len, causal=True)
        except ImportError:
            pass
        try:
            from protege.kernels.ops.xformers_attention import xformers_varlen_attention
            import xformers  # noqa: F401
            found["xformers"] = lambda q, k, v, cu, max_len: xformers_varlen_attention(q, k, v, cu)
        except ImportError:
            pass
    return found


def leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]


def outputs_of(result):
    out = result if isinstance(result, (tuple, list)) else (result,)
    return [o for o in out if isinstance(o, torch.Tensor) and o.requires_grad]


def fwd_bwd(fn, args, grads):
    """One forward + backward with fixed upstream gradients (made once, not timed)."""
    outs = outputs_of(fn(*args))
    torch.autograd.backward(outs, grads[: len(outs)])


CPU_REPEATS = 3  # host-timed runs per median without a GPU (benchmarks/gpu_suite.py --dry-run: 1, no warm-up)
CPU_WARMUP = True


def time_ms(fn, device) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA (its warm-up compiles and fills caches),
    else CPU_REPEATS host-timed runs after one warm-up (CPU: the logic only, the numbers mean nothing)."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, return_mode="median")
    if CPU_WARMUP:
        fn()
    times = []
    for _ in range(CPU_REPEATS):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def bench_ops(ops, shapes: Shapes, device="cuda", dtype=torch.bfloat16, limits: dict | None = None,
              use_compile: bool = True, stop: Callable[[], bool] = lambda: False,
              on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Every implementation of each op (ours, eager, torch.compile, third-party), forward and forward +
    backward, median times. limits: {"bytes_per_s", "flop_per_s"} for the share of the limit (None: no
    share). stop(): True when the caller's time is up (the remaining rows say so)."""
    rows = []

    def add(row):
        rows.append(row)
        on_row(row)

    for op in ops:
        triton_fn = load_triton(op)
        impls = {"triton": triton_fn} if triton_fn else {}
        impls["eager"] = getattr(reference, op.name)
        impls.update(third_party(op))
        if op.compile_ok and use_compile:  # last: compiling is the slowest part, cut first by stop()
            impls["torch.compile"] = torch.compile(getattr(reference, op.name))
        if not triton_fn:
            add({"op": op.name, "impl": "triton", "status": f"missing ({op.module}.{op.triton_fn})"})
        for impl, fn in impls.items():
            torch.manual_seed(0)
            args = op.make_args(shapes, device, dtype)
            for mode in ("forward", "forward+backward"):
                backward = mode != "forward"
                row = {"op": op.name, "impl": impl, "mode": mode}
                if stop():
                    add({**row, "status": "UNMEASURED (time cap reached)"})
                    continue
                try:
                    for a in leaves(args):
                        a.requires_grad_(backward)
                    if backward:
                        grads = [torch.randn_like(o) for o in outputs_of(fn(*args))]
                        ms = time_ms(lambda: fwd_bwd(fn, args, grads), device)
                        for a in leaves(args):
                            a.grad = None
                    else:
                        with torch.no_grad():
                            ms = time_ms(lambda: fn(*args), device)
                except Exception as e:  # an impl without a backward, out of memory, an API mismatch
                    add({**row, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                flops, nbytes = op.cost(shapes, backward)
                row.update(status="ok", ms=ms)
                rate, limit = (flops, "flop_per_s") if flops else (nbytes, "bytes_per_s")
                row.update({"tflops" if flops else "gbps": rate / ms / (1e9 if flops else 1e6)})
                row["share"] = rate / ms / 1e-3 / limits[limit] if limits else None
                add(row)
            del args
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def bench_gpu(ops, shapes: Shapes, device="cuda", dtype=torch.bfloat16) -> list[dict]:
    limits = device_limits(torch.cuda.get_device_name())
    return bench_ops(ops, shapes, device, dtype, limits, on_row=lambda r: print(format_row(r), flush=True))


def format_row(r: dict, eager_ms: float | None = None) -> str:
    if r.get("status") != "ok":
        return f"| {r['op']} | {r['impl']} | {r.get('mode', '')} | {r['status']} | | | |"
    rate = f"{r['tflops']:.0f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.0f} GB/s"
    speedup = f"{eager_ms / r['ms']:.2f}x" if eager_ms else ""
    share = f"{100 * r['share']:.0f}%" if r.get("share") is not None else "n/a (unknown device)"
    return f"| {r['op']} | {r['impl']} | {r['mode']} | {r['ms']:.3f} ms | {rate} | {share} | {speedup} |"


def check_cpu(ops) -> list[dict]:
    """Each Triton op once at tiny fp32 shapes in the interpreter vs the reference, forward and backward."""
    shapes, rows = Shapes.tiny(), []
    for op in ops:
        triton_fn = load_triton(op)
        if triton_fn is None:
            rows.append({"op": op.name, "status": f"missing ({op.module}.{op.triton_fn})"})
            continue
        results = []
        try:
            for fn in (triton_fn, getattr(reference, op.name)):
                torch.manual_seed(0)
                args = op.make_args(shapes, "cpu", torch.float32)
                for a in leaves(args):
                    a.requires_grad_()
                outs = outputs_of(fn(*args))
                torch.manual_seed(1)
                torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
                results.append([o.detach() for o in outs] + [a.grad for a in leaves(args)])
        except Exception as e:  # a kernel still being written: report it, check the others
            rows.append({"op": op.name, "status": f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:100]}"})
            continue
        err = max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
                  for x, y in zip(*results) if x is not None and y is not None)
        rows.append({"op": op.name, "status": "ok" if err <= 1e-4 else "MISMATCH", "max_rel_err": err})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ops", nargs="+", choices=[op.name for op in OPS], default=[op.name for op in OPS])
    args = p.parse_args()
    ops = [op for op in OPS if op.name in args.ops]

    if not torch.cuda.is_available():
        print("No CUDA device: no timings. Correctness smoke check of each op at tiny shapes in the Triton "
              "interpreter (fp32, forward + backward vs kernels/reference.py):")
        rows = check_cpu(ops)
        for r in rows:
            err = f"  max rel err {r['max_rel_err']:.1e}" if "max_rel_err" in r else ""
            print(f"  {r['op']:18s} {r['status']}{err}")
        return 1 if any(r["status"].startswith(("MISMATCH", "ERROR")) for r in rows) else 0

    shapes = Shapes(tokens=args.tokens)
    device_name = torch.cuda.get_device_name()
    print(f"{device_name}, bf16, {shapes}\n")
    limits = device_limits(device_name)
    header = ["| op | impl | mode | median | rate | share of the device's limit | speedup vs eager |",
              "|---|---|---|---:|---:|---:|---:|"]
    print("\n".join(header))
    rows = bench_gpu(ops, shapes)
    eager = {(r["op"], r["mode"]): r["ms"] for r in rows if r["impl"] == "eager" and r.get("status") == "ok"}
    RESULTS.mkdir(exist_ok=True)
    meta = {"device": device_name, "dtype": "bfloat16", "shapes": shapes.__dict__, "torch": torch.__version__,
            "limits": limits}
    (RESULTS / "kernels.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    md = [f"# Kernel timings on {device_name} (bf16, Qwen2.5-7B shapes, {shapes.tokens} tokens)", "",
          "Medians of triton.testing.do_bench. Rate: GB/s for memory-bound ops (bytes that must move), TFLOP/s "
          "for matmul-bound ones (useful FLOPs, recomputation not counted); share of the device's datasheet "
          f"limit: {limits}.", "",
          *header, *[format_row(r, eager.get((r["op"], r.get("mode")))) for r in rows], ""]
    (RESULTS / "kernels.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
