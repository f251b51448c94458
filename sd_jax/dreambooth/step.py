"""The Dreambooth train step: a pure, jitted, sharded ``train_step(state, frozen, batch) -> (state, metrics)``.

Use::

    models = StepModels.from_pipeline(pipe, config)          # modules in the compute dtype
    trainable, frozen = split_params(pipe.params, config)    # {"unet", ["text_encoder"]}, {["vae"], ["text_encoder"]}
                                                             # (LoRA: adapters, and the frozen "unet" too)
    optimizer = make_optimizer(config, trainable)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    state = init_train_state(trainable, optimizer, mesh, config)  # or restore into abstract_train_state(...)
    frozen = place_frozen(frozen, mesh, config)
    train_step = make_train_step(models, config, optimizer, mesh, state, frozen)
    batch = host_local_batch_to_global(rows, mesh, accum=config.optim.grad_accum_steps > 1)
    state, metrics = train_step(state, frozen, batch)  # `state` is donated: use the returned one

One call is one optimizer update. The batch (a dict of arrays; B rows = instance
and class examples together, a multiple of the device count, see :func:`pad_batch`):

- images, one of: ``pixel_values`` (B, H, W, 3) in [-1, 1] (VAE-encoded in the step,
  needs ``frozen["vae"]``); ``latent_mean`` + ``latent_logvar`` (B, h, w, 4), the
  cached VAE posterior (unscaled), sampled in the step; ``latents`` (B, h, w, 4),
  already sampled and scaled, used as they are.
- text, one of: ``input_ids`` (B, 77) int32 (the text encoder runs in the step:
  trainable, or ``frozen["text_encoder"]``, skipping its last ``train.clip_skip`` layers);
  ``text_embeddings`` (B, 77, D) cached with the same clip skip (only while the text
  encoder does not train).
- ``prior_mask`` (B,) 1.0 for class (prior) rows, 0.0 for instance rows; absent: all instance.
- ``valid`` (B,) 0.0 for padding rows; absent: all rows count.
- optional, for tests and reference runs: ``timesteps`` (B,) int32, ``noise`` (B, h, w, 4)
  and ``latent_noise`` (B, h, w, 4) (the posterior sample's ε) replace the step's draws.

With ``optim.grad_accum_steps = k > 1`` every array has a leading micro-batch axis (k, B, ...);
the step scans over the k micro-batches (one at a time in memory) and averages the
gradients and losses, then makes one update. Each micro-batch's loss parts are means over
its own rows, so this equals one batch of k·B rows when every micro-batch holds as many
instance (and class) rows as the others - which the trainer's batches do.

Randomness: update ``s`` uses ``key = fold_in(wrap_key_data(state.rng), s)``; timesteps
from ``fold_in(key, 0)``, noise (with offset) from ``fold_in(key, 1)``, the posterior
sample from ``fold_in(key, 2)``, each drawn for all k·B rows at once. JAX's
partitionable threefry makes the draws independent of the sharding.

Mixed precision ("bfloat16"): the float32 master weights are cast to bfloat16 for the
forward and backward passes; gradients, the loss, AdamW state and the update stay
float32.

LoRA (``lora.enabled``, :mod:`sd_jax.dreambooth.lora`): the trainable tree holds the adapters
(float32, with their AdamW state and EMA), ``frozen`` the starting UNet (and text encoder), in
``lora.base_dtype``; the loss merges them, ``W + (alpha / rank) * down @ up``, then casts to the
compute dtype, so the modules are the same.

Non-finite loss or gradients: ``metrics["finite"]`` is 0.0. With
``train.skip_nonfinite_updates`` (default) that update is not applied (weights,
optimizer state and EMA unchanged; the step counter still advances, so the next
update draws new noise, and the optimizer's own schedule count then lags
``state.step`` by the number of skipped updates). The trainer is expected to stop
and keep its last good checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from sd_jax import sharding as shd
from sd_jax.dreambooth import lora
from sd_jax.dreambooth.config import TrainConfig
from sd_jax.dreambooth.loss import dreambooth_loss, min_snr_weights, noise_with_offset
from sd_jax.dreambooth.optim import SkipsNonFinite, ema_update
from sd_jax.models.vae import AutoencoderKL
from sd_jax.schedulers import add_noise, alphas_cumprod, training_target

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
IMAGE_KEYS = ("pixel_values", "latent_mean", "latents")
TEXT_KEYS = ("input_ids", "text_embeddings")
RANDOM_KEYS = ("timesteps", "noise", "latent_noise")
KNOWN_KEYS = IMAGE_KEYS + ("latent_logvar",) + TEXT_KEYS + ("prior_mask", "valid") + RANDOM_KEYS


@flax.struct.dataclass
class TrainState:
    """Everything a run carries from update to update (and what a checkpoint holds)."""

    step: jax.Array       # int32 scalar: optimizer updates done
    params: Any           # float32 trainable weights {"unet", ["text_encoder"]}
    opt_state: Any        # optax state (float32)
    ema: Any              # EMA of ``params`` (float32), or None
    rng: jax.Array        # uint32 PRNG key data (jax.random.key_data), saveable by Orbax


@dataclasses.dataclass(frozen=True)
class StepModels:
    """The three modules (compute dtype, remat) and the noise schedule the loss needs."""

    unet: Any
    text_encoder: Any
    vae: Any
    alphas_cumprod: np.ndarray   # (T,) float32
    prediction_type: str         # "epsilon" | "v_prediction" | "sample"
    scaling_factor: float        # latent scale (0.18215)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def compute_dtype(self) -> Any:
        return self.unet.dtype

    @classmethod
    def from_pipeline(cls, pipe: Any, config: TrainConfig) -> StepModels:
        """From a :class:`sd_jax.StableDiffusion`: its modules re-configured with the run's compute
        dtype (parameters given to them are cast, the masters stay float32) and ``train.remat``."""
        dtype = COMPUTE_DTYPES[config.train.mixed_precision]
        schedule = pipe.noise_schedule()
        return cls(unet=pipe.unet.clone(dtype=dtype, param_dtype=jnp.float32, remat=config.train.remat),
                   text_encoder=pipe.text_encoder.clone(dtype=dtype, param_dtype=jnp.float32),
                   vae=pipe.vae.clone(dtype=dtype, param_dtype=jnp.float32),
                   alphas_cumprod=np.asarray(alphas_cumprod(schedule), np.float32),
                   prediction_type=schedule.prediction_type, scaling_factor=float(pipe.scaling_factor))

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


# ------------------------------------------------------------------------------ parameters

def split_params(params: dict[str, Any], config: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pipeline parameters -> (trainable, frozen) for ``config``.

    trainable: ``unet`` (+ ``text_encoder`` when it trains). frozen: ``vae`` unless
    latents are cached, ``text_encoder`` when it neither trains nor is cached.
    With LoRA: :func:`sd_jax.dreambooth.lora.split_params` (adapters; the bases frozen).
    """
    if config.lora.enabled:
        return lora.split_params(params, config)
    trainable = {"unet": params["unet"]}
    frozen = {}
    if config.train.train_text_encoder:
        trainable["text_encoder"] = params["text_encoder"]
    elif not config.data.cache_text_embeddings:
        frozen["text_encoder"] = params["text_encoder"]
    if not config.data.cache_latents:
        frozen["vae"] = params["vae"]
    return trainable, frozen


