"""Limits on what reading a file may cost, and the one way to echo a value from a file into a message.

Every reader in ``sd_jax.convert`` works within these bounds, checked before (or while) the work
is done, so a file of a few hundred bytes can neither hang a load nor grow it by gigabytes:

* ``short(value)`` (from ``sd_jax.limits``): the text of any value for an error message, at most
  ``ECHO_CHARS`` characters, built without ever calling ``repr`` on the whole value.
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
import re
from typing import Any, Callable

import numpy as np

from sd_jax.limits import ECHO_CHARS, short  # noqa: F401  (the one bounded echo, re-exported for convert/)

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
