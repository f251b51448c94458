"""The UNet's transformer blocks (diffusers' ``Transformer2DModel`` for continuous inputs).

GN -> proj_in -> (LN -> self-attn, LN -> cross-attn, LN -> GEGLU) x n -> proj_out,
plus the input. Parameter names mirror diffusers (``proj_in``,
``transformer_blocks_0/attn1/to_q``, ``ff/net_0/proj``, ``ff/net_2``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax.models.layers import Attention, GroupNorm, LayerNorm, conv1x1

Dtype = Any


class GEGLU(nn.Module):
    """Dense to 2x width, split into (hidden, gate), hidden * gelu(gate) with the exact (erf) GELU."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (B, L, C) -> (B, L, features)
        h = nn.Dense(2 * self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward, inner width 4x (diffusers' ``ff.net.0.proj`` / ``ff.net.2``)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (B, L, C)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(4 * x.shape[-1], name="net_0", **kw)(x)
        return nn.Dense(x.shape[-1], name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """[LN -> self-attn] -> [LN -> cross-attn to the text] -> [LN -> GEGLU], each residual."""

    heads: int
    only_cross_attention: bool = False
    upcast_attention: bool = False
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:  # x (B, L, C), context (B, Lt, Ct)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        attn = lambda name: Attention(self.heads, dim // self.heads, dim, upcast=self.upcast_attention,
                                      implementation=self.attention, name=name, **kw)
        h = LayerNorm(1e-5, name="norm1", **kw)(x)
        x = x + attn("attn1")(h, context if self.only_cross_attention else None)
        h = LayerNorm(1e-5, name="norm2", **kw)(x)
        x = x + attn("attn2")(h, context)
        h = LayerNorm(1e-5, name="norm3", **kw)(x)
        return x + FeedForward(name="ff", **kw)(h)


_RematTransformerBlock = nn.remat(BasicTransformerBlock)


class Transformer2D(nn.Module):
    """GN -> proj_in -> transformer blocks over the H*W tokens -> proj_out, plus the input."""

    heads: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    attention: str = "auto"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, channels = x.shape
        inner = self.heads * (channels // self.heads)
        h = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)  # diffusers fixes eps=1e-6 here
        if self.use_linear_projection:
            h = h.reshape(batch, height * width, channels)  # (B, HW, C)
            h = nn.Dense(inner, name="proj_in", **kw)(h)  # (B, HW, I)
        else:
            h = conv1x1(inner, name="proj_in", **kw)(h).reshape(batch, height * width, inner)  # (B, HW, I)
        block_cls = _RematTransformerBlock if self.remat else BasicTransformerBlock
        for j in range(self.num_layers):
            h = block_cls(self.heads, self.only_cross_attention, self.upcast_attention, self.attention,
                          name=f"transformer_blocks_{j}", **kw)(h, context)
        if self.use_linear_projection:
            h = nn.Dense(channels, name="proj_out", **kw)(h).reshape(batch, height, width, channels)
        else:
            h = conv1x1(channels, name="proj_out", **kw)(h.reshape(batch, height, width, inner))
        return h + x  # (B, H, W, C)
