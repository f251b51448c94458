"""Samplers as pure, jittable functions over an immutable state; one solver per module.

    sched = get_scheduler("pndm")                       # or "ddim", "euler_a", "dpm++2m-karras", ...
    cfg = NoiseScheduleConfig.from_diffusers_config(json.load(open(".../scheduler_config.json")))
    state = sched.create(cfg, 50, latents.shape)          # Python; arrays for the whole loop
    x = noise * sched.init_noise_sigma(state)             # txt2img start
    for i in range(state.start_index, num_model_calls(state)):    # or lax.fori_loop: sd_jax.sampling
        t = state.timesteps[i]                            # what the UNet gets
        eps = unet(sched.scale_model_input(state, x, i), t)
        x, state = sched.step(state, eps, i, x, noise=z_i)  # z_i ~ N(0, I): stochastic solvers only

img2img: `create(..., strength=s)` sets `state.start_index` (diffusers' get_timesteps); start
from `x = sched.add_noise_at(state, x0_latents, noise)` instead of `noise * init_noise_sigma`
and run the same loop from `state.start_index`: the arrays (and so the compiled loop) do not
depend on the strength. The solvers' multistep memory counts steps from the loop's start.

Step counts: the loop runs to `state.num_calls`, a traced value, and every per-step array can
be padded to one length (`pad_schedule(sched, state, schedule_length(cfg))`), so one compiled
loop serves every step count of a solver.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from . import ddim, ddpm, dpm_solver, euler, euler_ancestral, lms, pndm
from ._common import img2img_start
from .schedule import NoiseScheduleConfig, add_noise, alphas_cumprod, get_velocity, training_target

__all__ = [
    "NoiseScheduleConfig",
    "Scheduler",
    "SCHEDULER_NAMES",
    "DIFFUSERS_CLASS_NAMES",
    "get_scheduler",
    "scheduler_name_for_config",
    "num_model_calls",
    "pad_schedule",
    "schedule_length",
    "img2img_start",
    "add_noise",
    "get_velocity",
    "training_target",
    "alphas_cumprod",
]


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """One solver's functions. Hashable, so it can be a static argument of jax.jit.

    create(config, num_inference_steps, shape, *, strength=1.0, **options) -> State   (Python)
    init_noise_sigma(state) -> f32 scalar
    scale_model_input(state, sample, i) -> sample
    step(state, model_output, i, sample, *, noise=None) -> (prev_sample, state)
    add_noise_at(state, original, noise, index=None) -> noisy sample at timesteps[index]
    """

    name: str
    create: Callable[..., Any]
    init_noise_sigma: Callable[[Any], jax.Array]
    scale_model_input: Callable[..., jax.Array]
    step: Callable[..., tuple[jax.Array, Any]]
    add_noise_at: Callable[..., jax.Array]
    stochastic: bool  # always needs noise (ddim needs it only with eta > 0)
    diffusers_class: str
    order: int = 1  # diffusers' `scheduler.order` (the img2img start is t_start * order)
    step_fields: tuple[str, ...] = ()  # per-step arrays, padded together by pad_schedule


def _module_scheduler(name: str, module, stochastic: bool, diffusers_class: str, **create_kw) -> Scheduler:
    create = functools.partial(module.create, **create_kw) if create_kw else module.create
    return Scheduler(
        name=name,
        create=create,
        init_noise_sigma=module.init_noise_sigma,
        scale_model_input=module.scale_model_input,
        step=module.step,
        add_noise_at=module.add_noise_at,
        stochastic=stochastic,
        diffusers_class=diffusers_class,
        step_fields=module.STEP_FIELDS,
    )


_SCHEDULERS = {
    "ddim": _module_scheduler("ddim", ddim, False, "DDIMScheduler"),
    "pndm": _module_scheduler("pndm", pndm, False, "PNDMScheduler"),
    "lms": _module_scheduler("lms", lms, False, "LMSDiscreteScheduler"),
    "euler": _module_scheduler("euler", euler, False, "EulerDiscreteScheduler"),
    "euler_a": _module_scheduler("euler_a", euler_ancestral, True, "EulerAncestralDiscreteScheduler"),
    "dpm++2m": _module_scheduler("dpm++2m", dpm_solver, False, "DPMSolverMultistepScheduler", karras=False),
    "dpm++2m-karras": _module_scheduler(
        "dpm++2m-karras", dpm_solver, False, "DPMSolverMultistepScheduler", karras=True
    ),
    "ddpm": _module_scheduler("ddpm", ddpm, True, "DDPMScheduler"),
}
SCHEDULER_NAMES = tuple(_SCHEDULERS)
# AUTOMATIC1111's sampler names (its "sampler_name"; "Karras" may also come as its separate scheduler field).
A1111_SAMPLER_NAMES = {
    "Euler a": "euler_a", "Euler": "euler", "LMS": "lms", "DDIM": "ddim", "PLMS": "pndm", "DDPM": "ddpm",
    "DPM++ 2M": "dpm++2m", "DPM++ 2M Karras": "dpm++2m-karras",
}
DIFFUSERS_CLASS_NAMES = {name: s.diffusers_class for name, s in _SCHEDULERS.items()}


def canonical_scheduler_name(name: str) -> str | None:
    """sd_jax's name for a solver named in sd_jax's or AUTOMATIC1111's words ("Euler a", "DPM++ 2M
    Karras", ...; case and spacing of A1111 names are not significant); None when neither knows it."""
    if name in _SCHEDULERS:
        return name
    folded = " ".join(str(name).split()).casefold()
    for a1111, ours in A1111_SAMPLER_NAMES.items():
        if a1111.casefold() == folded:
            return ours
    return None


