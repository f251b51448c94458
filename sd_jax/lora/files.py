"""LoRA files: the adapter value, reading (format detected from the keys) and writing (PEFT or kohya).

An adapter is ``{"unet" | "text_encoder": {module name: LoraLayer}}``; module names are the
PyTorch names of the adapted layers without ``.weight`` (diffusers' UNet names; transformers'
``CLIPTextModel`` names, with their ``text_model.`` prefix). A layer's weight change is
``scale * (alpha / rank) * up @ down`` (reshaped for convolutions).

Formats read:

- kohya / AUTOMATIC1111 (``lora_unet_<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``;
  ``lora_te_<name>...``): the name is the module name with every ``.`` written ``_``. It is resolved
  against the model's own module names when they are given (``module_names``), else against the
  vocabulary of SD v1.x module names (:data:`WORDS`); a name that resolves to no module, or to two,
  is an error listing it. LoCon convolutions (3x3 down, 1x1 up) included.
- diffusers / PEFT (``unet.<name>.lora_A.weight``, ``.lora_B.weight``, ``text_encoder.<name>...``),
  with the ranks and alphas of diffusers' ``lora_adapter_metadata`` when the file has it, and the
  older diffusers names (``<name>.lora.down.weight``, ``.lora_linear_layer.down.weight``,
  ``attn1.processor.to_q_lora.down.weight``, ``self_attn.to_q_lora.down.weight``).

Every key must be understood: LyCORIS LoHa/LoKr, DoRA and LoRA biases are refused by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sd_jax.convert.core import listing
from sd_jax.convert.limits import short

COMPONENTS = ("unet", "text_encoder")
TEXT_PREFIX = "text_model."  # transformers' CLIPTextModel names; sd_jax's parameter tree starts below it
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
PEFT_FILE_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")
ECHO = 120  # characters of a key shown in an error

LoraAdapter = dict[str, dict[str, "LoraLayer"]]


class LoraFormatError(ValueError):
    """A LoRA file that sd_jax cannot read, or whose keys do not match the model."""


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One adapted layer, in PyTorch layout.

    ``down``: linear (rank, in), conv (rank, in, kh, kw); ``up``: linear (out, rank), conv
    (out, rank, 1, 1); the weight change is ``(alpha / rank) * up @ down``.
    """

    down: np.ndarray
    up: np.ndarray
    alpha: float

    def __post_init__(self):
        down, up = np.asarray(self.down), np.asarray(self.up)
        ok = (down.ndim in (2, 4) and up.ndim == down.ndim and up.shape[1] == down.shape[0]
              and (up.ndim == 2 or up.shape[2:] == (1, 1)))
        if not ok:
            raise LoraFormatError(f"a LoRA layer needs down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]); "
                                  f"got down {down.shape} and up {up.shape}")
        if not (isinstance(self.alpha, (int, float, np.number)) and np.isfinite(self.alpha) and self.alpha > 0):
            raise LoraFormatError(f"a LoRA layer's alpha must be a positive number, got {short(self.alpha)}")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def out_in(self) -> tuple[int, ...]:
        """The PyTorch shape of the layer's weight: (out, in) or (out, in, kh, kw)."""
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self, dtype: Any = np.float32) -> np.ndarray:
        """(alpha / rank) * up @ down in the layer weight's PyTorch layout."""
        up = np.asarray(self.up, dtype).reshape(self.up.shape[0], self.rank)
        down = np.asarray(self.down, dtype).reshape(self.rank, -1)
        return ((self.alpha / self.rank) * (up @ down)).reshape(self.out_in)


# ---------------------------------------------------------------------------------------------- reading

