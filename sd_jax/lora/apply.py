"""Merge LoRA adapters into a pipeline's parameters: ``W' = W + sum_i scale_i * (alpha_i / rank_i) * up_i @ down_i``.

:func:`prepare` checks an adapter against a parameter tree, strictly (every module must be a layer of
the model, with the shape the adapter implies) and lays its factors out for the merge.
:class:`LoraStack` holds the loaded adapters of one pipeline and the original values of every
parameter they touch, so unloading restores the exact base. The merge is one jitted function whose
scales are a traced array: changing a scale never recompiles (a new set of adapters does, once).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.convert import core
from sd_jax.convert.limits import short
from sd_jax.lora.files import (COMPONENTS, ECHO, TEXT_PREFIX, LoraAdapter, LoraFormatError, module_names,
                               read_lora, short_hash)

Path_ = tuple[str, ...]
Factors = dict[str, dict[Path_, tuple[jax.Array, jax.Array]]]  # component -> kernel path -> (up, down)
CACHED_FILES = 16  # LoRA files whose prepared factors a pipeline keeps (requests naming the same files reuse them)


@dataclasses.dataclass
class LoadedLora:
    """One adapter loaded into a pipeline: where it came from, its scale, its file's short hash."""

    name: str
    source: str          # as the user named it (a path or a hub id)
    path: str            # the file read
    scale: float
    hash: str            # AUTOMATIC1111's short hash of the file
    factors: Factors = dataclasses.field(repr=False)

    @property
    def layers(self) -> int:
        return sum(len(f) for f in self.factors.values())

    def record(self) -> dict[str, Any]:
        """What an image's metadata says of it."""
        return {"name": self.name, "scale": self.scale, "hash": self.hash, "source": self.source}


