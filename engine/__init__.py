"""Protégé engine: Qwen2.5 model, checkpoints, tokenizer/chat format, training."""
