"""CLIP text encoder (the text tower of CLIP ViT-L/14, SD v1.x's conditioning model).

Pre-LayerNorm transformer with a causal mask and a final LayerNorm; the
conditioning is the final hidden state *after* the final LayerNorm, all
positions. Flax module names mirror transformers' ``CLIPTextModel`` (without
the ``text_model.`` prefix), list indices written ``layers_i``::

    embeddings/token_embedding/embedding          <-> embeddings.token_embedding.weight
    encoder/layers_3/self_attn/q_proj/kernel      <-> encoder.layers.3.self_attn.q_proj.weight
    final_layer_norm/scale                        <-> final_layer_norm.weight

Numerics: embeddings and the residual stream are float32; the matmuls run in
``dtype``; LayerNorms and the attention softmax are float32 whatever ``dtype``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax import limits
from sd_jax.models.attention import IMPLEMENTATIONS, attention
from sd_jax.models.layers import LayerNorm

Dtype = Any

ACTIVATIONS = ("quick_gelu", "gelu")
# PyTorch buffers that text-encoder files may carry (not weights): loaders skip
# and report them, e.g. ``load_state_dict(..., ignore=TORCH_BUFFERS)``.
TORCH_BUFFERS = (r".*position_ids",)
TEXT_MODEL_PREFIX = "text_model."

# transformers' CLIPTextConfig defaults: a config.json may leave out any key equal to them.
_TRANSFORMERS_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                              num_hidden_layers=12, num_attention_heads=8,
                              max_position_embeddings=77, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=49406,
                              eos_token_id=49407)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text tower (transformers' field names)."""

    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 49407
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    # The token ids are informational (the tokenizer supplies the ids); they are not
    # range-checked because real config.json files carry legacy values (eos 2).

    def __post_init__(self):
        # Sizes within sd_jax.limits.CLIP_TEXT, checked before anything is built from them.
        for name, high in limits.CLIP_TEXT.items():
            limits.check_int("CLIPTextConfig", name, getattr(self, name), 1, high)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextConfig.hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig.hidden_act {limits.short(self.hidden_act)} is not supported; "
                             f"expected one of {ACTIVATIONS}")
        limits.check_number("CLIPTextConfig", "layer_norm_eps", self.layer_norm_eps, 0.0, limits.MAX_NORM_EPS,
                            low_open=True)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ValueError(f"CLIPTextConfig.{name} must be a non-negative int or None, "
                                 f"got {limits.short(value)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def sd_v1(cls) -> "CLIPTextConfig":
        """CLIP ViT-L/14 text tower, the SD v1.x text encoder (123,060,480 parameters)."""
        return cls()

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a transformers ``CLIPTextModel`` config.json dict (or a ``CLIPModel`` one's ``text_config``).

        Missing keys take transformers' ``CLIPTextConfig`` defaults (what its
        ``config.json`` may omit); ``projection_dim`` and training-only keys are ignored.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"expected a config.json dict, got {type(config).__name__}")
        model_type = config.get("model_type")
        if "text_config" in config or model_type == "clip":
            config = config.get("text_config") or {}
            model_type = config.get("model_type", "clip_text_model")
        if model_type not in (None, "clip_text_model"):
            raise ValueError(f"text encoder config has model_type {model_type!r}; expected "
                             f"'clip_text_model' (or a 'clip' config with a text_config)")
        values = {key: config.get(key, default) for key, default in _TRANSFORMERS_DEFAULTS.items()}
        if isinstance(values["eos_token_id"], (list, tuple)):  # transformers allows a list
            values["eos_token_id"] = values["eos_token_id"][0] if values["eos_token_id"] else None
        if isinstance(values["layer_norm_eps"], int):
            values["layer_norm_eps"] = float(values["layer_norm_eps"])
        return cls(**values)


def strip_text_model_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a leading ``text_model.`` from state-dict keys (transformers < 5 writes it).

    Keys without the prefix are kept as they are; a key that would then appear
    twice raises a ``ValueError`` naming it.
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        name = key[len(TEXT_MODEL_PREFIX):] if key.startswith(TEXT_MODEL_PREFIX) else key
        if name in out:
            raise ValueError(f"text encoder state dict has {name!r} both with and without the "
                             f"{TEXT_MODEL_PREFIX!r} prefix")
        out[name] = value
    return out


