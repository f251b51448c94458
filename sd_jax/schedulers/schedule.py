"""The noise schedule of a discrete-time diffusion model, kept apart from the solvers.

`NoiseScheduleConfig` is what a diffusers `scheduler_config.json` describes; the
functions below turn it into betas / alphas_cumprod / sigmas (computed in float64
numpy, handed to JAX as float32) and implement the forward process q(x_t | x_0)
that training and img2img use.

SD v1 ("scaled_linear"): betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2,
alphas_cumprod = cumprod(1 - betas)  (DDPM, Ho et al. 2020, eq. 4: ᾱ_t = Π_s (1 - β_s)).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import limits

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")

# Options of diffusers scheduler configs that sd_jax implements only at their default
# value; any other value is an error rather than a silent difference.
_ONLY_DEFAULT = {
    "thresholding": (False,),
    "rescale_betas_zero_snr": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "final_sigmas_type": ("zero",),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "variance_type": (None, "fixed_small"),
    "euler_at_final": (False,),
}

# diffusers' own defaults for keys a scheduler_config.json may leave out (the same in
# every scheduler class). Keys whose default differs between classes
# (clip_sample, set_alpha_to_one, skip_prk_steps, timestep_spacing) become None,
# meaning "this solver's diffusers default".
_DIFFUSERS_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "set_alpha_to_one": None,
    "skip_prk_steps": None,
    "clip_sample": None,
    "clip_sample_range": 1.0,
    "timestep_spacing": None,
    "use_karras_sigmas": False,
}


def _is_number(value: Any) -> bool:
    """A finite int or float (numpy's too), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value)


def _choice(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{name}={limits.short(value)} is not supported; valid choices: "
                         f"{', '.join(map(repr, valid))}")


@dataclasses.dataclass(frozen=True)
class NoiseScheduleConfig:
    """A diffusion noise schedule plus the solver options diffusers keeps beside it.

    Defaults are CompVis/stable-diffusion-v1-4's `scheduler_config.json`. A field set
    to None means "the default of the diffusers class of the chosen solver" (e.g.
    `timestep_spacing=None` is "leading" for DDIM/PNDM/DDPM and "linspace" for
    LMS/Euler/Euler-a/DPM++), so that `create(NoiseScheduleConfig.from_diffusers_config(d))`
    matches `DiffusersClass.from_config(d)` for every class.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    steps_offset: int = 1
    set_alpha_to_one: bool | None = False
    skip_prk_steps: bool | None = True
    clip_sample: bool | None = False
    clip_sample_range: float = 1.0
    timestep_spacing: str | None = None
    use_karras_sigmas: bool = False
    class_name: str | None = None  # diffusers `_class_name` of the model folder's scheduler

    def __post_init__(self):
        # Sizes within sd_jax.limits, checked before any array is made; then the schedule itself.
        T = self.num_train_timesteps
        limits.check_int("NoiseScheduleConfig", "num_train_timesteps", T, 2, limits.MAX_TRAIN_TIMESTEPS)
        if self.trained_betas is not None:
            if not isinstance(self.trained_betas, (list, tuple, np.ndarray)) or len(self.trained_betas) != T:
                raise ValueError(f"trained_betas={limits.short(self.trained_betas)} must be a list of "
                                 f"num_train_timesteps={T} values")
            if not all(_is_number(b) and 0.0 < b < 1.0 for b in self.trained_betas):
                raise ValueError(f"trained_betas={limits.short(self.trained_betas)}: values must all lie in (0, 1)")
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        else:
            _choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
            if self.beta_schedule != "squaredcos_cap_v2" and not (
                    _is_number(self.beta_start) and _is_number(self.beta_end)
                    and 0.0 < self.beta_start <= self.beta_end < 1.0):
                raise ValueError(f"beta_start={limits.short(self.beta_start)}, beta_end={limits.short(self.beta_end)}:"
                                 " need 0 < beta_start <= beta_end < 1")
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.timestep_spacing is not None:
            _choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS + (None,))
        limits.check_int("NoiseScheduleConfig", "steps_offset", self.steps_offset, 0, T)
        limits.check_number("NoiseScheduleConfig", "clip_sample_range", self.clip_sample_range, 0.0, 1e6,
                            low_open=True)
        for name in ("set_alpha_to_one", "skip_prk_steps", "clip_sample"):
            if getattr(self, name) not in (True, False, None):
                raise ValueError(f"{name}={limits.short(getattr(self, name))} must be True, False or None")
        if self.use_karras_sigmas not in (True, False):
            raise ValueError(f"use_karras_sigmas={limits.short(self.use_karras_sigmas)} must be True or False")
        # A schedule whose last ᾱ_t underflows (e.g. num_train_timesteps=3e8 with SD's betas) makes σ
        # infinite and every image black; refuse it here, with the numbers.
        last = float(alphas_cumprod(self)[-1])
        sigma_max = math.sqrt((1.0 - last) / last) if last > 0 else math.inf
        if not sigma_max <= limits.MAX_SIGMA:
            betas = "trained_betas" if self.trained_betas is not None else \
                f"beta_schedule={self.beta_schedule!r}, beta_end={self.beta_end:g}"
            raise ValueError(f"num_train_timesteps={T} with {betas}: the last ᾱ_t is {last:.3g} "
                             f"(σ_max {sigma_max:.3g}), past float32 "
                             f"sampling's limit σ_max <= {limits.MAX_SIGMA:g} (SD v1: σ_max 14.6); use fewer "
                             "timesteps or smaller betas")

    @classmethod
    def sd_v1(cls) -> "NoiseScheduleConfig":
        """The schedule of CompVis/stable-diffusion-v1-4 (PNDMScheduler, skip_prk_steps)."""
        return cls(class_name="PNDMScheduler")

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "NoiseScheduleConfig":
        """Reads a diffusers `scheduler_config.json` dict (unknown keys are ignored).

        Missing keys take diffusers' defaults (not SD v1's): a dict without
        `beta_schedule` means "linear", as it does in diffusers.
        """
        for key, allowed in _ONLY_DEFAULT.items():
            if key in config and config[key] not in allowed:
                raise ValueError(
                    f"scheduler config {key}={limits.short(config[key])} is not supported by sd_jax "
                    f"(supported: {', '.join(map(repr, allowed))})"
                )
        kwargs = {k: config.get(k, default) for k, default in _DIFFUSERS_DEFAULTS.items()}
        if kwargs["trained_betas"] is not None:
            kwargs["trained_betas"] = tuple(kwargs["trained_betas"])
        kwargs["use_karras_sigmas"] = bool(kwargs["use_karras_sigmas"])
        return cls(class_name=config.get("_class_name"), **kwargs)

    def resolved(self, name: str, solver_default: Any) -> Any:
        """The value of an optional field, or the solver's diffusers default when None."""
        value = getattr(self, name)
        return solver_default if value is None else value


