"""Argument checks shared by the Triton ops: a bad argument fails at the call, naming the argument and the
value, instead of deep inside a kernel launch."""
from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def check_float_tensor(op: str, name: str, t) -> None:
    """t is a fp16/bf16/fp32 tensor on a device the kernels can run on."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
    if not t.is_cuda and not INTERPRETING:
        raise ValueError(f"{op}: {name} is on {t.device}; the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 for the CPU interpreter)")


def check_like(op: str, name: str, t, ref_name: str, ref: torch.Tensor) -> None:
    """t is a tensor with ref's dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_token_logprobs_inputs(hidden, weight, targets, temperature, check_ids: bool = True) -> None:
    """check_ids: also the target ids' range (one device sync; callers whose ids are in range by construction,
    like the sampler's own draws, skip it)."""
    def fail(msg):
        raise ValueError(f"token_logprobs: {msg}")

    if hidden.dim() != 2:
        fail(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        fail(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        fail(f"hidden size differs: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        fail(f"targets must be [T] = [{hidden.shape[0]}], got shape {tuple(targets.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        fail(f"hidden dtype {hidden.dtype} unsupported (float16, bfloat16 or float32)")
    if weight.dtype != hidden.dtype:
        fail(f"dtype mismatch: hidden {hidden.dtype} vs weight {weight.dtype}")
    if targets.dtype not in (torch.int32, torch.int64):
        fail(f"targets must be int32 or int64 token ids, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        fail(f"device mismatch: hidden {hidden.device}, weight {weight.device}, targets {targets.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        fail(f"temperature must be a finite number > 0, got {temperature!r}")
    if check_ids and targets.numel():
        lo, hi = torch.stack([targets.min(), targets.max()]).tolist()  # one device sync
        if lo < 0 or hi >= weight.shape[0]:
            bad = lo if lo < 0 else hi
            fail(f"target id {bad} out of range [0, {weight.shape[0]}) (vocabulary of the weight)")


def rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """t as a 2-D [rows, n_cols] tensor whose last dimension is unit-stride (a view when possible)."""
    t2 = t.reshape(math.prod(t.shape[:-1]), n_cols)
    return t2 if t2.stride(-1) == 1 or n_cols <= 1 else t2.contiguous()
