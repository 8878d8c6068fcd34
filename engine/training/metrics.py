"""What a training run reports: FLOP counts for MFU, a JSONL metrics log, the loss plot."""
from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from protege.engine.config import ModelConfig
from protege.engine.optional import pyplot


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: all but the embedding lookup (the head counts)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
    return layers * per_layer + config.vocab_size * h


def training_flops(config: ModelConfig, seqlens: list[int]) -> float:
    """Forward + backward FLOPs of one packed batch: 6 per matmul parameter per token, plus causal
    attention per document (QK^T and PV: 2 * l^2 * heads * head_dim forward, 3x that to train)."""
    tokens = sum(seqlens)
    attention = 6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * sum(
        l * l for l in seqlens)
    return 6.0 * matmul_params(config) * tokens + attention


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MetricsLog:
    """metrics.jsonl, one line per logged step. On resume, lines past the resumed step are dropped (they
    belong to the part of the run that is being redone)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if (record := _parse(line)) is not None and record.get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _parse(line: str) -> dict | None:
    """A metrics line, or None for a blank one or the torn last line of a process killed while writing it."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def plot_loss(records: list[dict], out: Path) -> Path | None:
    """The loss curve as a PNG at `out`; None (with a note) without matplotlib."""
    plt = pyplot("the loss plot")
    if plt is None:
        return None

    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / trained token)")
    ax.set_title("SFT loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
