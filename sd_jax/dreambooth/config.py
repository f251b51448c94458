"""The Dreambooth run configuration: frozen dataclasses read from YAML recipes plus overrides.

    cfg = load_config("sd_jax/configs/dreambooth/unet.yaml", {"model": "path/to/sd",
                      "output_dir": "out", "concepts": [{"instance_dir": "dog", ...}]})
    cfg = load_config(None, {"optim.learning_rate": 1e-6, "train": {"remat": True}})
    recipe = apply_overrides(recipe, ["optim.learning_rate=1e-6", "train.remat=true"], what="--set")

Sections (YAML keys): ``model``, ``output_dir``, ``seed``, ``concepts`` (list),
``data``, ``class_images``, ``train``, ``lora``, ``optim``, ``mesh``, ``checkpoint``,
``logging``. Every value is checked in ``__post_init__``; an error names the
field (``optim.lr_schedule='cosin'``) and what is valid. Unknown keys are errors.
Recipes and ``--set`` values are read within :mod:`sd_jax.limits` (size, nesting,
alias expansion; counts and sizes have upper bounds there too); :func:`apply_overrides`
is the one way a recipe value is overridden.

Steps: ``train.max_train_steps`` counts optimizer updates. Each update consumes
``optim.grad_accum_steps`` micro-batches of ``train.train_batch_size`` instance
examples (plus as many class examples with prior preservation).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from sd_jax import limits
from sd_jax.limits import short
from sd_jax.request import DEFAULT_GUIDANCE, DEFAULT_STEPS  # the sampling defaults, defined once
from sd_jax.models.attention import IMPLEMENTATIONS as ATTENTION

LR_SCHEDULES = ("constant", "warmup", "cosine", "linear")
MIXED_PRECISION = ("float32", "bfloat16")
# LoRA target groups (the layers of each: sd_jax.dreambooth.lora.UNET_TARGETS / TEXT_ENCODER_TARGETS)
LORA_UNET_TARGETS = ("attention", "proj", "ff", "conv")
LORA_TEXT_ENCODER_TARGETS = ("attention", "mlp")
MAX_LORA_RANK = 1024
MAX_LORA_ALPHA = 65536.0
MAX_CLIP_SKIP = limits.CLIP_TEXT["num_hidden_layers"]  # layers skipped: below the text encoder's layer count


class ConfigError(ValueError):
    """A configuration value or key is not valid."""


def _fail(name: str, value: Any, valid: str) -> None:
    raise ConfigError(f"{name}={short(value)} is not valid: {valid}")


def _check_int(name: str, value: Any, low: int, high: int, allow_none: bool = False, note: str = "") -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        _fail(name, value, f"expected an integer in [{low}, {high}]" + (" or null" if allow_none else "") + note)


def _check_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        rng = " and ".join(x for x in (lo, hi) if x)
        _fail(name, value, f"expected a finite number {rng}".strip() + (" or null" if allow_none else ""))


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "expected true or false")


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        _fail(name, value, f"choose one of {', '.join(map(repr, choices))}")


def _check_str(name: str, value: Any, allow_none: bool = False, allow_empty: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        _fail(name, value, "expected a non-empty string" + (" or null" if allow_none else ""))


# ------------------------------------------------------------------------------------ sections

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The starting model: a diffusers folder, a CompVis single file or a hub id."""

    path: str = ""
    variant: str | None = None       # e.g. "fp16" files of a diffusers folder
    attention: str = "auto"          # sd_jax.models.attention implementation

    def __post_init__(self):
        _check_str("model.path", self.path, allow_empty=True)
        _check_str("model.variant", self.variant, allow_none=True)
        _check_choice("model.attention", self.attention, ATTENTION)


