"""Training checkpoints: written atomically, resumed exactly.

A checkpoint is a directory runs/<name>/checkpoints/step_<N>/ holding
  model/        the weights in Hugging Face format (+ tokenizer files): loadable by transformers and vLLM;
  train_state/  model and optimizer state, sharded as the run is (torch.distributed.checkpoint);
  rng/          every rank's RNG states;  trainer.json  step, data position, scheduler, counters.
It is written under step_<N>.tmp/ and renamed when complete, so a process dying mid-write never leaves a
half checkpoint under a final name, and the last good one is untouched. Only the last K are kept."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from protege.engine.checkpoint import save_state_dict
from protege.engine.training.config import ConfigError
from protege.engine.training.runtime import Runtime, barrier

_STEP_DIR = re.compile(r"step_(\d+)")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories of interrupted writes are ignored)."""
    root = checkpoint_dir(run_dir)
    done = [p for p in root.glob("step_*") if _STEP_DIR.fullmatch(p.name) and (p / "trainer.json").is_file()]
    return max(done, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)), default=None)


def resume_point(run_dir: Path, resume: bool, runtime: Runtime) -> Path | None:
    """The checkpoint a run continues from (None: from the start); a fresh run refuses a directory that holds
    another run's checkpoints."""
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None and runtime.is_main:
        print(f"--resume: no checkpoint under {run_dir / 'checkpoints'}; starting from step 0")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds checkpoints of a run: pass --resume to continue it, or "
                          f"choose another output_dir")
    return checkpoint


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_checkpoint(run_dir: Path, step: int, trainer_state: dict, root: nn.Module, model: nn.Module,
                             optimizer: torch.optim.Optimizer, runtime: Runtime, keep_last: int,
                             max_shard_size: str, dtype: str = "auto") -> Path:
    """Collective: every rank calls it. `root` is what was sharded (model + loss); `model` the causal LM.
    dtype: of model/'s weights (config checkpoint.dtype; auto: the model config's, else as trained)."""
    final = checkpoint_dir(run_dir) / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if runtime.is_main:
        for stale in checkpoint_dir(run_dir).glob("step_*.tmp"):  # left by runs that died while writing
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier(runtime)

    model_state, optim_state = get_state_dict(root, optimizer)
    with warnings.catch_warnings():  # one process without a process group is a supported case, not a warning
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "train_state"))
    torch.save(_rng_state(), tmp / "rng" / f"rank{runtime.rank:05d}.pt")
    # The Hugging Face copy: full tensors gathered to rank 0 (on the CPU, a layer at a time is enough).
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if runtime.is_main:
        written = model.config.dtype if dtype == "auto" else dtype
        save_state_dict(full, model.config, tmp / "model", source_dir=getattr(model, "source_dir", None),
                        max_shard_size=max_shard_size, dtype=getattr(torch, written) if written else None)
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step,
                                                      "world_size": runtime.world_size}, indent=2) + "\n")
        _fsync_tree(tmp)
        if os.environ.get("PROTEGE_FAULT") == "die-before-checkpoint-rename":  # fault injection for tests
            os._exit(137)
        if final.exists():  # a checkpoint of the same step from a run that was resumed earlier
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        for old in sorted((p for p in checkpoint_dir(run_dir).glob("step_*") if _STEP_DIR.fullmatch(p.name)),
                          key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))[:-keep_last]:
            shutil.rmtree(old)
    barrier(runtime)
    return final


def load_training_checkpoint(path: Path, root: nn.Module, optimizer: torch.optim.Optimizer,
                             runtime: Runtime) -> dict:
    """Restore model, optimizer and RNG states in place; returns trainer.json."""
    trainer_state = json.loads((path / "trainer.json").read_text())
    model_state, optim_state = get_state_dict(root, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / "train_state"))
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / "rng" / f"rank{runtime.rank:05d}.pt"
    if rng.is_file():  # absent when resuming on more ranks than the run had
        _set_rng_state(torch.load(rng, weights_only=False))
    return trainer_state


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
