"""Limits on what reading a file may cost, and the one way to echo a value from a file into a message.

Every reader in ``sd_jax.convert`` works within these bounds, checked before (or while) the work
is done, so a file of a few hundred bytes can neither hang a load nor grow it by gigabytes:

* ``short(value)``: the text of any value for an error message, at most ``ECHO_CHARS`` characters,
  built without ever calling ``repr`` on the whole value (nested, shared or huge values included).
* ``load_json``: JSON text of at most ``MAX_JSON_BYTES``, nested at most ``MAX_NESTING`` deep
  (CompVis YAML configs go through ``sd_jax.limits.read_yaml_file``, which bounds size, nesting
  and alias expansion the same way).
* Pickles (see ``torch_pickle``): ``MAX_PICKLE_BYTES`` of pickle, ``MAX_PICKLE_OPCODES`` opcodes,
  ``MAX_NESTING`` levels, and an object graph whose full unfolding (what hashing, comparing or
  printing it walks) is at most ``unfolded_limit(opcodes)`` nodes.
* Bytes made in memory (storages read from an archive, strided tensors copied) at most
  ``materialised_limit(file size)``; a compressed archive member may inflate at most
  ``MAX_INFLATION_RATIO`` times its stored size.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import numpy as np

ECHO_CHARS = 80                 # the most characters of one value an error message shows
MAX_NESTING = 100               # containers inside containers (real checkpoints and configs: < 30)
MAX_JSON_BYTES = 64 << 20       # a config.json or an *.index.json (real ones: < 1 MB)
MAX_PICKLE_BYTES = 64 << 20     # a torch.save data.pkl (SD v1 full-EMA .ckpt: ~0.3 MB)
MAX_PICKLE_OPCODES = 2_000_000  # (~15 per tensor: SD v1 full-EMA .ckpt ~40k; scanning 2M takes ~2 s)
MAX_INFLATION_RATIO = 100       # inflated / stored bytes of a compressed member (torch.save stores, ratio 1)
MATERIALISED_ALLOWANCE = 256 << 20  # bytes a load may make beyond its file's size


class InputLimitError(ValueError):
    """An input exceeds a size, nesting or expansion limit; nothing large was built from it."""


def unfolded_limit(opcodes: int) -> int:
    """Nodes the full unfolding of a pickle's objects may have: 4 per opcode plus 1M (real files: ~1 per opcode)."""
    return 4 * opcodes + 1_000_000


def materialised_limit(file_size: int) -> int:
    """Bytes a load of a file of ``file_size`` bytes may make in memory: twice the file plus an allowance."""
    return 2 * file_size + MATERIALISED_ALLOWANCE


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


# ---------------------------------------------------------------------------------------------
# JSON and YAML
# ---------------------------------------------------------------------------------------------

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_nesting(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text (strings skipped), in one vectorised pass."""
    skeleton = _JSON_STRING.sub("", text)
    codes = np.frombuffer(skeleton.encode("utf-8", "replace"), dtype=np.uint8)
    steps = (np.isin(codes, (ord("["), ord("{"))).astype(np.int32)
             - np.isin(codes, (ord("]"), ord("}"))).astype(np.int32))
    return int(np.cumsum(steps).max(initial=0))


def load_json(text: str | bytes, where: Any, *, max_bytes: int = MAX_JSON_BYTES,
              object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """Parse JSON text of at most max_bytes, nested at most MAX_NESTING deep (both checked before parsing).

    Raises InputLimitError past a limit, UnicodeDecodeError / json.JSONDecodeError for bad text.
    """
    if len(text) > max_bytes:
        raise InputLimitError(f"{where}: {len(text)} bytes of JSON is over the {max_bytes}-byte limit")
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    depth = json_nesting(text)
    if depth > MAX_NESTING:
        raise InputLimitError(f"{where}: JSON nested {depth} deep; the limit is {MAX_NESTING}")
    return json.loads(text, object_pairs_hook=object_pairs_hook)


def short_error(err: BaseException, limit: int = 200) -> str:
    """An exception's message, bounded: its text argument cut to ``limit``, or its arguments via ``short``.

    ``str(err)`` is never called: for a KeyError it is the repr of the key, which may be unbounded.
    """
    args = err.args
    if len(args) == 1 and isinstance(args[0], str):
        text = args[0]
        return text if len(text) <= limit else text[: limit - 3] + "..."
    return short(args[0] if len(args) == 1 else args, limit) if args else type(err).__name__
