"""The denoising loop: one ``jax.jit`` over a ``lax.fori_loop``, sharded over a ``data`` mesh axis.

Seeds. Image ``b`` of a call gets its own integer seed (``seed + b`` when one
integer is given, or the given list). From it: the initial noise is
``jax.random.normal(jax.random.key(seed_b), (h, w, C))`` and the noise a
stochastic solver (euler_a, ddim with eta > 0, ddpm) adds at loop index ``i`` is
``jax.random.normal(jax.random.fold_in(jax.random.fold_in(key(seed_b), 1), i), (h, w, C))``.
Nothing depends on the other images of the batch, so image ``b`` is
regenerated alone by calling with ``seed=seed_b`` and its prompt.

Compilation. The loop is compiled once per (UNet, solver, image size, batch
size, mode) and kept by ``jax.jit``; guidance scales, seeds, prompts, strength
(img2img start), the step count (the loop's end) and the solver's arrays,
padded to one length by ``pad_schedule``, are traced values, so changing them
never recompiles. Whether the unconditional half is computed
(any guidance scale > 1) is a static choice: with every scale <= 1 the
unconditional UNet pass is not compiled at all.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sd_jax.schedulers import Scheduler

MODES = ("txt2img", "inpaint", "blend")
MAX_SEED = 2**32 - 1  # jax.random.key takes 32-bit seeds  # img2img is txt2img started later; inpaint = 9-channel UNet


def image_seeds(seed: int | Sequence[int] | None, batch: int) -> list[int]:
    """Per-image seeds: ``seed + b`` for an int, the list itself, or random when None."""
    if seed is None:
        seed = int(np.random.default_rng().integers(0, MAX_SEED - batch))
    if isinstance(seed, (int, np.integer)):
        if not 0 <= int(seed) <= MAX_SEED - batch:
            raise ValueError(f"seed {seed} must be an integer in [0, {MAX_SEED - batch}] for {batch} image(s) "
                             f"(image b gets seed + b, and seeds are 32-bit)")
        return [int(seed) + b for b in range(batch)]
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds given for {batch} images; give one per image or one int")
    if any(not 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"seeds must be integers in [0, {MAX_SEED}], got {seeds}")
    return seeds


def seed_keys(seeds: Sequence[int]) -> jax.Array:
    """(B,) typed PRNG keys, one per image seed."""
    return jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seeds, np.uint32)))


def initial_noise(keys: jax.Array, shape_hwc: tuple[int, int, int]) -> jax.Array:
    """(B, h, w, C) unit-variance noise, image b drawn from its own key."""
    return jax.vmap(lambda k: jax.random.normal(k, shape_hwc, jnp.float32))(keys)


def step_noise(keys: jax.Array, i: jax.Array, shape_hwc: tuple[int, ...]) -> jax.Array:
    """(B, h, w, C) noise for loop index i, image b from fold_in(fold_in(key_b, 1), i)."""
    return jax.vmap(lambda k: jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(k, 1), i), shape_hwc, jnp.float32))(keys)


def data_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A one-axis ``data`` mesh over the local devices."""
    devices = list(devices) if devices is not None else jax.local_devices()
    return Mesh(np.asarray(devices), ("data",))


def pad_batch(x: np.ndarray | jax.Array, multiple: int) -> Any:
    """Pad the leading axis up to a multiple by repeating the last row."""
    extra = -x.shape[0] % multiple
    if extra == 0:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)], axis=0)


def guided_eps(unet: Any, params: Any, x: jax.Array, t: jax.Array, cond: jax.Array,
               uncond: jax.Array | None, guidance: jax.Array) -> jax.Array:
    """Classifier-free guidance: one UNet call on [uncond; cond] (or cond alone), float32 out.

    eps = eps_uncond + s * (eps_cond - eps_uncond), s per image.
    """
    batch = x.shape[0]
    tt = jnp.broadcast_to(t, (batch,))
    if uncond is None:
        return unet.apply({"params": params}, x.astype(unet.dtype), tt, cond).astype(jnp.float32)
    out = unet.apply({"params": params}, jnp.concatenate([x, x]).astype(unet.dtype),
                     jnp.concatenate([tt, tt]), jnp.concatenate([uncond, cond]))
    eps_u, eps_c = jnp.split(out.astype(jnp.float32), 2)
    return eps_u + guidance[:, None, None, None] * (eps_c - eps_u)


def denoise(unet: Any, scheduler: Scheduler, mode: str, params: Any, state: Any,
            latents: jax.Array, cond: jax.Array, uncond: jax.Array | None, guidance: jax.Array,
            keys: jax.Array, extra: dict[str, jax.Array]) -> jax.Array:
    """Run the solver from ``state.start_index`` to the end; returns float32 latents.

    ``extra`` by mode: "inpaint" (9-channel UNet) has ``mask`` (B, h, w, 1) and
    ``masked_latents`` (B, h, w, 4); "blend" (4-channel inpainting by latent
    blending) has ``mask``, ``init_latents`` and ``noise``.
    """
    n = state.num_calls  # traced: the step count is not part of the compiled shape
    shape = latents.shape[1:]
    stochastic = scheduler.stochastic or bool(getattr(state, "stochastic", False))

    def body(i, carry):
        x, st = carry
        model_in = scheduler.scale_model_input(st, x, i)
        if mode == "inpaint":
            model_in = jnp.concatenate([model_in, extra["mask"], extra["masked_latents"]], axis=-1)
        eps = guided_eps(unet, params, model_in, st.timesteps[i], cond, uncond, guidance)
        noise = step_noise(keys, i, shape) if stochastic else None
        x_next, st = scheduler.step(st, eps, i, x, None, noise=noise)
        if mode == "blend":
            # Keep the unmasked area on the init image, noised to the next step's level
            # (diffusers StableDiffusionInpaintPipeline with a 4-channel UNet).
            nxt = jnp.minimum(i + 1, n - 1)
            proper = scheduler.add_noise_at(st, extra["init_latents"], extra["noise"], nxt)
            proper = jnp.where(i + 1 < n, proper, extra["init_latents"])
            mask = extra["mask"]
            x_next = (1.0 - mask) * proper + mask * x_next
        return x_next.astype(jnp.float32), st

    start = jnp.asarray(state.start_index, jnp.int32)
    latents, _ = jax.lax.fori_loop(start, n, body, (latents.astype(jnp.float32), state))
    return latents


@functools.lru_cache(maxsize=64)
def compiled_denoise(unet: Any, scheduler: Scheduler, mode: str, guided: bool, mesh: Mesh) -> Any:
    """The jitted, sharded loop for one (UNet module, solver, mode, CFG on/off, mesh).

    Batch arrays are split over the mesh's ``data`` axis, parameters and the
    solver state replicated; jax.jit then keeps one executable per shape.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    def run(params, state, latents, cond, uncond, guidance, keys, extra):
        latents = jax.lax.with_sharding_constraint(latents, batch)
        return denoise(unet, scheduler, mode, params, state, latents, cond,
                       uncond if guided else None, guidance, keys, extra)

    return jax.jit(run, in_shardings=(replicated, replicated, batch, batch, batch if guided else replicated,
                                      batch, batch, batch), out_shardings=batch)