@dataclasses.dataclass(frozen=True)
class Concept:
    """One subject: its photos and prompt, and (optionally) its class prompt and class images."""

    instance_dir: str
    instance_prompt: str
    class_prompt: str | None = None     # None: no prior preservation for this concept
    class_dir: str | None = None        # None: <output_dir>/class_images/concept_<i>
    num_class_images: int = 100

    def __post_init__(self):
        _check_str("concepts[].instance_dir", self.instance_dir)
        _check_str("concepts[].instance_prompt", self.instance_prompt)
        _check_str("concepts[].class_prompt", self.class_prompt, allow_none=True)
        _check_str("concepts[].class_dir", self.class_dir, allow_none=True)
        _check_int("concepts[].num_class_images", self.num_class_images, 0, limits.MAX_CLASS_IMAGES)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Image preprocessing and what is cached before training."""

    resolution: int = 512
    center_crop: bool = False          # False: random crop
    random_flip: bool = True
    skip_bad_images: bool = False      # False: an unreadable image is an error
    cache_latents: bool = True         # VAE posterior moments computed once
    cache_text_embeddings: bool = True  # only used while the text encoder is frozen

    def __post_init__(self):
        _check_int("data.resolution", self.resolution, 8, limits.MAX_RESOLUTION)
        if self.resolution % 8:
            _fail("data.resolution", self.resolution, "expected a multiple of 8 (the VAE downsamples by 8)")
        for name in ("center_crop", "random_flip", "skip_bad_images", "cache_latents", "cache_text_embeddings"):
            _check_bool(f"data.{name}", getattr(self, name))


@dataclasses.dataclass(frozen=True)
class ClassImageConfig:
    """How missing class images are generated by the frozen starting model."""

    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    scheduler: str | None = None       # None: the model folder's scheduler
    batch_size: int = 4
    negative_prompt: str = ""
    seed: int | None = None            # None: the run's seed

    def __post_init__(self):
        _check_int("class_images.num_inference_steps", self.num_inference_steps, 1, limits.MAX_SAMPLING_STEPS)
        _check_float("class_images.guidance_scale", self.guidance_scale, 0.0)
        _check_str("class_images.scheduler", self.scheduler, allow_none=True)
        _check_int("class_images.batch_size", self.batch_size, 1, limits.MAX_BATCH)
        _check_str("class_images.negative_prompt", self.negative_prompt, allow_empty=True)
        _check_int("class_images.seed", self.seed, 0, limits.MAX_SEED, allow_none=True)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """What trains, for how long, the loss and the numerics."""

    max_train_steps: int = 800          # optimizer updates
    train_batch_size: int = 1           # instance examples per micro-batch (+ as many class examples)
    train_text_encoder: bool = False
    text_encoder_steps: int | None = None  # train the text encoder for the first N updates only
    prior_loss_weight: float = 1.0      # λ of SPEC §2; 0 switches prior preservation off
    noise_offset: float = 0.0           # ε += offset · N(0, 1) per (example, channel)
    min_snr_gamma: float | None = None  # Min-SNR-γ loss weighting (Hang et al. 2023); null: off
    mixed_precision: str = "float32"    # "bfloat16": bf16 compute, float32 master weights and Adam state
    remat: bool = False                 # recompute UNet blocks in the backward pass
    skip_nonfinite_updates: bool = True  # a NaN/inf loss or gradient leaves the weights unchanged
    clip_skip: int = 0                  # text encoder layers skipped (AUTOMATIC1111's "Clip skip" = N + 1)

    def __post_init__(self):
        _check_int("train.max_train_steps", self.max_train_steps, 1, limits.MAX_TRAIN_STEPS)
        _check_int("train.train_batch_size", self.train_batch_size, 1, limits.MAX_BATCH)
        _check_bool("train.train_text_encoder", self.train_text_encoder)
        _check_int("train.text_encoder_steps", self.text_encoder_steps, 1, limits.MAX_TRAIN_STEPS, allow_none=True)
        if self.text_encoder_steps is not None and not self.train_text_encoder:
            _fail("train.text_encoder_steps", self.text_encoder_steps,
                  "only meaningful with train.train_text_encoder=true (or set it to null)")
        _check_float("train.prior_loss_weight", self.prior_loss_weight, 0.0)
        _check_float("train.noise_offset", self.noise_offset, 0.0)
        _check_float("train.min_snr_gamma", self.min_snr_gamma, 0.0, low_open=True, allow_none=True)
        _check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check_bool("train.remat", self.remat)
        _check_bool("train.skip_nonfinite_updates", self.skip_nonfinite_updates)
        _check_int("train.clip_skip", self.clip_skip, 0, MAX_CLIP_SKIP - 1, note=": the text encoder layers "
                   "skipped, 0 none (AUTOMATIC1111's 'Clip skip' N+1: its 2 is 1 here)")


def _check_targets(name: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, tuple) or not value or not all(isinstance(v, str) for v in value):
        _fail(name, value, f"expected a non-empty list of {', '.join(choices)}")
    for v in value:
        _check_choice(name, v, choices)
    if len(set(value)) != len(value):
        _fail(name, value, "each target group at most once")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA Dreambooth (Hu et al. 2021): low-rank adapters train, the starting model stays frozen.

    Each targeted weight W becomes W + (alpha / rank) * down @ up; only down and up train (float32,
    with their AdamW state). UNet ``targets``: ``attention`` (to_q, to_k, to_v, to_out.0 of every
    attention), ``proj`` (the transformer blocks' proj_in, proj_out), ``ff`` (their feed-forward
    layers), ``conv`` (the ResNet blocks' and down/up-samplers' convolutions: LoCon). The text
    encoder's ``text_encoder_targets`` (``attention``: q/k/v/out_proj, ``mlp``: fc1, fc2) train with
    ``train.train_text_encoder``. ``base_dtype``: how the frozen weights are stored during training.
    """

    enabled: bool = False
    rank: int = 4
    alpha: float | None = None          # null: rank (scale 1)
    targets: tuple[str, ...] = ("attention",)
    text_encoder_targets: tuple[str, ...] = ("attention", "mlp")
    base_dtype: str = "float32"         # "bfloat16": the frozen weights in half the memory

    def __post_init__(self):
        for name in ("targets", "text_encoder_targets"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_bool("lora.enabled", self.enabled)
        _check_int("lora.rank", self.rank, 1, MAX_LORA_RANK)
        _check_float("lora.alpha", self.alpha, 0.0, MAX_LORA_ALPHA, low_open=True, allow_none=True)
        if self.alpha is not None:
            object.__setattr__(self, "alpha", float(self.alpha))
        _check_targets("lora.targets", self.targets, LORA_UNET_TARGETS)
        _check_targets("lora.text_encoder_targets", self.text_encoder_targets, LORA_TEXT_ENCODER_TARGETS)
        _check_choice("lora.base_dtype", self.base_dtype, MIXED_PRECISION)
        if self.base_dtype != "float32" and not self.enabled:
            _fail("lora.base_dtype", self.base_dtype, "a frozen base exists only with lora.enabled=true "
                  "(a full fine-tune keeps float32 master weights)")

    @property
    def scale(self) -> float:
        """alpha / rank: the factor of down @ up (kohya's and PEFT's convention)."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW, its learning-rate schedule, clipping, accumulation and the weights' EMA."""

    learning_rate: float = 5e-6
    text_encoder_lr: float | None = None  # null: learning_rate
    lr_schedule: str = "constant"        # constant | warmup | cosine | linear
    warmup_steps: int = 0                # linear warm-up from 0 (warmup, cosine, linear)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.01           # decoupled (AdamW), on every trainable weight, as the original
    max_grad_norm: float | None = 1.0    # global-norm clipping; null: off
    grad_accum_steps: int = 1            # micro-batches per optimizer update
    ema_decay: float | None = None       # EMA of the trainable weights; null: off

    def __post_init__(self):
        _check_float("optim.learning_rate", self.learning_rate, 0.0, low_open=True)
        _check_float("optim.text_encoder_lr", self.text_encoder_lr, 0.0, low_open=True, allow_none=True)
        _check_choice("optim.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_int("optim.warmup_steps", self.warmup_steps, 0, limits.MAX_TRAIN_STEPS)
        if self.lr_schedule == "constant" and self.warmup_steps:
            _fail("optim.warmup_steps", self.warmup_steps,
                  "lr_schedule='constant' has no warm-up; use lr_schedule='warmup' (or warmup_steps=0)")
        _check_float("optim.adam_beta1", self.adam_beta1, 0.0, 1.0, high_open=True)
        _check_float("optim.adam_beta2", self.adam_beta2, 0.0, 1.0, high_open=True)
        _check_float("optim.adam_epsilon", self.adam_epsilon, 0.0, low_open=True)
        _check_float("optim.weight_decay", self.weight_decay, 0.0)
        _check_float("optim.max_grad_norm", self.max_grad_norm, 0.0, low_open=True, allow_none=True)
        _check_int("optim.grad_accum_steps", self.grad_accum_steps, 1, limits.MAX_BATCH)
        _check_float("optim.ema_decay", self.ema_decay, 0.0, 1.0, low_open=True, high_open=True,
                      allow_none=True)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: ``data`` x ``fsdp`` = number of devices (one of them may be -1)."""

    data: int = -1
    fsdp: int = 1
    fsdp_min_size: int = 2**18  # arrays with fewer elements are replicated even with fsdp > 1

    def __post_init__(self):
        for name in ("data", "fsdp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value >= 1):
                _fail(f"mesh.{name}", value, "expected a positive integer or -1 (all remaining devices)")
        if self.data == -1 and self.fsdp == -1:
            _fail("mesh.fsdp", self.fsdp, "at most one of mesh.data and mesh.fsdp may be -1")
        _check_int("mesh.fsdp_min_size", self.fsdp_min_size, 1, 2**62)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints and the final export."""

    every: int = 500                  # optimizer updates between checkpoints
    keep: int = 3
    save_single_file: bool = False    # also write a CompVis-layout .safetensors
    merge_lora: bool = False          # LoRA runs: final/ also holds the full model with the LoRA merged in

    def __post_init__(self):
        _check_int("checkpoint.every", self.every, 1, limits.MAX_TRAIN_STEPS)
        _check_int("checkpoint.keep", self.keep, 1, limits.MAX_CHECKPOINTS_KEPT)
        _check_bool("checkpoint.save_single_file", self.save_single_file)
        _check_bool("checkpoint.merge_lora", self.merge_lora)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """TensorBoard scalars and validation samples."""

    log_every: int = 10
    sample_every: int = 0             # 0: no samples during training
    validation_prompts: tuple[str, ...] = ()  # empty: the instance prompts
    sample_steps: int = 25
    sample_guidance_scale: float = DEFAULT_GUIDANCE

    def __post_init__(self):
        if isinstance(self.validation_prompts, list):
            object.__setattr__(self, "validation_prompts", tuple(self.validation_prompts))
        _check_int("logging.log_every", self.log_every, 1, limits.MAX_TRAIN_STEPS)
        _check_int("logging.sample_every", self.sample_every, 0, limits.MAX_TRAIN_STEPS)
        if not isinstance(self.validation_prompts, tuple) or not all(
                isinstance(p, str) for p in self.validation_prompts):
            _fail("logging.validation_prompts", self.validation_prompts, "expected a list of strings")
        _check_int("logging.sample_steps", self.sample_steps, 1, limits.MAX_SAMPLING_STEPS)
        _check_float("logging.sample_guidance_scale", self.sample_guidance_scale, 0.0)


# --------------------------------------------------------------------------------- the config

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole Dreambooth run. A config without concepts is valid (for building a train step
    in tests or benches); :meth:`check_runnable` (called by :func:`load_config`) requires them."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    output_dir: str = "dreambooth-output"
    seed: int = 0
    description: str = ""
    concepts: tuple[Concept, ...] = ()
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    class_images: ClassImageConfig = dataclasses.field(default_factory=ClassImageConfig)
    train: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self):
        if isinstance(self.concepts, list):
            object.__setattr__(self, "concepts", tuple(self.concepts))
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                _fail(name, getattr(self, name), f"expected a {cls.__name__}")
        if not isinstance(self.concepts, tuple) or not all(isinstance(c, Concept) for c in self.concepts):
            _fail("concepts", self.concepts, "expected a list of Concept")
        _check_str("output_dir", self.output_dir)
        _check_int("seed", self.seed, 0, limits.MAX_SEED)
        _check_str("description", self.description, allow_empty=True)
        with_class = [c.class_prompt is not None for c in self.concepts]
        if any(with_class) and not all(with_class):
            missing = [i for i, w in enumerate(with_class) if not w]
            _fail("concepts", [c.instance_dir for c in self.concepts],
                  f"either every concept has a class_prompt or none does (concepts {missing} have none)")
        o, t = self.optim, self.train
        if o.lr_schedule in ("cosine", "linear") and o.warmup_steps >= t.max_train_steps:
            _fail("optim.warmup_steps", o.warmup_steps,
                  f"must be smaller than train.max_train_steps={t.max_train_steps} for a decaying schedule")
        if t.text_encoder_steps is not None and t.text_encoder_steps > t.max_train_steps:
            _fail("train.text_encoder_steps", t.text_encoder_steps,
                  f"must be <= train.max_train_steps={t.max_train_steps} (null trains it throughout)")
        if self.checkpoint.merge_lora and not self.lora.enabled:
            _fail("checkpoint.merge_lora", True, "only meaningful with lora.enabled=true (a full fine-tune always "
                  "writes the whole model)")

    # -- derived -------------------------------------------------------------------------------
    @property
    def with_prior_preservation(self) -> bool:
        """Class examples are in the batch: the concepts have class prompts and λ > 0."""
        return bool(self.concepts) and self.concepts[0].class_prompt is not None \
            and self.train.prior_loss_weight > 0

    @property
    def text_encoder_lr(self) -> float:
        """The text encoder's peak learning rate."""
        return self.optim.text_encoder_lr if self.optim.text_encoder_lr is not None else self.optim.learning_rate

    @property
    def cached_text_embeddings(self) -> bool:
        """Text embeddings are computed once (only possible while the text encoder is frozen)."""
        return self.data.cache_text_embeddings and not self.train.train_text_encoder

    def class_dir(self, index: int) -> Path:
        """Class-image folder of concept ``index``."""
        concept = self.concepts[index]
        if concept.class_dir:
            return Path(concept.class_dir)
        return Path(self.output_dir) / "class_images" / f"concept_{index}"

    def check_runnable(self) -> None:
        """What a training run needs beyond valid values: a model and at least one concept."""
        if not self.model.path:
            _fail("model.path", self.model.path, "give the starting model (diffusers folder, .ckpt/.safetensors "
                  "file or hub id)")
        if not self.concepts:
            _fail("concepts", [], "give at least one concept (instance_dir and instance_prompt)")

    # -- dict / YAML ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict; ``TrainConfig.from_dict(cfg.to_dict()) == cfg``."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a nested dict (YAML); unknown keys and wrong types are errors naming the key."""
        return _build(cls, d, "")


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "class_images": ClassImageConfig,
             "train": TrainingConfig, "lora": LoraConfig, "optim": OptimConfig, "mesh": MeshConfig,
             "checkpoint": CheckpointConfig, "logging": LoggingConfig}


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _unknown_key(prefix: str, key: str, valid: Sequence[str]) -> ConfigError:
    name = f"{prefix}{key}"
    close = difflib.get_close_matches(key, valid, n=1) if len(key) <= limits.ECHO_CHARS else []
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {short(name)}{hint} (valid keys here: {', '.join(sorted(valid))})")


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """YAML niceties: '1e-6' (YAML 1.1 reads it as a string) -> float; ints where floats go."""
    args = get_args(hint)
    is_float = hint is float or (get_origin(hint) is Union and float in args)
    if is_float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name}={short(value)} is not valid: expected a number") from None
    if is_float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _build(cls: type, d: Any, prefix: str) -> Any:
    if isinstance(d, cls):
        return d
    if cls is ModelConfig and isinstance(d, str):  # `model: path` shorthand
        d = {"path": d}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {short(d)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in fields:
            raise _unknown_key(prefix, str(key), list(fields))
        name = f"{prefix}{key}"
        if cls is TrainConfig and key in _SECTIONS:
            kwargs[key] = _build(_SECTIONS[key], value if value is not None else {}, f"{name}.")
        elif cls is TrainConfig and key == "concepts":
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"concepts={short(value)} is not valid: expected a list of mappings")
            concepts = []
            for i, c in enumerate(value):
                concept_fields = [f.name for f in dataclasses.fields(Concept)]
                if isinstance(c, Mapping):
                    missing = [k for k in ("instance_dir", "instance_prompt") if k not in c]
                    if missing:
                        raise ConfigError(f"concepts[{i}] lacks {', '.join(missing)}")
                    try:
                        concepts.append(_build(Concept, c, f"concepts[{i}]."))
                    except ConfigError as e:
                        raise ConfigError(str(e).replace("concepts[].", f"concepts[{i}].")) from None
                elif isinstance(c, Concept):
                    concepts.append(c)
                else:
                    raise ConfigError(f"concepts[{i}]={short(c)} is not valid: expected a mapping with "
                                      f"{', '.join(concept_fields)}")
            kwargs[key] = tuple(concepts)
        else:
            value = _coerce(value, hints[key], name)
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------- overrides and loading

