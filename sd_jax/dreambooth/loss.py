"""Dreambooth losses: pure functions of predictions, targets and per-example masks.

The batch holds instance and class ("prior") examples in one array; a 0/1 mask
per row says which rows are prior examples and another which rows are real
(padding rows, added so the batch splits over the devices, have ``valid = 0``).
Everything is computed in float32 whatever the compute dtype.

SPEC §2 (Ruiz et al. 2022, eq. 2):
``loss = mse(eps(x_t, t, c_inst), ε) + λ · mse(eps(x'_t', t', c_class), ε')``,
each MSE a mean over its own examples' elements, as diffusers' train_dreambooth.py
computes it on the two halves of its batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def per_example_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """(B, ...) x (B, ...) -> (B,) mean squared error of each example, float32."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return err.reshape(err.shape[0], -1).mean(axis=1)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` over rows with mask 1; 0 when no row is selected."""
    total = jnp.sum(mask)
    return jnp.where(total > 0, jnp.sum(values * mask) / jnp.maximum(total, 1e-12), 0.0)


def diffusion_loss(pred: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Scalar MSE in float32: the mean over examples of (weight ·) each example's mean squared error.

    ``weights`` (B,) per-example weights (e.g. :func:`min_snr_weights`); None = 1.
    Without weights this is ``F.mse_loss(pred, target)``.
    """
    err = per_example_mse(pred, target)
    if weights is not None:
        err = err * weights.astype(jnp.float32)
    return err.mean()


def snr(alphas_cumprod: jax.Array, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) of each timestep, float32."""
    a = jnp.asarray(alphas_cumprod, jnp.float32)[t]
    return a / (1.0 - a)


def min_snr_weights(alphas_cumprod: jax.Array, t: jax.Array, gamma: float,
                    prediction_type: str = "epsilon") -> jax.Array:
    """Min-SNR-γ loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", eq. 9) for each timestep, (B,) float32.

    The weight of the x_0 loss is min(SNR, γ); expressed for the network's target:
    ε-prediction min(SNR, γ) / SNR, v-prediction min(SNR, γ) / (SNR + 1), x_0 min(SNR, γ)
    (diffusers' ``compute_snr`` recipe).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
    s = snr(alphas_cumprod, t)
    clipped = jnp.minimum(s, jnp.float32(gamma))
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped


def noise_with_offset(key: jax.Array, shape: tuple[int, ...], offset: float = 0.0) -> jax.Array:
    """Training noise ε ~ N(0, I) of ``shape`` (B, h, w, C), float32, plus
    ``offset · N(0, 1)`` per (example, channel) when offset > 0 (the "noise offset"
    of Guttenberg 2023, as diffusers adds it: ``noise += offset * randn(B, C, 1, 1)``)."""
    noise_key, offset_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, shape, jnp.float32)
    if offset:
        per_channel = jax.random.normal(offset_key, (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],),
                                        jnp.float32)  # (B, 1, 1, C)
        noise = noise + jnp.float32(offset) * per_channel
    return noise


def dreambooth_loss(pred: jax.Array, target: jax.Array, prior_mask: jax.Array | None = None,
                    prior_loss_weight: float = 1.0, weights: jax.Array | None = None,
                    valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Instance loss + λ · prior loss over one batch holding both kinds of rows.

    pred, target: (B, h, w, C). prior_mask: (B,) 1 for class (prior) rows, 0 for
    instance rows (None: all instance). weights: (B,) per-example loss weights
    (Min-SNR; applied to both halves). valid: (B,) 0 for padding rows.
    Returns ``(total, {"instance_loss", "prior_loss"})``, float32 scalars; each part
    is the mean over its own rows, so with equal halves it is exactly
    ``F.mse_loss`` of each half.
    """
    err = per_example_mse(pred, target)  # (B,)
    if weights is not None:
        err = err * weights.astype(jnp.float32)
    batch = err.shape[0]
    valid = jnp.ones((batch,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    prior = jnp.zeros((batch,), jnp.float32) if prior_mask is None else prior_mask.astype(jnp.float32)
    instance_loss = _masked_mean(err, valid * (1.0 - prior))
    prior_loss = _masked_mean(err, valid * prior)
    total = instance_loss + jnp.float32(prior_loss_weight) * prior_loss
    return total, {"instance_loss": instance_loss, "prior_loss": prior_loss}
