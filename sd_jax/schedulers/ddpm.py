"""DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models",
arXiv 2006.11239) and the forward-process helpers training uses.

Sampling: x_{t'} = μ̃(x_t, x̂_0) + sqrt(β̃) z with the posterior q(x_{t'} | x_t, x_0) of eq. 6-7
taken between consecutive *inference* timesteps t > t' (ᾱ_{t'} = 1 past the end), and
β̃ = (1 - ᾱ_{t'}) / (1 - ᾱ_t) · (1 - ᾱ_t/ᾱ_{t'}) ("fixed_small", clamped at 1e-20). No noise at
t = 0. Matches diffusers' `DDPMScheduler` (variance_type="fixed_small").

Training: `add_noise` (eq. 4), `get_velocity` (v-prediction target) and `training_target`
are the noise schedule's forward process, re-exported from `schedule`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import schedule
from ._common import f32, img2img_start, step_noise, x0_eps_from_alpha
from .schedule import add_noise, get_velocity, training_target  # noqa: F401  (training helpers)

# Per-step arrays (leading axis = loop index); padded together by `schedulers.pad_schedule`.
STEP_FIELDS = ("timesteps", "alpha_t", "alpha_prev", "noise_scale")


def epsilon_target(noise: jax.Array) -> jax.Array:
    """The ε-prediction training target is the noise itself (eq. 14, L_simple)."""
    return noise


@struct.dataclass
class DDPMState:
    timesteps: jax.Array  # (n,) int32: t given to the UNet at loop index i
    alpha_t: jax.Array  # (n,) f32: ᾱ_t
    alpha_prev: jax.Array  # (n,) f32: ᾱ of the next inference timestep, 1 after the last
    noise_scale: jax.Array  # (n,) f32: 1 where t > 0, else 0
    alphas_cumprod: jax.Array  # (T,) f32, for add_noise_at
    start_index: jax.Array  # () int32
    num_calls: jax.Array  # () int32: model calls of the schedule = the loop's end (arrays may be longer)
    prediction_type: str = struct.field(pytree_node=False)
    clip_sample: bool = struct.field(pytree_node=False)
    clip_sample_range: float = struct.field(pytree_node=False)


def create(
    config: schedule.NoiseScheduleConfig,
    num_inference_steps: int,
    shape: tuple[int, ...] | None = None,
    *,
    strength: float = 1.0,
) -> DDPMState:
    """Precomputes everything the loop needs (Python, not traced). `shape` is unused (no memory)."""
    n = schedule.check_num_inference_steps(config, num_inference_steps)
    timesteps = schedule.discrete_timesteps(config, n, config.resolved("timestep_spacing", "leading"))
    schedule.check_timesteps_in_range(config, timesteps, f"ddpm with {n} steps")
    ac = schedule.alphas_cumprod64(config)
    alpha_prev = np.concatenate([ac[timesteps[1:]], [1.0]])
    return DDPMState(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        alpha_t=jnp.asarray(ac[timesteps], jnp.float32),
        alpha_prev=jnp.asarray(alpha_prev, jnp.float32),
        noise_scale=jnp.asarray(timesteps > 0, jnp.float32),
        alphas_cumprod=jnp.asarray(ac, jnp.float32),
        start_index=jnp.asarray(img2img_start(n, strength), jnp.int32),
        num_calls=jnp.asarray(len(timesteps), jnp.int32),
        prediction_type=config.prediction_type,
        clip_sample=bool(config.resolved("clip_sample", True)),
        clip_sample_range=float(config.clip_sample_range),
    )


def init_noise_sigma(state: DDPMState) -> jax.Array:
    return jnp.float32(1.0)


def scale_model_input(state: DDPMState, sample: jax.Array, i) -> jax.Array:
    return sample


def step(state: DDPMState, model_output, i, sample, *, noise=None):
    """One ancestral step (eq. 6-7); needs `noise`, an N(0, I) draw."""
    z = step_noise(noise)
    if z is None:
        raise ValueError("ddpm is stochastic: step() needs noise= (an N(0, I) draw of the sample's shape)")
    x, m = f32(sample), f32(model_output)
    a_t, a_prev = state.alpha_t[i], state.alpha_prev[i]
    beta_prod_t, beta_prod_prev = 1.0 - a_t, 1.0 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1.0 - cur_alpha
    x0, _ = x0_eps_from_alpha(state.prediction_type, m, x, a_t)
    if state.clip_sample:
        x0 = jnp.clip(x0, -state.clip_sample_range, state.clip_sample_range)
    # μ̃_t = sqrt(ᾱ_{t'}) β_t / (1-ᾱ_t) x̂_0 + sqrt(α_t) (1-ᾱ_{t'}) / (1-ᾱ_t) x_t   (eq. 7)
    mean = (jnp.sqrt(a_prev) * cur_beta / beta_prod_t) * x0 + (jnp.sqrt(cur_alpha) * beta_prod_prev / beta_prod_t) * x
    variance = jnp.maximum(beta_prod_prev / beta_prod_t * cur_beta, 1e-20)
    prev = mean + state.noise_scale[i] * jnp.sqrt(variance) * z
    return prev.astype(sample.dtype), state


def add_noise_at(state: DDPMState, original, noise, index=None):
    """img2img start latents: q(x_t | x_0) at t = timesteps[index] (default: state.start_index)."""
    index = state.start_index if index is None else index
    return schedule.add_noise(state.alphas_cumprod, original, noise, state.timesteps[index])
