"""Hugging Face safetensors checkpoints: load into a model built on the meta device one tensor at a time (never
two full copies in memory), save as model.safetensors or shards plus model.safetensors.index.json."""
from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from protege.engine.config import DTYPES

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
FLOAT_DTYPES = ("F32", "BF16", "F16")


def checkpoint_files(directory: str) -> dict[str, list[str]]:
    """{safetensors file path: [tensor names to read from it]}, from the index when the checkpoint is sharded."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            try:
                index = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{index_path}: not valid JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: no 'weight_map' object mapping tensor names to shard files")
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(os.path.join(directory, shard), []).append(name)
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{index_path} lists shard {os.path.basename(path)!r}, which is missing "
                                        f"from {directory}")
        return files
    single = os.path.join(directory, SINGLE_FILE)
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors "
                                f"checkpoints are supported)")
    with _open(single) as f:
        return {single: list(f.keys())}


def load_checkpoint(model: nn.Module, directory: str | os.PathLike, dtype: torch.dtype,
                    device: torch.device) -> None:
    """Fill `model` (parameters on the meta device, names = tensor names) from a checkpoint directory.
    Every name and shape is checked before any data is read. A tied model ignores a stored lm_head.weight
    only if it equals the embedding."""
    directory = os.fspath(directory)
    files = checkpoint_files(directory)
    params = dict(model.named_parameters())
    tied = getattr(model.config, "tie_word_embeddings", False)

    seen: dict[str, str] = {}
    for path, names in files.items():
        with _open(path) as f:
            stored = set(f.keys())
            for name in names:
                where = f"{path}: tensor {name!r}"
                if name not in stored:
                    raise ValueError(f"{where} is listed in {INDEX_FILE} but absent from the file")
                seen[name] = path
                if name == "lm_head.weight" and tied:
                    param = params["model.embed_tokens.weight"]
                elif name in params:
                    param = params[name]
                else:
                    raise ValueError(f"{where} is unexpected: the model (config.json) has no such parameter")
                info = f.get_slice(name)
                if tuple(info.get_shape()) != tuple(param.shape):
                    raise ValueError(f"{where} has shape {tuple(info.get_shape())}, the model expects "
                                     f"{tuple(param.shape)} (does config.json match the weights?)")
                if info.get_dtype() not in FLOAT_DTYPES:
                    raise ValueError(f"{where} has dtype {info.get_dtype()}, expected one of {FLOAT_DTYPES}")
    missing = sorted(set(params) - set(seen))
    if missing:
        raise ValueError(f"{directory}: the checkpoint lacks {len(missing)} tensor(s) the model needs: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")

    for path, names in files.items():
        with _open(path) as f:
            for name in names:
                if name == "lm_head.weight" and tied:
                    continue
                module_name, _, leaf = name.rpartition(".")
                module = model.get_submodule(module_name)
                tensor = f.get_tensor(name).to(device=device, dtype=dtype)
                module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
    if tied and "lm_head.weight" in seen:
        with _open(seen["lm_head.weight"]) as f:
            head = f.get_tensor("lm_head.weight").to(device=device, dtype=dtype)
        if not torch.equal(head, model.get_parameter("model.embed_tokens.weight")):
            raise ValueError(f"{seen['lm_head.weight']}: lm_head.weight differs from model.embed_tokens.weight "
                             f"but config.json says tie_word_embeddings=true")


def save_state_dict(state: dict[str, torch.Tensor], config, directory: str | os.PathLike,
                    source_dir: str | os.PathLike | None = None, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> None:
    """Write a Hugging Face checkpoint: config.json (from the ModelConfig `config`), generation_config.json,
    the weights of `state` (full tensors under Hugging Face names; cast to `dtype` a shard at a time when
    given, and config.json says so) and the tokenizer files of `source_dir`.
    Every file is written under a temporary name and renamed into place, config.json last, so a crash never
    leaves a partial file under a final name."""
    directory = os.fspath(directory)
    limit = parse_size(max_shard_size)
    _check_names_and_shapes(state, config)
    os.makedirs(directory, exist_ok=True)

    if dtype is not None and str(dtype).removeprefix("torch.") not in DTYPES:
        raise ValueError(f"save_state_dict: dtype={dtype} is not a checkpoint dtype ({', '.join(DTYPES)})")
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    itemsize = torch.empty((), dtype=dtype).element_size()

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    shard_files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for names, filename in zip(shards, shard_files):
        tensors = {k: state[k].to("cpu", dtype).contiguous() for k in names}
        write_atomically(os.path.join(directory, filename),
                          lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    if n > 1:
        index = {"metadata": {"total_size": sum(t.numel() * itemsize for t in state.values())},
                 "weight_map": {k: f for names, f in zip(shards, shard_files) for k in names}}
        _write_json(os.path.join(directory, INDEX_FILE), index)
    # Weights of an earlier save in this directory would otherwise be mixed with these on load.
    for filename in os.listdir(directory):
        stale_shard = (filename == SINGLE_FILE or SHARD_NAME.fullmatch(filename)) and filename not in shard_files
        if stale_shard or (filename == INDEX_FILE and n == 1):
            os.remove(os.path.join(directory, filename))

    for filename in TOKENIZER_FILES + ("generation_config.json",):
        if source_dir and os.path.isfile(os.path.join(source_dir, filename)):
            _copy_atomically(os.path.join(source_dir, filename), os.path.join(directory, filename))
    if not os.path.isfile(os.path.join(directory, "generation_config.json")):
        _write_json(os.path.join(directory, "generation_config.json"),
                    {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id")
                     if getattr(config, k) is not None})
    config_dict = config.to_hf_dict()
    config_dict["dtype"] = config_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write_json(os.path.join(directory, "config.json"), config_dict)


def _check_names_and_shapes(state: dict[str, torch.Tensor], config) -> None:
    """Refuse to write weights that would not load back as this config's model."""
    from protege.engine.model import Qwen2ForCausalLM
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Qwen2ForCausalLM(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"state dict does not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, shape in got.items():
        if shape != expected[name]:
            raise ValueError(f"state dict tensor {name!r} has shape {shape}, the config implies {expected[name]}")


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB' (Hugging Face's convention)."""
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size={size!r}: expected a positive number of bytes or a size like '5GB'")
    return int(float(match.group(1)) * units[match.group(2)])


def _open(path: str):
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:  # e.g. a file cut short by a crash while it was copied
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def write_atomically(path: str, write) -> None:
    """write(tmp) beside `path`, fsync it, then rename it over `path`: readers see the old or the new file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    write_atomically(path, write)


def _copy_atomically(src: str, dst: str) -> None:
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return
    write_atomically(dst, lambda tmp: shutil.copyfile(src, tmp))