def read_lora(path: str | os.PathLike, module_names: Mapping[str, Collection[str]] | None = None
              ) -> tuple[LoraAdapter, dict[str, str]]:
    """A LoRA file -> (adapter, the file's metadata); the format is detected from the keys.

    ``module_names``: ``{"unet" | "text_encoder": the model's module names}`` against which kohya's
    underscore names are resolved (:func:`module_names` of a parameter tree gives them); without it
    they are resolved against the SD v1.x vocabulary (:data:`WORDS`).
    """
    tensors, metadata = read_tensors(path)
    return parse_state_dict(tensors, metadata, module_names, source=os.fspath(path)), metadata


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a .safetensors (or torch zip .pt/.ckpt/.bin) LoRA file."""
    from sd_jax.convert.files import read_weight_file

    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise LoraFormatError(f"{short(str(path), 200)}: a LoRA file ends in {', '.join(SUFFIXES)}")
    weights = read_weight_file(path, strict=True)
    return weights.tensors, dict(weights.metadata)


def detect_format(keys: Iterable[str]) -> str:
    """'kohya' (lora_unet_/lora_te_ keys) or 'peft' (diffusers/PEFT names); raises for anything else."""
    keys = list(keys)
    if not keys:
        raise LoraFormatError("the file holds no tensors: it is not a LoRA")
    kohya = [k for k in keys if k.startswith(tuple(KOHYA_PREFIXES))]
    if kohya and len(kohya) == len(keys):
        return "kohya"
    if kohya:
        raise LoraFormatError(f"the file mixes kohya keys ({short(kohya[0], ECHO)}) with others "
                              f"({short(next(k for k in keys if k not in kohya), ECHO)})")
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        raise LoraFormatError("this is an SDXL LoRA (lora_te1_/lora_te2_ keys); sd_jax runs SD v1.x")
    return "peft"


def parse_state_dict(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None,
                     module_names: Mapping[str, Collection[str]] | None = None, *, source: str = "the LoRA"
                     ) -> LoraAdapter:
    """A LoRA state dict (either format) -> adapter; every key must be understood."""
    kind = detect_format(tensors)
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown: list[str] = []
    split = _kohya_key if kind == "kohya" else _peft_key
    for key, value in tensors.items():
        got = split(key)
        if got is None:
            unknown.append(key)
            continue
        component, module, role = got
        slot = parts.setdefault((component, module), {})
        if role in slot:
            raise LoraFormatError(f"{source}: two tensors give the {role} of {short(module, ECHO)} "
                                  f"(one is {short(key, ECHO)})")
        slot[role] = np.asarray(value)
    if unknown:
        raise LoraFormatError(f"{source}: {listing('keys that are not LoRA down/up/alpha weights', unknown)}\n"
                              "sd_jax reads LoRA (kohya, diffusers/PEFT); LoHa/LoKr, DoRA and LoRA biases are not "
                              "supported")
    incomplete = [f"{c}.{m}" for (c, m), slot in parts.items() if not {"down", "up"} <= set(slot)]
    if incomplete:
        raise LoraFormatError(f"{source}: {listing('layers without both down and up weights', incomplete)}")
    if kind == "kohya":
        parts = _resolve_kohya(parts, module_names, source)
    alphas = _peft_alphas(metadata or {}) if kind == "peft" else {}
    adapter: LoraAdapter = {}
    for (component, module), slot in parts.items():
        rank = slot["down"].shape[0]
        if "alpha" in slot:
            alpha = float(np.asarray(slot["alpha"], np.float64).reshape(-1)[0])
        else:
            alpha = _pattern_alpha(alphas.get(component), module, rank)
        down, up = slot["down"], slot["up"]
        try:
            layer = LoraLayer(down=down, up=up, alpha=alpha)
        except LoraFormatError as err:
            raise LoraFormatError(f"{source}: {component} layer {short(module, ECHO)}: {err}") from None
        adapter.setdefault(component, {})[module] = layer
    return adapter


_PEFT_ROLES = (  # (suffix, role), longest first where one ends another
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)
# The oldest diffusers attention-processor names: <attention>.processor.to_q_lora.down.weight
_OLD_PROCESSOR = re.compile(r"(?P<attn>.*?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)"
                            r"\.weight")
_OLD_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _peft_key(key: str) -> tuple[str, str, str] | None:
    """'unet.<module>.lora_A.weight' (and the older spellings) -> (component, module, role)."""
    component, rest = "unet", key  # the oldest files name UNet modules without a prefix
    for name in COMPONENTS:
        if key.startswith(name + "."):
            component, rest = name, key[len(name) + 1:]
    if (old := _OLD_PROCESSOR.fullmatch(rest)) is not None:
        proj = old["proj"]
        if component == "text_encoder":
            module = f"{old['attn']}.{_OLD_TEXT[proj]}"
        else:
            module = f"{old['attn']}.{'to_out.0' if proj == 'to_out' else proj}"
        return component, module, old["role"]
    for suffix, role in _PEFT_ROLES:
        if rest.endswith(suffix):
            module = rest[:-len(suffix)].replace(".processor.", ".")
            if component == "text_encoder" and not module.startswith(TEXT_PREFIX):
                module = TEXT_PREFIX + module
            return component, module, role
    return None


def _kohya_key(key: str) -> tuple[str, str, str] | None:
    """'lora_unet_<name>.lora_down.weight' -> ("unet", "<name>", "down"); the name still has underscores."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            stem, _, role = key[len(prefix):].partition(".")
            roles = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
            return (component, stem, roles[role]) if role in roles and stem else None
    return None


