"""StableDiffusion: load a model, encode prompts and images, predict noise, decode.

The pipeline holds three Flax modules (stateless), their parameters as one
pytree ``{"text_encoder", "unet", "vae"}``, the tokenizer and the scheduler
configuration. Every compiled function is ``f(params, inputs) -> outputs``
and is cached per shape by ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.convert import core
from sd_jax.convert.diffusers import (IGNORED_BUFFERS, ModelFolderError, component_folder,
                                      read_component_state, read_json)
from sd_jax.models.clip import CLIPTextConfig, CLIPTextModel
from sd_jax.models.unet import UNet2DConditionModel, UNetConfig
from sd_jax.models.vae import AutoencoderKL, VAEConfig
from sd_jax.tokenizer import load_tokenizer

log = logging.getLogger("sd_jax")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MODEL_KEYS = ("text_encoder", "unet", "vae")


def parse_dtype(dtype: Any, what: str = "dtype") -> Any:
    """'float32' | 'bfloat16' | 'float16' (or the jnp type) -> jnp dtype; anything else is an error."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"{what} {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    for value in DTYPES.values():
        if jnp.dtype(dtype) == jnp.dtype(value):
            return value
    raise ValueError(f"{what} {dtype!r} is not supported; choose one of {sorted(DTYPES)}")


def param_shapes(module: Any, *example_inputs: Any) -> dict[str, Any]:
    """Parameter shapes/dtypes of a module without allocating them."""
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs))
    return variables["params"]


@dataclasses.dataclass
class StableDiffusion:
    """A Stable Diffusion v1.x model: modules, parameters, tokenizer and scheduler config."""

    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizer: Any
    params: dict[str, Any]
    scheduler_config: dict[str, Any]
    source: str = ""
    skipped_weights: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: Any = "float32", *, param_dtype: Any = None,
                        variant: str | None = None, attention: str = "auto",
                        remat: bool = False) -> StableDiffusion:
        """Load a diffusers folder. ``dtype`` is the compute dtype; parameters are
        stored in ``param_dtype`` (default: the same as ``dtype``)."""
        compute = parse_dtype(dtype)
        storage = parse_dtype(param_dtype, "param_dtype") if param_dtype is not None else compute
        root = Path(path).expanduser()
        if not root.exists():
            raise ModelFolderError(
                f"model path {str(path)!r} does not exist; pass a diffusers folder "
                "(with model_index.json, unet/, vae/, text_encoder/, tokenizer/)")
        if not root.is_dir():
            raise ValueError(f"{root} is a file; loading single-file checkpoints is not supported yet, "
                             "pass a diffusers folder")
        configs = {name: read_json(component_folder(root, name) / "config.json") for name in MODEL_KEYS}
        text_cfg = _config(CLIPTextConfig.from_transformers, configs["text_encoder"], root / "text_encoder")
        unet_cfg = _config(UNetConfig.from_diffusers, configs["unet"], root / "unet")
        vae_cfg = _config(VAEConfig.from_diffusers, configs["vae"], root / "vae")
        sched_file = root / "scheduler" / "scheduler_config.json"
        scheduler_config = read_json(sched_file) if sched_file.exists() else {}
        tok_dir = root / "tokenizer"
        tokenizer = load_tokenizer(tok_dir if tok_dir.is_dir() else None)

        modules = dict(
            text_encoder=CLIPTextModel(text_cfg, dtype=compute, param_dtype=storage),
            unet=UNet2DConditionModel(unet_cfg, dtype=compute, param_dtype=storage,
                                      remat=remat, attention=attention),
            vae=AutoencoderKL(vae_cfg, dtype=compute, param_dtype=storage, attention=attention),
        )
        params, skipped = {}, {}
        for name in MODEL_KEYS:
            shapes = param_shapes(modules[name], *_example_inputs(name, modules[name].config))
            state = read_component_state(root / name, name, variant)
            tree, skipped[name] = core.load_state_dict(shapes, state, what=name.replace("_", " "),
                                                       ignore=IGNORED_BUFFERS[name])
            del state
            params[name] = jax.device_put(tree)
            del tree
            if skipped[name]:
                log.info("%s: skipped buffers %s", name, ", ".join(skipped[name]))
        return cls(tokenizer=tokenizer, params=params, scheduler_config=scheduler_config,
                   source=str(path), skipped_weights=skipped, **modules)

    # ------------------------------------------------------------------ properties
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        """The latent scale (0.18215 for SD v1)."""
        return float(self.vae.config.scaling_factor)

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts -> (B, 77) int32 ids; a truncated prompt is reported with its dropped words."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
        ids, infos = self.tokenizer.tokenize(prompts)
        for prompt, info in zip(prompts, infos):
            if info.truncated:
                log.warning("prompt truncated to %d tokens; dropped: %r (prompt: %r)",
                            ids.shape[1], info.dropped_text, prompt)
        return ids

    def encode_prompt(self, prompts: str | Sequence[str], clip_skip: int = 0) -> jax.Array:
        """Prompts -> (B, 77, width) conditioning (the final hidden state after the final LayerNorm)."""
        ids = self.tokenize(prompts)
        return _encode_text(self.text_encoder, self.params["text_encoder"], jnp.asarray(ids), clip_skip)

    # ------------------------------------------------------------------ UNet
    def predict_noise(self, latents: Any, t: Any, emb: Any) -> jax.Array:
        """UNet epsilon prediction: latents (B, h, w, C) NHWC, t an int or (B,) ints -> (B, h, w, C)."""
        latents = jnp.asarray(latents)
        if latents.ndim != 4 or latents.shape[-1] != self.unet.config.in_channels:
            raise ValueError(f"latents must be (B, h, w, {self.unet.config.in_channels}) NHWC, "
                             f"got shape {latents.shape}")
        emb = jnp.asarray(emb)
        if emb.shape[0] != latents.shape[0]:
            raise ValueError(f"emb batch {emb.shape[0]} does not match latents batch {latents.shape[0]}")
        t = jnp.broadcast_to(jnp.asarray(t), (latents.shape[0],))
        return _predict_noise(self.unet, self.params["unet"], latents, t, emb)

    # ------------------------------------------------------------------ VAE
    def encode_image(self, images: Any, key: jax.Array | None = None) -> jax.Array:
        """Images (B, H, W, 3) in [0, 1] -> scaled latents; the posterior mean when ``key`` is None."""
        images = jnp.asarray(images)
        factor = self.vae_scale_factor
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % factor or images.shape[2] % factor:
            raise ValueError(f"images must be (B, H, W, 3) with H and W multiples of {factor}, "
                             f"got shape {images.shape}")
        return _encode_image(self.vae, self.params["vae"], images, key, self.scaling_factor)

    def decode_latents(self, latents: Any) -> jax.Array:
        """Scaled latents (B, h, w, 4) -> images (B, H, W, 3) float in [0, 1]."""
        latents = jnp.asarray(latents)
        if latents.ndim != 4 or latents.shape[-1] != self.vae.config.latent_channels:
            raise ValueError(f"latents must be (B, h, w, {self.vae.config.latent_channels}), "
                             f"got shape {latents.shape}")
        return _decode_latents(self.vae, self.params["vae"], latents, self.scaling_factor)


