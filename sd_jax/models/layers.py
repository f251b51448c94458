"""Building blocks shared by the UNet and the VAE (channels-last, NHWC).

Flax module names mirror diffusers' PyTorch module names, with list indices
written ``name_i`` (``resnets_0``), so that the converter in
``sd_jax/convert/`` maps every parameter with one explicit rule.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models.attention import attention

Dtype = Any


class GroupNorm(nn.Module):
    """GroupNorm computed in float32 (contiguous channel groups, as PyTorch)."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels do not divide into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        grouped = x32.reshape(*x.shape[:-1], self.num_groups, channels // self.num_groups)  # (B, H, W, G, C/G)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = grouped.mean(axis=axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=axes, keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        out = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return out.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in float32."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
        out = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (out * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def conv3x3(features: int, dtype: Dtype, param_dtype: Dtype, name: str, stride: int = 1,
            padding: Any = ((1, 1), (1, 1))) -> nn.Conv:
    """A 3x3 convolution, PyTorch's default padding of 1."""
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=param_dtype, name=name)


def conv1x1(features: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Conv:
    """A 1x1 convolution."""
    return nn.Conv(features, (1, 1), padding="VALID", dtype=dtype, param_dtype=param_dtype, name=name)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32 (DDPM / diffusers)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]  # (B, half)
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal embedding (kept in float32)."""

    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array) -> jax.Array:
        emb = nn.Dense(self.features, dtype=jnp.float32, param_dtype=self.param_dtype, name="linear_1")(emb)
        emb = nn.silu(emb)
        return nn.Dense(self.features, dtype=jnp.float32, param_dtype=self.param_dtype, name="linear_2")(emb)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 (+ time) -> GN -> SiLU -> dropout -> conv3x3, plus shortcut."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:  # x: (B, H, W, C)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, self.eps, name="norm1", **kw)(x)
        h = conv3x3(self.out_channels, name="conv1", **kw)(nn.silu(h))
        if temb is not None:
            t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))  # (B, C)
            h = h + t[:, None, None, :].astype(h.dtype)
        h = GroupNorm(self.groups, self.eps, name="norm2", **kw)(h)
        h = nn.Dropout(self.dropout, deterministic=deterministic)(nn.silu(h))
        h = conv3x3(self.out_channels, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv1x1(self.out_channels, name="conv_shortcut", **kw)(x)
        return (x.astype(h.dtype) + h)


class Downsample(nn.Module):
    """3x3 stride-2 convolution, padding 1 (UNet) or (0, 1, 0, 1) then none (VAE encoder)."""

    out_channels: int
    asymmetric_pad: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric_pad else ((1, 1), (1, 1))
        return conv3x3(self.out_channels, self.dtype, self.param_dtype, name="conv", stride=2,
                       padding=padding)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to ``size``) then a 3x3 convolution."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        # (B, H, W, C) -> (B, 2H, 2W, C), or (B, *size, C): a skip connection of odd size
        # (latents not divisible by 2^levels), as diffusers' forward_upsample_size.
        height, width = x.shape[1:3]
        if size is None or tuple(size) == (2 * height, 2 * width):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            x = nearest_resize(x, size)
        return conv3x3(self.out_channels, self.dtype, self.param_dtype, name="conv")(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (B, h, w, C) with torch's "nearest" rule: source index floor(i * H / h)."""
    height, width = x.shape[1:3]
    rows = (np.arange(size[0]) * height) // size[0]
    cols = (np.arange(size[1]) * width) // size[1]
    return x[:, rows][:, :, cols]


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (to_q, to_k, to_v, to_out_0)."""

    heads: int
    head_dim: int
    out_features: int
    qkv_bias: bool = False
    upcast: bool = False
    implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = x if context is None else context
        inner = self.heads * self.head_dim
        q = nn.Dense(inner, use_bias=self.qkv_bias, name="to_q", **kw)(x)        # (B, Lq, inner)
        k = nn.Dense(inner, use_bias=self.qkv_bias, name="to_k", **kw)(context)  # (B, Lk, inner)
        v = nn.Dense(inner, use_bias=self.qkv_bias, name="to_v", **kw)(context)
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.head_dim)  # (B, L, H, D)
        out = attention(split(q), split(k), split(v), upcast=self.upcast,
                        implementation=self.implementation)
        out = out.reshape(*out.shape[:2], inner)  # (B, Lq, inner)
        return nn.Dense(self.out_features, name="to_out_0", **kw)(out)