# Module-name words of SD v1.x's UNet and CLIP text encoder that contain "_" (kohya writes every "." as "_").
WORDS = ("down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
         "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out",
         "time_embedding", "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
         "out_proj")


def kohya_name(module: str) -> str:
    """A module name as kohya writes it: every '.' an '_'."""
    return module.replace(".", "_")


def _vocabulary_name(stem: str) -> str:
    """kohya's underscore name -> a module name, joining SD v1.x's multi-word names (see WORDS)."""
    parts, words = stem.split("_"), sorted(WORDS, key=lambda w: -w.count("_"))
    out, i = [], 0
    while i < len(parts):
        for word in words:
            n = word.count("_") + 1
            if "_".join(parts[i:i + n]) == word:
                out.append(word)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def _resolve_kohya(parts: dict[tuple[str, str], dict[str, np.ndarray]],
                   module_names: Mapping[str, Collection[str]] | None, source: str
                   ) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Replace kohya's underscore names by module names; unmatched or ambiguous names are one error."""
    lookup: dict[str, dict[str, list[str]]] = {}
    for component, names in (module_names or {}).items():
        for name in names:
            lookup.setdefault(component, {}).setdefault(kohya_name(name), []).append(name)
    resolved, unmatched, ambiguous = {}, [], []
    for (component, stem), slot in parts.items():
        if module_names is None:
            resolved[(component, _vocabulary_name(stem))] = slot
            continue
        found = lookup.get(component, {}).get(stem, [])
        if len(found) == 1:
            resolved[(component, found[0])] = slot
        elif found:
            ambiguous.append(f"{stem} -> {' | '.join(found)}")
        else:
            unmatched.append(f"{next(p for p, c in KOHYA_PREFIXES.items() if c == component)}{stem}")
    if unmatched or ambiguous:
        lines = [f"{source}: kohya LoRA names that do not name one layer of this model"]
        if unmatched:
            lines.append(listing("matching no layer", unmatched))
        if ambiguous:
            lines.append(listing("matching several layers", ambiguous))
        raise LoraFormatError("\n".join(lines))
    return resolved


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """diffusers' ``lora_adapter_metadata`` (r, lora_alpha, alpha_pattern per component), if present."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    from sd_jax.convert.limits import load_json

    try:
        config = load_json(raw, DIFFUSERS_METADATA_KEY)
    except ValueError as err:
        raise LoraFormatError(f"the file's {DIFFUSERS_METADATA_KEY} is not JSON ({short(str(err))})") from None
    out: dict[str, dict[str, Any]] = {}
    for key, value in (config.items() if isinstance(config, dict) else ()):
        component, _, field = key.partition(".")
        if component in COMPONENTS and field in ("lora_alpha", "alpha_pattern", "r"):
            out.setdefault(component, {})[field] = value
    return out


def _pattern_alpha(config: Mapping[str, Any] | None, module: str, rank: int) -> float:
    """A PEFT layer's alpha: its alpha_pattern entry, else lora_alpha, else its rank (scale 1)."""
    if not config:
        return float(rank)
    bare = module[len(TEXT_PREFIX):] if module.startswith(TEXT_PREFIX) else module
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        body = pattern.lstrip("^")
        if any(re.fullmatch(rf"(.*\.)?{body}", name) for name in (module, bare)):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


def module_names(params: Mapping[str, Any], component: str) -> set[str]:
    """The PyTorch module names of a component's parameter tree (layers with a kernel)."""
    from sd_jax.convert import core

    prefix = TEXT_PREFIX if component == "text_encoder" else ""
    return {prefix + core.flax_path_to_torch_name(path)[:-len(".weight")]
            for path in core.flatten_tree(params) if path[-1] == "kernel"}


# ---------------------------------------------------------------------------------------------- writing

