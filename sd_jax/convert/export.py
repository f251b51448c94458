"""Write a model back out: a diffusers folder or a CompVis-layout single ``.safetensors`` file.

``save_pretrained(pipe, folder)`` writes what ``StableDiffusionPipeline.from_pretrained`` reads
(``model_index.json``, ``unet/ vae/ text_encoder/`` with ``config.json`` + safetensors,
``tokenizer/``, ``scheduler/scheduler_config.json``); ``save_single_file(pipe, path)`` writes
the layout of the original CompVis checkpoints (``model.diffusion_model.*``,
``first_stage_model.*`` with the VAE mid-block attention as 1x1 convolutions,
``cond_stage_model.transformer.text_model.*``) that diffusers' ``from_single_file``,
AUTOMATIC1111 and ComfyUI open. Both cast floating-point weights to ``dtype`` (float32,
float16 or bfloat16), write atomically (a temporary name, then a rename) and refuse to replace
a non-empty folder or an existing file unless ``overwrite=True``.

The writers take diffusers-named, PyTorch-laid-out numpy state dicts, so the command line
(``python -m sd_jax.convert``) converts files without building the Flax model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from sd_jax.convert import core
from sd_jax.convert.compvis import SD_V1_SCHEDULER, diffusers_to_compvis
from sd_jax.convert.files import save_safetensors
from sd_jax.convert.limits import short
from sd_jax.models.clip import CLIPTextConfig

MODEL_KEYS = ("text_encoder", "unet", "vae")
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                 "bfloat16": np.dtype(ml_dtypes.bfloat16)}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}
# The diffusers config format these files follow (diffusers reads it only to warn about newer files).
DIFFUSERS_FORMAT_VERSION = "0.30.0"
TRANSFORMERS_FORMAT_VERSION = "4.40.0"
_SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it

StateFn = Callable[[str], Mapping[str, np.ndarray]]


def export_dtype(dtype: Any) -> np.dtype:
    """'float32' | 'float16' | 'bfloat16' (or the numpy/jax type) -> numpy dtype; anything else raises."""
    key = dtype if isinstance(dtype, str) else None
    if key is None:
        try:
            key = np.dtype(dtype).name
        except TypeError:
            key = repr(dtype)
    if key not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not supported; choose one of {sorted(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[key]


def cast_floats(state: Mapping[str, np.ndarray], dtype: np.dtype) -> dict[str, np.ndarray]:
    """Floating-point arrays to ``dtype`` (no copy when already there); integer buffers unchanged."""
    out = {}
    for name, array in state.items():
        array = np.asarray(array)
        is_float = np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16
        out[name] = array.astype(dtype, copy=False) if is_float else array
    return out


# ---------------------------------------------------------------------------------------------
# Atomic destinations
# ---------------------------------------------------------------------------------------------

def check_destination(path: Path, overwrite: bool, *, folder: bool) -> None:
    """Refuse a destination that holds the user's data unless overwrite=True (before any work)."""
    if not path.exists():
        return
    if folder and not path.is_dir():
        raise FileExistsError(f"{path} exists and is a file, not a folder")
    if not folder and path.is_dir():
        raise FileExistsError(f"{path} is a folder; a single-file export needs a file name ending in .safetensors")
    if not overwrite and (not folder or any(path.iterdir())):
        what = "is not empty" if folder else "exists"
        raise FileExistsError(f"{path} {what}; pass overwrite=True (--overwrite) to replace it")