# ----------------------------------------------------------------------------- schedule


def _alpha_bar_cosine(t: float) -> float:
    # Improved DDPM (Nichol & Dhariwal 2021), eq. 17, with s = 0.008.
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas64(config: NoiseScheduleConfig) -> np.ndarray:
    """β_1..β_T in float64, shape (T,)."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return np.asarray(config.trained_betas, np.float64)
    if config.beta_schedule == "linear":
        return np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
    if config.beta_schedule == "scaled_linear":
        return np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2
    # squaredcos_cap_v2: β_t = min(1 - ᾱ(t/T) / ᾱ((t-1)/T), 0.999)  (Nichol & Dhariwal 2021, sec. 3.2)
    return np.array(
        [min(1 - _alpha_bar_cosine((i + 1) / n) / _alpha_bar_cosine(i / n), 0.999) for i in range(n)],
        np.float64,
    )


def alphas_cumprod64(config: NoiseScheduleConfig) -> np.ndarray:
    """ᾱ_t = Π_{s<=t} (1 - β_s) in float64, shape (T,)."""
    return np.cumprod(1.0 - betas64(config))


def alphas_cumprod(config: NoiseScheduleConfig) -> np.ndarray:
    """ᾱ_t as float32, shape (T,): what the solvers and training index with t."""
    return alphas_cumprod64(config).astype(np.float32)


def train_sigmas64(config: NoiseScheduleConfig) -> np.ndarray:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) (the variance-exploding view, Karras et al. 2022 eq. 2 / Table 1), float64, (T,)."""
    ac = alphas_cumprod64(config)
    return np.sqrt((1.0 - ac) / ac)


def check_num_inference_steps(config: NoiseScheduleConfig, num_inference_steps: Any) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps={limits.short(num_inference_steps)} must be an int")
    n = int(num_inference_steps)
    if not 1 <= n <= config.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={n} must be between 1 and num_train_timesteps={config.num_train_timesteps}"
        )
    return n


