"""PNDM / PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds",
arXiv 2202.09778): the transfer part φ of eq. 9 driven by a pseudo linear multistep (PLMS,
eq. 12) or, for the first steps, a pseudo Runge-Kutta (PRK, eq. 13 / Algorithm 2) gradient.

Matches diffusers' `PNDMScheduler` including its quirks:
- skip_prk_steps=True (SD v1.4): timesteps are [t_0, t_1, t_1, t_2, ..., t_{n-1}] (n+1 model
  calls; a single call when n == 1). Call 0 is an Euler-like step with ε_0; call 1 re-evaluates
  at t_1 and redoes the step t_0 -> t_1 from x_{t_0} with (ε_0 + ε_1)/2 (a Heun/"improved
  Euler" start, not stored in the history); from call 2 on it is Adams-Bashforth of order
  2, 3, then 4 over the stored history.
- skip_prk_steps=False: 12 PRK calls over the 3 highest timesteps, then PLMS
  (n + 9 model calls). diffusers cannot build this schedule for n < 4.
- The history is counted from the first step taken (a counter in the state), not from the
  loop index, so img2img starting at index k > 0 restarts the multistep warm-up at k.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import schedule
from ._common import f32, img2img_start

N_PRK = 12  # 4 Runge-Kutta stages x 3 steps (diffusers' pndm_order 4)

# Adams-Bashforth weights over the history, oldest..newest, by the number of stored ε (eq. 12).
_PLMS_COEFFS = np.array(
    [
        [0, 0, 0, 0],
        [0, 0, 0, 1],
        [0, 0, -1 / 2, 3 / 2],
        [0, 5 / 12, -16 / 12, 23 / 12],
        [-9 / 24, 37 / 24, -59 / 24, 55 / 24],
    ],
    np.float32,
)

# Per-step arrays (leading axis = loop index); padded together by `schedulers.pad_schedule`.
STEP_FIELDS = ("timesteps",)


@struct.dataclass
class PNDMState:
    timesteps: jax.Array  # (n_calls,) int32: t given to the UNet at loop index i
    alphas_cumprod: jax.Array  # (T,) f32
    final_alpha_cumprod: jax.Array  # () f32: ᾱ used past t = 0
    ets: jax.Array  # (4, *shape) f32: ε history, newest last
    num_ets: jax.Array  # () int32: valid entries in ets
    cur_sample: jax.Array  # (*shape) f32: x at the start of the current (PRK / first PLMS) step
    cur_model_output: jax.Array  # (*shape) f32: PRK accumulator
    counter: jax.Array  # () int32: steps taken since the loop started
    start_index: jax.Array  # () int32
    num_calls: jax.Array  # () int32: model calls of the schedule = the loop's end (arrays may be longer)
    step_ratio: jax.Array  # () int32: T // num_inference_steps (traced: one compile for all counts)
    num_prk: int = struct.field(pytree_node=False)  # 0 with skip_prk_steps
    prediction_type: str = struct.field(pytree_node=False)


def _timesteps(config, n: int, skip_prk: bool) -> np.ndarray:
    ts = schedule.discrete_timesteps(config, n, config.resolved("timestep_spacing", "leading"))[::-1]  # ascending
    if skip_prk:
        # [t_0, t_1, t_1, t_2, ...] (descending, the second one repeated)
        return np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
    if n < 4:
        raise ValueError(
            f"pndm with skip_prk_steps=False needs num_inference_steps >= 4 (got {n}); "
            "diffusers cannot build that schedule either. Use skip_prk_steps=True."
        )
    half = config.num_train_timesteps // n // 2
    prk = ts[-4:].repeat(2) + np.tile(np.array([0, half]), 4)
    prk = prk[:-1].repeat(2)[1:-1][::-1]
    return np.concatenate([prk, ts[:-3][::-1]]).astype(np.int64)


def create(
    config: schedule.NoiseScheduleConfig,
    num_inference_steps: int,
    shape: tuple[int, ...] | None = None,
    *,
    strength: float = 1.0,
) -> PNDMState:
    """`shape` is the latent shape (e.g. (B, H, W, C)); the ε history is (4, *shape) float32."""
    n = schedule.check_num_inference_steps(config, num_inference_steps)
    if config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"pndm supports prediction_type 'epsilon' or 'v_prediction', not {config.prediction_type!r}")
    if shape is None:
        raise ValueError("pndm.create needs the latent shape for its ε history")
    skip_prk = bool(config.resolved("skip_prk_steps", False))
    timesteps = _timesteps(config, n, skip_prk)
    schedule.check_timesteps_in_range(config, timesteps, f"pndm with {n} steps")
    ac = schedule.alphas_cumprod64(config)
    final = 1.0 if config.resolved("set_alpha_to_one", False) else ac[0]
    shape = tuple(shape)
    return PNDMState(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        alphas_cumprod=jnp.asarray(ac, jnp.float32),
        final_alpha_cumprod=jnp.asarray(final, jnp.float32),
        ets=jnp.zeros((4,) + shape, jnp.float32),
        num_ets=jnp.zeros((), jnp.int32),
        cur_sample=jnp.zeros(shape, jnp.float32),
        cur_model_output=jnp.zeros(shape, jnp.float32),
        counter=jnp.zeros((), jnp.int32),
        start_index=jnp.asarray(img2img_start(n, strength), jnp.int32),
        num_calls=jnp.asarray(len(timesteps), jnp.int32),
        step_ratio=jnp.asarray(config.num_train_timesteps // n, jnp.int32),
        num_prk=0 if skip_prk else N_PRK,
        prediction_type=config.prediction_type,
    )


def init_noise_sigma(state: PNDMState) -> jax.Array:
    return jnp.float32(1.0)


def scale_model_input(state: PNDMState, sample: jax.Array, i) -> jax.Array:
    return sample


def _alpha(state: PNDMState, t) -> jax.Array:
    a = jnp.take(state.alphas_cumprod, jnp.maximum(t, 0), mode="clip")
    return jnp.where(t >= 0, a, state.final_alpha_cumprod)


def _transfer(state: PNDMState, x, t, t_prev, eps):
    """φ(x_t, ε, t, t-δ) of eq. 9 (the DDIM step written in ᾱ only)."""
    a_t, a_prev = _alpha(state, t), _alpha(state, t_prev)
    if state.prediction_type == "v_prediction":
        eps = jnp.sqrt(a_t) * eps + jnp.sqrt(1.0 - a_t) * x
    denom = a_t * jnp.sqrt(1.0 - a_prev) + jnp.sqrt(a_t * (1.0 - a_t) * a_prev)
    return jnp.sqrt(a_prev / a_t) * x - (a_prev - a_t) * eps / denom


def _plms(state: PNDMState, e, t, x):
    """One PLMS step (eq. 12 with the warm-up of diffusers' step_plms). Returns (prev, updates)."""
    r, c = state.step_ratio, state.counter
    first, second = c == 0, c == 1  # only reachable with skip_prk_steps (PRK leaves c >= 12)
    ets = jnp.where(second, state.ets, jnp.concatenate([state.ets[1:], e[None]]))
    num = jnp.where(second, state.num_ets, jnp.minimum(state.num_ets + 1, 4))
    w = jnp.asarray(_PLMS_COEFFS)[num]
    eps = jnp.tensordot(w, ets, axes=1)
    eps = jnp.where(second, (e + ets[-1]) / 2, eps)  # improved-Euler redo of the first step
    x_from = jnp.where(second, state.cur_sample, x)
    t_from = jnp.where(second, t + r, t)
    t_to = jnp.where(second, t, t - r)
    prev = _transfer(state, x_from, t_from, t_to, eps)
    cur_sample = jnp.where(first, x, state.cur_sample)
    return prev, dict(ets=ets, num_ets=num, cur_sample=cur_sample)


def _prk(state: PNDMState, e, t, x):
    """One pseudo Runge-Kutta stage (diffusers' step_prk; eq. 13). Returns (prev, updates)."""
    r, c = state.step_ratio, state.counter
    stage = c % 4
    t_to = t - jnp.where(c % 2 == 1, 0, r // 2)
    t_from = state.timesteps[(c // 4) * 4]
    acc = state.cur_model_output + jnp.where(stage == 0, 1 / 6, jnp.where(stage == 3, 0.0, 1 / 3)) * e
    eps = jnp.where(stage == 3, state.cur_model_output + e / 6, e)
    acc = jnp.where(stage == 3, jnp.zeros_like(acc), acc)
    cur_sample = jnp.where(stage == 0, x, state.cur_sample)
    push = stage == 0
    ets = jnp.where(push, jnp.concatenate([state.ets[1:], e[None]]), state.ets)
    num = jnp.where(push, jnp.minimum(state.num_ets + 1, 4), state.num_ets)
    prev = _transfer(state, cur_sample, t_from, t_to, eps)
    return prev, dict(ets=ets, num_ets=num, cur_sample=cur_sample, cur_model_output=acc)


def step(state: PNDMState, model_output, i, sample, *, noise=None):
    """One model call's update; returns (prev_sample, new_state). Deterministic (no noise)."""
    x, e = f32(sample), f32(model_output)
    t = state.timesteps[i]
    prev, upd = _plms(state, e, t, x)
    if state.num_prk:
        prev_k, upd_k = _prk(state, e, t, x)
        is_prk = state.counter < state.num_prk
        prev = jnp.where(is_prk, prev_k, prev)
        upd.setdefault("cur_model_output", state.cur_model_output)
        upd = {k: jnp.where(is_prk, upd_k[k], upd[k]) for k in upd}
    new_state = state.replace(counter=state.counter + 1, **upd)
    return prev.astype(sample.dtype), new_state


def add_noise_at(state: PNDMState, original, noise, index=None):
    """img2img start latents: q(x_t | x_0) at t = timesteps[index] (default: state.start_index)."""
    index = state.start_index if index is None else index
    return schedule.add_noise(state.alphas_cumprod, original, noise, state.timesteps[index])
