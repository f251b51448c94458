"""LoRA Dreambooth: low-rank adapters train over the frozen starting model (Hu et al. 2021, "LoRA").

With ``config.lora.enabled`` the train step (:mod:`sd_jax.dreambooth.step`) trains only the
adapters; the rest of the trainer (prior preservation, shardings, checkpoints, resume, logs,
samples, non-finite handling) is the full fine-tune's, over a smaller trainable tree::

    trainable, frozen = split_params(pipe.params, config)   # {"unet": adapters, ...}, {"unet": base, ...}
    unet_params = merge(frozen["unet"], trainable["unet"], config.lora.scale)   # inside the loss

Adapters. For each targeted kernel ``K`` (Flax layout: linear ``(in, out)``, convolution
``(kh, kw, in, out)``) the adapter tree holds, at ``K``'s module path, ``{"down", "up"}``:

- ``down``: ``K.shape[:-1] + (r,)``, a layer ``in -> r`` with K's kernel size, drawn as kohya
  and PEFT draw it (kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)));
- ``up``: ``(1,) * (K.ndim - 2) + (r, out)``, a 1x1 layer ``r -> out``, zeros (so update 0
  starts from the starting model exactly);

and the module runs unchanged with ``K' = K + (alpha / r) * down @ up`` (contracting ``r``), merged
inside the loss, so gradients reach only ``down`` and ``up``. In PyTorch's layout these are PEFT's
``lora_A`` / ``lora_B`` weights and kohya's ``lora_down`` / ``lora_up`` (:func:`to_lora_adapter`).
The frozen weights may be stored in bfloat16 (``lora.base_dtype``); samples and the export merge
the adapters into the float32 starting weights, as diffusers' ``load_lora_weights`` does.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.convert.core import flatten_tree, flax_path_to_torch_name, flax_to_torch_array, unflatten_tree
from sd_jax.dreambooth.config import TrainConfig

# Target groups -> the PyTorch module names (diffusers / transformers) of the layers they adapt.
UNET_TARGETS = {
    "attention": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "proj": r"\.attentions\.\d+\.(proj_in|proj_out)",
    "ff": r"\.ff\.net\.(0\.proj|2)",
    "conv": r"(\.resnets\.\d+\.(conv1|conv2|conv_shortcut)|\.(downsamplers|upsamplers)\.\d+\.conv)",
}
TEXT_ENCODER_TARGETS = {
    "attention": r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "mlp": r"\.mlp\.(fc1|fc2)",
}
TEXT_MODEL_PREFIX = "text_model."  # transformers' CLIPTextModel names (sd_jax.models.clip.TEXT_MODEL_PREFIX)
PEFT_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(folder) looks for
KOHYA_FILE = "kohya_lora.safetensors"         # AUTOMATIC1111, ComfyUI (lora_unet_... / lora_te_... keys)
STORAGE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def module_name(component: str, path: tuple[str, ...]) -> str:
    """The PyTorch module name of a Flax kernel path (``...to_q``, ``text_model.encoder...q_proj``)."""
    name = flax_path_to_torch_name(path).removesuffix(".weight")
    return TEXT_MODEL_PREFIX + name if component == "text_encoder" else name


def target_paths(component: str, params: Mapping[str, Any], groups: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The kernel paths of ``params`` (one component's tree) the target ``groups`` adapt, sorted."""
    table = UNET_TARGETS if component == "unet" else TEXT_ENCODER_TARGETS
    pattern = re.compile("(" + "|".join(table[g] for g in groups) + ")$")
    return sorted(path for path in flatten_tree(params) if path[-1] == "kernel"
                  and pattern.search("." + module_name(component, path)))


def components(config: TrainConfig) -> dict[str, tuple[str, ...]]:
    """The adapted components and their target groups: the UNet, and the text encoder when it trains."""
    out = {"unet": config.lora.targets}
    if config.train.train_text_encoder:
        out["text_encoder"] = config.lora.text_encoder_targets
    return out


