"""Compile every Triton kernel of kernels/ops for a real NVIDIA target (default sm_90; SM=80 for A100) without
a GPU, to catch what the CPU interpreter accepts but a GPU compile rejects (dot shapes, dtype mixing, shared
memory). Runs in seconds; tests/test_gpu_compile.py runs it in CI.

    python benchmarks/gpu_compile.py        (TRITON_INTERPRET must not be set)
"""
import os
import re
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not benchmarks/ (its kernels.py)
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("gpu_compile: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.ops import rms_norm, rope, swiglu, linear, attention, paged_attention, token_logprobs as tlp

TARGET = GPUTarget("cuda", int(os.environ.get("SM", "90")), 32)
fails = []

def compile_(name, jitfn, types, consts, **opts):
    fn = jitfn
    sig, cx = {}, {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"; cx[a] = consts[a]
        else:
            sig[a] = types[a]
    try:
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=TARGET, options=opts)
        print(f"ok   {name}  shared={c.metadata.shared} regs/spill n/a")
        return c
    except Exception as e:  # any compiler error is a finding: report it and go on with the others
        fails.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:600]}")

def same_mma(name, compiled):
    """Kernels that must give the same bits must use the same tensor-core instruction (wgmma vs mma.sync, shape)."""
    mma = re.compile(r"\b(wgmma\.mma_async\S*|mma\.sync\S*)")
    found = {k: sorted(set(mma.findall(c.asm["ptx"]))) for k, c in compiled.items() if c is not None}
    if len({tuple(v) for v in found.values()}) > 1:
        fails.append(name)
        print(f"FAIL {name}: different MMA instructions {found}")
    else:
        print(f"ok   {name}: one MMA instruction {next(iter(found.values()), [])}")

def ty(default, **over):
    class D(dict):
        def __missing__(self, k): return over.get(k, default)
    return D()

