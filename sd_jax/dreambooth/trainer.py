"""The Dreambooth run: class images, data, the sharded train step, checkpoints, logs, export.

    from sd_jax.dreambooth.config import load_config
    from sd_jax.dreambooth.trainer import train
    result = train(load_config("configs/dreambooth/unet.yaml", {"model": "path", ...}))

Output folder layout: ``checkpoints/`` (Orbax, resumable, checksummed), ``logs/`` (TensorBoard,
``metrics.jsonl``), ``samples/`` (validation images), ``final/`` (a diffusers folder; a LoRA run: the
adapters as ``pytorch_lora_weights.safetensors`` (PEFT/diffusers) and ``kohya_lora.safetensors``, plus the
merged diffusers folder with ``checkpoint.merge_lora``), ``config.json``,
the run marker ``.sd_jax_run.json`` and the lock ``.sd_jax.lock`` (rules: :mod:`sd_jax.dreambooth.run_dir`).

Clip skip (``train.clip_skip`` N, AUTOMATIC1111's "Clip skip" N+1): the UNet learns from the text encoder's
layer N before the last, in the loss, the cached embeddings, the class images and the samples alike; the
result is meant to be sampled with the same N. config.json records it, a LoRA's kohya file as ``ss_clip_skip``
(N+1), and the run ends saying so (a diffusers folder has no field for it).

Resume: a run whose output folder already holds checkpoints continues from the
latest one (``resume=None``, the default), or must (``resume=True``), or starts
over refusing to touch existing checkpoints (``resume=False``). The train
state (weights, Adam moments, EMA, step, RNG) and the data position are
restored exactly, so a killed run ends with the parameters of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sd_jax import sharding as shd
from sd_jax.dreambooth import data as dbdata
from sd_jax.dreambooth import lora
from sd_jax.dreambooth.checkpoint import Checkpointer, set_aside
from sd_jax.dreambooth.config import ConfigError, TrainConfig
from sd_jax.dreambooth.metrics import MetricsLogger, Progress, RunSummary
from sd_jax.dreambooth.run_dir import RunDir, StopOnInterrupt, TrainingDiverged, TrainingInterrupted
from sd_jax.dreambooth.optim import make_optimizer
from sd_jax.dreambooth.step import (BatchLayout, StepModels, abstract_train_state, init_train_state,
                                    make_train_step, place_frozen, process_rows, split_params)
from sd_jax.memory import compiled_peak_bytes

log = logging.getLogger("sd_jax.dreambooth")


__all__ = ["TrainResult", "TrainingDiverged", "TrainingInterrupted", "train"]


@dataclasses.dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    final_dir: Path | None
    single_file: Path | None
    steps: int
    final_loss: float
    summary: dict[str, Any]
    resumed_from: int | None
    complete: bool = False  # the run had already finished: nothing was trained or written


@dataclasses.dataclass
class RunPaths:
    """The output folder's parts."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def final(self) -> Path:
        return self.root / "final"


def data_concepts(config: TrainConfig) -> list[dbdata.Concept]:
    """The config's concepts as data concepts, class folders resolved (validated: folders exist)."""
    out = []
    for i, c in enumerate(config.concepts):
        class_dir = str(config.class_dir(i)) if c.class_prompt is not None else None
        if class_dir is not None:
            Path(class_dir).mkdir(parents=True, exist_ok=True)
        out.append(dbdata.Concept(instance_dir=c.instance_dir, instance_prompt=c.instance_prompt,
                                  class_prompt=c.class_prompt, class_dir=class_dir,
                                  num_class_images=max(c.num_class_images, 1)))
    return out


def check_clip_skip(pipe: Any, config: TrainConfig) -> None:
    """``train.clip_skip`` leaves at least one of the loaded text encoder's layers (checked before any work)."""
    skip, layers = config.train.clip_skip, pipe.text_encoder.config.num_hidden_layers
    if skip >= layers:
        raise ConfigError(f"train.clip_skip {skip} must be below the text encoder's {layers} layers (0 to "
                          f"{layers - 1}; AUTOMATIC1111's 'Clip skip' is N+1)")


