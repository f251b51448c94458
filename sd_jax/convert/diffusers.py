"""Reading diffusers model folders: configs, weight files and key conventions.

A diffusers folder (what ``huggingface_hub`` downloads for a model id) holds
``model_index.json`` and one sub-folder per component; each model sub-folder
has ``config.json`` and its weights as ``*.safetensors`` or PyTorch ``*.bin``
(optionally sharded with an ``*.index.json``, optionally a ``.fp16.`` variant).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sd_jax.convert import limits
from sd_jax.convert.files import read_state_dict
from sd_jax.convert.limits import short_error

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


def find_weight_files(folder: Path, component: str, variant: str | None = None) -> list[Path]:
    """The weight file(s) of one component: safetensors first, then .bin; shards resolved."""
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
                return [single]
            index = next((i for i in indexes if i.is_file()), None)
            if index is not None:
                shards = sorted(set(read_json(index).get("weight_map", {}).values()))
                if not shards:
                    raise ValueError(f"{index} has an empty weight_map")
                return [folder / s for s in shards]
    raise ModelFolderError(f"no weights for {component!r} in {folder}: looked for {', '.join(tried)}")


def read_component_state(folder: Path, component: str, variant: str | None = None
                         ) -> dict[str, np.ndarray]:
    """One component's PyTorch-named state dict, with the naming conventions normalised."""
    state: dict[str, np.ndarray] = {}
    for file in find_weight_files(folder, component, variant):
        if not file.is_file():
            raise ModelFolderError(f"{file} (a shard named in the index) is missing")
        state.update(read_state_dict(file, strict=True))
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
