"""Training-time transformations applied to a model from outside (the model file stays plain)."""
from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint

from engine.model import Qwen2ForCausalLM


def apply_activation_checkpointing(model: Qwen2ForCausalLM) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them: only the
    layer inputs stay alive. The layer's own forward is wrapped (not the module), so parameter names and
    state_dict keys are unchanged. Applying it twice is a no-op."""
    for layer in model.model.layers:
        if getattr(layer, "_activation_checkpointed", False):
            continue
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        layer._activation_checkpointed = True