def discrete_timesteps(config: NoiseScheduleConfig, num_inference_steps: int, spacing: str) -> np.ndarray:
    """Integer timesteps, descending, as DDIM/DDPM/PNDM space them (Lin et al. 2023, Table 2).

    "leading": t = k * (T // n) + steps_offset; "linspace": round(linspace(0, T-1, n));
    "trailing": round(arange(T, 0, -T/n)) - 1.
    """
    _choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, n = config.num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(n) * (T // n)).round()[::-1].astype(np.int64) + config.steps_offset
    else:
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    return ts.copy()


def sigma_schedule(
    config: NoiseScheduleConfig, num_inference_steps: int, spacing: str, *, karras: bool | None = None
) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """(timesteps f32 (n,), sigmas f32 (n+1,), init_noise_sigma) as diffusers' Euler/LMS classes set them.

    Timesteps are *not* rounded ("linspace": linspace(0, T-1, n), fractional); σ is
    interpolated linearly in t from the training σ_t (clamped at the ends, like np.interp);
    a final σ = 0 is appended. With Karras σ (eq. 5) the end points are kept and the
    timesteps become the log-σ-interpolated (fractional) t of each σ.
    init_noise_sigma is σ_max for "linspace"/"trailing", sqrt(σ_max² + 1) for "leading".
    """
    _choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, n = config.num_train_timesteps, num_inference_steps
    karras = config.use_karras_sigmas if karras is None else karras
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(n) * (T // n)).round()[::-1].astype(np.float32) + config.steps_offset
    else:
        ts = np.arange(T, 0, -T / n).round().astype(np.float32) - 1
    train = reference_sigmas32(config) if karras else train_sigmas64(config)
    sigmas = np.interp(ts.astype(np.float64), np.arange(T), train)
    if karras:
        sigmas = karras_sigmas(sigmas[-1], sigmas[0], n)
        ts = sigma_to_t(sigmas, np.log(train)).astype(np.float32)
    sigmas = np.concatenate([sigmas, [0.0]])
    smax = sigmas.max()
    init = smax if spacing in ("linspace", "trailing") else np.sqrt(smax**2 + 1)
    return ts.astype(np.float32), sigmas.astype(np.float32), np.float32(init)


def check_timesteps_in_range(config: NoiseScheduleConfig, timesteps: np.ndarray, what: str) -> None:
    T = config.num_train_timesteps
    if timesteps.size and (timesteps.max() >= T or timesteps.min() < 0):
        raise ValueError(
            f"{what}: timesteps {timesteps.min()}..{timesteps.max()} fall outside [0, {T - 1}] "
            f"(steps_offset={config.steps_offset}, timestep_spacing={config.timestep_spacing!r}); "
            "use fewer steps, steps_offset=0, or timestep_spacing='trailing' or 'linspace'"
        )


def _linspace32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) (scalar CPU path: two halves, float32 step)."""
    s, e = np.float32(start), np.float32(end)
    step = np.float32((e - s) / np.float32(n - 1))
    idx = np.arange(n)
    lo = s + step * idx.astype(np.float32)
    hi = e - step * (n - 1 - idx).astype(np.float32)
    return np.where(idx < n // 2, lo, hi).astype(np.float32)


def reference_sigmas32(config: NoiseScheduleConfig) -> np.ndarray:
    """σ_t as diffusers computes it in float32 torch (emulated: float32 linspace and (1 - β),
    cumprod accumulated in float64 and rounded to float32, σ in float32), as float64, (T,).

    Used only for Karras σ's: their end points and the mapping of each σ back to a timestep.
    DPM-Solver rounds that t to an integer, and the ~1e-5 relative difference between float32
    and float64 σ_t moves t by ~1e-3, enough to flip k + 0.5 the other way at ~28% of step
    counts. With this emulation the rounded timesteps agree with diffusers' at all but a few
    step counts (for SD v1, 854 and 996 of 1..1000; torch's own vectorised linspace can
    differ by an ulp between CPUs).
    """
    n = config.num_train_timesteps
    if config.trained_betas is not None or config.beta_schedule == "squaredcos_cap_v2":
        betas = betas64(config).astype(np.float32)
    elif config.beta_schedule == "linear":
        betas = _linspace32(config.beta_start, config.beta_end, n)
    else:
        betas = _linspace32(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    ac = np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32)
    return (((np.float32(1) - ac) / ac) ** np.float32(0.5)).astype(np.float64)


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each σ by linear interpolation in log σ (as k-diffusion / diffusers)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_train_sigmas, log_sigma, side="right") - 1, 0, len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, ρ = 7."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


# ---------------------------------------------------------------------- forward process


def _per_sample(coef: jax.Array, x: jax.Array) -> jax.Array:
    """Broadcasts a scalar or per-batch (B,) coefficient against x of shape (B, ...)."""
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def add_noise(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """q(x_t | x_0): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε  (DDPM, Ho et al. 2020, eq. 4).

    `t` is a scalar or a (B,) int array; arithmetic in float32, result in x0's dtype.
    """
    a = _per_sample(jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(t)], x0)
    out = jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * noise.astype(jnp.float32)
    return out.astype(x0.dtype)


def get_velocity(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0  (Salimans & Ho 2022, sec. 4; Imagen Video sec. 2.4)."""
    a = _per_sample(jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(t)], x0)
    out = jnp.sqrt(a) * noise.astype(jnp.float32) - jnp.sqrt(1.0 - a) * x0.astype(jnp.float32)
    return out.astype(x0.dtype)


def training_target(
    prediction_type: str, alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array
) -> jax.Array:
    """What the denoiser is trained to output: ε ("epsilon"), v ("v_prediction") or x_0 ("sample")."""
    _choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return get_velocity(alphas_cumprod, x0, noise, t)
    return x0