def _make_state(params: Any, optimizer: optax.GradientTransformation, seed: int, with_ema: bool) -> TrainState:
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema=jax.tree.map(jnp.copy, params) if with_ema else None,
                      rng=jax.random.key_data(jax.random.key(seed)))


def train_state_shapes(trainable: Any, optimizer: optax.GradientTransformation, config: TrainConfig) -> TrainState:
    """The TrainState's shapes and dtypes (``jax.eval_shape``; nothing is allocated)."""
    return jax.eval_shape(lambda p: _make_state(p, optimizer, config.seed, config.optim.ema_decay is not None),
                          trainable)


def train_state_shardings(state_shapes: TrainState, mesh: Mesh, config: TrainConfig | None = None) -> TrainState:
    """NamedSharding of every leaf of a TrainState (the rule table of :mod:`sd_jax.sharding`)."""
    min_size = config.mesh.fsdp_min_size if config is not None else shd.FSDP_MIN_SIZE
    return shd.tree_shardings(state_shapes, mesh, min_size)


def abstract_train_state(trainable: Any, optimizer: optax.GradientTransformation, mesh: Mesh,
                         config: TrainConfig) -> TrainState:
    """ShapeDtypeStructs with shardings: the target of an Orbax restore (and of jit out_shardings)."""
    shapes = train_state_shapes(trainable, optimizer, config)
    return shd.abstract(shapes, train_state_shardings(shapes, mesh, config))