@contextlib.contextmanager
def atomic_folder(folder: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``folder`` in one rename."""
    check_destination(folder, overwrite, folder=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            old = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.old"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def text_encoder_config(cfg: CLIPTextConfig, dtype: np.dtype) -> dict[str, Any]:
    """The transformers ``CLIPTextModel`` config.json of a text encoder."""
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps, "projection_dim": cfg.hidden_size, "attention_dropout": 0.0,
        "dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "torch_dtype": dtype.name, "transformers_version": TRANSFORMERS_FORMAT_VERSION,
    }


def scheduler_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The model's scheduler config (SD v1.4's PNDM one when it has none), with a class name."""
    out = dict(config or SD_V1_SCHEDULER)
    out.setdefault("_class_name", "PNDMScheduler")
    out.setdefault("_diffusers_version", DIFFUSERS_FORMAT_VERSION)
    return out


def model_index(configs: Mapping[str, Any], scheduler_class: str) -> dict[str, Any]:
    """``model_index.json`` of a StableDiffusion(Inpaint)Pipeline folder without a safety checker."""
    inpainting = configs["unet"].in_channels == 9
    return {
        "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_FORMAT_VERSION, "requires_safety_checker": False,
        "feature_extractor": [None, None], "image_encoder": [None, None], "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


# ---------------------------------------------------------------------------------------------
# Writers over diffusers-named state dicts
# ---------------------------------------------------------------------------------------------

def write_diffusers_folder(folder: str | Path, *, configs: Mapping[str, Any], state_fn: StateFn, tokenizer: Any,
                           scheduler: Mapping[str, Any] | None, dtype: Any = "float32",
                           overwrite: bool = False) -> Path:
    """Write a complete diffusers folder; ``state_fn(name)`` gives one component's state dict at a time."""
    np_dtype = export_dtype(dtype)
    folder = Path(folder).expanduser()
    with atomic_folder(folder, overwrite) as tmp:
        for name in MODEL_KEYS:
            state = cast_floats(state_fn(name), np_dtype)
            if name == "text_encoder":  # the layout transformers (all versions) and diffusers read
                state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
                config = text_encoder_config(configs[name], np_dtype)
            else:
                config = {**configs[name].to_diffusers(), "_diffusers_version": DIFFUSERS_FORMAT_VERSION}
            _write_json(tmp / name / "config.json", config)
            save_safetensors(tmp / name / WEIGHT_FILES[name], state, metadata=_SAFETENSORS_METADATA)
            del state
        tokenizer.save(tmp / "tokenizer")
        sched = scheduler_config(scheduler)
        _write_json(tmp / "scheduler" / "scheduler_config.json", sched)
        _write_json(tmp / "model_index.json", model_index(configs, sched["_class_name"]))
    return folder


def write_single_file(path: str | Path, *, configs: Mapping[str, Any], state_fn: StateFn,
                      dtype: Any = "float16", overwrite: bool = False) -> Path:
    """Write the CompVis single-file layout as one ``.safetensors`` (atomically)."""
    np_dtype = export_dtype(dtype)
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: single files are written as .safetensors only (sd_jax never writes pickles); "
                         "use a name ending in .safetensors")
    check_destination(path, overwrite, folder=False)
    states = {name: cast_floats(state_fn(name), np_dtype) for name in MODEL_KEYS}
    tensors = diffusers_to_compvis(states, configs["unet"], configs["vae"], configs["text_encoder"])
    del states
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, tensors, metadata=_SAFETENSORS_METADATA)
    return path


# ---------------------------------------------------------------------------------------------
# From a loaded pipeline
# ---------------------------------------------------------------------------------------------

def pipeline_configs(pipe: Any) -> dict[str, Any]:
    """The three model configs of a StableDiffusion pipeline."""
    return {"text_encoder": pipe.text_encoder.config, "unet": pipe.unet.config, "vae": pipe.vae.config}


def pipeline_state_fn(pipe: Any, dtype: np.dtype) -> StateFn:
    """name -> that component's parameters as a diffusers-named, PyTorch-laid-out state dict."""
    return lambda name: core.export_state_dict(pipe.params[name], dtype)


def save_pretrained(pipe: Any, folder: str | Path, dtype: Any = "float32", *, overwrite: bool = False) -> Path:
    """Write ``pipe`` as a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads."""
    np_dtype = export_dtype(dtype)
    return write_diffusers_folder(folder, configs=pipeline_configs(pipe), state_fn=pipeline_state_fn(pipe, np_dtype),
                                  tokenizer=pipe.tokenizer, scheduler=pipe.scheduler_config, dtype=np_dtype,
                                  overwrite=overwrite)


