"""The Stable Diffusion v1 VAE (diffusers ``AutoencoderKL``), channels-last.

Images are (B, H, W, 3) in [-1, 1]; latents are (B, H/8, W/8, 4) *unscaled*
(multiplying by ``VAEConfig.scaling_factor`` = 0.18215 is the pipeline's job).
Module names mirror diffusers' (``encoder/down_blocks_0/resnets_1/conv1``), so
``sd_jax.convert.core.load_state_dict`` maps every parameter with one rule::

    encoder: conv_in -> down_blocks_i{resnets_j, downsamplers_0} -> mid_block -> conv_norm_out -> conv_out
    quant_conv (1x1, 2*latent)    -> (mean, logvar), logvar clamped to [-30, 20]
    post_quant_conv (1x1, latent) -> decoder: conv_in -> mid_block -> up_blocks_i -> conv_norm_out -> conv_out

The mid blocks are resnet -> single-head self-attention over the H*W tokens
-> resnet. GroupNorms and the attention softmax run in float32 whatever the
compute ``dtype``; ``encode`` and ``decode`` return float32.

float16: the decoder's residual stream (and the encoder's) outgrows float16's
largest value, 65504, for ordinary SD latents, and one inf turns the image into
NaN (a black image). So with ``dtype=float16`` and ``force_upcast`` (the default,
diffusers' ``force_upcast``, true in every SD v1 VAE config) encoder and decoder
compute in float32 from the float16-stored weights. bfloat16 has float32's
range (8 exponent bits) and is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax import limits
from sd_jax.models.attention import IMPLEMENTATIONS
from sd_jax.models.layers import Attention, Downsample, GroupNorm, ResnetBlock, Upsample, conv1x1, conv3x3

Dtype = Any

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# diffusers config.json keys that describe the file, not the architecture.
_INFORMATIONAL_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path",
                                 "_use_default_values", "force_upcast"})


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an ``AutoencoderKL`` (preset: ``VAEConfig.sd_v1()``)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2            # encoder; the decoder uses layers_per_block + 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6               # fixed in diffusers' Encoder/Decoder
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215      # used by the pipeline, not by the model
    sample_size: int | tuple[int, int] = 512  # informational (diffusers' tiling default)

    def __post_init__(self):
        """Types, and sizes within ``sd_jax.limits.VAE``, checked before anything is built."""
        short = limits.short
        if not isinstance(self.block_out_channels, (list, tuple)):
            raise ValueError(f"VAEConfig.block_out_channels={short(self.block_out_channels)}: must be a list of "
                             "channel counts, e.g. (128, 256, 512, 512)")
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        size = self.sample_size if isinstance(self.sample_size, tuple) else (self.sample_size,)
        if len(size) not in (1, 2):
            raise ValueError(f"VAEConfig.sample_size={short(self.sample_size)}: must be a positive integer "
                             "or a (height, width) pair")
        for s in size:
            limits.check_int("VAEConfig", "sample_size", s, 1, limits.VAE["sample_size"])
        for key in ("in_channels", "out_channels", "latent_channels", "norm_num_groups", "layers_per_block"):
            limits.check_int("VAEConfig", key, getattr(self, key), 1, limits.VAE[key])
        if not 1 <= len(self.block_out_channels) <= limits.VAE["blocks"]:
            raise ValueError(f"VAEConfig.block_out_channels={short(self.block_out_channels)}: must hold 1 to "
                             f"{limits.VAE['blocks']} channel counts, e.g. (128, 256, 512, 512)")
        for c in self.block_out_channels:
            limits.check_int("VAEConfig", "block_out_channels", c, 1, limits.VAE["block_out_channels"])
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAEConfig.block_out_channels={short(self.block_out_channels)}: channels {bad} are "
                             f"not divisible by norm_num_groups={self.norm_num_groups}")
        limits.check_number("VAEConfig", "norm_eps", self.norm_eps, 0.0, limits.MAX_NORM_EPS, low_open=True)
        # NaN or inf here would make every latent non-finite: black images (SD: 0.18215, SDXL: 0.13025).
        limits.check_number("VAEConfig", "scaling_factor", self.scaling_factor, 0.0, limits.MAX_SCALING_FACTOR,
                            low_open=True)
        for key in ("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"VAEConfig.{key}={short(getattr(self, key))}: must be true or false")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for SD v1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd_v1(cls) -> VAEConfig:
        """The VAE of CompVis/stable-diffusion-v1-4 (and every SD v1.x)."""
        return cls()

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """Read a diffusers ``vae/config.json`` dict; unsupported values raise ``ValueError``."""
        config = dict(config)
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"VAE config: _class_name={limits.short(class_name)} is not supported; "
                             "sd_jax implements 'AutoencoderKL' only")
        channels = config.get("block_out_channels", cls.block_out_channels)
        if not isinstance(channels, (list, tuple)):
            raise ValueError(f"VAE config: block_out_channels={limits.short(channels)} must be a list, "
                             "e.g. [128, 256, 512, 512]")
        n_levels = len(channels)
        expected = {
            "down_block_types": ("DownEncoderBlock2D", "a list of 'DownEncoderBlock2D', one per block_out_channels"),
            "up_block_types": ("UpDecoderBlock2D", "a list of 'UpDecoderBlock2D', one per block_out_channels"),
        }
        for key, (block, what) in expected.items():
            value = config.pop(key, [block] * n_levels)
            if not isinstance(value, (list, tuple)) or list(value) != [block] * n_levels:
                raise ValueError(f"VAE config: {key}={limits.short(value)} is not supported; expected {what} "
                                 f"({n_levels} entries)")
        act_fn = config.pop("act_fn", "silu")
        if act_fn != "silu":
            raise ValueError(f"VAE config: act_fn={limits.short(act_fn)} is not supported; only 'silu' is")
        for key in ("shift_factor", "latents_mean", "latents_std"):
            value = config.pop(key, None)
            if value is not None:
                raise ValueError(f"VAE config: {key}={limits.short(value)} is not supported; SD v1 VAEs have "
                                 f"{key}=null (only the scaling_factor is applied to latents)")
        fields = {f.name for f in dataclasses.fields(cls)} - {"norm_eps"}
        kwargs, unknown = {}, []
        for key, value in config.items():
            if key in fields:
                kwargs[key] = tuple(value) if key == "block_out_channels" else value
            elif key not in _INFORMATIONAL_KEYS:
                unknown.append(key)
        if unknown:
            raise ValueError(f"VAE config: unsupported keys {limits.short(sorted(unknown), 200)} "
                             f"(values {limits.short([config[k] for k in sorted(unknown)])}); supported keys are "
                             f"{sorted(fields | set(expected) | {'act_fn'})} plus informational "
                             f"{sorted(_INFORMATIONAL_KEYS)}")
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``config.json`` dict of this architecture (for export)."""
        n_levels = len(self.block_out_channels)
        out = {"_class_name": "AutoencoderKL", "act_fn": "silu",
               "down_block_types": ["DownEncoderBlock2D"] * n_levels,
               "up_block_types": ["UpDecoderBlock2D"] * n_levels}
        for f in dataclasses.fields(self):
            if f.name != "norm_eps":
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


