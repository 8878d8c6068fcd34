"""Parallelism applied to the model from outside (the model file stays plain): activation checkpointing, FSDP2
sharding, and rollout mode (the sharded model unsharded in place for the in-process sampler)."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

from protege.engine.config import ModelConfig
from protege.engine.model import Qwen2ForCausalLM, compute_dtype as default_compute_dtype
from protege.engine.training.config import ConfigError
from protege.engine.training.runtime import Runtime


def apply_activation_checkpointing(model: Qwen2ForCausalLM) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them: only the
    layer inputs stay alive. The layer's own forward is wrapped (not the module), so parameter names and
    state_dict keys are unchanged. Applying it twice is a no-op."""
    for layer in model.model.layers:
        if getattr(layer, "_activation_checkpointed", False):
            continue
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        layer._activation_checkpointed = True


RESHARD_ATTR = "_protege_reshard_after_forward"   # training's setting, restored when rollout mode ends


def shard(root: nn.Module, layers: list[nn.Module], runtime: Runtime, compute_dtype: torch.dtype,
          offload: bool = False) -> None:
    """FSDP2: one parameter group per decoder layer, the rest (embedding, final norm, head) in the root's.
    Parameters keep their stored dtype (the fp32 master copy); compute runs in `compute_dtype` and gradients
    are reduced in fp32. offload: the shards live in CPU memory and each group is brought to the device for
    its forward (a frozen reference model that must not hold GPU memory)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    where = CPUOffloadPolicy(pin_memory=runtime.device.type == "cuda") if offload else OffloadPolicy()
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again first in the backward: keep them gathered.
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1,
                    offload_policy=where)
        setattr(layer, RESHARD_ATTR, i < len(layers) - 1)
    fully_shard(root, mesh=mesh, mp_policy=policy, offload_policy=where)
    setattr(root, RESHARD_ATTR, True)


def reshard_after_every_forward(root: nn.Module) -> None:
    """A frozen model (no backward): every FSDP2 group of `root` resharded after each forward of it. FSDP2
    keeps the root's group gathered after a forward (and shard() the last layer's), for the backward that
    follows in training; a model that never runs one would hold them through the whole update."""
    groups = [m for m in root.modules() if isinstance(m, FSDPModule)]

    def reshard(module, args, output):
        for group in groups:
            group.reshard()

    if groups:
        root.register_forward_hook(reshard)   # after FSDP2's own post-forward hook (registered first)


def gathered_bytes(root: nn.Module) -> int:
    """Bytes of unsharded parameter storage the FSDP2 groups of `root` hold now."""
    return sum(t.untyped_storage().nbytes() for m in root.modules() if isinstance(m, FSDPModule)
               for fp in m._get_fsdp_state()._fsdp_param_group.fsdp_params for t in fp.all_gather_outputs)


def load_sharded(path: str, dtype: torch.dtype, runtime: Runtime, compute_dtype: torch.dtype,
                 activation_checkpointing: bool, wrap: Callable[[Qwen2ForCausalLM], nn.Module],
                 offload: bool = False) -> tuple[Qwen2ForCausalLM, nn.Module]:
    """The model built on the meta device and sharded first, then filled: rank 0 reads the checkpoint (on the
    CPU) and each rank receives only its shards, so no GPU ever holds the whole model. `wrap(model)` is the FSDP root (the model and its loss)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device("meta"):
        model = Qwen2ForCausalLM(ModelConfig.from_json(path))
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    root = wrap(model)
    shard(root, list(model.model.layers), runtime, compute_dtype, offload)
    root.to_empty(device="cpu" if offload else runtime.device)
    full = Qwen2ForCausalLM.from_pretrained(path, dtype=dtype).state_dict() if runtime.is_main else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    model.source_dir = path
    return model, root


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def training_dtypes(model_cfg, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(master dtype, compute dtype) of model.dtype / model.compute_dtype ("auto": bf16 on CUDA, else fp32)."""
    auto = model_cfg.compute_dtype == "auto"
    return _DTYPES[model_cfg.dtype], default_compute_dtype(device) if auto else _DTYPES[model_cfg.compute_dtype]


def build_training_model(path: str, dtype: torch.dtype, compute_dtype: torch.dtype, runtime: Runtime,
                         activation_checkpointing: bool, wrap: Callable[[Qwen2ForCausalLM], nn.Module],
                         offload: bool = False) -> tuple[Qwen2ForCausalLM, nn.Module]:
    """The model to train and its FSDP root: sharded with FSDP2 when the runtime is (CUDA or torchrun), else
    plain on the device (then compute and master dtype must agree: mixed precision is FSDP2's; offload, the
    shards in CPU memory, needs the sharded path and is moot in one CPU process)."""
    if runtime.sharded:
        return load_sharded(path, dtype, runtime, compute_dtype, activation_checkpointing, wrap, offload)
    if compute_dtype != dtype:
        raise ConfigError(f"model.compute_dtype={_name(compute_dtype)} differs from model.dtype={_name(dtype)}: "
                          f"mixed precision needs the FSDP path (CUDA or torchrun)")
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=dtype, device=runtime.device)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    return model, wrap(model)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class RolloutMode:
    """The training model switched to sampling and back, in place (torchtitan-style, from outside the model).

    enter(): every FSDP2 group (the layers and the root) is all-gathered once, in the compute dtype, and kept
    unsharded: the sampler then runs on the very parameters FSDP gathered, with no per-forward all-gather
    and no copy, and calls the layers' plain forwards (Qwen2ForCausalLM.forward(plain_layers=True)): no FSDP2
    hook and no activation-checkpoint wrapper runs in a sampler step, so training's hooks and wrappers are
    left as they are and nothing needs restoring for them. leave(): the sampler's KV pool and graphs are
    freed, the groups resharded (training's reshard-after-forward restored) and the model's weight version
    bumped, so nothing computed with these weights is served again. Without FSDP (one process, CPU) both are
    no-ops but for the version.
    Use as `with rollout_mode: ...`; `last_switch` holds the last enter + leave cost."""

    def __init__(self, root: nn.Module, model: Qwen2ForCausalLM, sampler=None):
        self.root, self.model, self.sampler = root, model, sampler
        self.groups = [m for m in root.modules() if isinstance(m, FSDPModule)]   # the root first
        self.active = False
        self.last_switch = SwitchStats()

    def enter(self) -> RolloutMode:
        if self.active:
            raise RuntimeError("RolloutMode.enter: already in rollout mode")
        started = time.perf_counter()
        if self.groups:
            # FSDP2 takes the first module run as its root, and its lazy init shares the communication
            # context (streams) the groups' unshard() uses: the root (model and loss) is made the root now,
            # since a rollout comes first and the sampler runs no FSDP hook.
            self.groups[0]._get_fsdp_state()._lazy_init()
        for group in self.groups:
            group.set_reshard_after_forward(False, recurse=False)
        for group in reversed(self.groups):   # layers, then the root
            group.unshard()
        self.active = True
        self.last_switch = SwitchStats(enter_seconds=time.perf_counter() - started,
                                       gathered_bytes=_param_bytes(self.model) if self.groups else 0,
                                       copied_bytes=_copied_bytes(self.groups, self.model))
        return self

    def leave(self) -> SwitchStats:
        if not self.active:
            raise RuntimeError("RolloutMode.leave: not in rollout mode")
        if self.sampler is not None:
            if self.sampler.has_unfinished():
                raise RuntimeError(f"RolloutMode.leave: the sampler still runs {self.sampler.num_unfinished} "
                                   f"request(s); finish or abort them first (Sampler.abort_all)")
            self.sampler.release()
        started = time.perf_counter()
        for group in self.groups:
            group.reshard()
            group.set_reshard_after_forward(getattr(group, RESHARD_ATTR, True), recurse=False)
        self.model.weight_version += 1
        self.active = False
        self.last_switch.leave_seconds = time.perf_counter() - started
        return self.last_switch

    def __enter__(self) -> RolloutMode:
        return self.enter()

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self.sampler is not None:
            self.sampler.abort_all()   # an error mid-rollout: drop its requests, then switch back
        self.leave()


@dataclass
class SwitchStats:
    enter_seconds: float = 0.0
    leave_seconds: float = 0.0
    gathered_bytes: int = 0      # FSDP's own all-gather of the compute-dtype parameters
    copied_bytes: int = 0        # parameter bytes the sampler reads from anywhere else (the goal: 0)

    @property
    def seconds(self) -> float:
        return self.enter_seconds + self.leave_seconds


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _copied_bytes(groups: list, model: nn.Module) -> int:
    """Bytes of the model's parameters that are not FSDP's own unsharded storage (storage identity)."""
    if not groups:
        return 0
    owned = {fp.unsharded_param.data_ptr() for g in groups
             for fp in g._get_fsdp_state()._fsdp_param_group.fsdp_params}
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.data_ptr() not in owned)