def save_single_file(pipe: Any, path: str | Path, dtype: Any = "float16", *, overwrite: bool = False) -> Path:
    """Write ``pipe`` as a CompVis-layout ``.safetensors`` (diffusers' from_single_file, A1111, ComfyUI)."""
    np_dtype = export_dtype(dtype)
    return write_single_file(path, configs=pipeline_configs(pipe), state_fn=pipeline_state_fn(pipe, np_dtype),
                             dtype=np_dtype, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# File -> file conversion (the command line), without building the model
# ---------------------------------------------------------------------------------------------

def validate_states(configs: Mapping[str, Any], states: Mapping[str, Mapping[str, np.ndarray]]
                    ) -> dict[str, list[str]]:
    """Check every component's names and shapes against its model, strictly, without copying weights.

    Runs the same strict mapping as loading (``core.load_state_dict``) on zero-stride stand-ins
    of the arrays, so a full-size check costs no memory. Returns the skipped buffer names per
    component; raises ``WeightMismatchError`` listing every problem.
    """
    import jax
    import jax.numpy as jnp

    from sd_jax.convert.diffusers import IGNORED_BUFFERS
    from sd_jax.models.clip import CLIPTextModel
    from sd_jax.models.unet import UNet2DConditionModel
    from sd_jax.models.vae import AutoencoderKL

    cfg = configs
    factor = 2 ** (len(cfg["vae"].block_out_channels) - 1)
    modules = {
        "text_encoder": (CLIPTextModel(cfg["text_encoder"]),
                         (jnp.zeros((1, cfg["text_encoder"].max_position_embeddings), jnp.int32),)),
        "unet": (UNet2DConditionModel(cfg["unet"]),
                 (jnp.zeros((1, 8, 8, cfg["unet"].in_channels)), jnp.zeros((1,), jnp.int32),
                  jnp.zeros((1, 1, cfg["unet"].cross_attention_dim)))),
        "vae": (AutoencoderKL(cfg["vae"]), (jnp.zeros((1, factor, factor, cfg["vae"].in_channels)),)),
    }
    skipped = {}
    for name, (module, inputs) in modules.items():
        shapes = jax.eval_shape(lambda m=module, x=inputs: m.init(jax.random.key(0), *x))["params"]
        stand_ins = {k: np.broadcast_to(np.zeros((), np.float32), np.shape(v)) for k, v in states[name].items()}
        _, skipped[name] = core.load_state_dict(shapes, stand_ins, what=name.replace("_", " "),
                                                ignore=IGNORED_BUFFERS[name])
    return skipped


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


def destination_kind(destination: str | os.PathLike) -> str:
    """What a destination's name asks for: "single" (``.safetensors``) or "folder"; anything else raises.

    A folder is a name without a suffix, a name ending in a path separator, or an existing folder
    (so ``sd-v1.5/`` is a folder). Pickle suffixes (``.ckpt``, ``.bin``, ...) are refused: sd_jax
    never writes pickles. Any other suffix is refused rather than guessed.
    """
    text = os.fspath(destination)
    path = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "single"
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{short(text, 200)}: sd_jax writes .safetensors only, never pickles ({suffix} files can run "
                         "code when loaded); name the output *.safetensors (diffusers' from_single_file, AUTOMATIC1111 "
                         "and ComfyUI read it) or give a folder name for a diffusers folder")
    if suffix:
        raise ValueError(f"{short(text, 200)}: unknown output suffix {short(suffix, 20)}; use a name ending in "
                         ".safetensors for a single file, or a folder name without a suffix (end it with '/' to keep "
                         "a dotted folder name)")
    return "folder"


def convert(source: str | Path, destination: str | Path, *, dtype: Any = None, use_ema: bool = True,
            config: str | Path | None = None, overwrite: bool = False, variant: str | None = None,
            **hub_options: Any) -> Path:
    """Convert between a diffusers folder, a CompVis single file and a hub id (the CLI's work).

    The destination's name decides the format (:func:`destination_kind`): ``*.safetensors`` gets
    the CompVis single-file layout (default float16), a folder name a diffusers folder (default
    float32). The weights are checked strictly against the model, and for finite values, before
    anything is written.
    """
    from sd_jax.convert.source import load_model_files
    from sd_jax.tokenizer import load_tokenizer

    single = destination_kind(destination) == "single"
    destination = Path(destination).expanduser()
    dtype = dtype or ("float16" if single else "float32")
    export_dtype(dtype)  # fail on a bad dtype before reading anything
    check_destination(destination, overwrite, folder=not single)
    files = load_model_files(source, variant=variant, use_ema=use_ema, config=config, **hub_options)
    skipped = validate_states(files.configs, files.states)
    states = {name: {k: v for k, v in files.states[name].items() if k not in skipped[name]} for name in MODEL_KEYS}
    for name in MODEL_KEYS:
        bad = [k for k, v in states[name].items() if not core.all_finite(np.asarray(v))]
        if bad:
            raise core.non_finite_error(name.replace("_", " "), bad)
    state_fn = states.__getitem__
    if single:
        return write_single_file(destination, configs=files.configs, state_fn=state_fn, dtype=dtype,
                                 overwrite=overwrite)
    return write_diffusers_folder(destination, configs=files.configs, state_fn=state_fn,
                                  tokenizer=load_tokenizer(files.tokenizer_dir), scheduler=files.scheduler_config,
                                  dtype=dtype, overwrite=overwrite)
