"""Euler ancestral: an Euler step down to σ_down followed by fresh noise of std σ_up, with
σ_up = sqrt(σ_{i+1}² (σ_i² - σ_{i+1}²) / σ_i²), σ_down = sqrt(σ_{i+1}² - σ_up²)
(k-diffusion `sample_euler_ancestral` / `get_ancestral_step`, eta = 1; the ancestral
sampling of DDPM, Ho et al. 2020, written in σ as in Karras et al. 2022).

Matches diffusers' `EulerAncestralDiscreteScheduler`. That class has no Karras option, so
`use_karras_sigmas` is ignored here too (diffusers' from_config drops the key).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from . import schedule
from ._common import f32, img2img_start, step_noise, x0_from_sigma
from .euler import add_noise_at, init_noise_sigma, scale_model_input  # noqa: F401  (same as Euler)

# Per-step arrays (leading axis = loop index); padded together by `schedulers.pad_schedule`.
STEP_FIELDS = ("timesteps", "sigmas")


@struct.dataclass
class EulerAncestralState:
    timesteps: jax.Array  # (n,) f32: t given to the UNet
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
) -> EulerAncestralState:
    """Precomputes the σ schedule (Python, not traced). `shape` is unused (no memory)."""
    n = schedule.check_num_inference_steps(config, num_inference_steps)
    if config.prediction_type == "sample":
        raise ValueError("euler_a supports prediction_type 'epsilon' or 'v_prediction', not 'sample'")
    spacing = config.resolved("timestep_spacing", "linspace")
    ts, sigmas, init = schedule.sigma_schedule(config, n, spacing, karras=False)
    return EulerAncestralState(
        timesteps=jnp.asarray(ts),
        sigmas=jnp.asarray(sigmas),
        init_sigma=jnp.asarray(init),
        start_index=jnp.asarray(img2img_start(n, strength), jnp.int32),
        num_calls=jnp.asarray(len(ts), jnp.int32),
        prediction_type=config.prediction_type,
    )


def step(state: EulerAncestralState, model_output, i, sample, *, noise=None):
    """One ancestral step; needs `noise`, an N(0, I) draw."""
    z = step_noise(noise)
    if z is None:
        raise ValueError("euler_a is stochastic: step() needs noise= (an N(0, I) draw of the sample's shape)")
    x, m = f32(sample), f32(model_output)
    sigma, sigma_to = state.sigmas[i], state.sigmas[i + 1]
    sigma_up = jnp.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
    sigma_down = jnp.sqrt(jnp.maximum(sigma_to**2 - sigma_up**2, 0.0))
    d = (x - x0_from_sigma(state.prediction_type, m, x, sigma)) / sigma
    prev = x + d * (sigma_down - sigma) + z * sigma_up
    return prev.astype(sample.dtype), state
