"""Where weights come from: a diffusers folder, a CompVis single file, or a hub id.

``load_model_files(source)`` turns any of them into one :class:`ModelFiles`
record: the three model configurations, their PyTorch-named state dicts in
diffusers' layout, the tokenizer folder (None: the packaged CLIP vocabulary)
and the scheduler configuration. The pipeline then fills its parameter trees
strictly from it; nothing here knows about Flax.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from sd_jax.convert.limits import short_error
from sd_jax.convert.diffusers import (ModelFolderError, component_folder, read_component_state,
                                      read_json)
from sd_jax.models.clip import CLIPTextConfig
from sd_jax.models.unet import UNetConfig
from sd_jax.models.vae import VAEConfig

MODEL_KEYS = ("text_encoder", "unet", "vae")
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")


@dataclasses.dataclass
class ModelFiles:
    """Everything read from a model source, before it becomes parameters."""

    configs: dict[str, Any]                 # {"text_encoder": CLIPTextConfig, "unet": UNetConfig, "vae": VAEConfig}
    states: dict[str, dict[str, np.ndarray]]  # diffusers/transformers-named state dicts
    scheduler_config: dict[str, Any]
    tokenizer_dir: Path | None
    source: str
    extra_dirs: dict[str, Path] = dataclasses.field(default_factory=dict)  # e.g. safety_checker
    notes: list[str] = dataclasses.field(default_factory=list)             # what was chosen/skipped
    pad_token: str | None = None  # for the packaged tokenizer when there is no folder ("!" for SD 2.x)


def read_config(reader: Any, data: dict[str, Any], where: Path | str) -> Any:
    """Read a model config, naming the file in any error."""
    try:
        return reader(data)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{where}: {short_error(err, 500)}") from None


def read_diffusers_folder(root: Path, variant: str | None = None) -> ModelFiles:
    """A diffusers Stable Diffusion folder -> ModelFiles (configs validated before weights are read)."""
    readers = {"text_encoder": CLIPTextConfig.from_transformers, "unet": UNetConfig.from_diffusers,
               "vae": VAEConfig.from_diffusers}
    configs = {}
    for name in MODEL_KEYS:
        config_file = component_folder(root, name) / "config.json"
        configs[name] = read_config(readers[name], read_json(config_file), config_file)
    sched_file = root / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(sched_file) if sched_file.exists() else {}
    states = {name: read_component_state(root / name, name, variant) for name in MODEL_KEYS}
    tok = root / "tokenizer"
    extra = {name: root / name for name in ("safety_checker", "feature_extractor") if (root / name).is_dir()}
    return ModelFiles(configs=configs, states=states, scheduler_config=scheduler_config,
                      tokenizer_dir=tok if tok.is_dir() else None, source=str(root), extra_dirs=extra)


def load_model_files(source: str | Path, *, variant: str | None = None, use_ema: bool = True,
                     config: str | Path | None = None, safety_checker: bool = False,
                     **hub_options: Any) -> ModelFiles:
    """Read a diffusers folder, a CompVis single file (.ckpt/.safetensors) or a hub id.

    ``safety_checker`` only matters for hub ids: whether its weights are downloaded too.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if config is not None:
            raise ValueError("config= applies to single-file checkpoints; a diffusers folder has its own configs")
        return read_diffusers_folder(path, variant)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ValueError(f"{path} is not a checkpoint: expected a diffusers folder or a file ending in "
                             f"{', '.join(SINGLE_FILE_SUFFIXES)}")
        from sd_jax.convert.compvis import read_single_file

        return read_single_file(path, use_ema=use_ema, config=config)
    if looks_like_hub_id(str(source)):
        from sd_jax.convert.hub import download

        folder = download(str(source), variant=variant, safety_checker=safety_checker, **hub_options)
        return load_model_files(folder, variant=variant, use_ema=use_ema, config=config)
    raise ModelFolderError(
        f"model {str(source)!r} does not exist: pass a diffusers folder (with model_index.json, unet/, vae/, "
        "text_encoder/, tokenizer/), a .ckpt/.safetensors file, or a hub id such as CompVis/stable-diffusion-v1-4")


def looks_like_hub_id(text: str) -> bool:
    """'org/name' with no path-like parts."""
    parts = text.split("/")
    return (len(parts) == 2 and all(parts) and not text.startswith((".", "~"))
            and all(p.replace("-", "").replace("_", "").replace(".", "").isalnum() for p in parts))
