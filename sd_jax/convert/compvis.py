"""CompVis single-file checkpoints (``.ckpt`` / ``.safetensors``) <-> diffusers-named state dicts.

A CompVis (``ldm``) Stable Diffusion file holds the whole model under three prefixes::

    model.diffusion_model.*          UNet (openaimodel.UNetModel: input_blocks / middle_block / output_blocks)
    first_stage_model.*              VAE (encoder.down.{i}.block.{j}, mid.attn_1 as 1x1 convs, ...)
    cond_stage_model.transformer.*   CLIP text encoder (transformers names, with or without text_model.)
    cond_stage_model.model.*         ... or an OpenCLIP text tower (SD 2.x: resblocks, fused in_proj)

plus, in "full-EMA" files, ``model_ema.<UNet name without dots>`` copies of the UNet and
``model_ema.decay`` / ``num_updates``, and the DDPM schedule buffers (``betas``,
``alphas_cumprod``, ...), which are ignored (the schedule comes from the scheduler config).

Renaming is driven by one prefix table per model built from its config (``unet_prefix_table``,
``vae_prefix_table``): each row maps a CompVis module prefix to a diffusers one, and ResNet
blocks rename their inner layers (``in_layers.0`` -> ``norm1``, ...). The same tables, inverted,
write single files (``sd_jax.convert.export``). Architecture comes from tensor shapes
(:func:`detect_architecture`) or from ``config=``: a diffusers folder or an original CompVis
YAML such as ``v1-inference.yaml`` (:func:`configs_from_ldm_yaml`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sd_jax.convert import limits
from sd_jax.convert.core import WeightMismatchError, listing
from sd_jax.convert.files import read_weight_file
from sd_jax.convert.model_files import ModelFiles, read_config
from sd_jax.models.clip import CLIPTextConfig
from sd_jax.models.unet import UNetConfig
from sd_jax.models.vae import VAEConfig

log = logging.getLogger("sd_jax")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")

# DDPM buffers LatentDiffusion registers (ldm/models/diffusion/ddpm.py, register_schedule) and
# other non-weight entries; the schedule is taken from the scheduler config instead.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar", "scale_factor",
})
_OTHER_IGNORED = (re.compile(r"first_stage_model\.loss\..*"),          # LPIPS/discriminator of VAE training
                  re.compile(r"cond_stage_model\.model\.(text_projection|logit_scale|attn_mask)"))

# diffusers scheduler config of CompVis/stable-diffusion-v1-4 (what single files get by default).
SD_V1_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    "trained_betas": None, "timestep_spacing": "leading",
}

# The numbers of CompVis' configs/stable-diffusion/v1-inference.yaml that define the model
# (training-only entries left out); `configs_from_ldm_yaml(V1_INFERENCE)` is the SD v1 preset.
V1_INFERENCE: dict[str, Any] = {"model": {
    "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "params": {
        "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "image_size": 64,
        "channels": 4, "conditioning_key": "crossattn", "scale_factor": 0.18215,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1,
            "context_dim": 768, "use_checkpoint": True, "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "ddconfig": {
                "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
    }}}

# The OpenCLIP ViT-H/14 text tower of SD 2.x as diffusers configures it: the penultimate layer's
# output is used, so the model has 23 of the file's 24 layers (the last one is not loaded).
OPEN_CLIP_H_TEXT = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=1024,
                        num_hidden_layers=23, num_attention_heads=16, intermediate_size=4096,
                        hidden_act="gelu", layer_norm_eps=1e-5, pad_token_id=1)

_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_INNER = {"resnet": _UNET_RESNET, "vae_resnet": _VAE_RESNET, "vae_attention": _VAE_ATTENTION}


class UnsupportedCheckpointError(ValueError):
    """A single file that is not an SD 1.x/2.x-style model (SDXL, SD3, a LoRA, ...)."""


# ---------------------------------------------------------------------------------------------
# Prefix tables: (CompVis module prefix, diffusers module prefix, kind of inner renaming)
# ---------------------------------------------------------------------------------------------

def unet_prefix_table(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """Module prefixes of openaimodel.UNetModel and diffusers' UNet2DConditionModel, in order."""
    n = cfg.num_blocks
    layers = cfg.per_block("layers_per_block")
    rows = [("time_embed.0", "time_embedding.linear_1", "plain"),
            ("time_embed.2", "time_embedding.linear_2", "plain"),
            ("input_blocks.0.0", "conv_in", "plain")]
    k = 1
    for i in range(n):
        attends = cfg.down_block_types[i].startswith("CrossAttn")
        for j in range(layers[i]):
            rows.append((f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", "resnet"))
            if attends:
                rows.append((f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}", "plain"))
            k += 1
        if i < n - 1:
            rows.append((f"input_blocks.{k}.0.op", f"down_blocks.{i}.downsamplers.0.conv", "plain"))
            k += 1
    rows += [("middle_block.0", "mid_block.resnets.0", "resnet"),
             ("middle_block.1", "mid_block.attentions.0", "plain"),
             ("middle_block.2", "mid_block.resnets.1", "resnet")]
    k = 0
    for i, n_layers in enumerate(reversed(layers)):
        attends = cfg.up_block_types[i].startswith("CrossAttn")
        for j in range(n_layers + 1):
            rows.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "resnet"))
            if attends:
                rows.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "plain"))
            if j == n_layers and i < n - 1:
                rows.append((f"output_blocks.{k}.{2 if attends else 1}.conv",
                             f"up_blocks.{i}.upsamplers.0.conv", "plain"))
            k += 1
    return rows + [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]


