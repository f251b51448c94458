"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", arXiv 2211.01095, Algorithm 2 / eq. 5 with data prediction),
with the uniform-in-t schedule ("dpm++2m") or Karras σ ("dpm++2m-karras", Karras et al. 2022 eq. 5).

In λ = log(α/σ) with h = λ_t - λ_s:
  1st order (DPM-Solver++1 = DDIM):  x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) D0
  2M (multistep, midpoint):          D0 = m0, D1 = (m0 - m1) / r0, r0 = h_{-1} / h,
                                     x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) (D0 + D1 / 2)
where m0, m1 are the current and previous x̂_0 predictions.

Matches diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
solver_type="midpoint", final_sigmas_type="zero")`: the first step since the loop started and
the last step of the schedule are first order (the last one lands on σ = 0, i.e. returns x̂_0);
init_noise_sigma is 1 and inputs are not scaled; σ here is the VE σ = sqrt((1-ᾱ)/ᾱ), mapped to
VP α = 1/sqrt(σ²+1), σ_vp = σ α.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import schedule
from ._common import f32, img2img_start

# Per-step arrays (leading axis = loop index); padded together by `schedulers.pad_schedule`.
STEP_FIELDS = ("timesteps", "sigmas")


@struct.dataclass
class DPMSolverState:
    timesteps: jax.Array  # (n,) int32: t given to the UNet
    sigmas: jax.Array  # (n + 1,) f32 (VE σ), last 0
    prev_x0: jax.Array  # (*shape) f32: x̂_0 of the previous step (m1)
    counter: jax.Array  # () int32: steps taken since the loop started
    start_index: jax.Array  # () int32
    num_calls: jax.Array  # () int32: model calls of the schedule = the loop's end (arrays may be longer)
    prediction_type: str = struct.field(pytree_node=False)


def _schedule(config: schedule.NoiseScheduleConfig, n: int, karras: bool):
    T = config.num_train_timesteps
    spacing = config.resolved("timestep_spacing", "linspace")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = T // (n + 1)
        ts = (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    elif spacing == "trailing":
        ts = np.arange(T, 0, -T / n).round().astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r}; valid: 'leading', 'linspace', 'trailing'")
    if karras:
        ref = schedule.reference_sigmas32(config)  # see its docstring: t is rounded below
        sigmas = schedule.karras_sigmas(ref[0], ref[-1], n)
        ts = schedule.sigma_to_t(sigmas, np.log(ref))
        if config.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
        ts = ts.astype(np.int64)
    else:
        sigmas = np.interp(ts, np.arange(T), schedule.train_sigmas64(config))
        if np.any(np.diff(sigmas) == 0):
            raise ValueError(
                f"dpm++2m with num_inference_steps={n} and timestep_spacing={spacing!r} repeats a timestep "
                "(step size h = 0, which makes DPM-Solver++ and diffusers return NaN); use fewer steps "
                "(<= 500 with 'linspace') or 'dpm++2m-karras'"
            )
    return ts, np.concatenate([sigmas, [0.0]]).astype(np.float32)


def create(
    config: schedule.NoiseScheduleConfig,
    num_inference_steps: int,
    shape: tuple[int, ...] | None = None,
    *,
    strength: float = 1.0,
    karras: bool | None = None,
) -> DPMSolverState:
    """`shape` is the latent shape (memory: the previous x̂_0). karras=None: config.use_karras_sigmas."""
    n = schedule.check_num_inference_steps(config, num_inference_steps)
    if shape is None:
        raise ValueError("dpm_solver.create needs the latent shape for its x̂_0 memory")
    karras = config.use_karras_sigmas if karras is None else karras
    ts, sigmas = _schedule(config, n, karras)
    schedule.check_timesteps_in_range(config, ts, f"dpm++2m with {n} steps")
    return DPMSolverState(
        timesteps=jnp.asarray(ts, jnp.int32),
        sigmas=jnp.asarray(sigmas),
        prev_x0=jnp.zeros(tuple(shape), jnp.float32),
        counter=jnp.zeros((), jnp.int32),
        start_index=jnp.asarray(img2img_start(n, strength), jnp.int32),
        num_calls=jnp.asarray(len(ts), jnp.int32),
        prediction_type=config.prediction_type,
    )


def init_noise_sigma(state: DPMSolverState) -> jax.Array:
    return jnp.float32(1.0)


def scale_model_input(state: DPMSolverState, sample: jax.Array, i) -> jax.Array:
    return sample


def _vp(sigma):
    """VE σ -> (α_t, σ_t, λ_t) of the VP process; λ = +inf at σ = 0."""
    alpha = 1.0 / jnp.sqrt(sigma**2 + 1)
    sigma_t = sigma * alpha
    return alpha, sigma_t, jnp.log(alpha) - jnp.log(sigma_t)


def _x0(prediction_type, m, x, alpha, sigma_t):
    if prediction_type == "epsilon":
        return (x - sigma_t * m) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma_t * m
    if prediction_type == "sample":
        return m
    raise ValueError(f"prediction_type={prediction_type!r}; valid: 'epsilon', 'v_prediction', 'sample'")


def step(state: DPMSolverState, model_output, i, sample, *, noise=None):
    """One DPM-Solver++(2M) step; returns (prev_sample, new_state). Deterministic (no noise)."""
    x, m = f32(sample), f32(model_output)
    n = state.num_calls
    a_s0, s_s0, l_s0 = _vp(state.sigmas[i])
    a_t, s_t, l_t = _vp(state.sigmas[i + 1])
    _, _, l_s1 = _vp(state.sigmas[jnp.maximum(i - 1, 0)])
    m0 = _x0(state.prediction_type, m, x, a_s0, s_s0)
    h, h_0 = l_t - l_s0, l_s0 - l_s1
    second_order = (state.counter >= 1) & (i < n - 1)
    # Coefficient of (m0 - m1): 1/(2 r0) for 2M, 0 for the first-order step (the last step
    # has h = inf, so r0 = 0 there; select the scalar before it meets a tensor).
    c1 = jnp.where(second_order, 0.5 * h / jnp.where(second_order, h_0, 1.0), 0.0)
    prev = (s_t / s_s0) * x - (a_t * (jnp.exp(-h) - 1.0)) * (m0 + c1 * (m0 - state.prev_x0))
    new_state = state.replace(prev_x0=m0, counter=state.counter + 1)
    return prev.astype(sample.dtype), new_state


def add_noise_at(state: DPMSolverState, original, noise, index=None):
    """img2img start latents: α(σ) x_0 + σ_vp(σ) ε at σ = sigmas[index] (default: state.start_index)."""
    index = state.start_index if index is None else index
    alpha, sigma_t, _ = _vp(state.sigmas[index])
    return (alpha * f32(original) + sigma_t * f32(noise)).astype(original.dtype)
