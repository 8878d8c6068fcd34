"""Compile every Triton kernel of kernels/ops for real NVIDIA targets (sm_90 and sm_80) without a GPU, to catch
what the CPU interpreter accepts but a GPU compile rejects (dot shapes, dtype mixing) and kernels that would
not launch for lack of shared memory. tests/test_gpu_compile.py runs it in CI.

Each kernel is compiled as a real launch on aligned tensors specialises it: the JIT's own binder sees 16-byte
aligned pointers and sizes/strides that are multiples of 16 (an int equal to 1, a unit stride, becomes a
constant, as at launch), so it gets the JIT's divisibility attributes. Without them Triton cannot vectorise or
pipeline the loads and compiles a variant that needs a fraction of the real shared memory. For each kernel and
architecture it prints the shared memory, and the registers and spills that ptxas reports; it fails when a
kernel does not compile or needs more shared memory than a block may have.

    python benchmarks/gpu_compile.py        (TRITON_INTERPRET must not be set; SM=90 for one architecture)
"""
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("gpu_compile: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.runtime.cache import get_cache_manager
from triton.runtime.jit import MockTensor, create_function_from_signature
from protege.kernels.ops import rms_norm, rope, swiglu, linear, attention, paged_attention, philox, token_logprobs as tlp

# Shared memory one block may use (opt-in maximum: the SM's 228 KB / 164 KB less 1 KB reserved per block).
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ARCHS = [int(a) for a in os.environ.get("SM", "90,80").split(",")]
SIZE = 4096  # every int argument not given below: a size or stride that is a multiple of 16
M_TILES = linear.BLOCK_MS  # the exact-mode linear's row tiles
knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report when it compiles a kernel


def aligned(dtype):
    return MockTensor(dtype)  # data_ptr() is 0: 16-byte aligned


def compile_launch(fn, args, opts, arch):
    """fn compiled for sm_<arch> as fn[grid](**args, **opts) on aligned tensors would be (ints default to SIZE)."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {p.name: args[p.name] if p.is_constexpr or p.name in args else SIZE for p in fn.params} | opts
    # What JITFunction.run does before compiling (Triton 3.7): bind and specialise the arguments, pack them.
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def registers_and_spills(c, arch, log):
    """(registers, spill store bytes, spill load bytes) per thread, from ptxas -v's report: the one Triton's
    compile printed (log), kept next to the kernel in Triton's cache for the runs that find the kernel there; for
    a kernel cached without it, ptxas run again on the kernel's PTX with Triton's flags."""
    store = get_cache_manager(c.hash)
    if saved := "Used" not in log and store.get_file("ptxas-v.log"):
        log = Path(saved).read_text()
    elif "Used" not in log:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(c.asm["ptx"])
            f.flush()
            log = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name={sm_arch_from_capability(arch)}", f.name, "-o", os.devnull],
                                 capture_output=True, text=True, check=True).stderr
    if not saved:
        store.put(log, "ptxas-v.log", binary=False)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return int(re.search(r"Used (\d+) registers", log).group(1)), int(spills.group(1)), int(spills.group(2))


def check(arch, name, fn, args, opts):
    """Compile one launch for one architecture -> (its report line, whether it passes)."""
    tag = f"sm_{arch} {name:<26}"
    try:
        with contextlib.redirect_stdout(io.StringIO()) as log:  # knobs.nvidia.dump_ptxas_log prints it
            c = compile_launch(fn, args, opts, arch)
        regs, spill_st, spill_ld = registers_and_spills(c, arch, log.getvalue())
    except Exception as e:  # any compiler error is a finding: report it and go on with the others
        return f"FAIL {tag} {type(e).__name__}: {str(e)[:600]}", False
    shared, limit = c.metadata.shared, SMEM_LIMIT[arch]
    ok = shared <= limit
    return (f"{'ok  ' if ok else 'FAIL'} {tag} shared={shared / 1024:6.1f} KB{'' if ok else f' > {limit // 1024} KB'}"
            f"  regs={regs:3d}  spills={spill_st}/{spill_ld} B  (warps={c.metadata.num_warps}, "
            f"stages={c.metadata.num_stages})"), ok


@cache
def launches():
    """(name, kernel, arguments, launch options) for every kernel, with the engine's tiles for Qwen2.5-7B
    (3584 hidden, 28 query heads, 4 KV heads, head_dim 128; head_dim 64 too)."""
    out = []
    add = lambda name, fn, opts=None, **args: out.append((name, fn, args, opts or {}))  # noqa: E731
    f32, i32, i64 = aligned(torch.float32), aligned(torch.int32), aligned(torch.int64)
    for dt, torch_dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        P = aligned(torch_dt)
        add(f"rms_fwd {dt}", rms_norm._rms_norm_fwd, dict(num_warps=8), X=P, R=P, W=P, Y=P, S=P, RSTD=f32, eps=1e-6,
            HAS_RESIDUAL=True, BLOCK=4096)
        add(f"rms_bwd {dt}", rms_norm._rms_norm_bwd, dict(num_warps=8), DY=P, DS=P, X=P, W=P, RSTD=f32, DX=P,
            DW_PARTIAL=f32, HAS_DS=True, BLOCK=4096)
        for hk in (4, 1):  # 28 query heads; 4 KV heads, and 1
            add(f"rope {dt} hk={hk}", rope._rope_kernel, Q=P, K=P, Q_OUT=P, K_OUT=P, POS=i64, INV_FREQ=f32,
                stride_qt=28 * 128, stride_qh=128, stride_kt=hk * 128, stride_kh=128, n_q_heads=28, n_k_heads=hk,
                head_dim=128, SIGN=1.0, BLOCK_HQ=32, BLOCK_HK=hk, BLOCK_D=64)
        add(f"swiglu_fwd {dt}", swiglu._swiglu_fwd, dict(num_warps=8), GATE=P, UP=P, OUT=P, BLOCK=4096)
        add(f"swiglu_bwd {dt}", swiglu._swiglu_bwd, dict(num_warps=8), DOUT=P, GATE=P, UP=P, DGATE=P, DUP=P,
            BLOCK=4096)
        # linear: forward x @ W^T at every M tile (exact mode picks it by row count), backward dx = dy @ W and
        # dW = dy^T @ x at the 128-row tile (each has other unit strides)
        lin = dict(A=P, B=P, C=P, BIAS=P, HAS_BIAS=True, UPCAST=False, IEEE_FP32=dt == "fp32", BLOCK_N=linear.BLOCK_N,
                   BLOCK_K=linear.BLOCK_K, GROUP_M=linear.GROUP_M)
        stages = 2 if dt == "fp32" else 3
        for part, strides, tiles_m in (("fwd", (SIZE, 1, 1, SIZE), M_TILES), ("dx", (SIZE, 1, SIZE, 1), (128,)),
                                       ("dw", (1, SIZE, SIZE, 1), (128,))):
            for bm in tiles_m:
                add(f"linear {part} {dt} m{bm}", linear._matmul_kernel,
                    dict(num_warps=linear.num_warps(bm), num_stages=stages), **lin, BLOCK_M=bm,
                    **dict(zip(("stride_am", "stride_ak", "stride_bk", "stride_bn"), strides)))
        # attention (GQA group 7) and the paged attention of the sampler
        for hd in (128, 64):
            tiles = attention._tiles(hd, torch_dt, True)
            strides = dict(stride_qt=28 * hd, stride_qh=hd, stride_kt=4 * hd, stride_kh=hd, stride_vt=4 * hd,
                           stride_vh=hd, stride_ot=28 * hd, stride_oh=hd, stride_dot=28 * hd, stride_doh=hd,
                           stride_dqt=28 * hd, stride_dqh=hd, stride_dkt=4 * hd, stride_dkh=hd, stride_dvt=4 * hd,
                           stride_dvh=hd)
            consts = dict(DOT=tl.bfloat16 if dt == "bf16" else tl.float32, PRECISION="ieee" if dt == "fp32" else "tf32",
                          HEAD_DIM=hd, BLOCK_D=max(16, triton.next_power_of_2(hd)), GROUP=7)
            T = dict(Q=P, K=P, V=P, O=P, DO=P, DQ=P, DK=P, DV=P, LSE=f32, DELTA=f32, CU_SEQLENS=i32, qk_scale=0.1,
                     sm_scale=0.1)
            for name, fn, (bm, bn) in (("attn_fwd", attention._attn_fwd_kernel, tiles["fwd"]),
                                       ("attn_dkdv", attention._attn_bwd_dkdv_kernel, tiles["dkdv"]),
                                       ("attn_dq", attention._attn_bwd_dq_kernel, tiles["dq"])):
                args = {k: v for k, v in {**T, **strides}.items() if k in fn.arg_names}
                opts = dict(tiles["launch"], **attention.SAME_ROUNDING) if name == "attn_fwd" else tiles["launch"]
                add(f"{name} {dt} d={hd}", fn, opts, **args, **consts, CAUSAL=True, BLOCK_M=bm, BLOCK_N=bn)
            delta = attention._attn_bwd_delta_kernel
            add(f"attn_delta {dt} d={hd}", delta, **{k: v for k, v in {**T, **strides}.items() if k in delta.arg_names},
                HEAD_DIM=hd, BLOCK_D=consts["BLOCK_D"], BLOCK_M=tiles["dq"][0])
            # paged: exact (the training tiles), fast decode (split-KV) and fast prefill; the split pieces' merge
            paged = dict(Q=P, K_CACHE=P, V_CACHE=P, O=P, O_PART=f32, ML_PART=f32, BLOCK_TABLES=i32, CU_SEQLENS_Q=i32,
                         CONTEXT_LENS=i32, qk_scale=0.1, stride_qt=28 * hd, stride_qh=hd, stride_ot=28 * hd,
                         stride_oh=hd, stride_ch=hd, **consts, PAGE=16)
            for name, select, exact, part in (("exact", 0, True, "decode"), ("fast decode", 1, False, "decode"),
                                              ("fast prefill", 2, False, "prefill")):
                t = paged_attention.decode_plan(True, torch_dt, hd, 7, exact)[part]
                split_min, max_splits = t["split"] or (0, 1)
                add(f"paged {name} {dt} d={hd}", paged_attention._paged_attn_kernel,
                    dict(t["launch"], **paged_attention.SAME_ROUNDING), **paged,
                    BLOCK_M=t["block_m"], BLOCK_N=t["block_n"], SELECT=select, SPLIT=t["split"] is not None,
                    SPLIT_MIN=split_min, MAX_SPLITS=max_splits)
            # exact mode's decode tiles (exact_decode_block_m): 64 rows on sm_90, 16 on sm_80
            for cap in ((9, 0), (8, 0)):
                t = paged_attention.decode_plan(True, torch_dt, hd, 7, True, cap)["decode"]
                if any(name == f"paged exact decode m{t['block_m']} {dt} d={hd}" for name, *_ in out):
                    continue   # fp32: one tile on both
                add(f"paged exact decode m{t['block_m']} {dt} d={hd}", paged_attention._paged_attn_kernel,
                    dict(t["launch"], **paged_attention.SAME_ROUNDING), **paged, BLOCK_M=t["block_m"], BLOCK_N=t["block_n"], SELECT=1, SPLIT=False,
                    SPLIT_MIN=0, MAX_SPLITS=1)
            split_min, max_splits = paged_attention.SPLITS[True]
            add(f"paged merge {dt} d={hd}", paged_attention._merge_pieces_kernel, O=P, O_PART=f32, ML_PART=f32,
                CU_SEQLENS_Q=i32, CONTEXT_LENS=i32, stride_ot=28 * hd, stride_oh=hd, HEAD_DIM=hd,
                BLOCK_D=consts["BLOCK_D"], BLOCK_N=tiles["fwd"][1], SPLIT_MIN=split_min, MAX_SPLITS=max_splits,
                BLOCK_S=triton.next_power_of_2(max_splits))
        add(f"write_kv {dt}", paged_attention._write_kv_kernel, K=P, V=P, K_CACHE=P, V_CACHE=P, SLOTS=i64, ROW=512,
            BLOCK=512)
        # token_logprobs (the dot in fp32 for fp32 inputs)
        fp32dot = dt == "fp32"
        tiles = dict(BLOCK_T=tlp.BLOCK_T, BLOCK_V=tlp.BLOCK_V, BLOCK_H=tlp.BLOCK_H, FP32_DOT=fp32dot)
        add(f"tlp_split {dt}", tlp._forward_split_kernel, tlp.SAME_ROUNDING, h_ptr=P, w_ptr=P, tgt_ptr=i64,
            part_ptr=f32, inv_temp=1.0, V_SPLIT=tlp.V_SPLIT, **tiles)
        add(f"tlp_head_logits {dt}", tlp._head_logits_kernel, tlp.SAME_ROUNDING, h_ptr=P, w_ptr=P, z_ptr=f32,
            inv_temp=1.0, **tiles)
        if dt == "fp32":  # over stored fp32 logits: one variant
            add("tlp_stored_split", tlp._stored_split_kernel, tlp.SAME_ROUNDING, z_ptr=f32, tgt_ptr=i64,
                part_ptr=f32, V_SPLIT=tlp.V_SPLIT, BLOCK_T=tlp.BLOCK_T, BLOCK_V=tlp.BLOCK_V)
        add(f"tlp_combine {dt}", tlp._forward_combine_kernel, part_ptr=f32, logp_ptr=f32, lse_ptr=f32,
            entropy_ptr=f32, mean_ptr=f32, BLOCK=tlp.COMBINE_BLOCK)
        add(f"tlp_dlogits {dt}", tlp._dlogits_kernel, h_ptr=P, w_ptr=P, tgt_ptr=i64, lse_ptr=f32, mean_ptr=f32,
            g_ptr=f32, ge_ptr=f32, d_ptr=P, inv_temp=1.0, ENTROPY_GRAD=True, **tiles)
        # d @ W -> dh and d^T @ h -> dW
        for part, strides in (("dh", (SIZE, 1, SIZE, 1)), ("dw", (1, SIZE, SIZE, 1))):
            add(f"tlp_matmul {part} {dt}", tlp._matmul_kernel, a_ptr=P, b_ptr=P, c_ptr=f32, ACCUMULATE=True,
                BLOCK=tlp.MATMUL_BLOCK, FP32_DOT=fp32dot,
                **dict(zip(("stride_am", "stride_ak", "stride_bk", "stride_bn"), strides)))
    add("philox_uniforms", philox._philox_uniform_kernel, SEEDS=i64, COUNTERS=i64, OUT=aligned(torch.float64),
        BLOCK=philox.BLOCK)
    return out


def same_mma_groups(arch):
    """Launches that must give the same bits must use one tensor-core instruction (wgmma vs mma.sync, shape):
    the linear's M tiles exact mode may pick on this architecture, exact paged attention (its prefill and its
    decode tile on this architecture) vs the training forward, and the fused log-prob's logits vs head_logits'."""
    groups = []
    for dt, torch_dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        groups.append((f"linear {dt}", [f"linear fwd {dt} m{bm}"
                                        for bm in linear.block_m_choices((arch // 10, arch % 10), torch_dt)]))
        for hd in (128, 64):
            decode_m = paged_attention.decode_plan(True, torch_dt, hd, 7, True, (arch // 10, arch % 10))["decode"]
            groups.append((f"paged exact vs attn_fwd {dt} d={hd}", [f"attn_fwd {dt} d={hd}", f"paged exact {dt} d={hd}",
                                                                     f"paged exact decode m{decode_m['block_m']} {dt} d={hd}"]))
        # The sampler draws from head_logits' z and reports log p as the fused op computes it.
        groups.append((f"token_logprobs z {dt}", [f"tlp_split {dt}", f"tlp_head_logits {dt}"]))
    return groups


def uncontracted(arch):
    """Kernels whose fp32 softmax arithmetic must round the same in every launch that shares its bits (the
    training attention forward and exact paged attention; the fused log-prob and head_logits): compiled without
    multiply-add contraction, their PTX holds no fma. With contraction the training forward's unmasked key
    blocks fused s * scale - max while the masked ones and the paged kernel did not: an H200 showed the bits."""
    names = []   # bf16 only: an fp32 dot is itself a chain of fma (in its fixed K order)
    for hd in (128, 64):
        decode_m = paged_attention.decode_plan(True, torch.bfloat16, hd, 7, True, (arch // 10, arch % 10))["decode"]
        names += [f"attn_fwd bf16 d={hd}", f"paged exact bf16 d={hd}", f"paged exact decode m{decode_m['block_m']} bf16 d={hd}"]
    return names + ["tlp_split bf16", "tlp_head_logits bf16"]


def ptx(arch, name):
    fn, args, opts = next((f, a, o) for n, f, a, o in launches() if n == name)
    with contextlib.redirect_stdout(io.StringIO()):   # compiled already: Triton's cache answers
        return compile_launch(fn, args, opts, arch).asm["ptx"]


def mma_instructions(arch, name):
    return tuple(sorted(set(re.findall(r"\b(wgmma\.mma_async\S*|mma\.sync\S*)", ptx(arch, name)))))


def _check_job(job):
    arch, i = job
    return check(arch, *launches()[i])


def main():
    unknown = [a for a in ARCHS if a not in SMEM_LIMIT]
    if unknown:
        sys.exit(f"gpu_compile: no shared-memory limit known for sm_{unknown[0]} (known: {sorted(SMEM_LIMIT)})")
    jobs = [(arch, i) for arch in ARCHS for i in range(len(launches()))]
    fails = []
    with ProcessPoolExecutor(min(os.cpu_count() or 1, 8)) as pool:  # compiles are independent and CPU-bound
        for (arch, i), (line, ok) in zip(jobs, pool.map(_check_job, jobs)):
            print(line, flush=True)
            if not ok:
                fails.append(f"sm_{arch} {launches()[i][0]}")
    for arch in ARCHS:
        for group, names in same_mma_groups(arch):
            if any(f"sm_{arch} {n}" in fails for n in names):
                continue
            found = {n: mma_instructions(arch, n) for n in names}
            ok = len(set(found.values())) == 1
            print(f"{'ok  ' if ok else 'FAIL'} sm_{arch} {group}: "
                  + (f"same MMA instructions {next(iter(found.values()))}" if ok else f"different MMA instructions {found}"))
            if not ok:
                fails.append(f"sm_{arch} {group}")
        names = [n for n in uncontracted(arch) if f"sm_{arch} {n}" not in fails]
        fused = [n for n in names if re.search(r"\bfma\.rn\.f32\b", ptx(arch, n))]
        print(f"{'FAIL' if fused else 'ok  '} sm_{arch} no multiply-add contraction in {len(names)} kernels"
              + (f": fma in {fused}" if fused else ""))
        if fused:
            fails.append(f"sm_{arch} fma in {fused}")
    print("FAILED:", fails)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