class MidBlockAttention(nn.Module):
    """GroupNorm -> single-head self-attention over H*W tokens (with biases) -> residual."""

    channels: int
    groups: int
    eps: float
    implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.group_norm = GroupNorm(self.groups, self.eps, **kw)
        self.attn = Attention(heads=1, head_dim=self.channels, out_features=self.channels, qkv_bias=True,
                              implementation=self.implementation, **kw)
        # to_q/to_k/to_v/to_out_0 live directly under this module, as in diffusers.
        nn.share_scope(self, self.attn)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, C)
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)  # (B, HW, C)
        out = self.attn(tokens).reshape(b, h, w, c)       # (B, H, W, C)
        return x.astype(out.dtype) + out


class MidBlock(nn.Module):
    """resnets_0 -> attentions_0 -> resnets_1 at the lowest resolution (diffusers ``UNetMidBlock2D``)."""

    config: VAEConfig
    channels: int
    remat: bool = False
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (B, h, w, C)
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet = nn.remat(ResnetBlock) if self.remat else ResnetBlock
        attn = nn.remat(MidBlockAttention) if self.remat else MidBlockAttention
        x = resnet(self.channels, cfg.norm_num_groups, cfg.norm_eps, name="resnets_0", **kw)(x)
        if cfg.mid_block_add_attention:
            x = attn(self.channels, cfg.norm_num_groups, cfg.norm_eps, self.attention,
                     name="attentions_0", **kw)(x)
        return resnet(self.channels, cfg.norm_num_groups, cfg.norm_eps, name="resnets_1", **kw)(x)


class EncoderBlock(nn.Module):
    """``layers`` ResNet blocks, then an asymmetric-pad stride-2 conv unless last (``DownEncoderBlock2D``)."""

    config: VAEConfig
    out_channels: int
    layers: int
    downsample: bool
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B, H/2, W/2, C')
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet = nn.remat(ResnetBlock) if self.remat else ResnetBlock
        for j in range(self.layers):
            x = resnet(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, name=f"resnets_{j}", **kw)(x)
        if self.downsample:
            x = Downsample(self.out_channels, asymmetric_pad=True, name="downsamplers_0", **kw)(x)
        return x


