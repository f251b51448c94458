"""LMS: 4th-order linear multistep (Adams-Bashforth in σ) on the probability-flow ODE
dx/dσ = (x - x̂_0(x, σ)) / σ  (Karras et al. 2022, eq. 4 with σ(t) = t; k-diffusion `sample_lms`).

The coefficient of the derivative from k steps ago is ∫_{σ_i}^{σ_{i+1}} ℓ_k(τ) dτ, ℓ_k the
Lagrange basis polynomial on σ_i, σ_{i-1}, ..., computed once in `create` (exactly, in
float64, where diffusers integrates with scipy.quad at every step).

Matches diffusers' `LMSDiscreteScheduler` (order 4) including one quirk: the polynomial order
at loop index i is min(i + 1, 4) from the *loop index*, while only the derivatives stored
since the loop started are summed. For img2img starting at k > 0 the first steps thus use
truncated order-4 weights, not lower-order ones.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import schedule
from ._common import f32, img2img_start, x0_from_sigma

ORDER = 4

# Per-step arrays (leading axis = loop index); padded together by `schedulers.pad_schedule`.
STEP_FIELDS = ("timesteps", "sigmas", "coeffs")


@struct.dataclass
class LMSState:
    timesteps: jax.Array  # (n,) f32: t given to the UNet (fractional with "linspace")
    sigmas: jax.Array  # (n + 1,) f32, last 0
    coeffs: jax.Array  # (n, 4) f32: weight of the derivative from k steps ago at index i
    derivatives: jax.Array  # (4, *shape) f32: newest first
    counter: jax.Array  # () int32: steps taken since the loop started
    init_sigma: jax.Array  # () f32
    start_index: jax.Array  # () int32
    num_calls: jax.Array  # () int32: model calls of the schedule = the loop's end (arrays may be longer)
    prediction_type: str = struct.field(pytree_node=False)


def _lms_coeffs(sigmas: np.ndarray, n: int) -> np.ndarray:
    s = sigmas.astype(np.float64)
    out = np.zeros((n, ORDER), np.float64)
    for i in range(n):
        order = min(i + 1, ORDER)
        nodes = [s[i - k] for k in range(order)]
        for j in range(order):
            poly = np.poly1d([1.0])
            for k in range(order):
                if k != j:
                    poly *= np.poly1d([1.0, -nodes[k]]) / (nodes[j] - nodes[k])
            antider = poly.integ()
            out[i, j] = antider(s[i + 1]) - antider(s[i])
    return out.astype(np.float32)


def create(
    config: schedule.NoiseScheduleConfig,
    num_inference_steps: int,
    shape: tuple[int, ...] | None = None,
    *,
    strength: float = 1.0,
) -> LMSState:
    """`shape` is the latent shape; the derivative history is (4, *shape) float32."""
    n = schedule.check_num_inference_steps(config, num_inference_steps)
    if shape is None:
        raise ValueError("lms.create needs the latent shape for its derivative history")
    ts, sigmas, init = schedule.sigma_schedule(config, n, config.resolved("timestep_spacing", "linspace"))
    return LMSState(
        timesteps=jnp.asarray(ts),
        sigmas=jnp.asarray(sigmas),
        coeffs=jnp.asarray(_lms_coeffs(sigmas, n)),
        derivatives=jnp.zeros((ORDER,) + tuple(shape), jnp.float32),
        counter=jnp.zeros((), jnp.int32),
        init_sigma=jnp.asarray(init),
        start_index=jnp.asarray(img2img_start(n, strength), jnp.int32),
        num_calls=jnp.asarray(len(ts), jnp.int32),
        prediction_type=config.prediction_type,
    )


def init_noise_sigma(state: LMSState) -> jax.Array:
    return state.init_sigma


def scale_model_input(state: LMSState, sample: jax.Array, i) -> jax.Array:
    """x / sqrt(σ_i² + 1): the UNet was trained on variance-preserving inputs."""
    sigma = state.sigmas[i]
    return (f32(sample) / jnp.sqrt(sigma**2 + 1)).astype(sample.dtype)


def step(state: LMSState, model_output, i, sample, *, noise=None):
    """x_{i+1} = x_i + Σ_k c_{i,k} d_{i-k}, d = (x - x̂_0)/σ. Deterministic (no noise)."""
    x, m = f32(sample), f32(model_output)
    sigma = state.sigmas[i]
    d = (x - x0_from_sigma(state.prediction_type, m, x, sigma)) / sigma
    derivs = jnp.concatenate([d[None], state.derivatives[:-1]])
    used = jnp.arange(ORDER) < jnp.minimum(state.counter + 1, ORDER)
    w = jnp.where(used, state.coeffs[i], 0.0)
    prev = x + jnp.tensordot(w, derivs, axes=1)
    return prev.astype(sample.dtype), state.replace(derivatives=derivs, counter=state.counter + 1)


def add_noise_at(state: LMSState, original, noise, index=None):
    """img2img start latents: x_0 + σ_index ε (default index: state.start_index)."""
    index = state.start_index if index is None else index
    return (f32(original) + f32(noise) * state.sigmas[index]).astype(original.dtype)