def init_train_state(trainable: Any, optimizer: optax.GradientTransformation, mesh: Mesh, config: TrainConfig,
                     *, donate: bool = False) -> TrainState:
    """A fresh TrainState (step 0, float32 masters, zero Adam moments, EMA = weights,
    rng from ``config.seed``), every leaf created directly in its sharding.

    ``trainable`` may be host or device arrays (e.g. ``pipe.params["unet"]``), the same on
    every process. ``donate=True`` lets the new state reuse their memory (they become invalid).
    """
    shapes = train_state_shapes(trainable, optimizer, config)
    shardings = train_state_shardings(shapes, mesh, config)
    params = shd.shard_tree(trainable, shardings.params)
    init = jax.jit(lambda p: _make_state(p, optimizer, config.seed, config.optim.ema_decay is not None),
                   in_shardings=(shardings.params,), out_shardings=shardings,
                   donate_argnums=(0,) if donate else ())
    return init(params)


def place_frozen(frozen: Any, mesh: Mesh, config: TrainConfig | None = None) -> Any:
    """The frozen parameters in their shardings (same rule table: fsdp applies to them too)."""
    min_size = config.mesh.fsdp_min_size if config is not None else shd.FSDP_MIN_SIZE
    return shd.shard_tree(frozen, shd.tree_shardings(frozen, mesh, min_size))


# ------------------------------------------------------------------------------ batches

def pad_batch(batch: dict[str, Any], multiple: int, accum: bool = False) -> dict[str, np.ndarray]:
    """Pad the row axis up to a multiple (e.g. the device count) with copies of row 0 that have
    ``valid = 0`` (they cost compute but not loss). Adds ``valid`` if missing."""
    axis = 1 if accum else 0
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    rows = next(iter(arrays.values())).shape[axis]
    if "valid" not in arrays:
        shape = arrays[next(iter(arrays))].shape[: axis + 1]
        arrays["valid"] = np.ones(shape, np.float32)
    extra = -rows % multiple
    if not extra:
        return arrays
    out = {}
    for k, v in arrays.items():
        filler = np.repeat(np.take(v, [0], axis=axis), extra, axis=axis)
        if k == "valid":
            filler = np.zeros_like(filler)
        out[k] = np.concatenate([v, filler], axis=axis)
    return out


