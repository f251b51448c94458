"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", arXiv 2010.02502).

Matches diffusers' `DDIMScheduler`: the previous timestep is t - T // steps whatever the
spacing, and past t = 0 the "previous" ᾱ is `final_alpha_cumprod` (ᾱ_0 for SD v1,
whose config has set_alpha_to_one=False).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import schedule
from ._common import f32, img2img_start, step_noise, x0_eps_from_alpha

# Per-step arrays (leading axis = loop index); padded together by `schedulers.pad_schedule`.
STEP_FIELDS = ("timesteps", "alpha_t", "alpha_prev")


@struct.dataclass
class DDIMState:
    timesteps: jax.Array  # (n,) int32: t given to the UNet at loop index i
    alpha_t: jax.Array  # (n,) f32: ᾱ_t
    alpha_prev: jax.Array  # (n,) f32: ᾱ_{t - T//steps}, or final_alpha_cumprod past 0
    alphas_cumprod: jax.Array  # (T,) f32, for add_noise_at
    eta: jax.Array  # () f32: η of eq. 16 (0 = deterministic DDIM, 1 = DDPM-like)
    start_index: jax.Array  # () int32: first loop index (0 for txt2img)
    num_calls: jax.Array  # () int32: model calls of the schedule = the loop's end (arrays may be longer)
    prediction_type: str = struct.field(pytree_node=False)
    clip_sample: bool = struct.field(pytree_node=False)
    clip_sample_range: float = struct.field(pytree_node=False)
    stochastic: bool = struct.field(pytree_node=False)  # eta > 0: step needs noise


def create(
    config: schedule.NoiseScheduleConfig,
    num_inference_steps: int,
    shape: tuple[int, ...] | None = None,
    *,
    strength: float = 1.0,
    eta: float = 0.0,
) -> DDIMState:
    """Precomputes everything the loop needs (Python, not traced). `shape` is unused (no memory)."""
    n = schedule.check_num_inference_steps(config, num_inference_steps)
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta={eta!r} must be in [0, 1]")
    T = config.num_train_timesteps
    spacing = config.resolved("timestep_spacing", "leading")
    timesteps = schedule.discrete_timesteps(config, n, spacing)
    schedule.check_timesteps_in_range(config, timesteps, f"ddim with {n} steps")
    ac = schedule.alphas_cumprod64(config)
    final = 1.0 if config.resolved("set_alpha_to_one", True) else ac[0]
    prev = timesteps - T // n
    alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    return DDIMState(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        alpha_t=jnp.asarray(ac[timesteps], jnp.float32),
        alpha_prev=jnp.asarray(alpha_prev, jnp.float32),
        alphas_cumprod=jnp.asarray(ac, jnp.float32),
        eta=jnp.asarray(eta, jnp.float32),
        start_index=jnp.asarray(img2img_start(n, strength), jnp.int32),
        num_calls=jnp.asarray(len(timesteps), jnp.int32),
        prediction_type=config.prediction_type,
        clip_sample=bool(config.resolved("clip_sample", True)),
        clip_sample_range=float(config.clip_sample_range),
        stochastic=float(eta) > 0.0,
    )


def init_noise_sigma(state: DDIMState) -> jax.Array:
    return jnp.float32(1.0)


def scale_model_input(state: DDIMState, sample: jax.Array, i) -> jax.Array:
    return sample


def step(state: DDIMState, model_output, i, sample, *, noise=None):
    """x_{t-Δ} from x_t (DDIM eq. 12), returns (prev_sample, state)."""
    x, m = f32(sample), f32(model_output)
    a_t, a_prev = state.alpha_t[i], state.alpha_prev[i]
    x0, eps = x0_eps_from_alpha(state.prediction_type, m, x, a_t)
    if state.clip_sample:
        x0 = jnp.clip(x0, -state.clip_sample_range, state.clip_sample_range)
    # σ_t(η)² = η² (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · (1 - ᾱ_t / ᾱ_{t-1})   (eq. 16)
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = state.eta * jnp.sqrt(variance)
    # eq. 12: sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z
    prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - std**2) * eps
    z = step_noise(noise)
    if z is None and state.stochastic:
        raise ValueError("ddim with eta > 0 needs noise= (an N(0, I) draw of the sample's shape) in step()")
    if z is not None:
        prev = prev + std * z
    return prev.astype(sample.dtype), state


def add_noise_at(state: DDIMState, original, noise, index=None):
    """img2img start latents: q(x_t | x_0) at t = timesteps[index] (default: state.start_index)."""
    index = state.start_index if index is None else index
    return schedule.add_noise(state.alphas_cumprod, original, noise, state.timesteps[index])
