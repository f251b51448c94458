"""Parameter shapes of a module, traced once and then read from disk.

Loading needs every parameter's shape and dtype to fill the tree strictly. Getting them
means tracing ``module.init`` (``jax.eval_shape``), which for the three SD models takes
seconds, the largest part of a load after the copy of the weights. The result depends only
on the module (class, config, dtypes, options), the JAX version and sd_jax's model code, so
it is stored as JSON under ``<cache root>/shapes/<key>.json`` with all of these in the key:
a changed config or model file gets a new entry, never a stale one.

The cache root is the compilation cache's parent (``~/.cache/sd_jax``), and it is off
whenever the compilation cache is (``SD_JAX_COMPILATION_CACHE=0``). An unreadable or
inconsistent entry is ignored and rewritten.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax

from sd_jax._runtime import compilation_cache_dir

_MODELS_DIR = Path(__file__).resolve().parent / "models"


@functools.lru_cache(maxsize=1)
def _model_code_digest() -> str:
    """Digest of sd_jax's model source files: parameter shapes are a function of this code."""
    h = hashlib.sha256()
    for path in sorted(_MODELS_DIR.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def cache_dir() -> Path | None:
    """``<cache root>/shapes``, or None when caching is off."""
    root = compilation_cache_dir()
    return None if root is None else root.parent / "shapes"


def cache_key(module: Any, example_inputs: tuple[Any, ...]) -> str:
    """Everything the traced shapes depend on, hashed."""
    inputs = [(tuple(x.shape), str(x.dtype)) for x in example_inputs]
    text = json.dumps([type(module).__module__, type(module).__qualname__, repr(module), inputs,
                       jax.__version__, _model_code_digest()])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _to_json(params: Any) -> list:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return [[[k.key for k in path], list(leaf.shape), str(leaf.dtype)] for path, leaf in leaves]


def _from_json(entries: list) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, shape, dtype in entries:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.ShapeDtypeStruct(tuple(shape), jax.numpy.dtype(dtype))
    return tree


def param_shapes(module: Any, *example_inputs: Any) -> dict[str, Any]:
    """Parameter shapes/dtypes (``jax.ShapeDtypeStruct`` leaves) of a module, nothing allocated."""
    folder = cache_dir()
    path = None if folder is None else folder / f"{cache_key(module, example_inputs)}.json"
    if path is not None and path.is_file():
        try:
            return _from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            pass  # unreadable entry: trace again and rewrite it
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs))["params"]
    if path is not None:
        _write_atomically(path, json.dumps(_to_json(params)))
    return params


def _write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half an entry."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the trace next time
