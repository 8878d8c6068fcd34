"""Every Triton kernel compiles for real GPU targets (sm_90 and sm_80) as an aligned launch specialises it, and
fits in shared memory; checked without a GPU (benchmarks/gpu_compile.py, in a process without the interpreter)."""
import os
import re
import subprocess
import sys
from pathlib import Path

from protege.kernels.ops import linear

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def python(*args):
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=900, cwd=ROOT)


def test_all_triton_kernels_compile_for_nvidia():
    proc = python("benchmarks/gpu_compile.py")
    assert proc.returncode == 0 and "FAILED: []" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = dict(re.findall(r"^ok +(sm_\d+ .+?) +shared= *([\d.]+) KB  regs= *\d+  spills=\d+/\d+ B", proc.stdout,
                             re.M))
    kernels = {arch: {k.split(" ", 1)[1] for k in report if k.startswith(arch)} for arch in ("sm_90", "sm_80")}
    assert kernels["sm_90"] and kernels["sm_90"] == kernels["sm_80"], proc.stdout[-3000:]
    # The aligned variant is the one compiled: the bf16 linear pipelines its A and B tiles over all 3 stages
    # (the unaligned one, with no async copies, needs a single stage: 32 KB).
    per_stage = (128 * linear.BLOCK_K + linear.BLOCK_K * linear.BLOCK_N) * 2   # the 128-row tile
    assert float(report["sm_90 linear fwd bf16 m128"]) * 1024 == 3 * per_stage
    # Tiles that must give the same bits compile to one tensor-core instruction (the MMA check ran).
    assert re.search(r"^ok +sm_90 linear bf16: same MMA instructions \('wgmma", proc.stdout, re.M), proc.stdout[-3000:]
    assert re.search(r"^ok +sm_80 paged exact vs attn_fwd bf16 d=128: same MMA instructions \('mma", proc.stdout, re.M)
    # ... and their softmax arithmetic rounds alike: no multiply-add contraction (the fma check ran).
    assert re.search(r"^ok +sm_90 no multiply-add contraction in 8 kernels$", proc.stdout, re.M), proc.stdout[-3000:]


def test_too_much_shared_memory_fails_the_check():
    snippet = """
import importlib.util
spec = importlib.util.spec_from_file_location("gpu_compile", "benchmarks/gpu_compile.py")
g = importlib.util.module_from_spec(spec)
spec.loader.exec_module(g)
name, fn, args, opts = next(launch for launch in g.launches() if launch[0] == "linear fwd bf16 m128")
print(*g.check(90, "linear K-tile 128, 4 stages", fn, dict(args, BLOCK_K=128), dict(opts, num_stages=4)))
"""
    proc = python("-c", snippet)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^FAIL sm_90 linear K-tile 128, 4 stages +shared= 256.0 KB > 227 KB .* False$", proc.stdout,
                     re.M), proc.stdout
