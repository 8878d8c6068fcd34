"""The process group and device of this process (torchrun or one process), and tiny collectives."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from protege.engine.training.config import ConfigError


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    sharded: bool  # parameters sharded with FSDP2 (multi-process, or CUDA for its mixed precision)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config asks for device=\"cuda\" but this machine has no usable CUDA device "
                           "(torch.cuda.is_available() is False); use device=\"cpu\" or \"auto\"")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_runtime(requested_device: str, timeout_s: float | None = None) -> Runtime:
    """Join the process group started by torchrun (WORLD_SIZE > 1), or run as one process. On CUDA a
    one-process group is made too, so that FSDP2's mixed precision (bf16 compute, fp32 master) applies.
    timeout_s: how long a collective may wait for the other ranks (config.process_group_timeout; None: the
    backend's default, 10 minutes for NCCL)."""
    if timeout_s is not None and not timeout_s > 0:
        raise ConfigError(f"process group timeout {timeout_s!r} s: expected a positive number of seconds")
    device = resolve_device(requested_device)
    world = launched_world_size()
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if world == 1 and device.type == "cpu":
        return Runtime(0, 1, device, sharded=False)
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=None if timeout_s is None else timedelta(seconds=timeout_s))
    return Runtime(dist.get_rank(), dist.get_world_size(), device, sharded=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce(values: list[float], op: str, runtime: Runtime) -> list[float]:
    """Sum or max of a few numbers over all ranks (float64 on the host for gloo, on the device for nccl)."""
    if runtime.world_size == 1 or not dist.is_initialized():
        return list(values)
    device = runtime.device if runtime.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def barrier(runtime: Runtime) -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown(runtime: Runtime) -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