for dt in ("bf16", "fp32"):
    P = f"*{dt}"
    # rms_norm
    compile_(f"rms_fwd {dt}", rms_norm._rms_norm_fwd, ty("i32", X=P, R=P, W=P, Y=P, S=P, RSTD="*fp32", eps="fp32"),
             dict(HAS_RESIDUAL=True, BLOCK=4096), num_warps=8)
    compile_(f"rms_bwd {dt}", rms_norm._rms_norm_bwd, ty("i32", DY=P, DS=P, X=P, W=P, RSTD="*fp32", DX=P, DW_PARTIAL="*fp32"),
             dict(HAS_DS=True, BLOCK=4096), num_warps=8)
    # rope (4 kv heads, 28 q heads -> 32; head_dim 128; and 1 kv head)
    for hk in (4, 1):
        compile_(f"rope {dt} hk={hk}", rope._rope_kernel, ty("i32", Q=P, K=P, Q_OUT=P, K_OUT=P, POS="*i64", INV_FREQ="*fp32"),
                 dict(SIGN=1.0, BLOCK_HQ=32, BLOCK_HK=hk, BLOCK_D=64))
    compile_(f"swiglu_fwd {dt}", swiglu._swiglu_fwd, ty("i32", GATE=P, UP=P, OUT=P), dict(BLOCK=4096), num_warps=8)
    compile_(f"swiglu_bwd {dt}", swiglu._swiglu_bwd, ty("i32", DOUT=P, GATE=P, UP=P, DGATE=P, DUP=P), dict(BLOCK=4096), num_warps=8)
    # linear: every M tile the launcher may take on this target, each with the 128-row tile's MMA instruction
    torch_dt = {"bf16": __import__("torch").bfloat16, "fp32": __import__("torch").float32}[dt]
    lin = {bm: compile_(f"linear {dt} m{bm}", linear._matmul_kernel, ty("i32", A=P, B=P, C=P, BIAS=P),
                        dict(HAS_BIAS=True, UPCAST=False, IEEE_FP32=dt == "fp32", BLOCK_M=bm, BLOCK_N=linear.BLOCK_N,
                             BLOCK_K=linear.BLOCK_K, GROUP_M=linear.GROUP_M),
                        num_warps=linear.num_warps(bm), num_stages=2 if dt == "fp32" else 3)
           for bm in linear.block_m_choices((TARGET.arch // 10, TARGET.arch % 10), torch_dt)}
    same_mma(f"linear {dt}", lin)
    # attention
    for hd in (128, 64):
        tiles = attention._tiles(hd, torch_dt, True)
        dot = tl.bfloat16 if dt == "bf16" else tl.float32
        prec = "ieee" if dt == "fp32" else "tf32"
        consts = dict(DOT=dot, PRECISION=prec, HEAD_DIM=hd, BLOCK_D=max(16, triton.next_power_of_2(hd)), GROUP=7, CAUSAL=True)
        T = ty("i32", Q=P, K=P, V=P, O=P, DO=P, DQ=P, DK=P, DV=P, LSE="*fp32", DELTA="*fp32", CU_SEQLENS="*i32",
               qk_scale="fp32", sm_scale="fp32")
        bm, bn = tiles["fwd"]
        fwd = compile_(f"attn_fwd {dt} d={hd}", attention._attn_fwd_kernel, T, dict(consts, BLOCK_M=bm, BLOCK_N=bn), **tiles["launch"])
        compile_(f"attn_delta {dt} d={hd}", attention._attn_bwd_delta_kernel, T,
                 dict(HEAD_DIM=hd, BLOCK_D=consts["BLOCK_D"], BLOCK_M=tiles["dq"][0]))
        bm, bn = tiles["dkdv"]
        compile_(f"attn_dkdv {dt} d={hd}", attention._attn_bwd_dkdv_kernel, T, dict(consts, BLOCK_M=bm, BLOCK_N=bn), **tiles["launch"])
        bm, bn = tiles["dq"]
        compile_(f"attn_dq {dt} d={hd}", attention._attn_bwd_dq_kernel, T, dict(consts, BLOCK_M=bm, BLOCK_N=bn), **tiles["launch"])
        # paged: exact (the training tiles: must be the training kernel's instruction), fast decode (split-KV) and
        # fast prefill, and the merge of split-KV pieces
        pc = dict(DOT=dot, PRECISION=prec, HEAD_DIM=hd, BLOCK_D=consts["BLOCK_D"], GROUP=7, PAGE=16)
        PT = ty("i32", Q=P, K_CACHE=P, V_CACHE=P, O=P, O_PART="*fp32", ML_PART="*fp32", BLOCK_TABLES="*i32",
                CU_SEQLENS_Q="*i32", CONTEXT_LENS="*i32", qk_scale="fp32")
        for name, select, t in (("exact", 0, paged_attention.decode_plan(True, torch_dt, hd, 7, True)["decode"]),
                                ("fast decode", 1, paged_attention.decode_plan(True, torch_dt, hd, 7, False)["decode"]),
                                ("fast prefill", 2, paged_attention.decode_plan(True, torch_dt, hd, 7, False)["prefill"])):
            split_min, max_splits = t["split"] or (0, 1)
            c = compile_(f"paged {name} {dt} d={hd}", paged_attention._paged_attn_kernel, PT,
                         dict(pc, BLOCK_M=t["block_m"], BLOCK_N=t["block_n"], SELECT=select, SPLIT=t["split"] is not None,
                              SPLIT_MIN=split_min, MAX_SPLITS=max_splits), **t["launch"])
            if name == "exact":
                same_mma(f"paged exact vs attn_fwd {dt} d={hd}", {"attn_fwd": fwd, "paged": c})
        split_min, max_splits = paged_attention.SPLITS[True]
        compile_(f"paged merge {dt} d={hd}", paged_attention._merge_pieces_kernel, PT,
                 dict(HEAD_DIM=hd, BLOCK_D=consts["BLOCK_D"], BLOCK_N=tiles["fwd"][1], SPLIT_MIN=split_min,
                      MAX_SPLITS=max_splits, BLOCK_S=triton.next_power_of_2(max_splits)))
    compile_(f"write_kv {dt}", paged_attention._write_kv_kernel, ty("i32", K=P, V=P, K_CACHE=P, V_CACHE=P, SLOTS="*i64"),
             dict(ROW=512, BLOCK=512))
    # token_logprobs
    fp32dot = dt == "fp32"
    TT = ty("i32", h_ptr=P, w_ptr=P, tgt_ptr="*i64", part_ptr="*fp32", inv_temp="fp32", lse_ptr="*fp32", mean_ptr="*fp32",
            g_ptr="*fp32", ge_ptr="*fp32", d_ptr=P, logp_ptr="*fp32", entropy_ptr="*fp32")
    compile_(f"tlp_split {dt}", tlp._forward_split_kernel, TT,
             dict(V_SPLIT=tlp.V_SPLIT, BLOCK_T=tlp.BLOCK_T, BLOCK_V=tlp.BLOCK_V, BLOCK_H=tlp.BLOCK_H, FP32_DOT=fp32dot))
    compile_(f"tlp_combine {dt}", tlp._forward_combine_kernel, TT, dict(BLOCK=tlp.COMBINE_BLOCK))
    compile_(f"tlp_dlogits {dt}", tlp._dlogits_kernel, TT,
             dict(ENTROPY_GRAD=True, BLOCK_T=tlp.BLOCK_T, BLOCK_V=tlp.BLOCK_V, BLOCK_H=tlp.BLOCK_H, FP32_DOT=fp32dot))
    compile_(f"tlp_matmul {dt}", tlp._matmul_kernel, ty("i32", a_ptr=P, b_ptr=P, c_ptr="*fp32"),
             dict(ACCUMULATE=True, BLOCK=tlp.MATMUL_BLOCK, FP32_DOT=fp32dot))
print("FAILED:", fails)
sys.exit(1 if fails else 0)
