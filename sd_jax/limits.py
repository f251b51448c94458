"""Bounds on what a user or a stranger can hand sd_jax, in one place, and the helpers that enforce them.

Every bound admits every real SD 1.x/2.x model (and SDXL-sized ones) with wide headroom; a value
past one is refused with a ``ValueError`` naming the field, a short prefix of the value and the
valid range, before anything is allocated. The README's safety section lists the same numbers.

Documents (recipes, ``--set`` values, ldm model YAMLs) are read by :func:`load_yaml`: at most
:data:`MAX_DOCUMENT_BYTES`, nesting at most :data:`MAX_NESTING` deep, and at most
:data:`MAX_NODES` values after alias expansion (``*name`` counts the whole subtree it repeats, so a
"billion laughs" document is refused while it is read, in milliseconds). Error messages echo values
through :func:`short` (at most :data:`ECHO_CHARS` characters, whatever the value's size or depth).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np
import yaml

ECHO_CHARS = 80  # longest echo of a user value in an error message

# ------------------------------------------------------------------------------ documents
MAX_DOCUMENT_BYTES = 1 << 20  # 1 MiB; a recipe is ~2 KB, v1-inference.yaml ~2 KB
MAX_NESTING = 64              # lists/mappings inside each other; recipes use 3, ldm YAMLs 7
MAX_NODES = 100_000           # values after alias expansion; a recipe has ~60

# ------------------------------------------------------------------ model architectures
# Largest accepted value of each size (the smallest is 1 unless the config says otherwise).
# Real values for comparison: SD 1.x / SD 2.x / SDXL.
CLIP_TEXT = {
    "vocab_size": 1 << 20,             # 49408 / 49408 / 49408
    "max_position_embeddings": 8192,   # 77
    "hidden_size": 8192,               # 768 / 1024 / 1280
    "num_hidden_layers": 128,          # 12 / 23-24 / 32
    "num_attention_heads": 256,        # 12 / 16 / 20
    "intermediate_size": 65536,        # 3072 / 4096 / 5120
}
UNET = {
    "blocks": 8,                       # len(block_out_channels): 4 / 4 / 3
    "block_out_channels": 8192,        # each: at most 1280
    "layers_per_block": 16,            # 2
    "num_attention_heads": 256,        # 8 / 5-20 / 5-20
    "transformer_layers_per_block": 64,  # 1 / 1 / 10
    "in_channels": 64,                 # 4, 9 (inpainting), 5 (depth), 8 (pix2pix)
    "out_channels": 64,                # 4
    "cross_attention_dim": 16384,      # 768 / 1024 / 2048
    "norm_num_groups": 1024,           # 32
    "time_embedding_dim": 32768,       # 1280
    "sample_size": 4096,               # latent pixels: 64 / 96 / 128
}
VAE = {
    "blocks": 8,                       # 4
    "block_out_channels": 8192,        # each: at most 512
    "layers_per_block": 16,            # 2
    "in_channels": 64,                 # 3
    "out_channels": 64,                # 3
    "latent_channels": 64,             # 4 (16 in SD3)
    "norm_num_groups": 1024,           # 32
    "sample_size": 16384,              # image pixels: 512 / 768 / 1024
}
MAX_SCALING_FACTOR = 100.0           # VAE latent scale: 0.18215 / 0.18215 / 0.13025 (SD3 1.5305)
MAX_NORM_EPS = 1.0                   # 1e-5, 1e-6
MAX_FREQ_SHIFT = 1000.0              # UNet time embedding shift: 0 or 1

# ----------------------------------------------------------------------- noise schedules
MAX_TRAIN_TIMESTEPS = 100_000        # 1000 in every SD
MAX_SIGMA = 1e8                      # largest σ_t = sqrt((1 - ᾱ_t) / ᾱ_t): 14.6 (SD), 2e4 (cosine, T=1000)

# ------------------------------------------------------------------ Dreambooth run config
MAX_TRAIN_STEPS = 2**31 - 1          # the optimizer's update count is an int32
MAX_RESOLUTION = 8192                # training images (SD 1.x: 512, SDXL: 1024)
MAX_BATCH = 65536                    # examples per micro-batch, micro-batches per update, sampling batch
MAX_SAMPLING_STEPS = 10_000          # class images and validation samples (at most T anyway)
MAX_CLASS_IMAGES = 1_000_000         # per concept
MAX_CHECKPOINTS_KEPT = 10_000
MAX_SEED = 2**32 - 1


# ---------------------------------------------------------------------------------- echoes

def short(value: Any, limit: int = ECHO_CHARS) -> str:
    """A bounded repr of ``value``: at most ``limit`` characters, in time bounded by ``limit``.

    Strings and bytes are cut before ``repr``; containers show their first items, a few levels
    deep (shared or nested values cost no more than flat ones); big integers show their size;
    arrays their shape and dtype; any other object only its type name (its ``__repr__`` never runs).
    """
    parts: list[str] = []
    _short_into(value, parts, [limit + 1], depth=3)
    text = "".join(parts)
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def short_path(path: Any, limit: int = ECHO_CHARS) -> str:
    """A file path quoted, at most ``limit`` characters: a long one keeps its end (the file's name)."""
    text = str(path)
    if len(text) > limit:
        text = "..." + text[-(limit - 3):]
    return repr(text)


def _short_into(value: Any, parts: list[str], budget: list[int], depth: int) -> None:
    """Append pieces of value's text to parts while budget[0] (characters left) is positive."""
    if budget[0] <= 0:
        return
    text = _short_scalar(value, budget[0])
    if text is None:
        if isinstance(value, (tuple, list, set, frozenset, dict)):
            _short_container(value, parts, budget, depth)
            return
        text = f"<{type(value).__name__}>"
    parts.append(text)
    budget[0] -= len(text)


def _short_scalar(value: Any, room: int) -> str | None:
    """The text of a value that is not a container, or None for containers."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return repr(int(value)) if value.bit_length() <= 64 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, (str, bytes, bytearray)):
        cut = value[:room]
        return repr(cut) + ("..." if len(value) > room else "")
    if isinstance(value, np.ndarray):
        return f"<array {value.dtype} {value.shape}>" if value.ndim <= 8 else f"<array {value.dtype} ndim={value.ndim}>"
    if isinstance(value, os.PathLike):
        return _short_scalar(os.fspath(value), room)
    return None


def _short_container(value: Any, parts: list[str], budget: list[int], depth: int) -> None:
    """Append a container's opening, first items and closing to parts."""
    kind = type(value)
    opening, closing = (("(", ")") if isinstance(value, tuple) else ("[", "]") if isinstance(value, list)
                        else ("{", "}"))
    if kind not in (tuple, list, set, frozenset, dict):
        opening = f"{kind.__name__}({opening}"
        closing += ")"
    if depth <= 0:
        parts.append(opening + "..." + closing)
        budget[0] -= len(parts[-1])
        return
    parts.append(opening)
    budget[0] -= len(opening)
    items = value.items() if isinstance(value, dict) else value
    for i, item in enumerate(items):
        if budget[0] <= 0 or i >= 8:
            parts.append(", ..." if i else "...")
            budget[0] -= 5
            break
        if i:
            parts.append(", ")
            budget[0] -= 2
        if isinstance(value, dict):
            _short_into(item[0], parts, budget, depth - 1)
            parts.append(": ")
            budget[0] -= 2
            _short_into(item[1], parts, budget, depth - 1)
        else:
            _short_into(item, parts, budget, depth - 1)
    if isinstance(value, tuple) and len(value) == 1:
        parts.append(",")
    parts.append(closing)
    budget[0] -= len(closing) + 1


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` on one line (whitespace runs become one space), cut to at most ``limit`` characters."""
    text = " ".join(text[: 4 * limit].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------ checks

def check_int(owner: str, name: str, value: Any, low: int, high: int) -> None:
    """``value`` is an int (not a bool) in [low, high], else a ValueError naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{owner}.{name}={short(value)} is not valid; expected an integer in [{low}, {high}]")


def check_number(owner: str, name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    """``value`` is a finite real number (not a bool; numpy's too) in [low, high] (``(low, high]`` with
    ``low_open``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ValueError(f"{owner}.{name}={short(value)} is not valid; expected a finite number in "
                         f"{'(' if low_open else '['}{low:g}, {high:g}]")


# ------------------------------------------------------------------------------- YAML

class DocumentTooLarge(ValueError):
    """A YAML/JSON document is past one of the limits above."""


try:  # libyaml's scanner and parser (10x faster); the composer that counts is PyYAML's, in Python
    from yaml.cyaml import CParser as _Parser

    def _init_parser(loader: Any, stream: str) -> None:
        _Parser.__init__(loader, stream)
except ImportError:  # PyYAML built without libyaml
    from yaml.parser import Parser as _Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, _Parser):  # type: ignore[no-redef]
        pass

    def _init_parser(loader: Any, stream: str) -> None:
        Reader.__init__(loader, stream)
        Scanner.__init__(loader)
        yaml.parser.Parser.__init__(loader)


class _BoundedLoader(yaml.composer.Composer, _Parser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """``yaml.safe_load``'s loader, counting nesting and alias-expanded values while composing."""

    def __init__(self, stream: str, max_depth: int, max_nodes: int):
        _init_parser(self, stream)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        yaml.composer.Composer.__init__(self)
        self._max_depth, self._max_nodes = max_depth, max_nodes
        self._depth = self._nodes = 0
        self._sizes: dict[str, int] = {}  # anchor -> values it stands for, aliases expanded

    def _count(self, n: int, event: Any) -> None:
        self._nodes += n
        if self._nodes > self._max_nodes:
            raise DocumentTooLarge(f"more than {self._max_nodes} values once aliases (*name) are expanded "
                                   f"(line {event.start_mark.line + 1})")

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.anchors and event.anchor not in self._sizes:
                raise DocumentTooLarge(f"alias *{clip(event.anchor, 40)} refers to a value that contains it "
                                       f"(line {event.start_mark.line + 1})")
            self._count(self._sizes.get(event.anchor, 0), event)
            return super().compose_node(parent, index)  # an undefined alias is PyYAML's error
        if self._depth >= self._max_depth:
            raise DocumentTooLarge(f"nested more than {self._max_depth} levels deep "
                                   f"(line {event.start_mark.line + 1})")
        before = self._nodes
        self._count(1, event)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if event.anchor is not None:
            self._sizes[event.anchor] = self._nodes - before
        return node


def load_yaml(text: str | bytes, what: str, *, max_bytes: int = MAX_DOCUMENT_BYTES,
              max_depth: int = MAX_NESTING, max_nodes: int = MAX_NODES) -> Any:
    """``yaml.safe_load(text)`` within the document limits; any failure is one ``ValueError`` that
    starts with ``what`` (e.g. ``"config file 'a.yaml'"``) and echoes nothing long."""
    if len(text) > max_bytes:
        raise DocumentTooLarge(f"{what} is {len(text)} bytes; at most {max_bytes} are read")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{what} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    loader = _BoundedLoader(text, max_depth, max_nodes)
    try:
        return loader.get_single_data()
    except DocumentTooLarge as err:
        raise DocumentTooLarge(f"{what} is refused: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{what} is not valid YAML: {clip(str(err), 300)}") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise ValueError(f"{what} has a value Python cannot read: {clip(str(err), 120)}") from None
    finally:
        loader.dispose()


def read_yaml_file(path: Any, what: str | None = None, **limits: int) -> Any:
    """:func:`load_yaml` of a file, whose size is checked before it is read."""
    from pathlib import Path

    path = Path(path)
    what = what or f"YAML file {short(str(path))}"
    max_bytes = limits.get("max_bytes", MAX_DOCUMENT_BYTES)
    size = path.stat().st_size
    if size > max_bytes:
        raise DocumentTooLarge(f"{what} is {size} bytes; at most {max_bytes} are read")
    with path.open("rb") as f:
        data = f.read(max_bytes + 1)
    return load_yaml(data, what, **limits)
