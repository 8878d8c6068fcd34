"""Sections: environment (versions, device) and measured ceilings."""
from __future__ import annotations

import torch

import kernel_timings  # a benchmarks/ sibling: benchmarks/ is first on sys.path (the script's folder)

from .report import Section
from .suite import Suite


# -- sections: environment and ceilings ---------------------------------------------------------------------------
def section_environment(suite: Suite, sec: Section):
    for name, version in suite.report.meta["versions"].items():
        if name in ("flash_attn", "xformers", "liger_kernel", "vllm"):
            if version == "not installed":
                sec.skip(f"optional: {name}", "not installed: its comparisons are skipped")
            else:
                sec.add(dict(check=f"optional: {name}", status="PASS", detail=f"importable ({version})"))
    sec.check("CUDA device", lambda: dict(status="PASS", detail=suite.report.meta["device"]["name"])
              if suite.device.type == "cuda" else dict(status="SKIP", detail="dry run on the CPU"))


def section_ceilings(suite: Suite, sec: Section):
    """A device-to-device copy (bytes read + written) and a square bf16 matmul, as METHOD.md measures them."""
    n_copy = suite.pick(1 << 30, 1 << 29, 1 << 20)  # bytes per buffer
    size = suite.pick(8192, 8192, 128)

    def copy():
        src = torch.randn(n_copy // 4, device=suite.device)
        dst = torch.empty_like(src)
        ms = kernel_timings.time_ms(lambda: dst.copy_(src), suite.device)
        rate = 2 * n_copy / ms / 1e-3
        suite.measured["bytes_per_s"] = rate
        share = rate / suite.limits["bytes_per_s"] if suite.limits else None
        return dict(status="PASS", value=f"{rate / 1e12:.2f} TB/s", share_of_datasheet=share)

    def matmul():
        a = torch.randn(size, size, device=suite.device, dtype=torch.bfloat16)
        b = torch.randn(size, size, device=suite.device, dtype=torch.bfloat16)
        ms = kernel_timings.time_ms(lambda: a @ b, suite.device)
        rate = 2 * size ** 3 / ms / 1e-3
        suite.measured["flop_per_s"] = rate
        share = rate / suite.limits["flop_per_s"] if suite.limits else None
        return dict(status="PASS", value=f"{rate / 1e12:.1f} TFLOP/s", share_of_datasheet=share)

    sec.check(f"copy {n_copy >> 20} MiB", copy)
    sec.check(f"bf16 matmul {size}^3 (random data)", matmul)
    sec.note("Shares elsewhere in this report are of the datasheet peaks; these measured ceilings are what this "
             "device reached on plain PyTorch work.")