class DecoderBlock(nn.Module):
    """``layers`` ResNet blocks, then nearest x2 + conv unless last (``UpDecoderBlock2D``)."""

    config: VAEConfig
    out_channels: int
    layers: int
    upsample: bool
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (B, h, w, C) -> (B, 2h, 2w, C')
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet = nn.remat(ResnetBlock) if self.remat else ResnetBlock
        for j in range(self.layers):
            x = resnet(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, name=f"resnets_{j}", **kw)(x)
        if self.upsample:
            x = Upsample(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """Image (B, H, W, in) -> moments (B, H/f, W/f, 2 * latent) before ``quant_conv``."""

    config: VAEConfig
    remat: bool = False
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = cfg.block_out_channels
        x = conv3x3(channels[0], name="conv_in", **kw)(x)
        for i, ch in enumerate(channels):
            x = EncoderBlock(cfg, ch, cfg.layers_per_block, downsample=i < len(channels) - 1,
                             remat=self.remat, name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(cfg, channels[-1], self.remat, self.attention, name="mid_block", **kw)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        return conv3x3(2 * cfg.latent_channels, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latent (B, h, w, latent) after ``post_quant_conv`` -> image (B, h*f, w*f, out)."""

    config: VAEConfig
    remat: bool = False
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = cfg.block_out_channels[::-1]  # up_blocks_0 works at the widest, lowest-resolution level
        x = conv3x3(channels[0], name="conv_in", **kw)(z)
        x = MidBlock(cfg, channels[0], self.remat, self.attention, name="mid_block", **kw)(x)
        for i, ch in enumerate(channels):
            x = DecoderBlock(cfg, ch, cfg.layers_per_block + 1, upsample=i < len(channels) - 1,
                             remat=self.remat, name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        return conv3x3(cfg.out_channels, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """The KL autoencoder: ``encode`` (image -> mean, logvar), ``decode`` (latent -> image).

    Call both through ``model.apply({"params": p}, x, method=AutoencoderKL.encode)``;
    ``model.init(key, image)`` (which runs ``__call__``) creates all parameters.
    """

    config: VAEConfig = dataclasses.field(default_factory=VAEConfig.sd_v1)
    dtype: Dtype = jnp.float32        # compute dtype
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"           # sd_jax.models.attention implementation for the mid blocks
    force_upcast: bool = True         # float16 compute runs in float32 (see the module docstring)

    @property
    def compute_dtype(self) -> Dtype:
        """The dtype encoder and decoder compute in: ``dtype``, or float32 for an upcast float16."""
        if self.force_upcast and jnp.dtype(self.dtype) == jnp.dtype(jnp.float16):
            return jnp.float32
        return self.dtype

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.compute_dtype, param_dtype=self.param_dtype)
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"AutoencoderKL.attention={self.attention!r} is not one of {IMPLEMENTATIONS}")
        self.encoder = Encoder(cfg, self.remat, self.attention, **kw)
        self.decoder = Decoder(cfg, self.remat, self.attention, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = conv1x1(2 * cfg.latent_channels, name=None, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv1x1(cfg.latent_channels, name=None, **kw)

    def _check(self, x: jax.Array, channels: int, what: str, multiple: int = 1) -> None:
        """Fail early, at trace time, on a wrongly shaped image or latent."""
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"AutoencoderKL.{what}: expected (B, H, W, {channels}) channels-last input, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] % multiple or x.shape[2] % multiple:
            raise ValueError(f"AutoencoderKL.{what}: height and width {tuple(x.shape[1:3])} must be "
                             f"multiples of {multiple}")

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, 3) image in [-1, 1] -> float32 (mean, logvar), each (B, H/8, W/8, 4)."""
        self._check(x, self.config.in_channels, "encode", self.config.downsample_factor)
        moments = self.encoder(x.astype(self.compute_dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)  # (B, h, w, latent) each
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """(B, h, w, 4) unscaled latent -> float32 (B, 8h, 8w, 3) image (about [-1, 1], not clipped)."""
        self._check(z, self.config.latent_channels, "decode")
        z = z.astype(self.compute_dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruct: encode, take the mean (or a posterior sample with ``key``), decode."""
        mean, logvar = self.encode(x)
        z = mean if key is None else latent_dist_sample(mean, logvar, key)
        return self.decode(z)


def latent_dist_sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """One draw from the diagonal Gaussian posterior, exactly::

        mean + exp(0.5 * logvar) * jax.random.normal(key, mean.shape, float32)

    (diffusers' ``DiagonalGaussianDistribution.sample`` with JAX's generator;
    ``logvar`` is already clamped by ``encode``). Unscaled: multiply by
    ``scaling_factor`` for the UNet.
    """
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise)
