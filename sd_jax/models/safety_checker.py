"""Stable Diffusion safety checker: diffusers' ``StableDiffusionSafetyChecker`` in Flax.

A CLIP ViT image tower (ViT-L/14 for SD v1.x) embeds each image; the pooled CLS
token goes through ``visual_projection`` and is compared by cosine similarity
with 17 "concept" and 3 "special care" embeddings. Per image, as diffusers::

    special_score_j = round(cos(e, special_j) - special_threshold_j + adj, 3)   adj = 0.01 once any
    concept_score_j = round(cos(e, concept_j) - concept_threshold_j + adj, 3)   special score > 0
    has_nsfw        = any(concept_score > 0)

The checker only *reports*: unlike diffusers, no image is replaced here.

Flax module names mirror the diffusers state dict as the Hub's files write it
(``vision_model.vision_model.`` twice: the safety checker's ``CLIPVisionModel``
and, inside, transformers 4's ``CLIPVisionTransformer``), list indices ``layers_i``::

    vision_model/vision_model/embeddings/patch_embedding/kernel
        <-> vision_model.vision_model.embeddings.patch_embedding.weight
    vision_model/vision_model/encoder/layers_3/mlp/fc1/kernel
        <-> vision_model.vision_model.encoder.layers.3.mlp.fc1.weight
    visual_projection/kernel <-> visual_projection.weight

The PyTorch names (five bare parameters outside ``convert.core``'s leaf rule, the
buffers to skip, transformers 4 and 5 spellings) live in ``sd_jax.convert.safety_checker``.

Numerics: embeddings and the residual stream are float32; matmuls run in
``dtype``; LayerNorms, softmax, cosine similarities and the 17+3 comparison
embeddings and thresholds are float32 whatever ``dtype``/``param_dtype``.

Preprocessing (:func:`preprocess`) is transformers' PIL ``CLIPImageProcessor``
(the pipeline's ``feature_extractor``): shortest side to 224 with PIL bicubic
on uint8, centre crop 224, ``x / 255`` (float64, then float32), normalise.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models.attention import IMPLEMENTATIONS
from sd_jax.models.clip import ACTIVATIONS, CLIPEncoder
from sd_jax.models.layers import LayerNorm

Dtype = Any

NUM_CONCEPTS = 17       # diffusers hard-codes both counts
NUM_SPECIAL_CARE = 3
SPECIAL_CARE_ADJUSTMENT = 0.01
SCORE_DECIMALS = 3

# transformers' CLIPVisionConfig defaults: a config.json may leave out any key equal to them.
_TRANSFORMERS_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, num_channels=3, image_size=224,
                                     patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_TRANSFORMERS_PROJECTION_DIM = 512  # CLIPConfig.projection_dim default


def _positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture of a CLIP ViT image tower (transformers' field names); defaults: ViT-L/14."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_channels", "image_size", "patch_size"):
            _positive_int("CLIPVisionConfig", name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPVisionConfig.hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.patch_size > self.image_size:
            raise ValueError(f"CLIPVisionConfig.patch_size {self.patch_size} is larger than "
                             f"image_size {self.image_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPVisionConfig.hidden_act {self.hidden_act!r} is not supported; "
                             f"expected one of {ACTIVATIONS}")
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float)) \
                or self.layer_norm_eps <= 0:
            raise ValueError(f"CLIPVisionConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
        """From a transformers ``CLIPVisionConfig`` dict; missing keys take its defaults."""
        if not isinstance(config, Mapping):
            raise ValueError(f"expected a vision_config dict, got {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type not in (None, "clip_vision_model"):
            raise ValueError(f"vision_config has model_type {model_type!r}; expected 'clip_vision_model'")
        values = {key: config.get(key, default) for key, default in _TRANSFORMERS_VISION_DEFAULTS.items()}
        if isinstance(values["layer_norm_eps"], int) and not isinstance(values["layer_norm_eps"], bool):
            values["layer_norm_eps"] = float(values["layer_norm_eps"])
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class SafetyCheckerConfig:
    """The safety checker: a CLIP image tower and its projection width."""

    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 768

    def __post_init__(self):
        if not isinstance(self.vision, CLIPVisionConfig):
            raise ValueError(f"SafetyCheckerConfig.vision must be a CLIPVisionConfig, "
                             f"got {type(self.vision).__name__}")
        _positive_int("SafetyCheckerConfig", "projection_dim", self.projection_dim)

    @classmethod
    def sd_v1(cls) -> "SafetyCheckerConfig":
        """CompVis/stable-diffusion-safety-checker: CLIP ViT-L/14 image tower, projection 768."""
        return cls()

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "SafetyCheckerConfig":
        """From the ``safety_checker/config.json`` dict (a transformers ``CLIPConfig``).

        Reads ``vision_config`` and ``projection_dim`` with transformers' defaults
        for missing keys. A legacy ``vision_config_dict`` (SD v1.4/v1.5 files
        carry one) wins as in ``CLIPConfig``: every field comes from it or from
        the ``CLIPVisionConfig`` defaults. ``text_config`` is ignored.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"expected a config.json dict, got {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type not in (None, "clip"):
            raise ValueError(f"safety checker config has model_type {model_type!r}; expected 'clip' "
                             f"(a transformers CLIPConfig)")
        vision = config.get("vision_config") or {}
        legacy = config.get("vision_config_dict")
        if legacy is not None:
            if not isinstance(legacy, Mapping):
                raise ValueError(f"vision_config_dict must be a dict, got {type(legacy).__name__}")
            vision = {**vision, **{k: legacy.get(k, d) for k, d in _TRANSFORMERS_VISION_DEFAULTS.items()}}
        projection_dim = config.get("projection_dim", _TRANSFORMERS_PROJECTION_DIM)
        return cls(vision=CLIPVisionConfig.from_transformers(vision), projection_dim=projection_dim)