def vae_prefix_table(cfg: VAEConfig) -> list[tuple[str, str, str]]:
    """Module prefixes of ldm's AutoencoderKL and diffusers' AutoencoderKL."""
    n, layers = len(cfg.block_out_channels), cfg.layers_per_block
    rows = []
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.conv_in", f"{part}.conv_in", "plain"),
                 (f"{part}.conv_out", f"{part}.conv_out", "plain"),
                 (f"{part}.norm_out", f"{part}.conv_norm_out", "plain"),
                 (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", "vae_resnet"),
                 (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", "vae_resnet")]
        if cfg.mid_block_add_attention:
            rows.append((f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", "vae_attention"))
    for i in range(n):
        for j in range(layers):
            rows.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", "vae_resnet"))
        if i < n - 1:
            rows.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv",
                         "plain"))
    for i in range(n):
        level = n - 1 - i  # ldm numbers decoder levels from the lowest resolution up
        for j in range(layers + 1):
            rows.append((f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", "vae_resnet"))
        if i < n - 1:
            rows.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv",
                         "plain"))
    if cfg.use_quant_conv:
        rows.append(("quant_conv", "quant_conv", "plain"))
    if cfg.use_post_quant_conv:
        rows.append(("post_quant_conv", "post_quant_conv", "plain"))
    return rows


def rename_keys(state: Mapping[str, np.ndarray], table: list[tuple[str, str, str]], *, to_diffusers: bool,
                what: str) -> dict[str, np.ndarray]:
    """Rename every key through a prefix table; keys no row explains raise one error listing them."""
    src, dst = (0, 1) if to_diffusers else (1, 0)
    rows = {row[src]: (row[dst], _INNER.get(row[2])) for row in table}
    out: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in state.items():
        new = _rename_one(key, rows, to_diffusers)
        if new is None:
            unknown.append(key)
        elif new in out:
            raise WeightMismatchError(f"the {what} weights name {limits.short(new)} twice "
                                      f"(one of them as {limits.short(key)})")
        else:
            out[new] = _relayout(value, new, to_diffusers) if what == "VAE" else value
    if unknown:
        layout = "CompVis" if to_diffusers else "diffusers"
        raise WeightMismatchError(
            f"the {what} weights have names that do not fit the {what} configuration ({layout} layout)\n"
            + listing("not recognised", unknown)
            + "\ncheck that the configuration (config= or the detected architecture) belongs to these weights")
    return out


def _rename_one(key: str, rows: Mapping[str, tuple[str, Mapping[str, str] | None]],
                to_diffusers: bool) -> str | None:
    """The new name of one key by its longest matching module prefix, or None."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix not in rows:
            continue
        target, inner = rows[prefix]
        rest = parts[cut:]
        if inner is None:
            return ".".join([target, *rest])
        module, leaf = ".".join(rest[:-1]), rest[-1]
        names = inner if to_diffusers else {v: k for k, v in inner.items()}
        return f"{target}.{names[module]}.{leaf}" if module in names else None
    return None


def _relayout(value: np.ndarray, new_name: str, to_diffusers: bool) -> np.ndarray:
    """VAE mid-block attention: ldm's 1x1 convs (C, C, 1, 1) <-> diffusers' linear (C, C)."""
    if ".mid_block.attentions." in new_name or ".mid.attn_1." in new_name:
        if new_name.endswith("weight") and not new_name.endswith("norm.weight"):
            if to_diffusers and value.ndim == 4:
                return value.reshape(value.shape[:2])
            if not to_diffusers and value.ndim == 2:
                return value.reshape(*value.shape, 1, 1)
    return value


# ---------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------

def clip_from_compvis(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``cond_stage_model.transformer.[text_model.]*`` -> transformers names without ``text_model.``."""
    out = {}
    for key, value in state.items():
        name = key[len(CLIP_PREFIX):]
        name = name[len("text_model."):] if name.startswith("text_model.") else name
        if name in out:
            raise WeightMismatchError(f"the text encoder has {limits.short(name)} both with and without 'text_model.'")
        out[name] = value
    return out


_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPEN_CLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                  "positional_embedding": "embeddings.position_embedding.weight",
                  "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias|in_proj_weight|in_proj_bias)")


def open_clip_from_compvis(state: Mapping[str, np.ndarray], num_layers: int
                           ) -> tuple[dict[str, np.ndarray], list[str]]:
    """OpenCLIP text tower (SD 2.x) -> transformers CLIP names; layers >= num_layers are dropped.

    ``attn.in_proj_weight`` (3C, C) is split into q/k/v (views, no copy). Returns
    ``(state, dropped keys)``; unknown keys raise.
    """
    out, dropped, unknown = {}, [], []
    for key, value in state.items():
        name = key[len(OPEN_CLIP_PREFIX):]
        if name in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[name]] = value
            continue
        match = _RESBLOCK.fullmatch(name)
        if name in ("text_projection", "logit_scale", "attn_mask"):  # CLIP's joint-embedding head, a buffer
            dropped.append(key)
            continue
        if not match:
            unknown.append(key)
            continue
        layer, module, leaf = int(match[1]), match[2], match[3]
        if layer >= num_layers:
            dropped.append(key)
            continue
        base = f"encoder.layers.{layer}"
        if leaf.startswith("in_proj_"):
            kind = leaf[len("in_proj_"):]
            for name_qkv, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                out[f"{base}.self_attn.{name_qkv}.{kind}"] = part
        elif module in _OPEN_CLIP_LAYER:
            out[f"{base}.{_OPEN_CLIP_LAYER[module]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise WeightMismatchError("the OpenCLIP text encoder has names sd_jax does not know\n"
                                  + listing("not recognised", unknown))
    return out, dropped