def concat_prior_batch(instance: dict[str, Any], prior: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Instance rows and class rows (same keys) -> one batch with ``prior_mask``."""
    rows = len(next(iter(instance.values())))
    if prior is None:
        return {**{k: np.asarray(v) for k, v in instance.items()}, "prior_mask": np.zeros((rows,), np.float32)}
    if set(instance) != set(prior):
        raise ValueError(f"instance keys {sorted(instance)} differ from class keys {sorted(prior)}")
    prior_rows = len(next(iter(prior.values())))
    out = {k: np.concatenate([np.asarray(instance[k]), np.asarray(prior[k])]) for k in instance}
    out["prior_mask"] = np.concatenate([np.zeros((rows,), np.float32), np.ones((prior_rows,), np.float32)])
    return out


def process_rows(mesh: Mesh, rows: int, devices: Any = None) -> list[int]:
    """The global batch rows this process's devices (or ``devices``) hold under
    :func:`sd_jax.sharding.batch_sharding`, ascending: the order
    ``jax.make_array_from_process_local_data`` expects its local rows in."""
    if rows % mesh.size:
        raise ValueError(f"a global batch of {rows} rows cannot be split over {mesh.size} devices")
    index = shd.batch_sharding(mesh).devices_indices_map((rows,))
    mine = set(jax.local_devices() if devices is None else devices)
    return sorted({r for d, (sl,) in index.items() if d in mine for r in range(*sl.indices(rows))})


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Where the rows of one global micro-batch sit, whatever the number of processes.

    Rows ``[0, batch_size)`` are the instance examples, then (prior preservation)
    ``batch_size`` class rows, then padding rows (copies of row 0, ``valid = 0``) up to
    a multiple of ``devices`` (the global device count): the batch one process builds
    with :func:`concat_prior_batch` and :func:`pad_batch`. The step draws timesteps and
    noise per global row (:func:`draw_randomness`), so a process must feed exactly the
    rows its devices hold (:func:`process_rows`) for an N-process run to compute the
    one-process update; concatenating each process's own instance and class rows would
    reorder the rows and pair them with other draws.
    """

    batch_size: int
    with_prior: bool
    devices: int

    @property
    def real_rows(self) -> int:
        return self.batch_size * (2 if self.with_prior else 1)

    @property
    def rows(self) -> int:
        """Rows of the padded global batch."""
        return self.real_rows + (-self.real_rows % self.devices)

    def split(self, rows: list[int]) -> tuple[list[int], list[int], int]:
        """Global rows (ascending) -> (instance rows, class rows, padding row count) among them."""
        b = self.batch_size
        instance = [r for r in rows if r < b]
        prior = [r - b for r in rows if b <= r < self.real_rows]
        return instance, prior, sum(r >= self.real_rows for r in rows)

    @staticmethod
    def assemble(instance: dict[str, Any] | None, prior: dict[str, Any] | None, pad: int,
                 pad_row: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """A process's rows in global order: its instance rows, its class rows, ``pad`` copies of
        ``pad_row`` (the batch's row 0, one-row arrays); adds ``prior_mask`` and ``valid``."""
        parts, mask, valid = [], [], []
        for part, is_prior in ((instance, 0.0), (prior, 1.0)):
            if part is not None:
                n = len(next(iter(part.values())))
                parts.append({k: np.asarray(v) for k, v in part.items()})
                mask += [is_prior] * n
                valid += [1.0] * n
        if pad:
            if pad_row is None:
                raise ValueError(f"{pad} padding row(s) need the batch's row 0 (pad_row)")
            parts.append({k: np.repeat(np.asarray(v)[:1], pad, axis=0) for k, v in pad_row.items()})
            mask += [0.0] * pad
            valid += [0.0] * pad
        if not parts:
            raise ValueError("no rows to assemble")
        keys = set(parts[0])
        if any(set(p) != keys for p in parts):
            raise ValueError(f"batch parts carry different keys: {[sorted(p) for p in parts]}")
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        out["prior_mask"] = np.asarray(mask, np.float32)
        out["valid"] = np.asarray(valid, np.float32)
        return out


def _check_batch(batch: dict[str, Any], trainable: Any, frozen: Any, accum: int) -> None:
    """Trace-time checks with errors that say what the batch must carry."""
    unknown = sorted(set(batch) - set(KNOWN_KEYS))
    if unknown:
        raise ValueError(f"unknown batch keys {unknown}; known: {KNOWN_KEYS}")
    lead = 2 if accum > 1 else 1
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    rows = {k: s[:lead] for k, s in shapes.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"batch arrays disagree on their leading {'(micro, rows)' if lead == 2 else 'row'} "
                         f"axes: {rows}")
    if accum > 1 and next(iter(rows.values()))[0] != accum:
        raise ValueError(f"optim.grad_accum_steps={accum}: batch arrays need a leading micro-batch axis of "
                         f"{accum}, got shapes {shapes}")
    images = [k for k in IMAGE_KEYS if k in batch]
    if len(images) != 1:
        raise ValueError(f"the batch needs exactly one of {IMAGE_KEYS} (latent_mean with latent_logvar), "
                         f"got {images}")
    if images[0] == "latent_mean" and "latent_logvar" not in batch:
        raise ValueError("batch has latent_mean but no latent_logvar (cached VAE posterior needs both)")
    if images[0] == "pixel_values" and "vae" not in frozen:
        raise ValueError("batch has pixel_values but frozen has no 'vae' parameters (cache latents, or "
                         "keep the VAE in frozen: data.cache_latents=false)")
    texts = [k for k in TEXT_KEYS if k in batch]
    if len(texts) != 1:
        raise ValueError(f"the batch needs exactly one of {TEXT_KEYS}, got {texts}")
    if "text_encoder" in trainable and texts[0] != "input_ids":
        raise ValueError("the text encoder trains: the batch must carry input_ids, not text_embeddings")
    if texts[0] == "input_ids" and "text_encoder" not in trainable and "text_encoder" not in frozen:
        raise ValueError("batch has input_ids but there are no text encoder parameters (trainable or frozen)")


# ------------------------------------------------------------------------------ loss

def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_loss_fn(models: StepModels, config: TrainConfig) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """``loss_fn(trainable, frozen, batch) -> (total, {"instance_loss", "prior_loss"})`` for ONE
    micro-batch whose randomness is explicit: the batch must carry ``timesteps`` and
    ``noise`` (and ``latent_noise`` when it holds pixels or the cached posterior). Pure;
    ``jax.value_and_grad(loss_fn, has_aux=True)`` gives the gradients of the step."""
    t_cfg = config.train
    dtype = models.compute_dtype
    ac = jnp.asarray(models.alphas_cumprod)
    clip_skip = int(t_cfg.clip_skip)  # static: the layers skipped are not computed

    def trained(name, trainable, frozen):
        """A training module's weights in the compute dtype (LoRA: its frozen base with the adapters merged)."""
        if config.lora.enabled:
            return _cast_floats(lora.merge(frozen[name], trainable[name], config.lora.scale), dtype)
        return _cast_floats(trainable[name], dtype)

    def latents_of(frozen, batch):
        if "latents" in batch:
            return batch["latents"].astype(jnp.float32)
        if "pixel_values" in batch:
            mean, logvar = models.vae.apply({"params": _cast_floats(frozen["vae"], dtype)},
                                            batch["pixel_values"].astype(dtype), method=AutoencoderKL.encode)
        else:
            mean, logvar = batch["latent_mean"], batch["latent_logvar"]
        z = mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * batch["latent_noise"]
        return jax.lax.stop_gradient(z * models.scaling_factor)  # (B, h, w, 4)

    def context_of(trainable, frozen, batch):
        if "text_embeddings" in batch:
            return batch["text_embeddings"]
        if "text_encoder" in trainable:
            return models.text_encoder.apply({"params": trained("text_encoder", trainable, frozen)},
                                             batch["input_ids"], clip_skip=clip_skip)
        emb = models.text_encoder.apply({"params": _cast_floats(frozen["text_encoder"], dtype)}, batch["input_ids"],
                                        clip_skip=clip_skip)
        return jax.lax.stop_gradient(emb)  # (B, 77, D)

    def loss_fn(trainable, frozen, batch):
        t = batch["timesteps"]
        noise = batch["noise"].astype(jnp.float32)
        x0 = latents_of(frozen, batch)
        noisy = add_noise(ac, x0, noise, t)
        target = training_target(models.prediction_type, ac, x0, noise, t)
        context = context_of(trainable, frozen, batch)
        pred = models.unet.apply({"params": trained("unet", trainable, frozen)}, noisy.astype(dtype), t,
                                 context.astype(dtype))
        weights = (min_snr_weights(ac, t, t_cfg.min_snr_gamma, models.prediction_type)
                   if t_cfg.min_snr_gamma is not None else None)
        return dreambooth_loss(pred, target, batch.get("prior_mask"), t_cfg.prior_loss_weight, weights,
                               batch.get("valid"))

    return loss_fn


def draw_randomness(key: jax.Array, batch: dict[str, Any], models: StepModels, config: TrainConfig,
                    accum: int = 1) -> dict[str, jax.Array]:
    """Timesteps, noise and posterior ε for every row of the batch (for all micro-batches at once);
    keys the batch already carries are kept. Returns the batch with them added."""
    lead = tuple(next(iter(batch.values())).shape[: 2 if accum > 1 else 1])
    n = int(np.prod(lead))
    if "latents" in batch:
        latent_shape = tuple(batch["latents"].shape[len(lead):])
    elif "latent_mean" in batch:
        latent_shape = tuple(batch["latent_mean"].shape[len(lead):])
    else:
        h, w = batch["pixel_values"].shape[len(lead):len(lead) + 2]
        f = models.latent_factor
        latent_shape = (h // f, w // f, models.vae.config.latent_channels)
    out = dict(batch)
    if "timesteps" not in out:
        t = jax.random.randint(jax.random.fold_in(key, 0), (n,), 0, models.num_train_timesteps, jnp.int32)
        out["timesteps"] = t.reshape(lead)
    if "noise" not in out:
        noise = noise_with_offset(jax.random.fold_in(key, 1), (n, *latent_shape), config.train.noise_offset)
        out["noise"] = noise.reshape(lead + latent_shape)
    if "latent_noise" not in out and "latents" not in out:
        eps = jax.random.normal(jax.random.fold_in(key, 2), (n, *latent_shape), jnp.float32)
        out["latent_noise"] = eps.reshape(lead + latent_shape)
    return out


# ------------------------------------------------------------------------------ the step

def _shardings_of(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def make_train_step(models: StepModels, config: TrainConfig, optimizer: SkipsNonFinite,
                    mesh: Mesh, state: TrainState, frozen: Any) -> Callable[..., tuple[TrainState, dict]]:
    """The jitted ``train_step(state, frozen, batch) -> (state, metrics)``.

    ``state`` and ``frozen`` give the shardings (concrete arrays, or the ShapeDtypeStructs of
    :func:`abstract_train_state`); the batch is sharded by :func:`sd_jax.sharding.batch_sharding`.
    The state argument is donated. Metrics (replicated float32 scalars): ``loss``,
    ``instance_loss``, ``prior_loss``, ``grad_norm`` (before clipping), ``lr`` (UNet),
    ``lr_text_encoder`` (when it trains), ``finite`` (1.0, or 0.0 for a NaN/inf loss or gradient).
    """
    if not isinstance(optimizer, SkipsNonFinite):
        raise TypeError(f"optimizer must come from sd_jax.dreambooth.optim.make_optimizer (it skips "
                        f"non-finite updates in place), got {type(optimizer).__name__}")
    accum = config.optim.grad_accum_steps
    if ("text_encoder" in state.params) != config.train.train_text_encoder:
        raise ValueError(f"the state trains {sorted(state.params)} but train.train_text_encoder="
                         f"{config.train.train_text_encoder}")
    if config.lora.enabled and not set(state.params) <= set(frozen):
        raise ValueError(f"lora.enabled: the adapters of {sorted(state.params)} need their frozen base weights, "
                         f"frozen holds {sorted(frozen)} (use split_params)")
    loss_fn = make_loss_fn(models, config)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    schedules = optimizer.schedules
    ema_decay = config.optim.ema_decay
    skip = config.train.skip_nonfinite_updates
    state_sh = _shardings_of(state)
    frozen_sh = _shardings_of(frozen)
    batch_sh = shd.batch_sharding(mesh, accum > 1)
    metric_sh = shd.replicated(mesh)

    def constrain(grads):
        return jax.lax.with_sharding_constraint(grads, state_sh.params)

    def step_fn(state: TrainState, frozen: Any, batch: dict[str, jax.Array]):
        _check_batch(batch, state.params, frozen, accum)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        batch = draw_randomness(key, batch, models, config, accum)
        if accum == 1:
            (loss, parts), grads = grad_fn(state.params, frozen, batch)
            grads = constrain(grads)
        else:
            def micro(carry, micro_batch):
                (loss_i, parts_i), grads_i = grad_fn(state.params, frozen, micro_batch)
                acc_grads, acc_loss, acc_parts = carry
                acc_grads = constrain(jax.tree.map(jnp.add, acc_grads, grads_i))
                acc_parts = jax.tree.map(jnp.add, acc_parts, parts_i)
                return (acc_grads, acc_loss + loss_i, acc_parts), None

            zeros = constrain(jax.tree.map(jnp.zeros_like, state.params))
            zero = jnp.zeros((), jnp.float32)
            init = (zeros, zero, {"instance_loss": zero, "prior_loss": zero})
            (grads, loss, parts), _ = jax.lax.scan(micro, init, batch)
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss = loss / accum
            parts = jax.tree.map(lambda v: v / accum, parts)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, finite=finite)
        params = optax.apply_updates(state.params, updates)
        applied = finite if skip else jnp.bool_(True)
        ema = (ema_update(state.ema, params, jnp.where(applied, ema_decay, 1.0))
               if ema_decay is not None else state.ema)
        metrics = {"loss": loss, **parts, "grad_norm": grad_norm, "lr": schedules["unet"](state.step),
                   "finite": finite.astype(jnp.float32)}
        if "text_encoder" in schedules:
            metrics["lr_text_encoder"] = schedules["text_encoder"](state.step)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        return new_state, metrics

    return jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, metric_sh), donate_argnums=0)