def apply_overrides(d: Mapping[str, Any], overrides: Mapping[str, Any] | Sequence[str], *,
                    what: str = "override") -> dict[str, Any]:
    """A copy of the recipe dict ``d`` with ``overrides`` applied: the one way a recipe value is
    overridden (:func:`load_config`'s overrides, the command line's flags and ``--set``).

    ``overrides`` maps dotted keys (``"optim.learning_rate"``; list entries by index,
    ``"concepts.0.instance_prompt"``) or nested mappings (``{"optim": {"learning_rate": 1e-6}}``)
    to values, or is a list of ``"key=value"`` strings (``--set``) whose values are read as YAML
    (``3`` int, ``1e-6`` float, ``true``, ``null``, ``[a, b]`` a list, anything else a string) within
    :mod:`sd_jax.limits`' bounds. Either way a mapping value sets the keys it holds and leaves the
    others (``model: path`` sets ``model.path``); any other value, a list too, replaces what was there.
    ``what`` starts each error message (e.g. ``"--set"``).
    """
    out = copy.deepcopy(dict(d))
    if isinstance(out.get("model"), str):  # the recipe's `model: path` shorthand
        out["model"] = {"path": out["model"]}
    if isinstance(overrides, Mapping):
        pairs = [(key, value, f"{what} {short(key)}") for key, value in overrides.items()]
    elif isinstance(overrides, Sequence) and not isinstance(overrides, str):
        pairs = [(*_parse_assignment(item, what), f"{what} {short(item)}") for item in overrides]
    else:
        raise ConfigError(f"{what}: expected a mapping or a list of key=value strings, got {short(overrides)}")
    for key, value, where in pairs:
        for dotted, leaf in _leaves(str(key), value):
            _set_path(out, dotted, copy.deepcopy(leaf), where)
    return out


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-6, 2.5E+3