# ---------------------------------------------------------------------------------------------
# What a file holds
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CompVisParts:
    """A CompVis state dict split by component (names keep their CompVis prefixes)."""

    unet: dict[str, np.ndarray]
    ema: dict[str, np.ndarray]
    vae: dict[str, np.ndarray]
    text: dict[str, np.ndarray]
    text_format: str  # "clip", "open_clip" or "none"
    ignored: list[str]
    unknown: list[str]


def split_components(state: Mapping[str, np.ndarray]) -> CompVisParts:
    """Sort the keys of a CompVis state dict into UNet / EMA / VAE / text / ignored / unknown."""
    parts = CompVisParts({}, {}, {}, {}, "none", [], [])
    for key, value in state.items():
        if key.startswith(UNET_PREFIX):
            parts.unet[key] = value
        elif key in EMA_BOOKKEEPING or key in SCHEDULE_BUFFERS or any(r.fullmatch(key) for r in _OTHER_IGNORED):
            parts.ignored.append(key)
        elif key.startswith(EMA_PREFIX):
            parts.ema[key] = value
        elif key.startswith(VAE_PREFIX):
            parts.vae[key] = value
        elif key.startswith((CLIP_PREFIX, OPEN_CLIP_PREFIX)):
            parts.text[key] = value
        else:
            parts.unknown.append(key)
    formats = {("open_clip" if k.startswith(OPEN_CLIP_PREFIX) else "clip") for k in parts.text}
    if len(formats) > 1:
        raise UnsupportedCheckpointError("the file holds both a CLIP (cond_stage_model.transformer.*) and an "
                                         "OpenCLIP (cond_stage_model.model.*) text encoder")
    parts.text_format = formats.pop() if formats else "none"
    return parts


def ema_name(compvis_unet_key: str) -> str:
    """``model.diffusion_model.a.b.weight`` -> ``model_ema.diffusion_modelabweight`` (ldm's LitEma naming)."""
    return EMA_PREFIX + compvis_unet_key[len("model."):].replace(".", "")


def select_unet_weights(parts: CompVisParts, use_ema: bool, notes: list[str]) -> dict[str, np.ndarray]:
    """The UNet weights to load: the EMA copies (use_ema and present) or the raw ones."""
    if not parts.ema:
        if use_ema:
            msg = "the file has no EMA weights (model_ema.*); using its UNet weights as they are"
            log.warning(msg)
            notes.append(msg)
        return parts.unet
    if not use_ema:
        notes.append(f"use_ema=False: ignored {len(parts.ema)} EMA weights (model_ema.*), loaded the raw UNet "
                     "weights (the choice for continued training)")
        return parts.unet
    missing = [key for key in parts.unet if ema_name(key) not in parts.ema]
    if missing:
        raise WeightMismatchError(
            f"the file has {len(parts.ema)} EMA weights but no EMA copy of some UNet weights\n"
            + listing("UNet weights without model_ema.* copies", missing)
            + "\npass use_ema=False (--no-ema) to load the raw UNet weights")
    used = {ema_name(key) for key in parts.unet}
    spare = [key for key in parts.ema if key not in used]
    if spare:
        notes.append(f"{len(spare)} EMA entries match no UNet weight and were ignored: {', '.join(spare[:5])}")
    notes.append(f"use_ema=True: loaded the EMA UNet weights ({len(used)} tensors)")
    return {key: parts.ema[ema_name(key)] for key in parts.unet}


