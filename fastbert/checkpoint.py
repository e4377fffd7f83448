"""Checkpoint files in Hugging Face's layout: reading model.safetensors or pytorch_model.bin,
single or sharded behind an index, and writing them (sharded above a size)."""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Union

import torch

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names every missing, unexpected or mis-shaped key."""


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, or of the (possibly sharded) weights in a directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for index in (SAFE_INDEX, TORCH_INDEX):
            if os.path.isfile(os.path.join(path, index)):
                shards = _shards(os.path.join(path, index))
                state: Dict[str, torch.Tensor] = {}
                for shard in shards:
                    state.update(read_state_dict(os.path.join(path, shard)))
                return state
        for name in (SAFE_WEIGHTS, TORCH_WEIGHTS):
            if os.path.isfile(os.path.join(path, name)):
                return read_state_dict(os.path.join(path, name))
        raise FileNotFoundError(f"no {SAFE_WEIGHTS} or {TORCH_WEIGHTS} in {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors, pickle and zip errors alike: the file is unreadable
        raise CheckpointError(f"could not read checkpoint {path} (corrupt or truncated?): {type(exc).__name__}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def _shards(index: str) -> List[str]:
    """The shard file names a sharded checkpoint's index lists (files beside it)."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"could not read the shard index {index}: {type(exc).__name__}: {exc}") from None
    for shard in shards:
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"the shard index {index} names {shard!r}: shards are files beside the index")
    return shards


def shard_bytes(size: Union[int, str]) -> int:
    """``max_shard_size`` in bytes: an int, or a string such as "5GB", "500MB" or "2GiB"."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(size).upper())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive byte count or a size like '5GB', got {size!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def write_state_dict(state: Dict[str, torch.Tensor], directory: str, max_shard_size: Union[int, str] = "50GB",
                     safe: bool = True) -> List[str]:
    """Write ``state`` (CPU tensors) as model.safetensors, or pytorch_model.bin when not
    ``safe``; above ``max_shard_size`` bytes as numbered shards (``model-00001-of-00002…``)
    with the index file that Hugging Face reads. Tensors stay whole and in key order; one
    larger than the limit gets a shard of its own. Returns the files written."""
    limit = shard_bytes(max_shard_size)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    used = 0
    for key, value in state.items():
        size = value.numel() * value.element_size()
        if shards[-1] and used + size > limit:
            shards.append({})
            used = 0
        shards[-1][key] = value
        used += size
    single, index = (SAFE_WEIGHTS, SAFE_INDEX) if safe else (TORCH_WEIGHTS, TORCH_INDEX)
    stem, ext = single.rsplit(".", 1)
    names = [single] if len(shards) == 1 else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    shard_name = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")
    for stale in os.listdir(directory):  # an older save in the same directory would shadow or mix with this one
        if stale in (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX) or shard_name.fullmatch(stale):
            os.remove(os.path.join(directory, stale))
    for name, shard in zip(names, shards):
        path = os.path.join(directory, name)
        if safe:
            from safetensors.torch import save_file
            save_file(shard, path, metadata={"format": "pt"})
        else:
            torch.save(shard, path)
    if len(shards) == 1:
        return names
    weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(directory, index), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names + [index]