def _config(reader: Any, data: dict[str, Any], folder: Path) -> Any:
    """Read a model config, naming the file in any error."""
    try:
        return reader(data)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{folder / 'config.json'}: {err}") from None


def _example_inputs(name: str, config: Any) -> tuple[Any, ...]:
    """Smallest inputs that trace every parameter of a module (for eval_shape)."""
    if name == "text_encoder":
        return (jnp.zeros((1, config.max_position_embeddings), jnp.int32),)
    if name == "unet":
        return (jnp.zeros((1, 8, 8, config.in_channels)), jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, 1, config.cross_attention_dim)))
    factor = 2 ** (len(config.block_out_channels) - 1)
    return (jnp.zeros((1, factor, factor, config.in_channels)),)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode_text(module: CLIPTextModel, params: Any, ids: jax.Array, clip_skip: int) -> jax.Array:
    """Jitted text encoder."""
    return module.apply({"params": params}, ids, clip_skip=clip_skip)


@functools.partial(jax.jit, static_argnums=(0,))
def _predict_noise(module: UNet2DConditionModel, params: Any, latents: jax.Array, t: jax.Array,
                   emb: jax.Array) -> jax.Array:
    """Jitted UNet call."""
    return module.apply({"params": params}, latents.astype(module.dtype), t, emb.astype(module.dtype))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _encode_image(module: AutoencoderKL, params: Any, images: jax.Array, key: jax.Array | None,
                  scale: float) -> jax.Array:
    """Jitted VAE encoder: [0, 1] images -> scaled latents."""
    mean, logvar = module.apply({"params": params}, (images * 2.0 - 1.0).astype(module.dtype),
                                method=AutoencoderKL.encode)
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return (z * scale).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode_latents(module: AutoencoderKL, params: Any, latents: jax.Array, scale: float) -> jax.Array:
    """Jitted VAE decoder: scaled latents -> [0, 1] images."""
    images = module.apply({"params": params}, (latents / scale).astype(module.dtype),
                          method=AutoencoderKL.decode)
    return jnp.clip(images.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)
