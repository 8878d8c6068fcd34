"""The Qwen2 architecture's hyper-parameters, read from and written to a Hugging Face config.json."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """Field names and defaults are Hugging Face's Qwen2Config ones."""
    vocab_size: int               # embedding rows; may exceed the tokenizer's real vocabulary (padding rows)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: as many as query heads
    head_dim: int | None = None             # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: str | None = None                # the checkpoint's dtype, as config.json states it
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            _check_positive_int(name, getattr(self, name))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _check_positive_int("num_key_value_heads", self.num_key_value_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                                 f"{self.num_attention_heads}; give head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} is odd; rotary embeddings need an even head_dim")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name}={value!r}: expected a positive number")
            setattr(self, name, float(value))
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings={self.tie_word_embeddings!r}: expected true or false")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {', '.join(DTYPES)}")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        """Parse a config.json (a file, or the checkpoint directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file (a Qwen2 checkpoint needs a config.json)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> ModelConfig:
        """Accepts both layouts: released checkpoints (rope_theta, torch_dtype at the top level) and
        transformers >= 5 (rope_parameters {rope_theta, rope_type}, dtype). Anything this engine does not
        implement is refused rather than silently ignored."""
        def fail(field, why):
            raise ValueError(f"{source}: field {field!r} is {data.get(field)!r}: {why}")

        if data.get("model_type") != "qwen2":
            fail("model_type", "expected 'qwen2' (this engine implements only the Qwen2 architecture)")
        architectures = data.get("architectures")
        if architectures is not None and "Qwen2ForCausalLM" not in architectures:
            fail("architectures", "expected ['Qwen2ForCausalLM']")
        if data.get("hidden_act", "silu") != "silu":
            fail("hidden_act", "only 'silu' is implemented")
        if data.get("use_sliding_window", False):
            fail("use_sliding_window", "sliding-window attention is not implemented")
        if "sliding_attention" in (data.get("layer_types") or []):
            fail("layer_types", "sliding-window attention is not implemented")
        if data.get("rope_scaling") is not None:
            fail("rope_scaling", "RoPE scaling is not implemented (only the default rotary embedding)")

        rope_theta = data.get("rope_theta")
        rope_parameters = data.get("rope_parameters")
        if rope_parameters is not None:
            if not isinstance(rope_parameters, dict):
                fail("rope_parameters", "expected an object {rope_theta, rope_type}")
            if rope_parameters.get("rope_type", "default") != "default":
                fail("rope_parameters", "RoPE scaling is not implemented (rope_type must be 'default')")
            nested = rope_parameters.get("rope_theta")
            if rope_theta is not None and nested is not None and float(rope_theta) != float(nested):
                fail("rope_theta", f"disagrees with rope_parameters.rope_theta={nested!r}")
            rope_theta = nested if nested is not None else rope_theta

        dtype, torch_dtype = data.get("dtype"), data.get("torch_dtype")
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            fail("dtype", f"disagrees with torch_dtype={torch_dtype!r}")
        dtype = dtype if dtype is not None else torch_dtype

        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for field in required:
            if field not in data:
                raise ValueError(f"{source}: required field {field!r} is missing")
        optional = ("num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                    "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id")
        kwargs = {k: data[k] for k in required + optional if k in data and data[k] is not None}
        if rope_theta is not None:
            kwargs["rope_theta"] = rope_theta
        try:
            return cls(**kwargs, dtype=dtype)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict:
        """A config.json that transformers (4.x and 5.x) and vLLM load as Qwen2ForCausalLM: RoPE theta and
        dtype are written in both the old and the new layout."""
        d = asdict(self)
        rope_theta, dtype = d.pop("rope_theta"), d.pop("dtype")
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **d,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "rope_theta": rope_theta,
            "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
            "rope_scaling": None,
            **({"dtype": dtype, "torch_dtype": dtype} if dtype is not None else {}),
            "use_cache": True,
        }


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
