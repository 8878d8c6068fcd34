"""A tiny Qwen2-architecture model and byte-level BPE tokenizer made from the bundled tasks' text: the
starting checkpoint of the built-in default job and of configs whose model.path is empty."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from protege.engine.config import ModelConfig
from protege.engine.model import Qwen2ForCausalLM
from protege.engine.tokenizer import Tokenizer, train_bpe_tokenizer


def tokenizer_corpus() -> list[str]:
    from protege.rollout.agent.loop import SYSTEM_PROMPT, TASK_PROMPT
    from protege.rollout.agent.tools import TOOLS
    from protege.rollout.tasks import BUNDLED_DIR, UPSTREAM_DIR, bundled_tasks
    texts = [SYSTEM_PROMPT, TASK_PROMPT, json.dumps(TOOLS)]
    for task in bundled_tasks():
        texts += [task.problem_statement, task.patch, task.test_patch]
    texts += [p.read_text(errors="replace") for p in sorted(BUNDLED_DIR.rglob("*.py"))
              if UPSTREAM_DIR not in p.parents]   # the default set's own files only
    return texts


def make_tiny_base(out_dir: Path, seed: int = 0, tokenizer: Tokenizer | None = None) -> Path:
    """Tokenizer (trained here unless given) and a random 2-layer Qwen2 (~0.7M parameters) in out_dir."""
    tokenizer = tokenizer or train_bpe_tokenizer(tokenizer_corpus(), vocab_size=2048, out_dir=out_dir)
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=384,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=True,
                         eos_token_id=list(tokenizer.eos_ids))
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    return out_dir