def _parse_assignment(item: Any, what: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ("a.b", the value read as YAML)."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"{what} {short(item)} is not valid: expected key=value, e.g. optim.learning_rate=1e-6")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = limits.load_yaml(text, f"{what} {short(key)}: the value") if text.strip() else ""
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-6 as a string; YAML 1.2 and users read a number
    return key, value


def _leaves(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) pairs of a possibly nested override; ``model: "path"`` is ``model.path``."""
    if key == "model" and isinstance(value, str):
        yield "model.path", value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _leaves(f"{key}.{k}", v)
    else:
        yield key, value


def _set_path(d: dict, dotted: str, value: Any, where: str) -> None:
    """d["a"]["b"] = value for "a.b" (missing sections are created); list entries by index."""
    parts = dotted.split(".")
    if not all(parts) or len(parts) > limits.MAX_NESTING:
        raise ConfigError(f"{where}: bad key {short(dotted)} (expected dotted names like optim.learning_rate)")
    node: Any = d
    for i, part in enumerate(parts):
        here, last = ".".join(parts[: i + 1]), i == len(parts) - 1
        if isinstance(node, list):
            if not (part.isascii() and part.isdigit() and len(part) <= 9) or int(part) >= len(node):
                raise ConfigError(f"{where}: {short(here)} is not an index of a list of {len(node)}")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"{where}: {short('.'.join(parts[:i]))} holds {short(node)}, not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]


def _read_recipe(yaml_path: str | Path) -> dict[str, Any]:
    path = Path(yaml_path)
    what = f"config file {short(str(path))}"
    if not path.is_file():
        raise ConfigError(f"{what} does not exist")
    try:
        loaded = limits.read_yaml_file(path, what)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} must hold a mapping at the top, got {type(loaded).__name__}")
    return loaded


def load_config(yaml_path: str | Path | None = None, overrides: Mapping[str, Any] | None = None, *,
                require_runnable: bool = True) -> TrainConfig:
    """A recipe (YAML file, or nothing) plus overrides -> a validated :class:`TrainConfig`.

    ``overrides`` is as :func:`apply_overrides` takes it (dotted keys or nested dicts);
    ``None`` values in it are ignored (an unset CLI flag). With ``require_runnable``
    the result must name a model and at least one concept.
    """
    base = _read_recipe(yaml_path) if yaml_path is not None else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg = TrainConfig.from_dict(apply_overrides(base, overrides))
    if require_runnable:
        cfg.check_runnable()
    return cfg
