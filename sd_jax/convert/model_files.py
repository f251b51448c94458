"""What every model source is read into (:class:`ModelFiles`), and the checks each config read passes.

Kept apart from ``source`` (which picks a reader) so that the readers (``diffusers``, ``compvis``)
can build a ModelFiles without importing the module that imports them.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from sd_jax.convert.limits import short, short_error

MODEL_KEYS = ("text_encoder", "unet", "vae")


@dataclasses.dataclass
class ModelFiles:
    """Everything read from a model source, before it becomes parameters."""

    configs: dict[str, Any]                 # {"text_encoder": CLIPTextConfig, "unet": UNetConfig, "vae": VAEConfig}
    states: dict[str, dict[str, np.ndarray]]  # diffusers/transformers-named state dicts
    scheduler_config: dict[str, Any]
    tokenizer_dir: Path | None
    source: str
    extra_dirs: dict[str, Path] = dataclasses.field(default_factory=dict)  # e.g. safety_checker
    notes: list[str] = dataclasses.field(default_factory=list)             # what was chosen/skipped
    pad_token: str | None = None  # for the packaged tokenizer when there is no folder ("!" for SD 2.x)


def read_config(reader: Callable[[Any], Any], data: Any, where: Path | str) -> Any:
    """Read a model config with ``reader``, naming the file in any error; non-finite numbers are refused."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: a model config must be a JSON object, not a {type(data).__name__}")
    try:
        config = reader(data)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{where}: {short_error(err, 500)}") from None
    check_finite_config(config, where)
    return config


def check_finite_config(config: Any, where: Any) -> None:
    """Refuse a config dataclass holding a NaN or infinite number (e.g. a VAE scaling_factor of NaN)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"{where}: {type(config).__name__}.{field.name}={short(value)} is not a finite number "
                             "(a NaN or infinite value would make every image black)")