# ---------------------------------------------------------------------------------------------
# Architecture detection from shapes
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Architecture:
    """What a single file holds, as sd_jax configs."""

    family: str        # "v1", "v2", "v1-inpainting" or "v2-inpainting"
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPTextConfig
    scheduler: dict[str, Any]
    notes: tuple[str, ...] = ()


_OTHER_FAMILIES = (  # (key prefix or marker, what it means)
    ("conditioner.embedders.", "an SDXL-style model (text encoders under conditioner.embedders.*)"),
    ("model.diffusion_model.joint_blocks.", "a Stable Diffusion 3 model (MMDiT joint_blocks)"),
    ("joint_blocks.", "a Stable Diffusion 3 model (MMDiT joint_blocks)"),
    ("model.diffusion_model.double_blocks.", "a FLUX model (double_blocks)"),
    ("double_blocks.", "a FLUX model (double_blocks)"),
    ("control_model.", "a ControlNet (control_model.*)"),
    ("model.diffusion_model.label_emb.", "a class/vector-conditioned UNet (label_emb: SDXL, upscaler or unCLIP)"),
    ("lora_", "a LoRA adapter (lora_* keys), not a full model"),
    ("encoder.conv_in.", "a standalone VAE (encoder.*/decoder.* without first_stage_model.); load it into a "
                         "diffusers folder's vae/ instead"),
)


def describe_unsupported(keys: Iterable[str]) -> str | None:
    """Name the model family of a key set sd_jax does not load, or None."""
    keys = list(keys)
    for marker, what in _OTHER_FAMILIES:
        if any(k.startswith(marker) or (marker == "lora_" and "lora_" in k) for k in keys):
            return what
    return None


