"""Phase 1: supervised fine-tuning on packed agent trajectories (loss on the policy's own tokens only).

Per optimizer step: the next global batch of samples is split over the ranks (rank r takes every
world_size-th), each rank packs its share into micro-batches under a token budget, and the summed
negative log-likelihood of the trained tokens is divided by the number of trained tokens of the whole
global batch -- so the loss and the update do not depend on micro-batching or on the number of ranks."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
from torch import nn

from protege.kernels import dispatch as kernels
from protege.engine.model import Qwen2ForCausalLM
from protege.engine.tokenizer import Tokenizer
from protege.engine.training.config import TrainConfig, save_config
from protege.engine.training.data import DataError, GlobalBatches, MicroBatch, Sample, SFTDataset, make_micro_batch, pack_micro_batches
from protege.engine.training.metrics import MetricsLog, peak_memory_bytes, plot_loss, training_flops
from protege.engine.training.parallelize import build_training_model, training_dtypes
from protege.engine.training.resume import latest_checkpoint, load_training_checkpoint, resume_point, save_training_checkpoint
from protege.engine.training.runtime import Runtime, all_reduce



class TokenNLL(nn.Module):
    """The model and its loss as one module (the FSDP root), so the head's weight is gathered while the
    fused head + log-softmax (kernels.token_logprobs) uses it. Returns the summed weighted NLL. The head runs
    only at positions whose target is trained (tool output, most of an agent trajectory, needs none)."""

    def __init__(self, model: Qwen2ForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, cu_seqlens, targets, weights):
        hidden = self.model(input_ids, cu_seqlens=cu_seqlens, return_hidden=True)
        rows = weights.nonzero().squeeze(1)
        logp = kernels.token_logprobs(hidden[rows], self.model.lm_head_weight, targets[rows])
        return -(logp * weights[rows]).sum()


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _placeholder_batch() -> MicroBatch:
    # A rank with fewer micro-batches than the others still joins every FSDP collective: one token, no loss.
    return make_micro_batch([Sample(ids=[0], mask=[0], where="<placeholder>")])


def run_sft(cfg: TrainConfig, runtime: Runtime, resume: bool) -> dict:
    run_dir = Path(cfg.output_dir)
    checkpoint = resume_point(run_dir, resume, runtime)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    dtype, compute_dtype = training_dtypes(cfg.model, runtime.device)
    model, root = build_training_model(cfg.model.path, dtype, compute_dtype, runtime,
                                       cfg.model.activation_checkpointing, TokenNLL)
    model.exact = cfg.model.exact

    t = cfg.train
    optimizer = torch.optim.AdamW(root.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                  weight_decay=t.weight_decay, fused=runtime.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.steps, t.min_lr_ratio))

    tokenizer = Tokenizer.from_dir(cfg.data.tokenizer or cfg.model.path)
    dataset = SFTDataset(cfg.data.train_files, tokenizer, cfg.data.max_seq_len, cfg.data.long_policy,
                         cfg.data.bad_line_policy, vocab_size=model.config.vocab_size)
    batches = GlobalBatches(len(dataset), t.global_batch_size, cfg.seed, cfg.data.shuffle)

    step, position = 0, 0
    if checkpoint is not None:
        state = load_training_checkpoint(checkpoint, root, optimizer, runtime)
        step, position = state["step"], state["data_position"]
        scheduler.load_state_dict(state["scheduler"])
        dataset.counts.update(state.get("data_counts_rank0", {}) if runtime.is_main else {})
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
        log = MetricsLog(run_dir / "metrics.jsonl", resume_step=step if checkpoint is not None else None)
        print(f"SFT: {len(dataset)} samples, {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{runtime.world_size} rank(s) on {runtime.device.type}, steps {step}->{t.steps}"
              + (f" (resumed from {checkpoint})" if checkpoint is not None else ""), flush=True)
    bar = _progress(cfg, step) if runtime.is_main else None
    peak_tflops = cfg.log.peak_tflops or (989.0 if runtime.device.type == "cuda" else 0.0)
    first_loss = None

    while step < t.steps:
        started = time.perf_counter()
        indices = batches.indices(position)[runtime.rank::runtime.world_size]
        samples = [s for s in (dataset.sample(i) for i in indices) if s is not None]
        micro_batches, waste = pack_micro_batches(samples, t.micro_batch_tokens)
        local_trained = sum(float(mb.weights.sum()) for mb in micro_batches)
        trained, = all_reduce([local_trained], "sum", runtime)
        most, = all_reduce([len(micro_batches)], "max", runtime)
        micro_batches += [_placeholder_batch() for _ in range(int(most) - len(micro_batches))]
        if trained == 0:
            raise DataError(f"step {step + 1}: the global batch at data position {position} has no trained "
                               f"token (every sample dropped: {dict(dataset.counts)})")

        local_nll = 0.0
        for mb in micro_batches:
            nll = root(mb.input_ids.to(runtime.device), mb.cu_seqlens.to(runtime.device),
                       mb.targets.to(runtime.device), mb.weights.to(runtime.device))
            # FSDP averages gradients over ranks; the loss is a sum over the global batch: undo the average.
            (nll * (runtime.world_size / trained)).backward()
            local_nll += float(nll.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(root.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        model.weight_version += 1
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        position += t.global_batch_size

        seqlens = [n for mb in micro_batches for n in mb.seqlens]
        nll_sum, tokens, flops, wastes = all_reduce(
            [local_nll, sum(seqlens), training_flops(model.config, seqlens), waste], "sum", runtime)
        loss = nll_sum / trained
        first_loss = loss if first_loss is None else first_loss
        seconds = time.perf_counter() - started
        if runtime.is_main and (step % cfg.log.every == 0 or step == t.steps):
            record = {"step": step, "loss": loss, "grad_norm": float(grad_norm), "lr": lr,
                      "trained_tokens": int(trained), "tokens": int(tokens),
                      "tokens_per_s_per_device": tokens / seconds / runtime.world_size,
                      "mfu": (flops / seconds / runtime.world_size / (peak_tflops * 1e12)) if peak_tflops else None,
                      "packing_efficiency": 1.0 - wastes / runtime.world_size,
                      "peak_memory_gb": peak_memory_bytes(runtime.device) / 1e9, "step_seconds": seconds,
                      **{f"data_{k}": v for k, v in dataset.counts.items()}}
            log.write(record)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / seconds:,.0f}")
            bar.update(1)
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == t.steps:
            trainer_state = {"data_position": position, "scheduler": scheduler.state_dict(),
                             "data_counts_rank0": dict(dataset.counts)}
            save_training_checkpoint(run_dir, step, trainer_state, root, model, optimizer, runtime,
                                     cfg.checkpoint.keep_last, cfg.checkpoint.max_shard_size, cfg.checkpoint.dtype)
    if bar is not None:
        bar.close()
    summary = {}
    if runtime.is_main:
        records = log.records()
        plot = plot_loss(records, run_dir / "loss.png")
        final = latest_checkpoint(run_dir)
        summary = {"first_loss": records[0]["loss"] if records else first_loss,
                   "final_loss": records[-1]["loss"] if records else None,
                   "checkpoint": str(final / "model") if final else None,
                   "metrics": str(run_dir / "metrics.jsonl"), "plot": str(plot) if plot else None,
                   "data_counts": dict(dataset.counts)}
        print(f"SFT done: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}\n"
              f"  checkpoint: {summary['checkpoint']}\n  metrics:    {summary['metrics']}\n"
              f"  loss plot:  {summary['plot']}", flush=True)
    return summary


def _progress(cfg: TrainConfig, start: int):
    if not cfg.log.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.train.steps, initial=start, desc="sft", unit="step", dynamic_ncols=True)