def get_scheduler(name: str) -> Scheduler:
    """The solver registered under `name` (one of SCHEDULER_NAMES)."""
    if name not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    return _SCHEDULERS[name]


def scheduler_name_for_config(config: NoiseScheduleConfig) -> str:
    """The sd_jax name of a model folder's scheduler (`scheduler=None` = "the folder's own")."""
    if config.class_name == "DPMSolverMultistepScheduler":
        return "dpm++2m-karras" if config.use_karras_sigmas else "dpm++2m"
    for name, cls in DIFFUSERS_CLASS_NAMES.items():
        if cls == config.class_name:
            return name
    raise ValueError(
        f"scheduler class {config.class_name!r} has no sd_jax solver; supported classes: "
        f"{', '.join(sorted(set(DIFFUSERS_CLASS_NAMES.values())))} (or pick a scheduler by name: "
        f"{', '.join(SCHEDULER_NAMES)})"
    )


def num_model_calls(state) -> int:
    """Model calls of a full run (the loop's end); PNDM-PLMS makes steps + 1. Outside jit only."""
    return int(state.num_calls)


# Longest schedule a solver builds beyond num_train_timesteps model calls (PNDM with PRK: n + 9).
_EXTRA_CALLS = 16


def schedule_length(config: NoiseScheduleConfig) -> int:
    """One padded length that holds every step count's schedule for this noise schedule."""
    return config.num_train_timesteps + _EXTRA_CALLS


def pad_schedule(scheduler: Scheduler, state, length: int):
    """`state` with its per-step arrays padded to `length` model calls (last entry repeated).

    The loop still ends at `state.num_calls`; only the array shapes change, so states of
    different step counts share one compiled loop. Entries past the end are never read.
    """
    calls = int(state.timesteps.shape[0])
    if length < calls:
        raise ValueError(f"cannot pad a {calls}-call schedule to {length} calls")
    widths = lambda a: [(0, length - calls)] + [(0, 0)] * (a.ndim - 1)  # noqa: E731
    return state.replace(**{f: jnp.pad(getattr(state, f), widths(getattr(state, f)), mode="edge")
                            for f in scheduler.step_fields})
