"""The optimizer: AdamW with schedules, global-norm clipping, a separately scheduled (and
optionally time-limited) text encoder, and the EMA of the weights.

``make_optimizer(config, trainable)`` returns one ``optax.GradientTransformation`` over the
trainable tree ``{"unet": ..., ["text_encoder": ...]}``::

    freeze text encoder gradients after N updates   (so they stop counting in the clip norm)
    -> clip_by_global_norm(max_grad_norm)            (over UNet and text encoder together, as diffusers)
    -> multi_transform: "unet" AdamW(lr schedule), "text_encoder" AdamW(its own lr schedule)
    -> freeze text encoder updates after N updates   (AdamW's momentum and weight decay would
                                                      otherwise keep moving the weights)

Gradient accumulation happens inside the train step (one call = one optimizer update,
see :mod:`sd_jax.dreambooth.step`), so the optimizer state holds no partial sums and
a checkpoint after any step resumes exactly. All schedules count optimizer updates.
The EMA of the weights is kept in the train state (:func:`ema_update`), updated after
every applied optimizer update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sd_jax.dreambooth.config import TrainConfig

GROUPS = ("unet", "text_encoder")


def lr_schedule(name: str, peak: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """Learning rate at optimizer update ``count`` (0-based).

    constant: ``peak``. warmup: linear from 0 to ``peak`` over ``warmup_steps``, then
    constant. cosine: the warm-up, then cosine decay to 0 at ``total_steps``. linear:
    the warm-up, then linear decay to 0 at ``total_steps``.
    """
    if name == "constant":
        return optax.constant_schedule(peak)
    warm = optax.linear_schedule(0.0, peak, warmup_steps) if warmup_steps else None
    decay_steps = max(total_steps - warmup_steps, 1)
    if name == "warmup":
        after = optax.constant_schedule(peak)
    elif name == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=0.0)
    elif name == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    else:
        raise ValueError(f"lr_schedule={name!r} is not one of constant, warmup, cosine, linear")
    if warm is None:
        return after
    return optax.join_schedules([warm, after], [warmup_steps])


def until(schedule: optax.Schedule, steps: int | None) -> optax.Schedule:
    """``schedule`` for the first ``steps`` updates, 0 afterwards (None: always ``schedule``)."""
    if steps is None:
        return schedule
    return lambda count: jnp.where(count < steps, schedule(count), 0.0)


def lr_schedules(config: TrainConfig) -> dict[str, optax.Schedule]:
    """The learning-rate schedule of each trainable group ("unet", and "text_encoder" when trained)."""
    o, t = config.optim, config.train
    out = {"unet": lr_schedule(o.lr_schedule, o.learning_rate, t.max_train_steps, o.warmup_steps)}
    if t.train_text_encoder:
        te = lr_schedule(o.lr_schedule, config.text_encoder_lr, t.max_train_steps, o.warmup_steps)
        out["text_encoder"] = until(te, t.text_encoder_steps)
    return out


class FreezeState(NamedTuple):
    count: jax.Array  # updates seen


def freeze_group_after(group: str, steps: int) -> optax.GradientTransformation:
    """Zero the updates of the top-level subtree ``group`` from update ``steps`` on (0-based)."""

    def init(params):
        del params
        return FreezeState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        keep = state.count < steps
        updates = dict(updates)
        updates[group] = jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)), updates[group])
        return updates, FreezeState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_optimizer(config: TrainConfig, trainable_params: Any) -> optax.GradientTransformation:
    """The optimizer for ``trainable_params`` (``{"unet", ["text_encoder"]}``), see the module doc."""
    groups = tuple(trainable_params)
    for g in groups:
        if g not in GROUPS:
            raise ValueError(f"trainable parameter group {g!r} is not one of {GROUPS}")
    if "unet" not in groups:
        raise ValueError("the trainable parameters must contain 'unet'")
    if ("text_encoder" in groups) != config.train.train_text_encoder:
        raise ValueError(f"trainable groups {groups} do not match train.train_text_encoder="
                         f"{config.train.train_text_encoder}")
    o = config.optim
    schedules = lr_schedules(config)

    def adamw(schedule):
        return optax.adamw(schedule, b1=o.adam_beta1, b2=o.adam_beta2, eps=o.adam_epsilon,
                           weight_decay=o.weight_decay)

    steps = config.train.text_encoder_steps
    freeze = "text_encoder" in groups and steps is not None
    chain = []
    if freeze:
        chain.append(freeze_group_after("text_encoder", steps))
    if o.max_grad_norm is not None:
        chain.append(optax.clip_by_global_norm(o.max_grad_norm))
    chain.append(optax.multi_transform({g: adamw(schedules[g]) for g in groups}, {g: g for g in groups}))
    if freeze:
        chain.append(freeze_group_after("text_encoder", steps))
    return optax.chain(*chain)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """One EMA step of the weights: ``ema ← decay · ema + (1 - decay) · params`` (float32)."""
    d = jnp.float32(decay)
    return jax.tree.map(lambda e, p: (d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)).astype(e.dtype),
                        ema, params)
