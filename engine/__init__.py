"""Protégé engine: the Qwen2.5 model, its checkpoints, tokenizer and chat format; training in engine.training."""