# ----------------------------------------------------------------------------- the image tower


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (no bias), a class token in front, learned positions; float32 out."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:  # (B, S, S, C) -> (B, 1 + P, D)
        cfg = self.config
        p = cfg.patch_size
        patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding")(
            pixel_values.astype(self.dtype))  # (B, S/p, S/p, D)
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, cfg.hidden_size).astype(jnp.float32)  # (B, P, D), row-major
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,),
                         self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(jnp.float32), (batch, 1, cfg.hidden_size))  # (B, 1, D)
        positions = nn.Embed(cfg.num_patches + 1, cfg.hidden_size, dtype=jnp.float32,
                             param_dtype=self.param_dtype, name="position_embedding")(
            jnp.arange(cfg.num_patches + 1))  # (1 + P, D)
        return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPVisionTransformer(nn.Module):
    """Pixels (B, S, S, C) -> (last hidden state (B, 1 + P, D), pooled (B, D)), both float32.

    transformers' ``CLIPVisionModel``: embeddings -> ``pre_layrnorm`` (sic) ->
    encoder; pooled = ``post_layernorm`` of the class token.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str = "auto"

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be (batch, {', '.join(map(str, expected))}) "
                             f"channels-last, got shape {tuple(pixel_values.shape)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPVisionEmbeddings(cfg, name="embeddings", **kw)(pixel_values)  # (B, 1 + P, D) f32
        x = LayerNorm(cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=self.param_dtype,
                      name="pre_layrnorm")(x)
        x = CLIPEncoder(cfg, self.attention_implementation, causal=False, name="encoder",
                        **kw)(x, cfg.num_hidden_layers)  # the text tower's layers, bidirectional
        pooled = LayerNorm(cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=self.param_dtype,
                           name="post_layernorm")(x[:, 0])  # (B, D)
        return x, pooled


class CLIPVisionModel(nn.Module):
    """transformers 4's ``CLIPVisionModel``: a shell whose one child is ``vision_model``."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str = "auto"

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        return CLIPVisionTransformer(self.config, self.dtype, self.param_dtype,
                                     self.attention_implementation, name="vision_model")(pixel_values)


# ----------------------------------------------------------------------------- the checker


class SafetyCheckerOutput(NamedTuple):
    """What :class:`SafetyChecker` computes, all float32."""

    pooled_output: jax.Array    # (B, D)    post_layernorm(CLS)
    image_embeds: jax.Array     # (B, proj) visual_projection(pooled_output)
    special_care_cos: jax.Array  # (B, 3)   cosine similarity with special_care_embeds
    concept_cos: jax.Array      # (B, 17)   cosine similarity with concept_embeds


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """(N, E) x (M, E) -> (N, M) float32; rows scaled by 1 / max(||row||, 1e-12) as torch's normalize."""
    normalise = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    a, b = normalise(a.astype(jnp.float32)), normalise(b.astype(jnp.float32))
    return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


class SafetyChecker(nn.Module):
    """Preprocessed pixels (B, S, S, 3) -> :class:`SafetyCheckerOutput` (cosine similarities).

    The thresholds are parameters (``concept_embeds_weights``,
    ``special_care_embeds_weights``); :func:`check_images` applies them.
    """

    config: SafetyCheckerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str = "auto"

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> SafetyCheckerOutput:
        cfg = self.config
        if self.attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attention_implementation {self.attention_implementation!r} is not "
                             f"one of {IMPLEMENTATIONS}")
        _, pooled = CLIPVisionModel(cfg.vision, self.dtype, self.param_dtype,
                                    self.attention_implementation, name="vision_model")(pixel_values)
        image_embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="visual_projection")(pooled)
        image_embeds = image_embeds.astype(jnp.float32)  # (B, proj)
        # diffusers initialises all four to ones; real values come from the checkpoint.
        ones = nn.initializers.ones
        concepts = self.param("concept_embeds", ones, (NUM_CONCEPTS, cfg.projection_dim), jnp.float32)
        special = self.param("special_care_embeds", ones, (NUM_SPECIAL_CARE, cfg.projection_dim),
                             jnp.float32)
        self.param("concept_embeds_weights", ones, (NUM_CONCEPTS,), jnp.float32)
        self.param("special_care_embeds_weights", ones, (NUM_SPECIAL_CARE,), jnp.float32)
        return SafetyCheckerOutput(pooled, image_embeds, cosine_similarity(image_embeds, special),
                                   cosine_similarity(image_embeds, concepts))