def _torch_shape(path: Path_, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return core._torch_shape(path[-1], flax_shape)


def _fits(out_in: tuple[int, ...], torch_shape: tuple[int, ...]) -> bool:
    """A LoRA's (out, in[, kh, kw]) fits a weight of ``torch_shape``; 1x1 convs and linears are interchangeable."""
    squeeze = lambda s: s[:2] if len(s) == 4 and s[2:] == (1, 1) else s  # noqa: E731
    return squeeze(tuple(out_in)) == squeeze(tuple(torch_shape))


def prepare(adapter: LoraAdapter, params: Mapping[str, Any], source: str = "the LoRA") -> Factors:
    """Check an adapter against a pipeline's parameters and lay out its factors for :func:`merge`.

    Returns ``{component: {kernel path: (up (out, rank) * alpha / rank, down (rank, in[, kh, kw]))}}`` as
    float32 device arrays. Layers the model does not have, or with the wrong shape, are one error listing them.
    """
    unknown_components = [c for c in adapter if c not in COMPONENTS]
    if unknown_components:
        raise LoraFormatError(f"{source}: components {unknown_components} cannot take LoRA weights; valid: "
                              f"{', '.join(COMPONENTS)}")
    factors: Factors = {}
    missing, bad = [], []
    for component, layers in adapter.items():
        prefix = TEXT_PREFIX if component == "text_encoder" else ""
        kernels = {prefix + core.flax_path_to_torch_name(path)[:-len(".weight")]: (path, leaf)
                   for path, leaf in core.flatten_tree(params[component]).items() if path[-1] == "kernel"}
        for module, layer in layers.items():
            if module not in kernels:
                missing.append(f"{component}.{module}")
                continue
            path, leaf = kernels[module]
            torch_shape = _torch_shape(path, tuple(leaf.shape))
            if not _fits(layer.out_in, torch_shape):
                bad.append(f"{component}.{module}: the LoRA makes {layer.out_in}, the layer is {torch_shape}")
                continue
            up = np.asarray(layer.up, np.float32).reshape(layer.up.shape[0], layer.rank) * (layer.alpha / layer.rank)
            factors.setdefault(component, {})[path] = (jnp.asarray(up), jnp.asarray(layer.down, jnp.float32))
    if missing or bad:
        lines = [f"{source} does not fit this model"]
        if missing:
            lines.append(core.listing("layers the model does not have", missing))
        if bad:
            lines.append(core.listing("shape mismatches", bad))
        raise LoraFormatError("\n".join(lines))
    if not factors:
        raise LoraFormatError(f"{source} holds no layers")
    return factors


def _key(component: str, path: Path_) -> str:
    return "/".join((component, *path))


@jax.jit
def merge(originals: dict[str, jax.Array], factors: Sequence[dict[str, tuple[jax.Array, jax.Array]]],
          scales: jax.Array) -> dict[str, jax.Array]:
    """``{key: W}`` -> ``{key: W + sum_i scales[i] * up_i @ down_i}`` in each W's Flax layout and dtype.

    ``factors[i]``: adapter i's ``{key: (up (out, rank), down (rank, in[, kh, kw]))}`` (alpha / rank folded
    into up); ``scales``: (len(factors),) float32, traced.
    """
    out = {}
    for key, weight in originals.items():
        total = weight.astype(jnp.float32)
        for i, adapter in enumerate(factors):
            if key not in adapter:
                continue
            up, down = adapter[key]
            delta = jnp.matmul(up, down.reshape(down.shape[0], -1), precision=jax.lax.Precision.HIGHEST)
            delta = delta.reshape(up.shape[0], *down.shape[1:])        # (out, in[, kh, kw]) PyTorch layout
            total = total + scales[i] * core.torch_to_flax_array(delta, "kernel", weight.shape)
        out[key] = total.astype(weight.dtype)
    return out


def _replace(tree: Mapping[str, Any], path: Path_, value: Any) -> dict[str, Any]:
    """A copy of ``tree`` with the leaf at ``path`` replaced; the dicts off the path are shared."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _replace(tree[path[0]], path[1:], value)
    return out


def _leaf(tree: Mapping[str, Any], path: Path_) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _check_scale(scale: Any, name: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.number)) or not math.isfinite(scale):
        raise ValueError(f"LoRA {short(name, ECHO)}: scale {short(scale)} must be a finite number")
    return float(scale)


class LoraStack:
    """The adapters loaded into one pipeline, in load order, and the base values of what they change."""

    def __init__(self):
        self.loaded: dict[str, LoadedLora] = {}
        self.base: dict[str, dict[Path_, Any]] = {}   # component -> path -> the parameter before any LoRA
        self._files: collections.OrderedDict[tuple[str, int, int], tuple[Factors, str]] = collections.OrderedDict()

    # ------------------------------------------------------------------ reading
    def read(self, source: str | os.PathLike, params: Mapping[str, Any], *, weight_name: str | None = None,
             **hub_options: Any) -> tuple[Path, Factors, str]:
        """(file, prepared factors, short hash) of a LoRA file or hub id.

        A file is read, checked against the model and hashed once (kept by path, size and mtime).
        """
        path = resolve(source, weight_name=weight_name, **hub_options)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._files:
            names = {c: module_names(params[c], c) for c in COMPONENTS}
            adapter, _ = read_lora(path, names)
            self._files[key] = (prepare(adapter, params, short(os.fspath(source), ECHO)), short_hash(path))
            while len(self._files) > CACHED_FILES:
                self._files.popitem(last=False)
        self._files.move_to_end(key)
        factors, digest = self._files[key]
        return path, factors, digest

    def entry(self, source: str | os.PathLike, params: Mapping[str, Any], scale: float = 1.0,
              name: str | None = None, *, taken: Iterable[str] = (), **options: Any) -> LoadedLora:
        """A :class:`LoadedLora` of a file (not yet part of the stack); ``name`` defaults to the file's stem,
        made unique among the loaded adapters and ``taken``."""
        path, factors, digest = self.read(source, params, **options)
        name = name if name is not None else self.free_name(Path(path).stem, taken)
        scale = _check_scale(scale, name)
        return LoadedLora(name=name, source=os.fspath(source), path=str(path), scale=scale, hash=digest,
                          factors=factors)

    def entries(self, refs: Iterable[tuple[str, float]], params: Mapping[str, Any]) -> list[LoadedLora]:
        """Entries of ``(source, scale)`` pairs for one use (a request's LoRAs), each with a unique name."""
        out: list[LoadedLora] = []
        for source, scale in refs:
            out.append(self.entry(source, params, scale, taken=[e.name for e in out]))
        return out

    def free_name(self, stem: str, taken: Iterable[str] = ()) -> str:
        taken = set(self.loaded) | set(taken)
        name, n = stem, 2
        while name in taken:
            name, n = f"{stem}-{n}", n + 1
        return name

    # ------------------------------------------------------------------ stacking
    def add(self, entry: LoadedLora, params: Mapping[str, Any]) -> dict[str, Any]:
        """Add an adapter; returns the parameters with every loaded adapter merged."""
        if not isinstance(entry.name, str) or not entry.name:
            raise ValueError(f"a LoRA name must be a non-empty string, got {short(entry.name)}")
        if entry.name in self.loaded:
            raise ValueError(f"a LoRA named {short(entry.name, ECHO)} is already loaded (loaded: "
                             f"{', '.join(self.loaded)}); pass another name= or unload it first")
        self.loaded[entry.name] = entry
        try:
            return self.apply(params)
        except BaseException:
            del self.loaded[entry.name]
            raise

    def set_scale(self, name: str, scale: float, params: Mapping[str, Any]) -> dict[str, Any]:
        entry = self.get(name)
        old, entry.scale = entry.scale, _check_scale(scale, name)
        try:
            return self.apply(params)
        except BaseException:
            entry.scale = old
            raise

    def remove(self, name: str | None, params: Mapping[str, Any]) -> dict[str, Any]:
        """Unload one adapter (or all, ``name=None``); untouched parameters get back their exact base values."""
        if name is None:
            self.loaded.clear()
        else:
            del self.loaded[self.get(name).name]
        return self.apply(params)

    def get(self, name: Any) -> LoadedLora:
        name = getattr(name, "name", name)
        if name not in self.loaded:
            raise KeyError(f"no LoRA named {short(name, ECHO)} is loaded; loaded: "
                           f"{', '.join(self.loaded) or 'none'}")
        return self.loaded[name]

    def apply(self, params: Mapping[str, Any], extra: Iterable[LoadedLora] = ()) -> dict[str, Any]:
        """``params`` with the loaded adapters (and ``extra`` ones, not kept) merged into their base values.

        Without ``extra`` the stack remembers the base value of every parameter it changes and forgets
        those no adapter touches any more (they are restored to the very arrays they were).
        """
        extra = list(extra)
        entries = list(self.loaded.values()) + extra
        touched = {(c, p) for e in entries for c, f in e.factors.items() for p in f}
        remembered = {(c, p) for c, paths in self.base.items() for p in paths}
        originals = {(c, p): self.base[c][p] if (c, p) in remembered else _leaf(params[c], p)
                     for c, p in touched | remembered}
        merged = {}
        if touched:
            inputs = {_key(c, p): originals[(c, p)] for c, p in touched}
            factors = tuple({_key(c, p): f for c, paths in e.factors.items() for p, f in paths.items()}
                            for e in entries)
            scales = jnp.asarray([e.scale for e in entries], jnp.float32)
            out = merge(inputs, factors, scales)
            merged = {(c, p): out[_key(c, p)] for c, p in touched}
        result = dict(params)
        for (c, p), value in originals.items():
            result[c] = _replace(result[c], p, merged.get((c, p), value))
        if not extra:
            self.base = {}
            for c, p in touched:
                self.base.setdefault(c, {})[p] = originals[(c, p)]
        return result

    def records(self, extra: Iterable[LoadedLora] = ()) -> list[dict[str, Any]]:
        return [e.record() for e in list(self.loaded.values()) + list(extra)]


# ---------------------------------------------------------------------------------------------- hub ids

def resolve(source: str | os.PathLike, *, weight_name: str | None = None, **hub_options: Any) -> Path:
    """A LoRA file path, or a hub id whose LoRA file is fetched (or read from the cache offline)."""
    from sd_jax.convert.source import looks_like_hub_id

    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        candidates = ([path / weight_name] if weight_name else
                      [path / "pytorch_lora_weights.safetensors"] + sorted(path.glob("*.safetensors")))
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"LoRA folder {short(text, 200)} has no "
                                    f"{weight_name or 'pytorch_lora_weights.safetensors or other .safetensors'} file")
        return found
    if path.exists() or not looks_like_hub_id(text):
        if not path.is_file():
            raise FileNotFoundError(f"LoRA {short(text, 200)} does not exist: pass a .safetensors file, a folder "
                                    "holding one, or a hub id (user/repo)")
        return path
    return download(text, weight_name=weight_name, **hub_options)


def download(repo_id: str, *, weight_name: str | None = None, revision: str | None = None,
             token: str | bool | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch one LoRA file of a hub repository: ``weight_name``, else its only (or diffusers') .safetensors."""
    import huggingface_hub

    from sd_jax.convert.hub import HubDownloadError

    name = weight_name
    try:
        if name is None:
            files = huggingface_hub.HfApi(token=token).list_repo_files(repo_id, revision=revision)
            name = pick_file(files, repo_id)
        return Path(huggingface_hub.hf_hub_download(repo_id, name, revision=revision, token=token,
                                                    cache_dir=cache_dir))
    except HubDownloadError:
        raise
    except Exception as err:  # offline, not found, gated, network: try the cache
        try:
            if name is None:
                folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                                                local_files_only=True))
                name = pick_file([str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()], repo_id)
                return folder / name
            return Path(huggingface_hub.hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir,
                                                        local_files_only=True))
        except HubDownloadError:
            raise
        except Exception:
            raise HubDownloadError(f"cannot fetch the LoRA {repo_id!r} from the Hugging Face Hub "
                                   f"({type(err).__name__}) and it is not in the local cache: download the "
                                   ".safetensors file on a connected machine and pass its path") from None


def pick_file(files: Iterable[str], repo_id: str) -> str:
    """The LoRA file of a repository listing: diffusers' name, else its only top-level .safetensors."""
    from sd_jax.convert.hub import HubDownloadError

    files = list(files)
    if "pytorch_lora_weights.safetensors" in files:
        return "pytorch_lora_weights.safetensors"
    singles = sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))
    if len(singles) == 1:
        return singles[0]
    raise HubDownloadError(f"{repo_id}: {'no' if not singles else 'several'} top-level .safetensors LoRA files"
                           f"{' (' + ', '.join(singles[:6]) + ')' if singles else ''}; pass weight_name=")
