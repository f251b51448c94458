"""Safety-checker weights: diffusers/transformers names onto sd_jax's SafetyChecker tree.

transformers >= 5 saves the tower without its inner ``vision_model.``;
:func:`normalise_safety_checker_keys` accepts both spellings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sd_jax.convert.limits import short
from sd_jax.convert.core import (WeightMismatchError, all_finite, flatten_tree, load_state_dict, non_finite_error,
                                 unflatten_tree)

TOWER_PREFIX = "vision_model.vision_model."
# PyTorch buffers safety-checker files may carry (not weights): skipped and reported.
TORCH_BUFFERS = (r"vision_model\.vision_model\.embeddings\.position_ids",)
# Parameters whose PyTorch name is not "<module path>.weight/bias": Flax path <-> PyTorch name.
BARE_PARAMETERS = {
    ("vision_model", "vision_model", "embeddings", "class_embedding"):
        "vision_model.vision_model.embeddings.class_embedding",
    ("concept_embeds",): "concept_embeds",
    ("special_care_embeds",): "special_care_embeds",
    ("concept_embeds_weights",): "concept_embeds_weights",
    ("special_care_embeds_weights",): "special_care_embeds_weights",
}


def normalise_safety_checker_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """Bring transformers >= 5's ``vision_model.X`` to the Hub's ``vision_model.vision_model.X``.

    Keys already in the Hub's spelling, and the top-level parameters, are kept;
    a name that would then appear twice raises a ``ValueError`` naming it.
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        name = key
        if key.startswith("vision_model.") and not key.startswith(TOWER_PREFIX):
            name = TOWER_PREFIX + key[len("vision_model."):]
        if name in out:
            raise ValueError(f"safety checker state dict has {short(name)} in both the transformers 4 "
                             f"spelling and the transformers 5 one ({short(key)})")
        out[name] = value
    return out


def safety_checker_state_to_params(state: Mapping[str, Any], shapes: Mapping[str, Any],
                                   ) -> tuple[dict[str, Any], list[str]]:
    """Fill :func:`abstract_params`' tree from a diffusers safety-checker state dict, strictly.

    Maps :data:`BARE_PARAMETERS` here and every other name by ``convert.core``'s
    rule; skips :data:`TORCH_BUFFERS` (returned as the second value). Raises
    ``convert.core.WeightMismatchError`` listing every missing, unexpected and
    mis-shaped name at once. Returns numpy arrays in each target leaf's dtype.
    """
    state = normalise_safety_checker_keys(state)
    flat_shapes = flatten_tree(shapes)
    bare_params, problems = {}, []
    for path, name in BARE_PARAMETERS.items():
        spec = flat_shapes.pop(path, None)
        if spec is None:
            raise ValueError(f"the parameter tree has no {'/'.join(path)}: not a SafetyChecker's tree")
        if name not in state:
            problems.append(f"missing from the file: {name}")
            continue
        array = np.asarray(state[name])
        if array.shape != tuple(spec.shape):
            problems.append(f"shape mismatch: {name}: file has {array.shape}, model expects "
                            f"{tuple(spec.shape)}")
            continue
        bare_params[path] = array.astype(spec.dtype)
        if not all_finite(bare_params[path]):
            raise non_finite_error("safety checker", [name])
    rest = {k: v for k, v in state.items() if k not in BARE_PARAMETERS.values()}
    try:
        params, skipped = load_state_dict(unflatten_tree(flat_shapes), rest, what="safety checker",
                                          ignore=TORCH_BUFFERS)
    except WeightMismatchError as err:
        if problems:
            raise WeightMismatchError("\n".join([str(err)] + problems)) from None
        raise
    if problems:
        raise WeightMismatchError("the safety checker weights do not match the safety checker "
                                  "configuration\n" + "\n".join(problems))
    return unflatten_tree({**flatten_tree(params), **bare_params}), skipped


