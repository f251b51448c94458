"""Reading diffusers model folders: configs, weight files and key conventions.

A diffusers folder (what ``huggingface_hub`` downloads for a model id) holds
``model_index.json`` and one sub-folder per component; each model sub-folder
has ``config.json`` and its weights as ``*.safetensors`` or PyTorch ``*.bin``
(optionally sharded with an ``*.index.json``, optionally a ``.fp16.`` variant).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from sd_jax.convert import limits
from sd_jax.convert.files import read_state_dict
from sd_jax.convert.limits import short, short_error

WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "safety_checker": "model",
}
_TORCH_BIN_NAMES = {"diffusion_pytorch_model": "diffusion_pytorch_model", "model": "pytorch_model"}

# Buffers some exporters save next to the weights; skipped by name and reported.
IGNORED_BUFFERS = {
    "text_encoder": [r"embeddings\.position_ids"],
    "unet": [],
    "vae": [],
}

# Older diffusers VAE folders name the mid-block attention weights differently.
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_VAE_RE = re.compile(r"^(.*mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)$")


class ModelFolderError(FileNotFoundError):
    """A model folder is missing a file or a component."""


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from a file (size and nesting bounded), naming the file in any error."""
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing")
    size = path.stat().st_size
    if size > limits.MAX_JSON_BYTES:
        raise limits.InputLimitError(f"{path} is {size} bytes, over the {limits.MAX_JSON_BYTES}-byte limit "
                                     "for a JSON file")
    try:
        data = limits.load_json(path.read_bytes(), path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {short_error(err)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object ({{...}}), not a {type(data).__name__}")
    return data


class ShardIndexError(ValueError):
    """A sharded checkpoint's ``*.index.json`` and its shards disagree, or the index is malformed."""


@dataclasses.dataclass(frozen=True)
class WeightFiles:
    """Where one component's weights are: a single file, or shards and the index that maps names to them."""

    files: list[Path]
    index: Path | None = None
    weight_map: dict[str, str] | None = None  # tensor name -> shard file, relative to the folder


def locate_weights(folder: Path, component: str, variant: str | None = None) -> WeightFiles:
    """The weight file(s) of one component: safetensors first, then .bin; shards from a checked index."""
    stem = WEIGHT_NAMES[component]
    stems = [stem, _TORCH_BIN_NAMES[stem]]
    tried = []
    variants = [variant, None] if variant else [None]
    for var in variants:
        suffix = f".{var}" if var else ""
        for name, ext in ((stem, "safetensors"), (stems[1], "bin")):
            single = folder / f"{name}{suffix}.{ext}"
            # Sharded: "name.ext.index.json"; variants as diffusers/transformers write them,
            # "name.ext.index.fp16.json" (and the older "name.fp16.ext.index.json").
            indexes = [folder / f"{name}{suffix}.{ext}.index.json"]
            if var:
                indexes.insert(0, folder / f"{name}.{ext}.index.{var}.json")
            tried += [single.name] + [i.name for i in indexes]
            if single.is_file():
                return WeightFiles([single])
            index = next((i for i in indexes if i.is_file()), None)
            if index is not None:
                weight_map = read_weight_map(index)
                shards = sorted(set(weight_map.values()))
                return WeightFiles([folder / s for s in shards], index, weight_map)
    raise ModelFolderError(f"no weights for {component!r} in {folder}: looked for {', '.join(tried)}")


def find_weight_files(folder: Path, component: str, variant: str | None = None) -> list[Path]:
    """The weight file(s) of one component (see :func:`locate_weights`)."""
    return locate_weights(folder, component, variant).files


def read_weight_map(index: Path) -> dict[str, str]:
    """An index's ``weight_map`` (tensor name -> shard file), checked: strings, shards inside the folder."""
    data = read_json(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ShardIndexError(f"{index}: weight_map must be a non-empty JSON object of tensor name -> shard file "
                              f"name, got {short(weight_map)}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ShardIndexError(f"{index}: weight_map[{short(name)}] must be a shard file name, got {short(shard)}")
        parts = PurePosixPath(shard).parts
        if "\\" in shard or shard.startswith("/") or ".." in parts or ":" in parts[0]:
            raise ShardIndexError(f"{index}: weight_map[{short(name)}] = {short(shard)} points outside the model "
                                  "folder; shards must be file names inside it")
    return weight_map


def read_component_state(folder: Path, component: str, variant: str | None = None
                         ) -> dict[str, np.ndarray]:
    """One component's PyTorch-named state dict, with the naming conventions normalised.

    Sharded weights follow their index exactly: every tensor must be in the shard the index names,
    once; a tensor in two shards, in a shard the index does not assign it to, or missing, is an error.
    """
    located = locate_weights(folder, component, variant)
    if located.index is None:
        return normalise_keys(component, read_state_dict(located.files[0], strict=True))
    index, weight_map = located.index, located.weight_map
    state: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for file in located.files:
        shard = file.relative_to(folder).as_posix()
        if not file.is_file():
            raise ModelFolderError(f"{file} (a shard named in {index.name}) is missing")
        for name, array in read_state_dict(file, strict=True).items():
            if name in origin:
                raise ShardIndexError(f"{index}: tensor {short(name)} is in two shards, {short(origin[name])} and "
                                      f"{short(shard)}; refusing to pick one")
            assigned = weight_map.get(name)
            if assigned != shard:
                where = f"assigns it to {short(assigned)}" if assigned else "does not list it"
                raise ShardIndexError(f"{index}: tensor {short(name)} is in shard {short(shard)} but the index {where}")
            state[name], origin[name] = array, shard
    missing = [name for name in weight_map if name not in state]
    if missing:
        raise ShardIndexError(f"{index}: {len(missing)} tensors the index lists are in no shard, e.g. "
                              f"{short(missing[0])} (assigned to {short(weight_map[missing[0]])})")
    return normalise_keys(component, state)


def normalise_keys(component: str, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Bring known historical key spellings to the current diffusers/transformers ones."""
    if component == "text_encoder":
        return strip_prefix(state, "text_model.")
    if component == "vae":
        out = {}
        for name, value in state.items():
            match = _OLD_VAE_RE.match(name)
            if match:
                name = f"{match[1]}.{_OLD_VAE_ATTENTION[match[2]]}.{match[3]}"
            out[name] = value
        return out
    return dict(state)


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Remove ``prefix`` from every key that has it (text encoders come with or without)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def component_folder(root: Path, component: str) -> Path:
    """``root/component``, or a clear error naming what is missing."""
    folder = root / component
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ModelFolderError(
            f"{root} has no {component}/ folder (found: {', '.join(present) or 'nothing'}); "
            "a diffusers Stable Diffusion folder needs unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
    return folder
