"""Qwen2 / Qwen2.5 causal language model over packed sequences (no batch dimension, no padding).

Module and parameter names are Hugging Face's, so state_dict keys are the checkpoint's tensor names. All math
goes through the kernels package (projections only in exact mode, F.linear otherwise); parallelism and
activation checkpointing are applied from outside (engine/parallelize.py)."""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from protege.kernels import dispatch as kernels
from protege.engine.config import ModelConfig

# attention(layer_idx, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> o [T, Hq, D], q and k after RoPE
Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Projection = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class Qwen2RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x, residual=None):
        """rms_norm(x), or with a residual (rms_norm(x + residual), x + residual) in one pass."""
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


class Qwen2Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, positions, attention: Attention, project: Projection):
        t = x.shape[0]
        q = project(x, self.q_proj.weight, self.q_proj.bias).view(t, self.num_heads, self.head_dim)
        k = project(x, self.k_proj.weight, self.k_proj.bias).view(t, self.num_kv_heads, self.head_dim)
        v = project(x, self.v_proj.weight, self.v_proj.bias).view(t, self.num_kv_heads, self.head_dim)
        q, k = kernels.apply_rope(q, k, positions, self.rope_theta)
        o = attention(self.layer_idx, q, k, v)
        return project(o.reshape(t, self.num_heads * self.head_dim), self.o_proj.weight, None)


class Qwen2MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, project: Projection):
        gate, up = project(x, self.gate_proj.weight, None), project(x, self.up_proj.weight, None)
        return project(kernels.swiglu(gate, up), self.down_proj.weight, None)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config, layer_idx)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(self, x, residual, positions, attention: Attention, project: Projection):
        """-> (mlp output, residual stream before it). The residual add is fused into the next norm, so the
        first layer gets residual=None and the model adds the last layer's output in the final norm."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, positions, attention, project), residual)
        return self.mlp(h, project), residual


class Qwen2Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.exact = False       # True: every projection through kernels.linear (batch-invariant)
        self.source_dir = None   # the checkpoint this was loaded from (tokenizer files are copied from it)
        self.weight_version = 0  # bumped by whoever changes the weights (optimizer step, rollout-mode switch):
        # the sampler's cached KV and CUDA graphs belong to one version
        self._init_weights()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The [vocab_size, hidden_size] output matrix (the embedding when tied)."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def _init_weights(self):
        # As Hugging Face: N(0, initializer_range) matrices, zero biases, unit norms.
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, attention: Attention | None = None,
                return_hidden: bool = False, plain_layers: bool = False) -> torch.Tensor:
        """input_ids [T] (packed sequences), cu_seqlens int32 [B+1] = [0, l1, l1+l2, ..., T].
        positions [T] default to 0, 1, ... within each sequence; attention defaults to causal attention
        within each sequence. cu_seqlens is needed only for those defaults. Returns logits [T, vocab_size],
        or the final-normed hidden states [T, hidden_size] with return_hidden=True.
        plain_layers: each decoder layer's own forward is called directly, past its module hooks (FSDP2's
        gather/reshard/cast) and any wrapper put on its forward (activation checkpointing): for a caller
        whose parameters are plain tensors, unsharded and fixed, that records nothing for a backward (the
        sampler; in rollout mode). The math is the same."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a 1-D torch.long tensor of packed tokens, got "
                             f"{_describe(input_ids)}")
        if positions is None or attention is None:
            if cu_seqlens is None:
                raise ValueError("cu_seqlens is required unless both positions and attention are given")
            max_seqlen = self._check_batch(input_ids, cu_seqlens)
            cu = cu_seqlens.to(input_ids.device)
            if positions is None:
                positions = _positions(cu, input_ids.shape[0])
            if attention is None:
                def attention(layer_idx, q, k, v):
                    return kernels.varlen_attention(q, k, v, cu, max_seqlen)
        if positions.shape != input_ids.shape:
            raise ValueError(f"positions must have shape {tuple(input_ids.shape)} like input_ids, got "
                             f"{_describe(positions)}")
        project = kernels.linear if self.exact else F.linear

        x, residual = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            if plain_layers:
                x, residual = Qwen2DecoderLayer.forward(layer, x, residual, positions, attention, project)
            else:
                x, residual = layer(x, residual, positions, attention, project)
        hidden, _ = self.model.norm(x, residual)
        return hidden if return_hidden else project(hidden, self.lm_head_weight, None)

    def _check_batch(self, input_ids, cu_seqlens) -> int:
        """Validate the packing (one host sync) and return the longest sequence's length."""
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError(f"cu_seqlens must be a 1-D torch.int32 tensor, got {_describe(cu_seqlens)}")
        bounds = cu_seqlens.tolist()
        t = input_ids.shape[0]
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != t:
            raise ValueError(f"cu_seqlens must run from 0 to the number of tokens ({t}), got {bounds}")
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if min(lengths) < 0:
            raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
        longest = max(lengths)
        if longest > self.config.max_position_embeddings:
            raise ValueError(f"a sequence of {longest} tokens is longer than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if t:
            lo, hi = torch.stack([input_ids.min(), input_ids.max()]).tolist()
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got "
                                 f"values from {lo} to {hi}")
        return longest

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> Qwen2ForCausalLM:
        """Load a Hugging Face Qwen2 checkpoint directory (safetensors, single file or sharded), tensor by
        tensor, converting to `dtype` (default: the config's dtype, else float32) on `device` (default CPU)."""
        from protege.engine.checkpoint import load_checkpoint
        config = ModelConfig.from_json(path)
        if dtype is None:
            dtype = getattr(torch, config.dtype) if config.dtype else torch.float32
        with torch.device("meta"):
            model = cls(config)
        load_checkpoint(model, path, dtype=dtype, device=torch.device(device or "cpu"))
        model.source_dir = os.fspath(path)
        return model

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write a Hugging Face checkpoint (config, generation config, safetensors, tokenizer files)."""
        from protege.engine.checkpoint import save_state_dict
        save_state_dict(self.state_dict(), self.config, directory, source_dir=self.source_dir,
                        max_shard_size=max_shard_size)


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype a model computes in on `device` by default: bf16 on CUDA (as trained and sampled in GRPO),
    fp32 elsewhere (the CPU path)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """0, 1, ... restarting at each sequence start."""
    starts = cu_seqlens[:-1].long()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.arange(total, device=cu_seqlens.device) - torch.repeat_interleave(starts, lengths,
                                                                                    output_size=total)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}"