def prepare_class_images(pipe: Any, config: TrainConfig, concepts: list[dbdata.Concept],
                         progress: bool = True) -> None:
    """Generate the missing class images with the frozen starting model (process 0 of a multi-host run)."""
    if not config.with_prior_preservation:
        return
    ci = config.class_images
    if jax.process_index() == 0:
        for concept in concepts:
            dbdata.ensure_class_images(pipe, concept, resolution=config.data.resolution, batch_size=ci.batch_size,
                                       seed=ci.seed if ci.seed is not None else config.seed,
                                       num_inference_steps=ci.num_inference_steps,
                                       guidance_scale=ci.guidance_scale, scheduler=ci.scheduler,
                                       clip_skip=config.train.clip_skip, progress=progress)
    if jax.process_count() > 1:  # the others wait (class folders must be on a shared filesystem)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sd_jax class images")


class BatchBuilder:
    """Dataset rows -> the train step's batch dict, with cached latents and text embeddings."""

    def __init__(self, pipe: Any, config: TrainConfig, dataset: dbdata.DreamboothDataset):
        self.config, self.dataset, self.pipe = config, dataset, pipe
        self.latents: dict[tuple[str, int, bool], tuple[np.ndarray, np.ndarray]] = {}
        self.embeddings: dict[str, np.ndarray] = {}
        if config.data.cache_latents:
            self._cache_latents()

    def _cache_latents(self) -> None:
        """VAE posterior moments of every image once (and of its mirror image for random flips)."""
        flips = (False, True) if self.config.data.random_flip else (False,)
        items = list(self.dataset.iter_all_images())
        for start in range(0, len(items), 8):
            chunk = items[start:start + 8]
            pixels = np.stack([it.image for it in chunk]) * 0.5 + 0.5  # [-1, 1] -> [0, 1]
            for flip in flips:
                mean, logvar = self.pipe.latent_moments(pixels[:, :, ::-1] if flip else pixels)
                for it, m, lv in zip(chunk, np.asarray(mean), np.asarray(logvar)):
                    self.latents[(it.kind, it.index, flip)] = (m, lv)

    def _text(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """input_ids, or cached embeddings while the text encoder is frozen."""
        if not self.config.cached_text_embeddings:
            return {"input_ids": np.asarray(self.pipe.tokenize(prompts), np.int32)}
        missing = sorted({p for p in prompts if p not in self.embeddings})
        if missing:
            embeddings = self.pipe.encode_prompt(missing, clip_skip=self.config.train.clip_skip, prompt_syntax="plain")
            for p, e in zip(missing, np.asarray(embeddings)):
                self.embeddings[p] = e
        return {"text_embeddings": np.stack([self.embeddings[p] for p in prompts])}

    def _part(self, rows: dict[str, Any], kind: str) -> dict[str, np.ndarray]:
        """One half (instance or class) of a micro-batch."""
        prompts = list(rows[f"{kind}_prompts"])
        part = self._text(prompts)
        if self.config.data.cache_latents:
            pairs = [self.latents[(kind, int(i), bool(f))]
                     for i, f in zip(rows[f"{kind}_index"], rows[f"{kind}_flip"])]
            part["latent_mean"] = np.stack([m for m, _ in pairs])
            part["latent_logvar"] = np.stack([lv for _, lv in pairs])
        else:
            part["pixel_values"] = np.asarray(rows[f"{kind}_images"], np.float32)
        return part

    def micro_batch(self, position: int, mesh: Any) -> dict[str, np.ndarray]:
        """The rows of global micro-batch ``position`` this process's devices hold (all rows in a
        one-process run): the same rows, in the same places, whatever the process count (BatchLayout)."""
        layout = BatchLayout(self.dataset.batch_size, self.config.with_prior_preservation, mesh.size)
        instance_rows, class_rows, pad = layout.split(process_rows(mesh, layout.rows))
        rows = self.dataset.rows(position, instance_rows + [0] * bool(pad), class_rows)  # row 0: the padding
        instance = self._part(rows, "instance") if instance_rows or pad else None
        prior = self._part(rows, "class") if class_rows else None
        n = len(instance_rows)
        pad_row = {k: v[n:] for k, v in instance.items()} if pad else None
        instance = {k: v[:n] for k, v in instance.items()} if n else None
        return layout.assemble(instance, prior, pad, pad_row)

    def update_batch(self, position: int, mesh: Any) -> dict[str, np.ndarray]:
        """The micro-batches of one optimizer update, stacked (k, B, ...) when accumulating."""
        k = self.config.optim.grad_accum_steps
        micro = [self.micro_batch(position + j, mesh) for j in range(k)]
        if k == 1:
            return micro[0]
        return {key: np.stack([m[key] for m in micro]) for key in micro[0]}


def _check_output_dir(paths: RunPaths, config: TrainConfig, resume: bool | None,
                      resume_step: int | None = None) -> int | None:
    """Decide whether to resume; refuse to mix runs. Returns the step to resume from, or None.

    ``resume_step``: resume from that (earlier) checkpoint; the later ones are set aside, not deleted.
    ``train.max_train_steps`` may grow between runs (the run is extended), never drop below the step reached.
    """
    ckpt_dir = paths.checkpoints
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.is_dir() else []
    if resume is True and not steps:
        raise ValueError(f"--resume: {ckpt_dir} holds no checkpoint to resume from")
    if steps and resume is False:
        raise ValueError(f"{paths.root} already holds checkpoints (steps {steps}); resume it (the default) "
                         "or choose another --output-dir")
    if resume_step is not None and resume_step not in steps:
        raise ValueError(f"--resume-step {resume_step}: {ckpt_dir} holds no such checkpoint; steps: {steps[-8:]}")
    saved = paths.root / "config.json"
    if steps and saved.is_file():
        before = json.loads(saved.read_text())
        try:  # sections and keys added since that run was written compare as their defaults
            before = TrainConfig.from_dict(before).to_dict()
        except (ConfigError, TypeError):
            pass
        now = config.to_dict()
        before_train = {k: v for k, v in (before.get("train") or {}).items() if k != "max_train_steps"}
        now_train = {k: v for k, v in now["train"].items() if k != "max_train_steps"}
        changed = sorted(k for k in set(before) | set(now)
                         if k not in ("logging", "checkpoint", "train", "output_dir")  # a moved folder resumes
                         and before.get(k) != now.get(k))
        changed += [f"train.{k}" for k in sorted(set(before_train) | set(now_train))  # e.g. train.clip_skip
                    if before_train.get(k) != now_train.get(k)]
        if changed:
            raise ValueError(f"{paths.root} holds a run with a different configuration (sections differ: "
                             f"{', '.join(changed)}); resume with the same settings or use another --output-dir")
    if resume_step is not None and steps[-1] > resume_step:
        set_aside(ckpt_dir, [s for s in steps if s > resume_step])
        log.warning("resuming from step %d: later checkpoints moved to %s", resume_step, ckpt_dir / ".set_aside")
        steps = [s for s in steps if s <= resume_step]
    if steps and steps[-1] > config.train.max_train_steps:
        raise ValueError(f"--max-train-steps {config.train.max_train_steps} is below the step this run has reached "
                         f"({steps[-1]}); pass at least {steps[-1]}, or --resume-step N to go back")
    return steps[-1] if steps else None


def _validation_prompts(config: TrainConfig) -> list[str]:
    """The prompts sampled during training: the configured ones, else the instance prompts."""
    prompts = list(config.logging.validation_prompts) or [c.instance_prompt for c in config.concepts]
    return list(dict.fromkeys(prompts))


def sample_images(pipe: Any, params: dict[str, Any], config: TrainConfig, seed: int = 0) -> Any:
    """Validation images of the current weights (fixed seeds, so runs are comparable)."""
    trained = dataclasses.replace(pipe, params={**pipe.params, **params})
    res = config.data.resolution
    return trained.generate(_validation_prompts(config), height=res, width=res, seed=seed,
                            num_inference_steps=config.logging.sample_steps,
                            guidance_scale=config.logging.sample_guidance_scale, clip_skip=config.train.clip_skip)


def _host(tree: Any) -> Any:
    """A pytree of (possibly sharded) arrays gathered to host numpy."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def train(config: TrainConfig, *, pipe: Any = None, resume: bool | None = None, progress: bool = True,
          overwrite: bool = False, resume_step: int | None = None) -> TrainResult:
    """Run (or resume) a Dreambooth fine-tune; returns where the model went and the run's figures.

    The output folder must be new, empty, or an sd_jax run (``overwrite=True``: a non-empty folder of other
    files, left alone); it is locked for the run (see :mod:`sd_jax.dreambooth.run_dir`). ``resume_step``
    resumes from an earlier checkpoint. Ctrl-C stops after the current step with a checkpoint and raises
    :class:`TrainingInterrupted`; a NaN/inf loss raises :class:`TrainingDiverged`.
    """
    config.check_runnable()
    shd.initialize_distributed()
    run = RunDir.open(config.output_dir, overwrite=overwrite, primary=jax.process_index() == 0)
    try:
        return _train(config, run, pipe=pipe, resume=resume, progress=progress, resume_step=resume_step)
    except jax.errors.JaxRuntimeError as err:
        lost = lost_process_error(err, Path(config.output_dir) / "checkpoints")
        if lost is None:
            raise
        raise lost from err
    finally:
        run.close()


_PEER_FAILURE = ("heartbeat", "another task", "connection closed", "unhealthy", "barrier failed")


def lost_process_error(err: BaseException, checkpoints: Path) -> OSError | None:
    """A collective or barrier failed because another process of the run died: one clear line, else None."""
    text = " ".join(str(err).split())
    if jax.process_count() == 1 or not any(sign in text.lower() for sign in _PEER_FAILURE):
        return None
    return OSError(f"another process of this {jax.process_count()}-process run died or became unreachable "
                   f"({text[:160]}); run the same command on every host again to resume from the last complete "
                   f"checkpoint in {checkpoints}")


def _train(config: TrainConfig, run: RunDir, *, pipe: Any, resume: bool | None, progress: bool,
           resume_step: int | None) -> TrainResult:
    """The run itself, in a folder this process holds."""
    from sd_jax.pipeline import StableDiffusion

    config.check_runnable()
    shd.initialize_distributed()
    paths = RunPaths(Path(config.output_dir))
    resume_step = _check_output_dir(paths, config, resume, resume_step)
    total = config.train.max_train_steps
    if resume_step == total and run.final_is_current(total) and (
            not config.checkpoint.save_single_file or run.single_file.is_file()):
        log.info("%s is complete (step %d of %d); final/ left as it is", paths.root, total, total)
        single = run.single_file if config.checkpoint.save_single_file and run.single_file.is_file() else None
        return TrainResult(output_dir=paths.root, final_dir=paths.final, single_file=single, steps=total,
                           final_loss=math.nan, summary={}, resumed_from=resume_step, complete=True)
    for p in (paths.root, paths.checkpoints, paths.logs, paths.samples):
        p.mkdir(parents=True, exist_ok=True)
    run.write_json("config.json", config.to_dict())
    ckpt = Checkpointer(paths.checkpoints, keep=config.checkpoint.keep)
    if resume_step is not None:
        ckpt.verify(resume_step)  # a damaged checkpoint is named now, before the model loads

    concepts = data_concepts(config)  # validates the instance folders before the model loads
    if pipe is None:
        pipe = StableDiffusion.from_pretrained(config.model.path, variant=config.model.variant,
                                               attention=config.model.attention, safety_checker=False)
    check_clip_skip(pipe, config)  # before class images and cached latents
    prepare_class_images(pipe, config, concepts, progress)
    dataset = dbdata.DreamboothDataset(concepts, resolution=config.data.resolution,
                                       batch_size=config.train.train_batch_size, seed=config.seed,
                                       center_crop=config.data.center_crop, random_flip=config.data.random_flip,
                                       skip_bad=config.data.skip_bad_images)
    builder = BatchBuilder(pipe, config, dataset)

    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
    models = StepModels.from_pipeline(pipe, config)
    trainable, frozen = split_params(pipe.params, config)
    optimizer = make_optimizer(config, trainable)
    position = 0
    if resume_step is not None:
        state, meta = ckpt.restore(resume_step, abstract_train_state(trainable, optimizer, mesh, config))
        position = int(meta["data_position"])
        log.info("resumed from step %d (data position %d)", resume_step, position)
    else:
        state = init_train_state(trainable, optimizer, mesh, config)
    frozen = place_frozen(frozen, mesh, config)
    # The trainable weights now live in the train state; keep the rest for sampling and export.
    if config.lora.enabled:  # the starting weights of the adapted modules: on the host, merged when needed
        pipe = lora.starting_weights_on_host(pipe, trainable)
    else:
        pipe = dataclasses.replace(pipe, params={k: v for k, v in pipe.params.items() if k not in trainable})
    builder.pipe = pipe
    train_step = make_train_step(models, config, optimizer, mesh, state, frozen)
    schedules = optimizer.schedules

    start = int(state.step)
    # Rows of steps after the resumed one (and of an attempt that died before its first checkpoint) are dropped.
    logger = MetricsLogger(paths.logs, enabled=jax.process_index() == 0, purge_step=start + 1)
    bar = Progress(total, initial=start, enabled=progress and jax.process_index() == 0)
    images_per_update = dataset.batch_size * (2 if config.with_prior_preservation else 1) \
        * config.optim.grad_accum_steps
    summary = RunSummary(images_per_step=images_per_update)
    last_loss = math.nan
    say = bar.write if jax.process_index() == 0 else (lambda message: None)
    say(_header(config, dataset, mesh, start, total, images_per_update))
    next_batch = lambda: shd.host_local_batch_to_global(builder.update_batch(position, mesh), mesh,
                                                        accum=config.optim.grad_accum_steps > 1)
    first_batch = None
    if start < total:
        say("compiling the train step")
        first_batch = next_batch()
        t0 = time.perf_counter()
        train_step = train_step.lower(state, frozen, first_batch).compile()  # one compile, reused by every step
        peak = compiled_peak_bytes(train_step)
        say(f"compiled in {time.perf_counter() - t0:.1f} s; XLA's memory estimate: "
            + (f"{peak / 2**30:.2f} GiB per device" if peak is not None else "not reported by this backend"))
    stop = StopOnInterrupt().install()
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            batch, first_batch = (first_batch if first_batch is not None else next_batch()), None
            state, metrics = train_step(state, frozen, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            position += config.optim.grad_accum_steps
            last_loss = metrics["loss"]
            if not metrics.get("finite", 1.0) or not math.isfinite(last_loss):
                ckpt.wait()  # an in-flight save of an earlier step completes first
                good = ckpt.latest_step()
                raise TrainingDiverged(
                    f"the loss became {last_loss} at step {step + 1} (grad norm {metrics.get('grad_norm')}); "
                    f"training stopped. The last good checkpoint is "
                    f"{'step ' + str(good) if good is not None else 'none (no checkpoint was written yet)'} in "
                    f"{paths.checkpoints}; in a new --output-dir, lower the learning rate or use "
                    "train.mixed_precision=float32")
            seconds = time.perf_counter() - t0
            if step == start:
                say(f"step {step + 1} done in {seconds:.1f} s")
            summary.tick(1, last_loss)
            done = step + 1
            if done % config.logging.log_every == 0 or done == total:
                lr = {f"lr/{k}": float(s(done - 1)) for k, s in schedules.items()}
                logger.scalars(done, {**{f"train/{k}": v for k, v in metrics.items()}, **lr,
                                      "perf/steps_per_s": 1.0 / seconds,
                                      "perf/images_per_s": images_per_update / seconds})
            bar.update(1, {"loss": f"{last_loss:.4f}"})
            if config.logging.sample_every and done % config.logging.sample_every == 0:
                _log_samples(pipe, state, config, paths, logger, done)
                say(f"samples of step {done} written to {paths.samples}")
            if done % config.checkpoint.every == 0 or done == total or stop.requested:
                logger.flush()  # the metrics of every step a checkpoint holds are on disk before it is
                ckpt.save(done, state, {"data_position": position, "step": done, "config": config.to_dict()})
                say(f"checkpoint step {done} saving to {paths.checkpoints / str(done)}")
            if stop.requested:
                ckpt.close()
                raise TrainingInterrupted(f"interrupted at step {done} of {total}; checkpoint step {done} is saved "
                                          f"in {paths.checkpoints}: run the same command again to resume")
        ckpt.wait()
    except BaseException:
        stop.restore()
        try:  # an in-flight save completes, Orbax's threads end: no background tracebacks at exit
            ckpt.close()
        except Exception as e:  # noqa: BLE001 - the error that stopped the run is the one to report
            log.warning("closing the checkpoints after the error: %s", e)
        raise
    finally:
        stop.restore()
        bar.close()
        logger.close()
    if stop.requested:  # Ctrl-C during the last step's save: stop before the export
        ckpt.close()
        raise TrainingInterrupted(f"interrupted at step {total} of {total} before the final model was written; "
                                  "run the same command again to write it")
    final_dir, single = _export(pipe, state, config, paths, run)
    ckpt.close()
    report = summary.as_dict()
    if jax.process_index() == 0:  # with --no-progress too
        summary.print()
        if config.train.clip_skip:  # the UNet learned this conditioning: sampling must use the same
            print(f"trained with clip skip: sample with clip_skip={config.train.clip_skip} (generate.py --clip-skip "
                  f"{config.train.clip_skip}; AUTOMATIC1111's Clip skip {config.train.clip_skip + 1})", flush=True)
    return TrainResult(output_dir=paths.root, final_dir=final_dir, single_file=single, steps=total,
                       final_loss=last_loss, summary=report, resumed_from=resume_step)


def _header(config: TrainConfig, dataset: Any, mesh: Any, start: int, total: int, images_per_update: int) -> str:
    """One line before the work: images, steps, learning rate, batch, devices, dtype."""
    n_class = len(dataset.class_examples) if config.with_prior_preservation else 0
    steps = f"steps {start + 1}-{total} of {total}" if start else f"{total} steps"
    if start >= total:
        steps = f"all {total} steps done"
    parts = dict(mesh.shape)
    return (f"dreambooth: {len(dataset.instance_examples)} instance images, {n_class} class images; {steps}; "
            f"lr {config.optim.learning_rate:g}; batch {config.train.train_batch_size} x accum "
            f"{config.optim.grad_accum_steps} ({images_per_update} images per update); {mesh.size} "
            f"{mesh.devices.flat[0].platform} devices (data {parts.get('data', 1)} x fsdp {parts.get('fsdp', 1)}); "
            f"{config.train.mixed_precision}; text encoder {'trained' if config.train.train_text_encoder else 'frozen'}"
            + (f" (clip skip {config.train.clip_skip}: A1111 {config.train.clip_skip + 1})"
               if config.train.clip_skip else "")
            + (f"; LoRA rank {config.lora.rank} alpha {config.lora.alpha or config.lora.rank:g} on "
               f"{', '.join(config.lora.targets)} (base {config.lora.base_dtype})" if config.lora.enabled else "")
            + f"; output {config.output_dir}")


def trained_params(state: Any, config: TrainConfig) -> dict[str, Any]:
    """The weights to export: the EMA when it is kept, else the raw ones (host arrays; LoRA: the adapters)."""
    params = state.ema if config.optim.ema_decay is not None and state.ema is not None else state.params
    return _host(params)


def model_weights(pipe: Any, trained: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """Trained parameters (host) -> the weights of the modules they belong to: themselves, or with LoRA the
    starting weights with the adapters merged in."""
    return lora.merged_params(pipe.params, trained, config) if config.lora.enabled else trained


def _log_samples(pipe: Any, state: Any, config: TrainConfig, paths: RunPaths, logger: Any, step: int) -> None:
    """Validation images to samples/ and TensorBoard."""
    params = _host(state.params)  # a collective: every process takes part
    if jax.process_index() != 0:  # the samples are process 0's alone; the others go on
        return
    params = model_weights(pipe, params, config)
    if jax.process_count() > 1:  # on this process's first device: a multi-process jit refuses numpy inputs
        params = jax.device_put(params, jax.local_devices()[0])
    # One process: host arrays, which the sampler places on its mesh (arrays committed to one device of
    # several would be refused).
    result = sample_images(pipe, params, config)
    from sd_jax.images import save_png
    from sd_jax.outputs import image_metadata  # the one PNG schema (prompt, seed, steps, ... as generate.py)

    for i, image in enumerate(result.images):
        meta = image_metadata(result, i, model=str(config.model.path), extra={"train_step": step})
        save_png(image, paths.samples / f"step{step:06d}-{i:02d}.png", meta)
    logger.images(step, "samples", result.images)


def _export(pipe: Any, state: Any, config: TrainConfig, paths: RunPaths,
            run: RunDir) -> tuple[Path | None, Path | None]:
    """The fine-tuned model as a diffusers folder (and optionally a CompVis single file), each written to a
    temporary name and renamed into place, replacing only what this run wrote before. A LoRA run writes
    its adapters into final/ (both formats), with the merged model's folder only when asked."""
    from sd_jax.convert.export import atomic_folder, save_pretrained, save_single_file

    params = trained_params(state, config)
    if jax.process_index() != 0:
        return None, None
    step, full_folder = int(state.step), not config.lora.enabled or config.checkpoint.merge_lora
    final = None
    if full_folder or config.checkpoint.save_single_file:
        final = dataclasses.replace(pipe, params={**pipe.params, **model_weights(pipe, params, config)})
    single = None
    with run.replacing_final(step, config.checkpoint.save_single_file):
        if full_folder:
            folder = save_pretrained(final, paths.final, overwrite=True)
        if config.lora.enabled:
            if full_folder:  # beside the merged model
                lora.save_adapters(params, paths.final, config, step)
            else:
                with atomic_folder(paths.final, overwrite=True) as tmp:  # final/ holds the adapters alone
                    lora.save_adapters(params, tmp, config, step)
            folder = paths.final
        if config.checkpoint.save_single_file:
            single = save_single_file(final, run.single_file, overwrite=True)
    return folder, single
