"""engine/config.py: both config.json layouts, the released Qwen2.5 shapes, refusals, and the config we write."""
import json

import pytest
import transformers

from protege.engine.config import ModelConfig

# Qwen2.5-0.5B-Instruct's config.json as released (transformers 4.x layout).
RELEASED_0_5B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def write(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_released_and_transformers5_layouts_parse_the_same(tmp_path):
    released = ModelConfig.from_json(write(tmp_path, RELEASED_0_5B))
    # The same model written by transformers 5: rope_parameters and dtype instead of rope_theta / torch_dtype.
    hf = transformers.Qwen2Config(**{k: v for k, v in RELEASED_0_5B.items()
                                     if k not in ("rope_theta", "torch_dtype", "architectures",
                                                  "transformers_version", "model_type")},
                                  rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, dtype="bfloat16",
                                  architectures=["Qwen2ForCausalLM"])
    hf.save_pretrained(tmp_path / "v5")
    saved = json.loads((tmp_path / "v5" / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_theta" not in saved and saved["dtype"] == "bfloat16"
    v5 = ModelConfig.from_json(tmp_path / "v5")  # a directory is accepted too
    assert released == v5
    assert (released.head_dim, released.num_key_value_heads, released.rope_theta) == (64, 2, 1e6)
    assert (released.dtype, released.tie_word_embeddings, released.eos_token_id) == ("bfloat16", True, 151645)


@pytest.mark.parametrize("hidden, layers, heads, kv, inter, vocab, tied, head_dim", [
    (1536, 28, 12, 2, 8960, 151936, True, 128),
    (2048, 36, 16, 2, 11008, 151936, True, 128),
    (3584, 28, 28, 4, 18944, 152064, False, 128),
])
def test_released_shapes(tmp_path, hidden, layers, heads, kv, inter, vocab, tied, head_dim):
    data = {**RELEASED_0_5B, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab, "tie_word_embeddings": tied}
    c = ModelConfig.from_json(write(tmp_path, data))
    assert (c.head_dim, c.vocab_size, c.tie_word_embeddings) == (head_dim, vocab, tied)


def test_explicit_head_dim_and_defaults(tmp_path):
    minimal = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 45, "intermediate_size": 30,
               "num_hidden_layers": 2, "num_attention_heads": 6, "head_dim": 6}
    c = ModelConfig.from_json(write(tmp_path, minimal))
    hf = transformers.Qwen2Config(**{k: v for k, v in minimal.items() if k != "model_type"})
    assert (c.head_dim, c.num_key_value_heads) == (6, 6)
    # Unset fields take Hugging Face's Qwen2 defaults.
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings) == (
        hf.rope_parameters["rope_theta"], hf.rms_norm_eps, hf.max_position_embeddings, hf.tie_word_embeddings)
    assert c.dtype is None


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "'model_type' is 'llama'"),
    ({"architectures": ["LlamaForCausalLM"]}, "'architectures' is \\['LlamaForCausalLM'\\]"),
    ({"use_sliding_window": True}, "'use_sliding_window' is True: sliding-window"),
    ({"layer_types": ["full_attention"] * 23 + ["sliding_attention"]}, "'layer_types'.*sliding-window"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "'rope_scaling'.*RoPE scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "'rope_parameters'.*yarn"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "'rope_theta' is 1000000.0: disagrees"),
    ({"hidden_act": "gelu"}, "'hidden_act' is 'gelu'"),
    ({"num_key_value_heads": 3}, "num_attention_heads=14 is not a multiple of num_key_value_heads=3"),
    ({"head_dim": 63}, "head_dim=63 is odd"),
    ({"num_attention_heads": 12}, "hidden_size=896 is not a multiple of num_attention_heads=12"),
    ({"vocab_size": 0}, "vocab_size=0: expected a positive integer"),
    ({"hidden_size": "896"}, "hidden_size='896': expected a positive integer"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps=-1.0: expected a positive number"),
    ({"torch_dtype": "int8"}, "dtype='int8'"),
    ({"dtype": "float32"}, "'dtype' is 'float32': disagrees with torch_dtype='bfloat16'"),
    ({"vocab_size": None}, "required field 'vocab_size' is missing"),
])
def test_unsupported_or_broken_configs_are_refused(tmp_path, change, message):
    data = {k: v for k, v in {**RELEASED_0_5B, **change}.items() if v is not None}
    path = write(tmp_path, data)
    with pytest.raises(ValueError, match=message) as info:
        ModelConfig.from_json(path)
    assert str(path) in str(info.value)  # the error names the file


def test_unreadable_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: no such file"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        ModelConfig.from_json(tmp_path)


@pytest.mark.parametrize("tied, head_dim", [(True, None), (False, 10)])
def test_written_config_loads_in_transformers_and_back(tmp_path, tied, head_dim):
    ours = ModelConfig(vocab_size=152064, hidden_size=84, intermediate_size=40, num_hidden_layers=3,
                       num_attention_heads=7, num_key_value_heads=1, head_dim=head_dim, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=tied, dtype="bfloat16", bos_token_id=151643,
                       eos_token_id=[151645, 151643])
    write(tmp_path, ours.to_hf_dict())
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf) is transformers.Qwen2Config
    assert hf.architectures == ["Qwen2ForCausalLM"]
    assert (hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers) == (152064, 84, 40, 3)
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == (7, 1, ours.head_dim)
    assert (hf.rope_parameters, hf.rms_norm_eps, hf.tie_word_embeddings) == (
        {"rope_theta": 1e6, "rope_type": "default"}, 1e-6, tied)
    assert str(hf.dtype) == "torch.bfloat16" and hf.use_sliding_window is False
    assert ModelConfig.from_json(tmp_path) == ours
