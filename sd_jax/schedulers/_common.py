"""Helpers shared by the solvers: dtype policy, model-output conversions, noise, img2img start."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def f32(x: Any) -> jax.Array:
    """All scheduler arithmetic runs in float32, whatever the model's dtype."""
    return jnp.asarray(x, F32)


def x0_eps_from_alpha(prediction_type: str, model_output, sample, alpha_prod_t):
    """(x̂_0, ε̂) from the model output in the ᾱ parameterisation (DDIM eq. 9; v from Salimans & Ho 2022)."""
    beta_prod_t = 1.0 - alpha_prod_t
    if prediction_type == "epsilon":
        x0 = (sample - jnp.sqrt(beta_prod_t) * model_output) / jnp.sqrt(alpha_prod_t)
        return x0, model_output
    if prediction_type == "sample":
        eps = (sample - jnp.sqrt(alpha_prod_t) * model_output) / jnp.sqrt(beta_prod_t)
        return model_output, eps
    if prediction_type == "v_prediction":
        x0 = jnp.sqrt(alpha_prod_t) * sample - jnp.sqrt(beta_prod_t) * model_output
        eps = jnp.sqrt(alpha_prod_t) * model_output + jnp.sqrt(beta_prod_t) * sample
        return x0, eps
    raise ValueError(f"prediction_type={prediction_type!r}; valid: 'epsilon', 'v_prediction', 'sample'")


def x0_from_sigma(prediction_type: str, model_output, sample, sigma):
    """x̂_0 for the σ (variance-exploding, Karras et al. 2022) view, where sample = x_0 + σ ε."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / jnp.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type={prediction_type!r}; valid: 'epsilon', 'v_prediction', 'sample'")


def step_noise(noise) -> jax.Array | None:
    """The N(0, I) draw of a stochastic step as float32 (None for a deterministic one).

    The sampler draws it per image (``sd_jax.sampling.step_noise``), so image b's noise
    does not depend on the rest of the batch.
    """
    return None if noise is None else f32(noise)


def img2img_start(num_inference_steps: int, strength: float, order: int = 1) -> int:
    """Loop index to start img2img at, as diffusers' StableDiffusionImg2ImgPipeline.get_timesteps:

    init_timestep = min(int(steps * strength), steps); t_start = max(steps - init_timestep, 0);
    the loop runs timesteps[t_start * order:].
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) or not 0 <= strength <= 1:
        raise ValueError(f"strength={strength!r} must be a number in [0, 1]")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    if init_timestep < 1:
        raise ValueError(
            f"strength={strength!r} with num_inference_steps={num_inference_steps} leaves no denoising "
            f"step (int(steps * strength) = 0); raise strength to at least {1 / num_inference_steps:.4g}"
        )
    t_start = max(num_inference_steps - init_timestep, 0)
    return t_start * order


def index_array(i: int) -> jax.Array:
    return jnp.asarray(i, jnp.int32)


def as_jnp(a: np.ndarray, dtype=F32) -> jax.Array:
    return jnp.asarray(np.asarray(a), dtype)
