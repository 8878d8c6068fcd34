"""A tiny SFT setup made from scratch: BPE tokenizer, random Qwen2 checkpoint, chat JSONL, config."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM as HFQwen2

from protege.engine.tokenizer import train_bpe_tokenizer

WORDS = "fix the bug in parser add test run pytest open file edit line value error index off by one".split()


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
        out.append({"messages": [
            {"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": f"Task {i}: {say(10)}"},
            {"role": "assistant", "content": say(3),
             "tool_calls": [{"function": {"name": "bash", "arguments": {"command": f"grep -n {say(1)} a.py"}}}]},
            {"role": "tool", "content": f"a.py:{i}: {say(6)}"},
            {"role": "assistant", "content": say(6 + i % 5)}]})
    return out


def make_sft_setup(root: Path, n_samples: int = 12, layers: int = 2, seed: int = 0) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    convs = conversations(n_samples, seed)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in convs))
    model_dir = root / "model"
    tokenizer = train_bpe_tokenizer([json.dumps(c) for c in convs], 400, model_dir)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False)
    HFQwen2(config).save_pretrained(model_dir)
    return {"root": root, "data": data, "model": model_dir, "tokenizer": tokenizer}


def write_config(path: Path, setup: dict, output_dir: Path, **sections) -> Path:
    base = {
        "output_dir": str(output_dir),
        "model": {"path": str(setup["model"])},
        "data": {"train_files": [str(setup["data"])], "max_seq_len": 256},
        "train": {"steps": 6, "global_batch_size": 4, "micro_batch_tokens": 300, "lr": 3e-3, "warmup_steps": 1},
        "checkpoint": {"every": 2, "keep_last": 2},
        "log": {"progress": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            base.setdefault(section, {}).update(values)
        else:
            base[section] = values
    lines = []
    for key, value in base.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for key, value in base.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