def init_adapters(component: str, params: Mapping[str, Any], groups: tuple[str, ...], rank: int,
                  seed: int) -> dict[str, Any]:
    """Fresh float32 adapters (numpy; the same on every process) for one component's kernels."""
    flat = flatten_tree(params)
    paths = target_paths(component, params, groups)
    if not paths:
        raise ValueError(f"lora targets {list(groups)} match no layer of the {component.replace('_', ' ')}")
    rng = np.random.default_rng([seed, 0x10A, ("unet", "text_encoder").index(component)])
    out = {}
    for path in paths:
        shape = tuple(flat[path].shape)  # arrays or ShapeDtypeStructs (an estimate allocates nothing)
        bound = 1.0 / math.sqrt(math.prod(shape[:-1]))  # fan_in = in * kh * kw
        out[path[:-1] + ("down",)] = rng.uniform(-bound, bound, shape[:-1] + (rank,)).astype(np.float32)
        out[path[:-1] + ("up",)] = np.zeros((1,) * (len(shape) - 2) + (rank, shape[-1]), np.float32)
    return unflatten_tree(out)


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def split_params(params: dict[str, Any], config: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pipeline parameters -> (adapters, frozen): ``trainable`` holds fresh adapters of the UNet (and
    of the text encoder when it trains); ``frozen`` the starting UNet (and text encoder, unless its
    embeddings are cached) in ``lora.base_dtype``, and the VAE unless latents are cached."""
    lo = config.lora
    trainable, frozen = {}, {}
    for name, groups in components(config).items():
        trainable[name] = init_adapters(name, params[name], groups, lo.rank, config.seed)
    base = STORAGE_DTYPES[lo.base_dtype]
    frozen["unet"] = _cast(params["unet"], base)
    if config.train.train_text_encoder or not config.data.cache_text_embeddings:
        frozen["text_encoder"] = _cast(params["text_encoder"], base)
    if not config.data.cache_latents:
        frozen["vae"] = params["vae"]
    return trainable, frozen


def _cast(tree: Any, dtype: Any) -> Any:
    if dtype == jnp.float32:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def delta(down: Any, up: Any, scale: float) -> Any:
    """``scale * down @ up`` contracting the rank: the change of the kernel, in its Flax layout (float32)."""
    xp = np if isinstance(down, np.ndarray) and isinstance(up, np.ndarray) else jnp
    up2 = up.reshape(up.shape[-2:])  # (r, out)
    return xp.float32(scale) * xp.tensordot(down.astype(xp.float32), up2.astype(xp.float32), axes=1)


def merge(base: Mapping[str, Any], adapters: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """``base`` with every adapted kernel replaced by ``K + scale * down @ up`` (float32); the other
    weights as they are. Pure (works on numpy arrays and inside jit); adapter paths must exist in base."""
    flat = flatten_tree(base)
    out = dict(flat)
    for path, leaf in flatten_tree(adapters).items():
        if path[-1] != "down":
            continue
        kernel = path[:-1] + ("kernel",)
        if kernel not in flat:
            raise ValueError(f"the adapter of {'/'.join(path[:-1])} has no kernel in the base weights")
        up = _get(adapters, path[:-1] + ("up",))
        k = flat[kernel]
        if tuple(k.shape) != tuple(leaf.shape[:-1]) + (up.shape[-1],):
            raise ValueError(f"adapter {'/'.join(path[:-1])}: down {tuple(leaf.shape)} @ up {tuple(up.shape)} "
                             f"does not fit the kernel {tuple(k.shape)}")
        out[kernel] = k.astype(np.float32) + delta(leaf, up, scale)
    return unflatten_tree(out)


def merged_params(starting: Mapping[str, Any], adapters: Mapping[str, Any], config: TrainConfig) -> dict[str, Any]:
    """The adapted components' weights with the adapters merged in (host float32 numpy), for samples and
    the export: ``{"unet", ["text_encoder"]}`` from the starting weights and host adapters."""
    host = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                                     else np.asarray(x), tree)
    return {name: merge(host(starting[name]), host(adapters[name]), config.lora.scale) for name in adapters}


def starting_weights_on_host(pipe: Any, adapted: Any) -> Any:
    """``pipe`` with the adapted components' starting weights moved to host memory: they serve samples and
    the export (merged with the adapters), while training reads the frozen copy on the devices."""
    params = {k: (jax.tree.map(np.asarray, jax.device_get(v)) if k in adapted else v) for k, v in pipe.params.items()}
    return dataclasses.replace(pipe, params=params)


# ---------------------------------------------------------------------------------------- files

def to_lora_adapter(adapters: Mapping[str, Any], config: TrainConfig) -> dict[str, dict[str, Any]]:
    """Host adapters -> :class:`sd_jax.lora.LoraAdapter` keyed by diffusers / transformers module names,
    in PyTorch's layout (``down`` (r, in[, kh, kw]), ``up`` (out, r[, 1, 1]))."""
    from sd_jax.lora import LoraLayer

    alpha = float(config.lora.alpha if config.lora.alpha is not None else config.lora.rank)
    out: dict[str, dict[str, Any]] = {}
    for component, tree in adapters.items():
        layers = out.setdefault(component, {})
        for path, down in flatten_tree(tree).items():
            if path[-1] != "down":
                continue
            up = _get(tree, path[:-1] + ("up",))
            name = module_name(component, path[:-1] + ("kernel",))
            layers[name] = LoraLayer(down=flax_to_torch_array(np.asarray(down, np.float32), "kernel"),
                                     up=flax_to_torch_array(np.asarray(up, np.float32), "kernel"), alpha=alpha)
    return out


def kohya_metadata(config: TrainConfig, steps: int) -> dict[str, str]:
    """kohya's ``ss_*`` training metadata (strings), as AUTOMATIC1111 and model sites read it."""
    res = config.data.resolution
    return {  # the network's own fields (ss_network_dim, ss_network_alpha, ...) come from save_lora
        "ss_resolution": f"({res}, {res})", "ss_sd_model_name": Path(str(config.model.path)).name[:200],
        "ss_max_train_steps": str(config.train.max_train_steps), "ss_steps": str(steps),
        "ss_learning_rate": str(config.optim.learning_rate), "ss_unet_lr": str(config.optim.learning_rate),
        "ss_text_encoder_lr": str(config.text_encoder_lr), "ss_seed": str(config.seed),
        "ss_prior_loss_weight": str(config.train.prior_loss_weight),
        # kohya's --clip_skip counts as AUTOMATIC1111's "Clip skip" (sd_jax's + 1); unset, it writes "None"
        "ss_clip_skip": str(config.train.clip_skip + 1) if config.train.clip_skip else "None",
        "ss_mixed_precision": config.train.mixed_precision, "ss_training_comment": "sd_jax Dreambooth LoRA",
    }


def save_adapters(adapters: Mapping[str, Any], folder: Path, config: TrainConfig, steps: int) -> list[Path]:
    """Write the adapters into ``folder`` in both formats users exchange: PEFT/diffusers
    (:data:`PEFT_FILE`) and kohya (:data:`KOHYA_FILE`, with ``ss_*`` metadata). Returns the paths."""
    from sd_jax.lora import save_lora

    adapter = to_lora_adapter(adapters, config)
    return [save_lora(adapter, Path(folder) / PEFT_FILE, format="peft", overwrite=True),
            save_lora(adapter, Path(folder) / KOHYA_FILE, format="kohya", metadata=kohya_metadata(config, steps),
                      overwrite=True)]
