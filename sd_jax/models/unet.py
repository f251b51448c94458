"""The Stable Diffusion UNet (diffusers' ``UNet2DConditionModel``), channels-last.

Covers SD v1.x and the switches SD 2.x / inpainting models use
(``use_linear_projection``, per-block head counts, 9 input channels,
``upcast_attention``). Parameter names mirror diffusers' module names with
list indices written ``name_i`` (``down_blocks_0/attentions_1/proj_in``), so
``sd_jax.convert.core`` maps every parameter to its diffusers key by one rule.

Shapes: images and feature maps are (B, H, W, C); token sequences (B, L, C).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax import limits
from sd_jax.models.layers import (Downsample, GroupNorm, ResnetBlock, TimestepEmbedding, Upsample,
                                  conv3x3, timestep_embedding)
from sd_jax.models.unet_blocks import Transformer2D

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a UNet2DConditionModel; the defaults are SD v1.4's.

    ``num_attention_heads`` is the number of heads (head size = channels / heads).
    diffusers' configs call this ``attention_head_dim`` for historical reasons;
    :meth:`from_diffusers` translates. Fields marked "per block" take one value
    for all blocks or a tuple with one value per down block (up blocks use them
    in reverse order, the mid block uses the last).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int | tuple[int, ...] = 2              # per block
    num_attention_heads: int | tuple[int, ...] = 8           # per block
    cross_attention_dim: int = 768                           # width of the text embedding
    transformer_layers_per_block: int | tuple[int, ...] = 1  # per block
    only_cross_attention: bool | tuple[bool, ...] = False    # per block (attn1 attends to the text)
    use_linear_projection: bool = False   # proj_in/proj_out: Dense (SD 2.x) instead of 1x1 conv
    upcast_attention: bool = False        # query-key products in float32 (SD 2.1)
    center_input_sample: bool = False     # sample -> 2 * sample - 1 first
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1           # 1: symmetric padding; 0: pad (0, 1) then none
    dropout: float = 0.0                  # ResNet blocks only, as diffusers
    time_embedding_dim: int | None = None  # None: 4 * block_out_channels[0]
    sample_size: int | tuple[int, int] | None = 64  # latent size the model was trained at (informational)

    @classmethod
    def sd_v1(cls) -> "UNetConfig":
        """CompVis/stable-diffusion-v1-4 (and v1-1 ... v1-5)."""
        return cls()

    @classmethod
    def sd_v2(cls) -> "UNetConfig":
        """The SD 2.x UNet: linear projections, 1024-d text (OpenCLIP), 5/10/20/20 heads.

        Read the checkpoint's own config.json for its flags (2.1's 768-v model
        sets ``upcast_attention``).
        """
        return cls(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024,
                   use_linear_projection=True, sample_size=96)

    def __post_init__(self):
        # JSON gives lists; keep everything hashable (the config is a Flax module attribute).
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        self._validate()

    # -- per-block views ----------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    def per_block(self, name: str) -> tuple:
        """A per-block field as a tuple with one entry per down block."""
        value = getattr(self, name)
        return tuple(value) if isinstance(value, tuple) else (value,) * self.num_blocks

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    # -- validation ---------------------------------------------------------------------------
    def _validate(self) -> None:
        """Types, consistency, and sizes within ``sd_jax.limits.UNET``, before anything is built."""
        def bad(name, value, valid):
            raise ValueError(f"UNetConfig.{name}={limits.short(value)} is not valid; expected {valid}")

        def positive_int(name, value):
            high = limits.UNET[name]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                bad(name, value, f"an integer in [1, {high}]")

        n = len(self.block_out_channels) if isinstance(self.block_out_channels, tuple) else 0
        if not 1 <= n <= limits.UNET["blocks"]:
            bad("block_out_channels", self.block_out_channels,
                f"a tuple of 1 to {limits.UNET['blocks']} channel counts")
        for c in self.block_out_channels:
            positive_int("block_out_channels", c)
        for name, valid in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            types = getattr(self, name)
            if not isinstance(types, tuple) or len(types) != n:
                bad(name, types, f"a tuple of {n} block types (one per entry of block_out_channels)")
            for t in types:
                if t not in valid:
                    bad(name, types, f"block types from {valid}")
        for name in ("layers_per_block", "num_attention_heads", "transformer_layers_per_block",
                     "only_cross_attention"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                bad(name, value, f"one value, or a tuple of {n} (one per down block)")
            for v in self.per_block(name):
                if name == "only_cross_attention":
                    if not isinstance(v, bool):
                        bad(name, value, "True or False (or a tuple of them)")
                elif isinstance(v, (tuple, list)):
                    bad(name, value, "integers (nested per-layer lists are not supported)")
                else:
                    positive_int(name, v)
        positive_int("in_channels", self.in_channels)
        positive_int("cross_attention_dim", self.cross_attention_dim)
        positive_int("out_channels", self.out_channels)
        positive_int("norm_num_groups", self.norm_num_groups)
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                bad("norm_num_groups", self.norm_num_groups,
                    f"a divisor of every block_out_channels entry {self.block_out_channels}")
        heads = self.per_block("num_attention_heads")
        for i, (c, h) in enumerate(zip(self.block_out_channels, heads)):
            attends = (self.down_block_types[i] == "CrossAttnDownBlock2D" or i == n - 1
                       or self.up_block_types[n - 1 - i] == "CrossAttnUpBlock2D")
            if attends and h > c:
                bad("num_attention_heads", self.num_attention_heads,
                    f"at most block_out_channels[{i}]={c} heads in block {i}")
        if self.downsample_padding not in (0, 1) or isinstance(self.downsample_padding, bool):
            bad("downsample_padding", self.downsample_padding, "0 or 1")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            bad("dropout", self.dropout, "a probability in [0, 1)")
        limits.check_number("UNetConfig", "norm_eps", self.norm_eps, 0.0, limits.MAX_NORM_EPS, low_open=True)
        limits.check_number("UNetConfig", "freq_shift", self.freq_shift, -limits.MAX_FREQ_SHIFT, limits.MAX_FREQ_SHIFT)
        if self.time_embedding_dim is not None:
            positive_int("time_embedding_dim", self.time_embedding_dim)
        if self.sample_size is not None:
            size = self.sample_size if isinstance(self.sample_size, tuple) else (self.sample_size,)
            if len(size) not in (1, 2):
                bad("sample_size", self.sample_size, "an integer, a (height, width) pair or None")
            for v in size:
                positive_int("sample_size", v)
        for name in ("use_linear_projection", "upcast_attention", "center_input_sample", "flip_sin_to_cos"):
            if not isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "True or False")

    # -- diffusers config.json ----------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
        """Read a diffusers ``unet/config.json`` dict; refuse what sd_jax does not compute.

        Missing keys take diffusers' defaults (not sd_jax's). Every key that
        would change the computation to something unsupported is reported in
        one ValueError that names the key, its value and what is supported.
        """
        problems = []
        for key, value in config.items():
            if key.startswith("_") or key in _DIFFUSERS_IGNORED or key in _DIFFUSERS_READ:
                continue
            if key in _DIFFUSERS_FIXED:
                allowed = _DIFFUSERS_FIXED[key]
                if not any(_same_value(value, a) for a in allowed):
                    problems.append(f"{limits.clip(key, 40)}={limits.short(value)} "
                                    f"(sd_jax supports {' or '.join(map(repr, allowed))})")
            else:
                problems.append(f"{limits.clip(key, 40)}={limits.short(value)} (unknown key; sd_jax reads "
                                f"{sorted(_DIFFUSERS_READ)})")
        if problems:
            more = [f"... and {len(problems) - 10} more"] if len(problems) > 10 else []
            raise ValueError("unsupported UNet configuration (SD 1.x/2.x UNet2DConditionModel only):\n  "
                             + "\n  ".join(problems[:10] + more))
        get = lambda key: config.get(key, _DIFFUSERS_READ[key])
        heads = get("num_attention_heads")
        heads = get("attention_head_dim") if heads is None else heads  # legacy name: it is the head count
        block_types = lambda key: _tuple_or_scalar(  # diffusers' alias names
            [t.removeprefix("UNetRes") if isinstance(t, str) else t for t in get(key)]
            if isinstance(get(key), (list, tuple)) else get(key))
        return cls(
            in_channels=get("in_channels"), out_channels=get("out_channels"),
            block_out_channels=_tuple_or_scalar(get("block_out_channels")),
            down_block_types=block_types("down_block_types"), up_block_types=block_types("up_block_types"),
            layers_per_block=_tuple_or_scalar(get("layers_per_block")),
            num_attention_heads=_tuple_or_scalar(heads),
            cross_attention_dim=_one_value("cross_attention_dim", get("cross_attention_dim")),
            transformer_layers_per_block=_tuple_or_scalar(get("transformer_layers_per_block")),
            only_cross_attention=_tuple_or_scalar(get("only_cross_attention")),
            use_linear_projection=get("use_linear_projection"), upcast_attention=get("upcast_attention"),
            center_input_sample=get("center_input_sample"), flip_sin_to_cos=get("flip_sin_to_cos"),
            freq_shift=_float(get("freq_shift")),
            norm_num_groups=get("norm_num_groups"), norm_eps=_float(get("norm_eps")),
            downsample_padding=get("downsample_padding"), dropout=_float(get("dropout")),
            time_embedding_dim=get("time_embedding_dim"),
            sample_size=_tuple_or_scalar(get("sample_size")),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``config.json`` dict of this architecture (heads under the legacy name)."""
        out = {"_class_name": "UNet2DConditionModel", "act_fn": "silu",
               "mid_block_type": "UNetMidBlock2DCrossAttn"}
        for field in dataclasses.fields(self):
            name = "attention_head_dim" if field.name == "num_attention_heads" else field.name
            value = getattr(self, field.name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


def _is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _float(value):
    """An int read from JSON as the float it stands for; anything else as it is (validated later)."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _same_value(value, allowed) -> bool:
    """``value == allowed`` without True == 1 or 0 == False slipping through."""
    if allowed is None or isinstance(allowed, bool):
        return value is allowed
    return not isinstance(value, bool) and value == allowed


def _one_value(key, value):
    """A per-block list whose entries are all equal -> that value (one text encoder feeds all blocks)."""
    if isinstance(value, (list, tuple)):
        if not value or any(v != value[0] for v in value):
            raise ValueError(f"unsupported UNet configuration: {key}={limits.short(value)} (sd_jax supports one "
                             f"value for all blocks)")
        return value[0]
    return value


def _tuple_or_scalar(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


# diffusers config keys sd_jax reads, with diffusers' default for a missing key.
_DIFFUSERS_READ = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": UNetConfig.down_block_types,
    "up_block_types": UNetConfig.up_block_types, "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "downsample_padding": 1,
    "dropout": 0.0, "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1, "attention_head_dim": 8, "num_attention_heads": None,
    "use_linear_projection": False, "upcast_attention": False, "time_embedding_dim": None,
    "sample_size": None,
}
# Keys whose only supported values are these (diffusers' defaults; "swish" is diffusers' SiLU too).
_DIFFUSERS_FIXED = {
    "act_fn": ("silu", "swish"), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "mid_block_scale_factor": (1,), "dual_cross_attention": (False,),
    "time_embedding_type": ("positional",), "class_embed_type": (None,), "addition_embed_type": (None,),
    "resnet_time_scale_shift": ("default",), "num_class_embeds": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,),
    "conv_out_kernel": (3,), "attention_type": ("default",), "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,), "reverse_transformer_layers_per_block": (None,),
}
# Keys that do not change what the blocks sd_jax builds compute.
_DIFFUSERS_IGNORED = frozenset({
    "mid_block_only_cross_attention",  # read by UNetMidBlock2DSimpleCrossAttn only
    "resnet_skip_time_act", "resnet_out_scale_factor",  # read by the Simple*/ResnetDownsample blocks only
    "addition_embed_type_num_heads",  # read only when addition_embed_type is set
})


# ---------------------------------------------------------------------------------------------
# UNet blocks
# ---------------------------------------------------------------------------------------------

# static_argnums counts ``self`` as 0: (x=1, temb=2, deterministic=3).
_RematResnetBlock = nn.remat(ResnetBlock, static_argnums=(3,))


class _UNetBlock(nn.Module):
    """Fields and sub-block factories shared by the down, mid and up blocks."""

    config: UNetConfig
    index: int               # which entry of the per-block settings (down-block order)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"

    def _resnet(self, name: str, x, temb, deterministic: bool):
        cfg = self.config
        cls = _RematResnetBlock if self.remat else ResnetBlock
        block = cls(cfg.block_out_channels[self.index], cfg.norm_num_groups, cfg.norm_eps, cfg.dropout,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        return block(x, temb, deterministic)

    def _transformer(self, name: str, x, context, only_cross: bool | None = None):
        cfg = self.config
        i = self.index
        only_cross = cfg.per_block("only_cross_attention")[i] if only_cross is None else only_cross
        block = Transformer2D(cfg.per_block("num_attention_heads")[i],
                              cfg.per_block("transformer_layers_per_block")[i], cfg.norm_num_groups,
                              cfg.use_linear_projection, only_cross, cfg.upcast_attention, self.attention,
                              self.remat, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        return block(x, context)


class DownBlock(_UNetBlock):
    """CrossAttnDownBlock2D / DownBlock2D: (ResNet [-> transformer]) x n, then a stride-2 conv."""

    @nn.compact
    def __call__(self, x, temb, context, deterministic: bool = True):  # x (B, H, W, C)
        cfg, i = self.config, self.index
        with_attention = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
        skips = []
        for j in range(cfg.per_block("layers_per_block")[i]):
            x = self._resnet(f"resnets_{j}", x, temb, deterministic)
            if with_attention:
                x = self._transformer(f"attentions_{j}", x, context)
            skips.append(x)
        if i < cfg.num_blocks - 1:
            x = Downsample(cfg.block_out_channels[i], asymmetric_pad=cfg.downsample_padding == 0,
                           dtype=self.dtype, param_dtype=self.param_dtype, name="downsamplers_0")(x)
            skips.append(x)  # (B, H/2, W/2, C)
        return x, skips


class MidBlock(_UNetBlock):
    """UNetMidBlock2DCrossAttn: ResNet -> transformer -> ResNet at the lowest resolution."""

    @nn.compact
    def __call__(self, x, temb, context, deterministic: bool = True):
        x = self._resnet("resnets_0", x, temb, deterministic)
        x = self._transformer("attentions_0", x, context, only_cross=False)  # diffusers ignores it here
        return self._resnet("resnets_1", x, temb, deterministic)


class UpBlock(_UNetBlock):
    """CrossAttnUpBlock2D / UpBlock2D: (concat skip -> ResNet [-> transformer]) x (n+1), upsample.

    ``index`` is the mirrored down-block index; ``position`` the place in ``up_blocks``.
    """

    position: int = 0

    @nn.compact
    def __call__(self, x, skips, temb, context, deterministic: bool = True,
                 upsample_size: tuple[int, int] | None = None):
        cfg = self.config
        with_attention = cfg.up_block_types[self.position] == "CrossAttnUpBlock2D"
        for j, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip], axis=-1)  # (B, H, W, C + C_skip), diffusers' order
            x = self._resnet(f"resnets_{j}", x, temb, deterministic)
            if with_attention:
                x = self._transformer(f"attentions_{j}", x, context)
        if self.position < cfg.num_blocks - 1:
            x = Upsample(cfg.block_out_channels[self.index], dtype=self.dtype, param_dtype=self.param_dtype,
                         name="upsamplers_0")(x, upsample_size)  # (B, 2H, 2W, C) or the next skip's size
        return x


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class UNet2DConditionModel(nn.Module):
    """Noise prediction eps(x_t, t, text): (B, H, W, in) x (B,) x (B, L, D) -> (B, H, W, out).

    ``dtype`` is the compute dtype (activations, matmuls, convolutions) and the
    dtype of the output; GroupNorm/LayerNorm statistics, softmax and the time
    embedding are float32 regardless. ``param_dtype`` is the stored weights'.
    ``remat`` recomputes ResNet and transformer blocks in the backward pass
    (parameter names are unchanged). ``attention`` picks the kernel of
    :func:`sd_jax.models.attention.attention` ("auto" chooses by backend/size).
    H and W must be multiples of 2 ** (number of blocks - 1) (8 for SD).
    """

    config: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        cfg = self.config
        batch, channels = sample.shape[0], sample.shape[-1]  # (B, H, W, C); any H, W (odd sizes upsample to the skips)
        if channels != cfg.in_channels:
            raise ValueError(f"UNet input has {channels} channels; the config expects "
                             f"in_channels={cfg.in_channels} (input is NHWC)")
        if encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states have width {encoder_hidden_states.shape[-1]}; the "
                             f"config expects cross_attention_dim={cfg.cross_attention_dim}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blocks = dict(config=cfg, remat=self.remat, attention=self.attention, **kw)

        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))  # (B,)
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(cfg.time_embed_dim, self.param_dtype, name="time_embedding")(t_emb)  # (B, T)
        context = encoder_hidden_states.astype(self.dtype)  # (B, L, D)

        x = conv3x3(cfg.block_out_channels[0], name="conv_in", **kw)(sample)  # (B, H, W, C0)
        skips = [x]
        for i in range(cfg.num_blocks):
            down = DownBlock(index=i, name=f"down_blocks_{i}", **blocks)
            x, block_skips = down(x, temb, context, deterministic)
            skips += block_skips
        x = MidBlock(index=cfg.num_blocks - 1, name="mid_block", **blocks)(x, temb, context, deterministic)
        for p in range(cfg.num_blocks):
            i = cfg.num_blocks - 1 - p
            n = cfg.per_block("layers_per_block")[i] + 1
            skips, block_skips = skips[:-n], skips[-n:]
            up = UpBlock(index=i, position=p, name=f"up_blocks_{p}", **blocks)
            # Odd sizes (latents not divisible by 2^levels): upsample to the next skip's size.
            size = tuple(skips[-1].shape[1:3]) if skips else None
            x = up(x, block_skips, temb, context, deterministic, size)
        x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x)
        return conv3x3(cfg.out_channels, name="conv_out", **kw)(nn.silu(x))  # (B, H, W, out)