def _unsupported(path: Any, what: str) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(
        f"{path}: unsupported checkpoint: recognised {what}. sd_jax loads Stable Diffusion 1.x/2.x-style "
        "single files: v1 (768-wide text context, 1x1-conv projections), 2.x-style (1024-wide context, linear "
        "projections) and their inpainting versions (9 input channels); for a custom variant of those pass "
        "config= (a diffusers folder or the model's CompVis .yaml)")


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted distinct integers that follow ``prefix`` in ``keys``."""
    found = {int(m[1]) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(found)


def _norm_groups(channels: Iterable[int], what: str, notes: list[str]) -> int:
    """32 (every SD model); for other widths the largest divisor <= 32, noted as a guess."""
    channels = list(channels)
    if all(c % 32 == 0 for c in channels):
        return 32
    g = math.gcd(*channels)
    groups = max(d for d in range(1, 33) if g % d == 0)
    notes.append(f"{what}: GroupNorm group count cannot be read from shapes; guessed {groups} "
                 "(pass config= for the exact architecture)")
    return groups


def detect_unet(unet: Mapping[str, np.ndarray], path: Any, notes: list[str]) -> tuple[str, UNetConfig]:
    """(family, UNetConfig) from CompVis UNet shapes (keys with the model.diffusion_model. prefix)."""
    p = UNET_PREFIX
    shape = lambda name: tuple(unet[p + name].shape)  # noqa: E731
    if p + "input_blocks.0.0.weight" not in unet or p + "out.2.weight" not in unet:
        raise _unsupported(path, "a file without a complete UNet (model.diffusion_model.input_blocks.0.0 / out.2)")
    in_channels, out_channels = shape("input_blocks.0.0.weight")[1], shape("out.2.weight")[0]
    levels: list[list[tuple[int, bool, int]]] = [[]]
    context, linear = set(), set()
    keys = list(unet)
    for k in _indices(keys, p + "input_blocks.")[1:]:
        if p + f"input_blocks.{k}.0.op.weight" in unet:
            levels.append([])
            continue
        attn = f"input_blocks.{k}.1."
        depth = len(_indices(keys, p + attn + "transformer_blocks."))
        if depth:
            context.add(shape(attn + "transformer_blocks.0.attn2.to_k.weight")[1])
            linear.add(len(shape(attn + "proj_in.weight")) == 2)
        levels[-1].append((shape(f"input_blocks.{k}.0.out_layers.3.weight")[0], bool(depth), depth))
    if not all(levels):
        raise _unsupported(path, "a UNet whose input blocks do not follow the SD layout")
    channels = tuple(level[0][0] for level in levels)
    attends = [level[0][1] for level in levels]
    if any(len({c for c, _, _ in lv}) != 1 or len({a for _, a, _ in lv}) != 1 for lv in levels):
        raise _unsupported(path, "a UNet whose blocks mix widths or attention within a level")
    mid = len(_indices(keys, p + "middle_block.1.transformer_blocks."))
    if not mid:
        raise _unsupported(path, "a UNet without cross-attention in its middle block")
    n = len(levels)
    layers = tuple(len(lv) for lv in levels)
    up_attends, k = [], 0
    for i in range(n):
        up_attends.append(p + f"output_blocks.{k}.1.proj_in.weight" in unet)
        k += layers[n - 1 - i] + 1
    if k != len(_indices(keys, p + "output_blocks.")):
        raise _unsupported(path, "a UNet whose output blocks do not match its input blocks")
    depths = tuple(max(d for _, _, d in lv) if lv[0][1] else 1 for lv in levels)
    if len(context) != 1 or len(linear) != 1:
        raise _unsupported(path, f"a UNet with text-context widths {sorted(context)} and projection kinds "
                                 f"{sorted('linear' if x else '1x1 conv' for x in linear)}")
    context_dim, is_linear = context.pop(), linear.pop()
    # SD v1 projects with 1x1 convs and uses 8 heads; 2.x-style UNets project linearly with 64-wide heads.
    family, heads, sample = ("v2", tuple(max(1, c // 64) for c in channels), 96) if is_linear else ("v1", 8, 64)
    standard = 1024 if is_linear else 768
    if context_dim != standard:
        notes.append(f"UNet: {context_dim}-wide text context with {'linear' if is_linear else '1x1-conv'} "
                     f"projections ({family}-style models use {standard}); head counts follow the {family} "
                     "convention (pass config= if this model differs)")
    if in_channels == 9:
        family += "-inpainting"
    elif in_channels != 4:
        extra = {5: " (a depth-conditioned model?)", 7: " (the x4 upscaler?)", 8: " (instruct-pix2pix?)"}
        raise _unsupported(path, f"a {family}-style UNet with {in_channels} input channels"
                                 f"{extra.get(in_channels, '')}")
    time_dim = shape("time_embed.0.weight")[0]
    cfg = UNetConfig(
        in_channels=in_channels, out_channels=out_channels, block_out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attends),
        layers_per_block=layers[0] if len(set(layers)) == 1 else layers,
        num_attention_heads=heads, cross_attention_dim=context_dim,
        transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else depths,
        use_linear_projection=is_linear, norm_num_groups=_norm_groups(channels, "UNet", notes),
        time_embedding_dim=None if time_dim == 4 * channels[0] else time_dim, sample_size=sample)
    return family, cfg


def detect_vae(vae: Mapping[str, np.ndarray], path: Any, notes: list[str],
               scale_factor: float | None) -> VAEConfig:
    """VAEConfig from CompVis VAE shapes (keys with the first_stage_model. prefix)."""
    p = VAE_PREFIX
    needed = ["encoder.conv_in.weight", "decoder.conv_out.weight", "decoder.conv_in.weight"]
    if any(p + name not in vae for name in needed):
        raise _unsupported(path, "a file without a complete VAE (first_stage_model.encoder/decoder)")
    keys = list(vae)
    levels = _indices(keys, p + "encoder.down.")
    channels = tuple(vae[p + f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels)
    layers = len(_indices(keys, p + "encoder.down.0.block."))
    cfg = VAEConfig(
        in_channels=vae[p + "encoder.conv_in.weight"].shape[1],
        out_channels=vae[p + "decoder.conv_out.weight"].shape[0], block_out_channels=channels,
        layers_per_block=layers, latent_channels=vae[p + "decoder.conv_in.weight"].shape[1],
        norm_num_groups=_norm_groups(channels, "VAE", notes),
        mid_block_add_attention=p + "encoder.mid.attn_1.q.weight" in vae,
        use_quant_conv=p + "quant_conv.weight" in vae, use_post_quant_conv=p + "post_quant_conv.weight" in vae,
        scaling_factor=0.18215 if scale_factor is None else scale_factor)
    return cfg


def detect_text(text: Mapping[str, np.ndarray], text_format: str, path: Any) -> CLIPTextConfig:
    """CLIPTextConfig from the text encoder's shapes (CLIP ViT-L/14 or OpenCLIP, penultimate layer)."""
    if text_format == "clip":
        state = clip_from_compvis(text)
        tok = state.get("embeddings.token_embedding.weight")
        if tok is None:
            raise _unsupported(path, "a CLIP text encoder without embeddings.token_embedding")
        hidden = tok.shape[1]
        return CLIPTextConfig(
            vocab_size=tok.shape[0], hidden_size=hidden,
            max_position_embeddings=state["embeddings.position_embedding.weight"].shape[0],
            num_hidden_layers=len(_indices(state, "encoder.layers.")), num_attention_heads=max(1, hidden // 64),
            intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0], hidden_act="quick_gelu")
    if text_format == "open_clip":
        p = OPEN_CLIP_PREFIX
        if p + "token_embedding.weight" not in text:
            raise _unsupported(path, "an OpenCLIP text encoder without token_embedding")
        tok = text[p + "token_embedding.weight"]
        hidden = tok.shape[1]
        layers = len(_indices(text, p + "transformer.resblocks."))
        return CLIPTextConfig(**{
            **OPEN_CLIP_H_TEXT, "vocab_size": tok.shape[0], "hidden_size": hidden,
            "max_position_embeddings": text[p + "positional_embedding"].shape[0],
            "num_hidden_layers": max(1, layers - 1), "num_attention_heads": max(1, hidden // 64),
            "intermediate_size": text[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]})
    raise _unsupported(path, "a file without a text encoder (no cond_stage_model.*)")


def detect_architecture(state: Mapping[str, np.ndarray], path: Any = "checkpoint") -> Architecture:
    """Configs for a CompVis state dict, from its tensor shapes; refuse other model families clearly."""
    other = describe_unsupported(state)
    if other:
        raise _unsupported(path, other)
    parts = split_components(state)
    notes: list[str] = []
    family, unet = detect_unet(parts.unet, path, notes)
    scale = state.get("scale_factor")
    if scale is not None and np.size(scale) != 1:
        raise _unsupported(path, f"a scale_factor buffer of shape {limits.short(np.shape(scale))} "
                                 "(expected one number)")
    vae = detect_vae(parts.vae, path, notes, None if scale is None else float(np.asarray(scale).reshape(())))
    text = detect_text(parts.text, parts.text_format, path)
    if unet.cross_attention_dim != text.hidden_size:
        raise _unsupported(path, f"a UNet with {unet.cross_attention_dim}-wide context but a "
                                 f"{text.hidden_size}-wide text encoder")
    if family.startswith("v2"):
        notes.append("2.x-style checkpoint: assumed epsilon prediction (SD 2.0/2.1-base); for a 768-v model pass "
                     "config= (its v2-inference-v.yaml or a diffusers folder)")
    return Architecture(family, unet, vae, text, dict(SD_V1_SCHEDULER), tuple(notes))


# ---------------------------------------------------------------------------------------------
# config= overrides: a diffusers folder or an original CompVis YAML
# ---------------------------------------------------------------------------------------------

def configs_from_ldm_yaml(data: Mapping[str, Any], where: Any = "the YAML config") -> Architecture:
    """Map an ldm ``v1-inference.yaml``-style dict onto sd_jax configs (like diffusers' converter)."""
    def get(node: Any, *keys: str, default: Any = ...) -> Any:
        for i, key in enumerate(keys):
            if not isinstance(node, Mapping) or key not in node:
                if default is not ...:
                    return default
                raise ValueError(f"{where}: missing {'.'.join(keys[:i + 1])} (expected an ldm config such as "
                                 "v1-inference.yaml)")
            node = node[key]
        return node

    def sizes(node: Any, key: str) -> Any:
        """A size or list of sizes that is multiplied or divided by: checked first (320 * "3e8" is a string)."""
        value = get(node, key)
        values = value if isinstance(value, (list, tuple)) else [value]
        if not 1 <= len(values) <= 64 or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 16
                                             for v in values):
            raise ValueError(f"{where}: {key}={limits.short(value)} is not valid; "
                             "expected positive integers up to 65536")
        return value

    params = get(data, "model", "params")
    if "network_config" in params or "conditioner_config" in params:
        raise _unsupported(where, "an SDXL-style (sgm) config with network_config/conditioner_config")
    unet_p = get(params, "unet_config", "params")
    if not unet_p.get("use_spatial_transformer", True) or unet_p.get("num_classes") is not None:
        raise _unsupported(where, "a UNet config without cross-attention or with class conditioning")
    mults = list(sizes(unet_p, "channel_mult"))
    channels = tuple(sizes(unet_p, "model_channels") * m for m in mults)
    resolutions = list(get(unet_p, "attention_resolutions"))
    attends = [2 ** i in resolutions for i in range(len(mults))]
    heads = unet_p.get("num_heads", -1)
    heads = (tuple(c // sizes(unet_p, "num_head_channels") for c in channels) if heads in (-1, None) else heads)
    context = get(unet_p, "context_dim")
    res = get(unet_p, "num_res_blocks")
    depth = unet_p.get("transformer_depth", 1)
    unet = UNetConfig(
        in_channels=get(unet_p, "in_channels"), out_channels=get(unet_p, "out_channels"),
        block_out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        layers_per_block=tuple(res) if isinstance(res, (list, tuple)) else res,
        num_attention_heads=heads, cross_attention_dim=context[0] if isinstance(context, list) else context,
        transformer_layers_per_block=tuple(depth) if isinstance(depth, (list, tuple)) else depth,
        use_linear_projection=bool(unet_p.get("use_linear_in_transformer", False)),
        only_cross_attention=_bools(unet_p.get("disable_self_attentions") or False),
        sample_size=params.get("image_size", 64))
    first = get(params, "first_stage_config", "params")
    dd = get(first, "ddconfig")
    if get(dd, "attn_resolutions", default=[]) or not get(dd, "double_z", default=True):
        raise _unsupported(where, "a VAE with attention outside its middle block or without double_z")
    if first.get("embed_dim", dd.get("z_channels")) != get(dd, "z_channels"):
        raise _unsupported(where, "a VAE whose embed_dim differs from z_channels")
    vae_channels = tuple(sizes(dd, "ch") * m for m in sizes(dd, "ch_mult"))
    vae = VAEConfig(in_channels=get(dd, "in_channels"), out_channels=get(dd, "out_ch"),
                    block_out_channels=vae_channels, layers_per_block=get(dd, "num_res_blocks"),
                    latent_channels=get(dd, "z_channels"),
                    scaling_factor=float(params.get("scale_factor", 0.18215)),
                    sample_size=int(params.get("image_size", 64)) * 2 ** (len(vae_channels) - 1))
    target = str(get(params, "cond_stage_config", "target"))
    if target.endswith("FrozenOpenCLIPEmbedder"):
        layer = get(params, "cond_stage_config", "params", "layer", default="last")
        text = CLIPTextConfig(**{**OPEN_CLIP_H_TEXT, "num_hidden_layers": 23 if layer == "penultimate" else 24})
    elif target.endswith("FrozenCLIPEmbedder"):
        text = CLIPTextConfig.sd_v1()
    else:
        raise _unsupported(where, f"text encoder {target} (sd_jax has CLIP ViT-L/14 and OpenCLIP ViT-H/14)")
    schedule = params.get("beta_schedule", "linear")
    if schedule != "linear":
        raise _unsupported(where, f"beta_schedule {limits.short(schedule)} (SD uses ldm's 'linear', "
                                  "diffusers' scaled_linear)")
    scheduler = {**SD_V1_SCHEDULER, "beta_start": float(params.get("linear_start", 0.0001)),
                 "beta_end": float(params.get("linear_end", 0.02)),
                 "num_train_timesteps": int(params.get("timesteps", 1000)),
                 "prediction_type": "v_prediction" if params.get("parameterization") == "v" else "epsilon"}
    family = ("v2" if unet.cross_attention_dim == 1024 else "v1") + (
        "-inpainting" if unet.in_channels == 9 else "")
    return Architecture(family, unet, vae, text, scheduler)


def _bools(value: Any) -> bool | tuple[bool, ...]:
    """One bool or a per-block tuple of bools (ldm writes lists)."""
    return tuple(bool(v) for v in value) if isinstance(value, (list, tuple)) else bool(value)


def read_config_override(config: str | Path) -> tuple[Architecture, Path | None]:
    """``config=``: a diffusers folder (its config.json files) or an ldm YAML -> (Architecture, tokenizer dir)."""
    from sd_jax.convert.diffusers import component_folder, read_json

    path = Path(config).expanduser()
    if path.is_dir():
        readers = {"unet": UNetConfig.from_diffusers, "vae": VAEConfig.from_diffusers,
                   "text_encoder": CLIPTextConfig.from_transformers}
        cfgs = {}
        for name, reader in readers.items():
            file = component_folder(path, name) / "config.json"
            cfgs[name] = read_config(reader, read_json(file), file)
        sched_file = path / "scheduler" / "scheduler_config.json"
        scheduler = read_json(sched_file) if sched_file.is_file() else dict(SD_V1_SCHEDULER)
        tok = path / "tokenizer"
        family = ("v2" if cfgs["unet"].cross_attention_dim == 1024 else "v1") + (
            "-inpainting" if cfgs["unet"].in_channels == 9 else "")
        arch = Architecture(family, cfgs["unet"], cfgs["vae"], cfgs["text_encoder"], scheduler)
        return arch, tok if tok.is_dir() else None
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        from sd_jax.limits import read_yaml_file  # size, nesting and alias expansion bounded, one-line errors

        data = read_yaml_file(path, f"config {path}")
        try:
            return configs_from_ldm_yaml(data, path), None
        except (TypeError, KeyError) as err:
            raise ValueError(f"{path}: not an ldm model config "
                             f"({type(err).__name__}: {limits.short_error(err)})") from None
    raise ValueError(f"config={str(config)!r} must be a diffusers model folder (with unet/, vae/, text_encoder/ "
                     "config.json files) or an original CompVis .yaml such as v1-inference.yaml")


# ---------------------------------------------------------------------------------------------
# Reading a single file
# ---------------------------------------------------------------------------------------------

def compvis_to_diffusers(state: Mapping[str, np.ndarray], arch: Architecture | None = None, *,
                         use_ema: bool = True, path: Any = "checkpoint",
                         notes: list[str] | None = None) -> tuple[Architecture, dict[str, dict[str, np.ndarray]]]:
    """A CompVis state dict -> (architecture, {"unet", "vae", "text_encoder": diffusers-named state}).

    ``arch`` None detects the architecture from shapes. Arrays are not copied (only renamed;
    OpenCLIP's fused q/k/v are split into views).
    """
    notes = [] if notes is None else notes
    other = describe_unsupported(state)
    if other:
        raise _unsupported(path, other)
    if arch is None:
        arch = detect_architecture(state, path)
    notes.extend(arch.notes)
    parts = split_components(state)
    if parts.unknown:
        raise WeightMismatchError(f"{path}: entries that are not part of an SD model\n"
                                  + listing("not recognised", parts.unknown)
                                  + "\n(expected model.diffusion_model.*, first_stage_model.*, "
                                    "cond_stage_model.*, model_ema.* and schedule buffers)")
    if parts.ignored:
        notes.append(f"ignored {len(parts.ignored)} non-weight entries: {', '.join(sorted(parts.ignored)[:8])}"
                     + (" ..." if len(parts.ignored) > 8 else ""))
    unet = select_unet_weights(parts, use_ema, notes)
    unet = {k[len(UNET_PREFIX):]: v for k, v in unet.items()}
    vae = {k[len(VAE_PREFIX):]: v for k, v in parts.vae.items()}
    states = {"unet": rename_keys(unet, unet_prefix_table(arch.unet), to_diffusers=True, what="UNet"),
              "vae": rename_keys(vae, vae_prefix_table(arch.vae), to_diffusers=True, what="VAE")}
    if parts.text_format == "clip":
        states["text_encoder"] = clip_from_compvis(parts.text)
    elif parts.text_format == "open_clip":
        states["text_encoder"], dropped = open_clip_from_compvis(parts.text, arch.text_encoder.num_hidden_layers)
        if dropped:
            notes.append(f"OpenCLIP: the text encoder uses {arch.text_encoder.num_hidden_layers} layers; "
                         f"{len(dropped)} weights of later layers were not loaded")
    else:
        raise _unsupported(path, "a file without a text encoder (no cond_stage_model.*)")
    return arch, states


def read_single_file(path: str | Path, *, use_ema: bool = True, config: str | Path | None = None):
    """A CompVis ``.ckpt`` / ``.safetensors`` file -> :class:`sd_jax.convert.model_files.ModelFiles`.

    ``.ckpt`` files go through the restricted unpickler (Lightning objects become inert
    placeholders, nothing is imported or run). ``use_ema`` picks a full-EMA file's EMA UNet
    weights; ``config`` (a diffusers folder or an ldm YAML) replaces shape detection.
    """
    path = Path(path)
    override, tokenizer_dir = read_config_override(config) if config is not None else (None, None)
    weights = read_weight_file(path, strict=False)
    state, skipped = weights.tensors, weights.skipped
    del weights
    notes: list[str] = []
    if skipped:
        notes.append(f"skipped {len(skipped)} non-tensor entries of the checkpoint")
    arch, states = compvis_to_diffusers(state, override, use_ema=use_ema, path=path, notes=notes)
    del state  # unused tensors (e.g. the raw UNet when EMA is loaded) can be freed now
    configs = {"text_encoder": arch.text_encoder, "unet": arch.unet, "vae": arch.vae}
    if config is None:
        notes.insert(0, f"detected a {arch.family} checkpoint")
    for note in notes:
        log.info("%s: %s", path.name, note)
    pad = "!" if arch.text_encoder.hidden_act == "gelu" else None  # SD 2.x (OpenCLIP) pads with "!"
    return ModelFiles(configs=configs, states=states, scheduler_config=dict(arch.scheduler),
                      tokenizer_dir=tokenizer_dir, source=str(path), notes=notes, pad_token=pad)


# ---------------------------------------------------------------------------------------------
# Writing: diffusers-named states -> one CompVis state dict
# ---------------------------------------------------------------------------------------------

def diffusers_to_compvis(states: Mapping[str, Mapping[str, np.ndarray]], unet_cfg: UNetConfig,
                         vae_cfg: VAEConfig, text_cfg: CLIPTextConfig) -> dict[str, np.ndarray]:
    """{"unet", "vae", "text_encoder": diffusers-named torch-layout arrays} -> CompVis single-file keys."""
    if text_cfg.hidden_act != "quick_gelu":
        raise ValueError("only CLIP ViT-L-style (quick_gelu) text encoders can be written in the CompVis layout; "
                         "an OpenCLIP (SD 2.x) text encoder's last layer is not part of the model; use "
                         "save_pretrained (a diffusers folder) instead")
    out: dict[str, np.ndarray] = {}
    for key, value in rename_keys(states["unet"], unet_prefix_table(unet_cfg), to_diffusers=False,
                                  what="UNet").items():
        out[UNET_PREFIX + key] = value
    for key, value in rename_keys(states["vae"], vae_prefix_table(vae_cfg), to_diffusers=False,
                                  what="VAE").items():
        out[VAE_PREFIX + key] = value
    for key, value in states["text_encoder"].items():
        name = key[len("text_model."):] if key.startswith("text_model.") else key
        out[CLIP_PREFIX + "text_model." + name] = value
    return out
