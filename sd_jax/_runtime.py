"""Process-wide JAX settings sd_jax makes on import, each with an opt-out.

1. XLA:CPU: jax 0.10 sends every convolution and matmul to YNNPACK; for the SD
   UNet's shapes the Eigen path is faster (the README's CPU figures). sd_jax appends
   ``--xla_cpu_experimental_ynn_fusion_type=`` to ``XLA_FLAGS`` when JAX's
   backend is not yet initialised and the user has not set that flag.
   Opt out: ``SD_JAX_XLA_CPU_DEFAULTS=0``. The flag affects the CPU backend only.
2. The persistent compilation cache, on by default in
   ``$SD_JAX_COMPILATION_CACHE`` (default ``~/.cache/sd_jax/jax``); ``0``
   switches it off. A second process reuses the compiled sampler and UNet.
"""

from __future__ import annotations

import os
from pathlib import Path

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
DEFAULT_CACHE = Path.home() / ".cache" / "sd_jax" / "jax"


def _backend_initialised() -> bool:
    """True once JAX has created its backends (XLA_FLAGS are read then)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - layout of a future jax
        return False
    return bool(getattr(xla_bridge, "_backends", None))


def configure_xla_cpu() -> bool:
    """Route XLA:CPU convolutions to Eigen unless told otherwise; True if the flag was set."""
    if os.environ.get("SD_JAX_XLA_CPU_DEFAULTS", "1") == "0":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags or _backend_initialised():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}".strip()
    return True


def compilation_cache_dir() -> Path | None:
    """Where the persistent compilation cache lives, or None when switched off."""
    value = os.environ.get("SD_JAX_COMPILATION_CACHE")
    if value == "0":
        return None
    return Path(value).expanduser() if value else DEFAULT_CACHE


def configure_compilation_cache() -> Path | None:
    """Switch on JAX's persistent compilation cache unless the user chose otherwise."""
    import jax

    directory = compilation_cache_dir()
    if directory is None or jax.config.jax_compilation_cache_dir:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return directory
