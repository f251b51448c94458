"""Where weights come from: a diffusers folder, a CompVis single file, or a hub id.

``load_model_files(source)`` turns any of them into one :class:`ModelFiles`
record: the three model configurations, their PyTorch-named state dicts in
diffusers' layout, the tokenizer folder (None: the packaged CLIP vocabulary)
and the scheduler configuration. The pipeline then fills its parameter trees
strictly from it; nothing here knows about Flax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sd_jax.convert.compvis import read_single_file
from sd_jax.convert.diffusers import ModelFolderError, component_folder, read_component_state, read_json
from sd_jax.convert.model_files import MODEL_KEYS, ModelFiles, check_finite_config, read_config
from sd_jax.models.clip import CLIPTextConfig
from sd_jax.models.unet import UNetConfig
from sd_jax.models.vae import VAEConfig

__all__ = ["MODEL_KEYS", "ModelFiles", "load_model_files", "looks_like_hub_id", "read_config",
           "read_diffusers_folder"]

SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")


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
        return _checked(read_diffusers_folder(path, variant))
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ValueError(f"{path} is not a checkpoint: expected a diffusers folder or a file ending in "
                             f"{', '.join(SINGLE_FILE_SUFFIXES)}")
        return _checked(read_single_file(path, use_ema=use_ema, config=config))
    if looks_like_hub_id(str(source)):
        from sd_jax.convert.hub import download

        folder = download(str(source), variant=variant, safety_checker=safety_checker, **hub_options)
        return load_model_files(folder, variant=variant, use_ema=use_ema, config=config)
    raise ModelFolderError(
        f"model {str(source)!r} does not exist: pass a diffusers folder (with model_index.json, unet/, vae/, "
        "text_encoder/, tokenizer/), a .ckpt/.safetensors file, or a hub id such as CompVis/stable-diffusion-v1-4")


def _checked(files: ModelFiles) -> ModelFiles:
    """Refuse non-finite numbers in any config however it was read (JSON, YAML, a checkpoint's buffers)."""
    for name, config in files.configs.items():
        check_finite_config(config, f"{files.source} ({name})")
    return files


def looks_like_hub_id(text: str) -> bool:
    """'org/name' with no path-like parts."""
    parts = text.split("/")
    return (len(parts) == 2 and all(parts) and not text.startswith((".", "~"))
            and all(p.replace("-", "").replace("_", "").replace(".", "").isalnum() for p in parts))
