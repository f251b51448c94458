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

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sd_jax import sharding
from sd_jax.schedulers import Scheduler
from sd_jax.sharding import sampling_mesh as data_mesh  # noqa: F401 - the name older callers use

MODES = ("txt2img", "inpaint", "blend")  # img2img is txt2img started later; inpaint = 9-channel UNet


class Progress(Protocol):
    """Receives sampling events: a batch starts (``compiling``: its shape is new in this process), each
    denoising step ends (from the compiled loop, through a host callback), the batch is done."""

    def batch_started(self, steps: int, compiling: bool) -> None: ...

    def step(self) -> None: ...

    def batch_done(self) -> None: ...


_REPORT_LOCK = threading.Lock()
_ACTIVE: list[Progress] = []          # the listener of the sampling call now running (at most one)
_SEEN: set[tuple[Any, ...]] = set()   # (compiled loop, batch shape) pairs run in this process


def _on_step(_: Any) -> None:
    """Host side of the per-step callback compiled into a reporting loop."""
    if _ACTIVE:
        _ACTIVE[0].step()


@contextlib.contextmanager
def reporting(progress: Progress | None, run: Any, shape: tuple[int, ...], steps: int) -> Iterator[None]:
    """Route the step events of ``run`` (one call, batch ``shape``) to ``progress`` while the block runs;
    the block must wait for the result (the callbacks fire while the device computes)."""
    if progress is None:
        yield
        return
    key = (run, shape)
    with _REPORT_LOCK:
        progress.batch_started(steps, compiling=key not in _SEEN)
        _ACTIVE[:] = [progress]
        try:
            yield
        finally:
            _ACTIVE.clear()
        _SEEN.add(key)
        progress.batch_done()


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


def pad_batch(x: np.ndarray | jax.Array, multiple: int) -> Any:
    """Pad the leading axis up to a multiple by repeating the last row (numpy stays numpy)."""
    extra = -x.shape[0] % multiple
    if extra == 0:
        return x
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)], axis=0)


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
            keys: jax.Array, extra: dict[str, jax.Array], report: bool = False) -> jax.Array:
    """Run the solver from ``state.start_index`` to the end; returns float32 latents.

    ``extra`` by mode: "inpaint" (9-channel UNet) has ``mask`` (B, h, w, 1) and
    ``masked_latents`` (B, h, w, 4); "blend" (4-channel inpainting by latent
    blending) has ``mask``, ``init_latents`` and ``noise``. ``report``: each
    step calls back to the host (see :func:`reporting`).
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
        x_next, st = scheduler.step(st, eps, i, x, noise=noise)
        if mode == "blend":
            # Keep the unmasked area on the init image, noised to the next step's level
            # (diffusers StableDiffusionInpaintPipeline with a 4-channel UNet).
            nxt = jnp.minimum(i + 1, n - 1)
            proper = scheduler.add_noise_at(st, extra["init_latents"], extra["noise"], nxt)
            proper = jnp.where(i + 1 < n, proper, extra["init_latents"])
            mask = extra["mask"]
            x_next = (1.0 - mask) * proper + mask * x_next
        if report:
            jax.debug.callback(_on_step, i)
        return x_next.astype(jnp.float32), st

    start = jnp.asarray(state.start_index, jnp.int32)
    latents, _ = jax.lax.fori_loop(start, n, body, (latents.astype(jnp.float32), state))
    return latents


@functools.lru_cache(maxsize=64)
def compiled_denoise(unet: Any, scheduler: Scheduler, mode: str, guided: bool, mesh: Mesh,
                     report: bool = False) -> Any:
    """The jitted, sharded loop for one (UNet module, solver, mode, CFG on/off, mesh, step reports).

    Batch arrays are split over the mesh's batch axes (``sharding.batch_sharding``),
    parameters and the solver state replicated; jax.jit then keeps one executable per shape.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    batch = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)

    def run(params, state, latents, cond, uncond, guidance, keys, extra):
        latents = jax.lax.with_sharding_constraint(latents, batch)
        return denoise(unet, scheduler, mode, params, state, latents, cond,
                       uncond if guided else None, guidance, keys, extra, report)

    return jax.jit(run, in_shardings=(replicated, replicated, batch, batch, batch if guided else replicated,
                                      batch, batch, batch), out_shardings=batch)