def _activation(name: str):
    """transformers' ACT2FN for the supported names."""
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    return lambda x: jax.nn.gelu(x, approximate=False)  # "gelu": exact erf form, as torch


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding, in float32."""

    config: CLIPTextConfig
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:  # (B, L) -> (B, L, C)
        cfg = self.config
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.float32,
                          param_dtype=self.param_dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=jnp.float32,
                             param_dtype=self.param_dtype, name="position_embedding")(
            jnp.arange(input_ids.shape[1]))  # (L, C)
        return tokens + positions[None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (causal for text, not for images)."""

    config: CLIPTextConfig
    implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (B, L, C)
        cfg = self.config
        dense = lambda name: nn.Dense(cfg.hidden_size, dtype=self.dtype,
                                      param_dtype=self.param_dtype, name=name)
        split = lambda t: t.reshape(*t.shape[:2], cfg.num_attention_heads, cfg.head_dim)  # (B, L, H, D)
        q, k, v = (split(dense(name)(x)) for name in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k, v, causal=self.causal, implementation=self.implementation)  # (B, L, H, D)
        return dense("out_proj")(out.reshape(*out.shape[:2], cfg.hidden_size))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(cfg.intermediate_size, name="fc1", **kw)(x)  # (B, L, 4C)
        return nn.Dense(cfg.hidden_size, name="fc2", **kw)(_activation(cfg.hidden_act)(h))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x)); the residual stays float32."""

    config: CLIPTextConfig
    implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (B, L, C) float32
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(cfg, self.implementation, causal=self.causal, name="self_attn",
                              **kw)(h).astype(jnp.float32)
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        return x + CLIPMLP(cfg, name="mlp", **kw)(h).astype(jnp.float32)


class CLIPEncoder(nn.Module):
    """The stack of encoder layers; runs only the first ``num_layers`` of them.

    Shared by the text tower (causal) and the safety checker's vision tower (``causal=False``);
    the config needs hidden_size, num_attention_heads, head_dim, intermediate_size, hidden_act
    and layer_norm_eps.
    """

    config: CLIPTextConfig
    implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, num_layers: int) -> jax.Array:
        for i in range(num_layers):
            x = CLIPEncoderLayer(self.config, self.implementation, dtype=self.dtype,
                                 param_dtype=self.param_dtype, causal=self.causal, name=f"layers_{i}")(x)
        return x


class CLIPTextModel(nn.Module):
    """Token ids (B, L <= 77) -> conditioning (B, L, width), after the final LayerNorm.

    ``clip_skip=k`` (a Python int) returns the output of layer ``num_layers - k``
    passed through the final LayerNorm, as diffusers' ``encode_prompt``
    (``hidden_states[-(k + 1)]`` then ``final_layer_norm``); the skipped layers
    are not computed. Initialise with ``clip_skip=0`` so every layer has parameters.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str = "auto"

    @nn.compact
    def __call__(self, input_ids: jax.Array, clip_skip: int = 0) -> jax.Array:
        cfg = self.config
        if self.attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attention_implementation {self.attention_implementation!r} is not "
                             f"one of {IMPLEMENTATIONS}")
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) \
                or not 0 <= clip_skip <= cfg.num_hidden_layers:
            raise ValueError(f"clip_skip must be an int in [0, {cfg.num_hidden_layers}], got {clip_skip!r}")
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"input_ids must be (batch, length <= {cfg.max_position_embeddings}), "
                             f"got shape {tuple(input_ids.shape)}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        x = CLIPTextEmbeddings(cfg, self.param_dtype, name="embeddings")(input_ids)  # (B, L, C) f32
        x = CLIPEncoder(cfg, self.attention_implementation, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="encoder")(
            x, cfg.num_hidden_layers - clip_skip)
        return LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="final_layer_norm")(x)  # (B, L, C)