def abstract_params(module: SafetyChecker) -> dict[str, Any]:
    """The parameter tree's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), nothing computed."""
    size, channels = module.config.vision.image_size, module.config.vision.num_channels
    return jax.eval_shape(module.init, jax.random.key(0),
                          jnp.zeros((1, size, size, channels), jnp.float32))["params"]


@dataclasses.dataclass(frozen=True)
class SafetyScores:
    """diffusers' per-image scores (``result_img``), as arrays over the batch."""

    special_scores: np.ndarray   # (B, 3) float32, rounded to 3 decimals
    concept_scores: np.ndarray   # (B, 17) float32, rounded to 3 decimals
    has_nsfw: np.ndarray         # (B,) bool: any concept score > 0

    @property
    def special_care(self) -> np.ndarray:
        """(B, 3) bool: the special-care concepts that fired."""
        return self.special_scores > 0

    @property
    def bad_concepts(self) -> np.ndarray:
        """(B, 17) bool: the concepts that fired."""
        return self.concept_scores > 0


def _rounded_score(cos: np.ndarray, threshold: np.ndarray, adjustment: np.ndarray) -> np.ndarray:
    """round(cos - threshold + adjustment, 3) in float32, as NumPy >= 2 evaluates diffusers' expression.

    diffusers computes ``round(np.float32 - float + float, 3)``: the Python floats
    are the float32 threshold (``.item()``) and 0.0 / 0.01, so every step is a
    float32 operation and ``round`` is ``np.round`` (scale by 1e3, round half to
    even, scale back) in float32.
    """
    return np.round((cos - threshold) + adjustment, SCORE_DECIMALS)


def safety_scores(special_care_cos: Any, concept_cos: Any, special_care_thresholds: Any,
                  concept_thresholds: Any) -> SafetyScores:
    """diffusers' ``StableDiffusionSafetyChecker.forward`` arithmetic on cosine similarities.

    In diffusers' loop over special-care concepts the adjustment becomes 0.01
    as soon as one fires, so *later* special-care scores of that image carry it
    too; every concept score carries it if any special-care concept fired.
    """
    special_cos = np.asarray(special_care_cos, np.float32)   # (B, 3)
    concept_cos = np.asarray(concept_cos, np.float32)        # (B, 17)
    special_thr = np.asarray(special_care_thresholds, np.float32)
    concept_thr = np.asarray(concept_thresholds, np.float32)
    if special_cos.ndim != 2 or concept_cos.ndim != 2 or special_cos.shape[0] != concept_cos.shape[0] \
            or special_thr.shape != special_cos.shape[1:] or concept_thr.shape != concept_cos.shape[1:]:
        raise ValueError(f"cosine similarities (B, S) and (B, C) need thresholds (S,) and (C,); got "
                         f"{special_cos.shape}, {concept_cos.shape}, {special_thr.shape}, "
                         f"{concept_thr.shape}")
    batch, n_special = special_cos.shape
    adjustment = np.zeros((batch,), np.float32)
    special_scores = np.empty_like(special_cos)
    for j in range(n_special):  # sequential, as diffusers: a firing raises the adjustment for j + 1...
        special_scores[:, j] = _rounded_score(special_cos[:, j], special_thr[j], adjustment)
        adjustment = np.where(special_scores[:, j] > 0, np.float32(SPECIAL_CARE_ADJUSTMENT), adjustment)
    concept_scores = _rounded_score(concept_cos, concept_thr[None], adjustment[:, None])
    return SafetyScores(special_scores, concept_scores, np.any(concept_scores > 0, axis=1))


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: SafetyChecker, params: Any, pixel_values: jax.Array) -> SafetyCheckerOutput:
    return module.apply({"params": params}, pixel_values)


def check_images(module: SafetyChecker, params: Mapping[str, Any], pixel_values: Any
                 ) -> tuple[list[bool], SafetyScores]:
    """Preprocessed pixels (B, S, S, 3) -> (has_nsfw per image, the scores); images are not touched.

    ``pixel_values`` is :func:`preprocess`'s output. The network runs jitted
    (compiled once per module and batch shape); the thresholding runs in NumPy
    on the host, exactly as diffusers does it.
    """
    pixel_values = jnp.asarray(pixel_values)
    if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
        raise ValueError(f"pixel_values must be floating point (preprocess's output), "
                         f"got dtype {pixel_values.dtype}")
    out = _apply(module, params, pixel_values)
    scores = safety_scores(jax.device_get(out.special_care_cos), jax.device_get(out.concept_cos),
                           jax.device_get(params["special_care_embeds_weights"]),
                           jax.device_get(params["concept_embeds_weights"]))
    return [bool(flag) for flag in scores.has_nsfw], scores
