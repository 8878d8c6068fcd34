"""Parallelism applied to the model from outside (the model file stays plain): activation checkpointing and
FSDP2 sharding."""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.config import ModelConfig
from engine.model import Qwen2ForCausalLM
from engine.training.config import ConfigError
from engine.training.runtime import Runtime


def apply_activation_checkpointing(model: Qwen2ForCausalLM) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them: only the
    layer inputs stay alive. The layer's own forward is wrapped (not the module), so parameter names and
    state_dict keys are unchanged. Applying it twice is a no-op."""
    for layer in model.model.layers:
        if getattr(layer, "_activation_checkpointed", False):
            continue
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        layer._activation_checkpointed = True


def shard(root: nn.Module, layers: list[nn.Module], runtime: Runtime, compute_dtype: torch.dtype) -> None:
    """FSDP2: one parameter group per decoder layer, the rest (embedding, final norm, head) in the root's.
    Parameters keep their stored dtype (the fp32 master copy); compute runs in `compute_dtype` and gradients
    are reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again first in the backward: keep them gathered.
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    fully_shard(root, mesh=mesh, mp_policy=policy)


def load_sharded(path: str, dtype: torch.dtype, runtime: Runtime, compute_dtype: torch.dtype,
                 activation_checkpointing: bool, wrap: Callable[[Qwen2ForCausalLM], nn.Module]
                 ) -> tuple[Qwen2ForCausalLM, nn.Module]:
    """The model built on the meta device and sharded first, then filled: rank 0 reads the checkpoint (on the
    CPU) and each rank receives only its shards, so no GPU ever holds the whole model. `wrap(model)` is the FSDP root (the model and its loss)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device("meta"):
        model = Qwen2ForCausalLM(ModelConfig.from_json(path))
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    root = wrap(model)
    shard(root, list(model.model.layers), runtime, compute_dtype)
    root.to_empty(device=runtime.device)
    full = Qwen2ForCausalLM.from_pretrained(path, dtype=dtype).state_dict() if runtime.is_main else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    model.source_dir = path
    return model, root


def build_training_model(path: str, dtype: torch.dtype, compute_dtype: torch.dtype, runtime: Runtime,
                         activation_checkpointing: bool, wrap: Callable[[Qwen2ForCausalLM], nn.Module]
                         ) -> tuple[Qwen2ForCausalLM, nn.Module]:
    """The model to train and its FSDP root: sharded with FSDP2 when the runtime is (CUDA or torchrun), else
    plain on the device (then compute and master dtype must agree: mixed precision is FSDP2's)."""
    if runtime.sharded:
        return load_sharded(path, dtype, runtime, compute_dtype, activation_checkpointing, wrap)
    if compute_dtype != dtype:
        raise ConfigError(f"model.compute_dtype={_name(compute_dtype)} differs from model.dtype={_name(dtype)}: "
                          f"mixed precision needs the FSDP path (CUDA or torchrun)")
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=dtype, device=runtime.device)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    return model, wrap(model)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
