"""Euler: first-order solver of the probability-flow ODE dx/dσ = (x - x̂_0(x, σ)) / σ
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv 2206.00364, eq. 4 / Algorithm 1 without the 2nd-order correction and with S_churn = 0).

Matches diffusers' `EulerDiscreteScheduler` (s_churn = 0): fractional timesteps with the
default "linspace" spacing, inputs scaled by 1/sqrt(σ² + 1), optional Karras σ (eq. 5).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from . import schedule
from ._common import f32, img2img_start, x0_from_sigma

# Per-step arrays (leading axis = loop index); padded together by `schedulers.pad_schedule`.
STEP_FIELDS = ("timesteps", "sigmas")


@struct.dataclass
class EulerState:
    timesteps: jax.Array  # (n,) f32: t given to the UNet (fractional with "linspace")
    sigmas: jax.Array  # (n + 1,) f32, last 0
    init_sigma: jax.Array  # () f32
    start_index: jax.Array  # () int32
    num_calls: jax.Array  # () int32: model calls of the schedule = the loop's end (arrays may be longer)
    prediction_type: str = struct.field(pytree_node=False)


def create(
    config: schedule.NoiseScheduleConfig,
    num_inference_steps: int,
    shape: tuple[int, ...] | None = None,
    *,
    strength: float = 1.0,
) -> EulerState:
    """Precomputes the σ schedule (Python, not traced). `shape` is unused (no memory)."""
    n = schedule.check_num_inference_steps(config, num_inference_steps)
    ts, sigmas, init = schedule.sigma_schedule(config, n, config.resolved("timestep_spacing", "linspace"))
    return EulerState(
        timesteps=jnp.asarray(ts),
        sigmas=jnp.asarray(sigmas),
        init_sigma=jnp.asarray(init),
        start_index=jnp.asarray(img2img_start(n, strength), jnp.int32),
        num_calls=jnp.asarray(len(ts), jnp.int32),
        prediction_type=config.prediction_type,
    )


def init_noise_sigma(state: EulerState) -> jax.Array:
    return state.init_sigma


def scale_model_input(state: EulerState, sample: jax.Array, i) -> jax.Array:
    """x / sqrt(σ_i² + 1): the UNet was trained on variance-preserving inputs."""
    sigma = state.sigmas[i]
    return (f32(sample) / jnp.sqrt(sigma**2 + 1)).astype(sample.dtype)


def step(state: EulerState, model_output, i, sample, *, noise=None):
    """x_{i+1} = x_i + (σ_{i+1} - σ_i) d_i, d_i = (x_i - x̂_0) / σ_i. Deterministic (no noise)."""
    x, m = f32(sample), f32(model_output)
    sigma, sigma_next = state.sigmas[i], state.sigmas[i + 1]
    d = (x - x0_from_sigma(state.prediction_type, m, x, sigma)) / sigma
    prev = x + d * (sigma_next - sigma)
    return prev.astype(sample.dtype), state


def add_noise_at(state: EulerState, original, noise, index=None):
    """img2img start latents: x_0 + σ_index ε (default index: state.start_index)."""
    index = state.start_index if index is None else index
    return (f32(original) + f32(noise) * state.sigmas[index]).astype(original.dtype)