def save_lora(adapter: LoraAdapter, path: str | os.PathLike, format: str = "peft",
              metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write an adapter as a .safetensors file, atomically; refuses an existing file unless ``overwrite``.

    ``format="peft"``: the keys diffusers' ``StableDiffusionPipeline.save_lora_weights`` writes
    (``unet.<module>.lora_A.weight``, ``text_encoder.<module>.lora_A.weight``), which
    ``load_lora_weights`` and ComfyUI read; PEFT files carry no alphas (diffusers takes alpha = rank),
    so ``alpha / rank`` is folded into ``up``. ``format="kohya"``: ``lora_unet_``/``lora_te_`` keys with
    ``.alpha`` and kohya's ``ss_*`` metadata, which AUTOMATIC1111 and ComfyUI read.
    ``metadata`` is added to (and overrides) the file's own.
    """
    from sd_jax.convert.export import check_destination
    from sd_jax.convert.files import save_safetensors

    if format not in ("peft", "kohya"):
        raise ValueError(f"LoRA format {short(format)} is not supported; choose 'peft' or 'kohya'")
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{short(str(path), 200)}: LoRA files are written as .safetensors only; use a name "
                         f"ending in .safetensors (diffusers' name is {PEFT_FILE_NAME})")
    bad = [c for c in adapter if c not in COMPONENTS]
    if bad:
        raise ValueError(f"adapter components {bad} are not supported; valid: {', '.join(COMPONENTS)}")
    layers = [(c, m, layer) for c in COMPONENTS for m, layer in sorted(adapter.get(c, {}).items())]
    if not layers:
        raise ValueError("the adapter has no layers: nothing to save")
    check_destination(path, overwrite, folder=False)
    tensors = _kohya_tensors(layers) if format == "kohya" else _peft_tensors(layers)
    meta = _kohya_metadata(layers) if format == "kohya" else {"format": "pt"}
    meta.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, tensors, metadata=meta)
    return path


def _float32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array, np.float32))


def _peft_tensors(layers: list[tuple[str, str, LoraLayer]]) -> dict[str, np.ndarray]:
    out = {}
    for component, module, layer in layers:
        name = f"{component}.{module}"
        out[f"{name}.lora_A.weight"] = _float32(layer.down)
        out[f"{name}.lora_B.weight"] = _float32(np.asarray(layer.up, np.float32) * (layer.alpha / layer.rank))
    return out


def _kohya_tensors(layers: list[tuple[str, str, LoraLayer]]) -> dict[str, np.ndarray]:
    out = {}
    for component, module, layer in layers:
        prefix = next(p for p, c in KOHYA_PREFIXES.items() if c == component)
        name = prefix + kohya_name(module)
        out[f"{name}.lora_down.weight"] = _float32(layer.down)
        out[f"{name}.lora_up.weight"] = _float32(layer.up)
        out[f"{name}.alpha"] = np.asarray(layer.alpha, np.float32)
    return out


def _kohya_metadata(layers: list[tuple[str, str, LoraLayer]]) -> dict[str, str]:
    """kohya sd-scripts' ss_* fields that AUTOMATIC1111 and ComfyUI show or read."""
    def most_common(values):
        values = list(values)
        return max(set(values), key=values.count)

    components = {c for c, _, _ in layers}
    conv = [layer for _, _, layer in layers if layer.down.ndim == 4 and layer.down.shape[2:] != (1, 1)]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(most_common(layer.rank for _, _, layer in layers)),
        "ss_network_alpha": f"{most_common(layer.alpha for _, _, layer in layers):g}",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_training_comment": "written by sd_jax",
        "ss_network_args": json.dumps({"conv_dim": str(conv[0].rank), "conv_alpha": f"{conv[0].alpha:g}"}
                                      if conv else {}),
    }
    if components == {"unet"}:
        meta["ss_network_train_unet_only"] = "True"
    return meta


# ---------------------------------------------------------------------------------------------- hashes

def short_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's "Lora hashes" value: the first 12 hex digits of a sha256.

    For .safetensors the hash covers the tensor data after the header (A1111's and kohya's
    "addnet" hash, unchanged by metadata edits); for other files the whole file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if Path(path).suffix.lower() == ".safetensors":
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- command line

def parse_lora_arg(text: str) -> Any:
    """``FILE[:SCALE]`` (generate.py --lora) -> :class:`~sd_jax.request.LoraRef`; the scale defaults to 1.

    A path that itself holds a ':' (and exists) is taken whole.
    """
    from sd_jax.request import LoraRef

    path, sep, scale = text.rpartition(":")
    if not sep or Path(text).expanduser().exists():
        return LoraRef(text, 1.0)
    try:
        value = float(scale)
    except ValueError:
        raise ValueError(f"--lora {short(text, 200)}: give FILE or FILE:SCALE with SCALE a number "
                         f"(e.g. style.safetensors:0.7); {short(scale, 40)} is not a number") from None
    if not path:
        raise ValueError(f"--lora {short(text, 200)}: the file name is missing before ':'")
    return LoraRef(path, value)


def check_lora_source(source: str, flag: str = "--lora") -> None:
    """Refuse (before any model loads) a LoRA that is neither an existing file or folder nor a hub id."""
    from sd_jax.convert.source import looks_like_hub_id

    if not Path(source).expanduser().exists() and not looks_like_hub_id(source):
        raise FileNotFoundError(f"{flag} {short(source, 200)} does not exist: pass a LoRA .safetensors file, a "
                                "folder holding one, or a hub id (user/repo)")
