"""One sampling request: a frozen, typed value, validated once, that every caller hands to the pipeline.

    req = GenerationRequest.build("a cat", num_images_per_prompt=4, seed=7, guidance_scale=6.0)
    result = pipe.run(req)                       # what pipe.generate("a cat", ...) does

``build`` takes the keyword arguments of :meth:`StableDiffusion.generate` and
expands them per image: each image has its own prompt, negative prompt, seed
and guidance scale. Everything that can be checked without the model is
checked here, once (sizes, counts, solver, strength, image inputs, seeds);
what depends on the model (its latent factor, an inpainting UNet, memory) is
checked by the pipeline before any work. ``generate.py``, the notebooks,
Dreambooth's class images and validation samples all build this value.

Errors are :class:`RequestError` (a ``ValueError``) whose message names the
Python argument (``height=60 ...``); the command line renders the same error
with its flags (``--height 60 ...``) through :meth:`RequestError.render`.

``loras`` (adapters and their scales) and ``prompt_syntax`` are fields of the
request: ``"a1111"`` (the default) reads AUTOMATIC1111's weights, ``BREAK`` and
prompts longer than 75 tokens (:mod:`sd_jax.prompts`), ``"plain"`` takes the
text literally (truncated to 77 tokens).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sd_jax.limits import MAX_SEED, short  # seeds become 32-bit PRNG keys; errors echo a short prefix
from sd_jax.prompts import DEFAULT_SYNTAX, PROMPT_SYNTAXES  # "a1111" (weights, long prompts) or "plain"

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_SIZE = 512            # pixels, SD v1's training size
IMG2IMG_STRENGTH = 0.8        # diffusers' StableDiffusionImg2ImgPipeline default
INPAINT_STRENGTH = 1.0        # diffusers' StableDiffusionInpaintPipeline default
LATENT_FACTOR = 8             # SD v1 VAE: pixels per latent side (the pipeline re-checks with its model)
MAX_SIDE = 8192               # pixels per side; memory is checked as well (sd_jax.memory)
MAX_IMAGES = 10_000           # images one request returns at once (generate.py streams longer runs in batches)
MAX_STEPS = 1000              # SD v1 has 1000 training timesteps
MAX_PROMPT_CHARS = 10_000
RANDOM_SEED = -1              # "draw a random seed", as AUTOMATIC1111


def scheduler_names() -> tuple[str, ...]:
    """The solvers a request may name (defined once, in sd_jax.schedulers); AUTOMATIC1111's sampler
    names (:func:`a1111_sampler_names`) are accepted too and mean the same solvers."""
    from sd_jax.schedulers import SCHEDULER_NAMES

    return SCHEDULER_NAMES


def a1111_sampler_names() -> tuple[str, ...]:
    """AUTOMATIC1111's names for the solvers sd_jax has ("Euler a", "DPM++ 2M Karras", ...)."""
    from sd_jax.schedulers import A1111_SAMPLER_NAMES

    return tuple(A1111_SAMPLER_NAMES)


def canonical_scheduler(name: str) -> str:
    """sd_jax's solver name for one of its names or an A1111 sampler name; a RequestError otherwise."""
    from sd_jax.schedulers import canonical_scheduler_name

    found = canonical_scheduler_name(name) if isinstance(name, str) else None
    if found is None:
        raise RequestError(f"unknown scheduler {short(name)}; valid names: ", ", ".join(scheduler_names()),
                           " (or AUTOMATIC1111's: ", ", ".join(a1111_sampler_names()), ")")
    return found


class RequestError(ValueError):
    """A bad request value. Parts are text or ``(field,)`` / ``(field, value)``: the field is named as the
    Python argument (``height=60``) or, by :meth:`render` with a flag table, as a command-line flag
    (``--height 60``)."""

    def __init__(self, *parts: str | tuple[Any, ...]):
        self.parts = parts
        super().__init__(self.render())

    def render(self, flags: Mapping[str, str] | None = None) -> str:
        """The message with each field named by ``flags`` (field -> flag) where it has one."""
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            field, *value = part
            flag = (flags or {}).get(field)
            if not value:
                out.append(flag or field)
            elif flag:
                out.append(f"{flag} {value[0]}")
            else:
                out.append(f"{field}={value[0]}")
        return "".join(out)


@dataclasses.dataclass(frozen=True)
class LoraRef:
    """A LoRA adapter and its scale (room for issue 13; the pipeline refuses them until it applies them)."""

    path: str
    scale: float = 1.0

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise RequestError(("loras", short(self.path)), " must name a LoRA file or hub id")
        if not _is_number(self.scale) or not math.isfinite(self.scale):
            raise RequestError(("loras", short(self.scale)), " scale must be a finite number")


@dataclasses.dataclass(frozen=True, eq=False)
class GenerationRequest:
    """One sampling request, per image: prompts, negative prompts, seeds and guidance scales.

    ``init_image`` (1 or B, H, W, 3) float32 in [0, 1]; ``mask_image`` (1 or B,
    H, W, 1) in {0, 1}, 1 = repaint; ``latents`` (B, h, w, C) unit noise
    replacing the seeded draw. ``batch_size`` images go through one compiled
    call. ``scheduler`` None: the model folder's own solver.
    """

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    guidance_scales: tuple[float, ...]
    scheduler: str | None = None
    steps: int = DEFAULT_STEPS
    height: int = DEFAULT_SIZE
    width: int = DEFAULT_SIZE
    eta: float = 0.0
    init_image: np.ndarray | None = None
    mask_image: np.ndarray | None = None
    strength: float | None = None          # None: 0.8 for img2img, 1.0 for inpainting, unused for txt2img
    latents: np.ndarray | None = None
    batch_size: int | None = None          # None: every image in one call
    clip_skip: int = 0
    loras: tuple[LoraRef, ...] = ()
    prompt_syntax: str = DEFAULT_SYNTAX

    def __post_init__(self):
        set_ = _setter(self)
        for name in ("prompts", "negative_prompts", "seeds", "guidance_scales", "loras"):
            set_(name, tuple(getattr(self, name)))
        total = len(self.prompts)
        if not 1 <= total <= MAX_IMAGES:
            raise RequestError(("prompts",), f" must hold 1 to {MAX_IMAGES} images per request, got {total}")
        for i, p in enumerate(self.prompts + self.negative_prompts):
            if not isinstance(p, str):
                raise RequestError(("prompts",), f" must be strings, got {type(p).__name__} {short(p)}")
            if len(p) > MAX_PROMPT_CHARS:
                raise RequestError(("prompts",), f" must be at most {MAX_PROMPT_CHARS} characters, got one of "
                                   f"{len(p)}: {short(p)}")
        for name in ("negative_prompts", "seeds", "guidance_scales"):
            if len(getattr(self, name)) != total:
                raise RequestError(f"{len(getattr(self, name))} ", (name,), f" for {total} images; give one per "
                                   "image")
        for s in self.seeds:
            if not _is_int(s) or not 0 <= s <= MAX_SEED:
                raise RequestError(("seed", short(s)), f" must be an integer in [0, {MAX_SEED}] (or -1: random)")
        set_("seeds", tuple(int(s) for s in self.seeds))
        for g in self.guidance_scales:
            if not _is_number(g) or not math.isfinite(g) or g < 0:
                raise RequestError(("guidance_scale", short(g)), " must be a finite number >= 0")
        set_("guidance_scales", tuple(float(g) for g in self.guidance_scales))
        if self.scheduler is not None:
            set_("scheduler", canonical_scheduler(self.scheduler))
        _check_int("num_inference_steps", self.steps, 1, MAX_STEPS)
        for name in ("height", "width"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 < value <= MAX_SIDE or value % LATENT_FACTOR:
                raise RequestError((name, short(value)), f" must be a positive multiple of {LATENT_FACTOR} up to "
                                   f"{MAX_SIDE}")
        if not _is_number(self.eta) or not math.isfinite(self.eta) or self.eta < 0:
            raise RequestError(("eta", short(self.eta)), " must be a finite number >= 0")
        if self.eta and self.scheduler not in (None, "ddim"):
            raise RequestError(("eta", short(self.eta)), f" only applies to the ddim scheduler (scheduler is "
                               f"{self.scheduler!r})")
        self._check_images(total)
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1, MAX_IMAGES)
        _check_int("clip_skip", self.clip_skip, 0, 1000)
        if not all(isinstance(lora, LoraRef) for lora in self.loras):
            raise RequestError(("loras",), " must be LoraRef(path, scale) values")
        if self.prompt_syntax not in PROMPT_SYNTAXES:
            raise RequestError(("prompt_syntax", short(self.prompt_syntax)), " must be one of "
                               f"{', '.join(PROMPT_SYNTAXES)}")

    def _check_images(self, total: int) -> None:
        """Init image, mask, strength and latents: shapes, ranges and the strength default."""
        shape_hw = (self.height, self.width)
        if self.mask_image is not None and self.init_image is None:
            raise RequestError(("mask_image",), " needs ", ("init_image",), " (the image to inpaint)")
        if self.init_image is None:
            if self.strength is not None:
                raise RequestError(("strength", short(self.strength)), " needs ", ("init_image",),
                                   " (strength is how much img2img changes it)")
        else:
            for name, channels in (("init_image", 3), ("mask_image", 1)):
                arr = getattr(self, name)
                if arr is None:
                    continue
                if (not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.ndim != 4
                        or arr.shape[1:] != (*shape_hw, channels) or arr.shape[0] not in (1, total)):
                    raise RequestError((name,), f" must be a float32 array (1 or {total}, {self.height}, "
                                       f"{self.width}, {channels}), got {getattr(arr, 'shape', type(arr).__name__)}"
                                       " (build requests with GenerationRequest.build)")
            default = INPAINT_STRENGTH if self.mask_image is not None else IMG2IMG_STRENGTH
            strength = default if self.strength is None else self.strength
            if not _is_number(strength) or not 0.0 < strength <= 1.0:
                raise RequestError(("strength", short(strength)), " must be in (0, 1]")
            _setter(self)("strength", float(strength))
        if self.latents is not None:
            lat = self.latents  # its (h, w, C) against the model: StableDiffusion.check_request
            if not isinstance(lat, np.ndarray) or lat.ndim != 4 or lat.shape[0] != total:
                raise RequestError(("latents",), f" must be a ({total}, h, w, C) array for this call, got "
                                   f"{getattr(lat, 'shape', type(lat).__name__)}")
            if not np.isfinite(lat).all():
                raise RequestError(("latents",), " must be finite (they hold NaN or inf)")

    # ------------------------------------------------------------------ derived values
    @property
    def total(self) -> int:
        """Images in the request."""
        return len(self.prompts)

    @property
    def batch(self) -> int:
        """Images per compiled call."""
        return min(self.batch_size or self.total, self.total)

    @property
    def mode(self) -> str:
        """'txt2img', 'img2img' or 'inpaint' (what the request asks for; the UNet decides how)."""
        if self.init_image is None:
            return "txt2img"
        return "inpaint" if self.mask_image is not None else "img2img"

    @property
    def guided(self) -> bool:
        """Whether any image uses classifier-free guidance (the unconditional pass is compiled)."""
        return any(g > 1.0 for g in self.guidance_scales)

    def select(self, start: int, stop: int) -> GenerationRequest:
        """Images ``start:stop`` as a request of their own (same settings; the batch size kept)."""
        sl = slice(start, stop)

        def per_image(arr):
            return arr if arr is None or arr.shape[0] == 1 else arr[sl]

        return dataclasses.replace(
            self, prompts=self.prompts[sl], negative_prompts=self.negative_prompts[sl], seeds=self.seeds[sl],
            guidance_scales=self.guidance_scales[sl], init_image=per_image(self.init_image),
            mask_image=per_image(self.mask_image), latents=None if self.latents is None else self.latents[sl])

    def batches(self) -> Iterator[GenerationRequest]:
        """The request split into consecutive batches of ``batch`` images."""
        for start in range(0, self.total, self.batch):
            yield self.select(start, min(start + self.batch, self.total))

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
              height: int | None = None, width: int | None = None, num_inference_steps: int = DEFAULT_STEPS,
              guidance_scale: float | Sequence[float] = DEFAULT_GUIDANCE, scheduler: str | None = None,
              seed: int | Sequence[int] | None = 0, num_images_per_prompt: int = 1, latents: Any = None,
              eta: float = 0.0, init_image: Any = None, strength: float | None = None, mask_image: Any = None,
              clip_skip: int = 0, batch_size: int | None = None, loras: Sequence[LoraRef] = (),
              prompt_syntax: str = DEFAULT_SYNTAX) -> GenerationRequest:
        """The keyword arguments of :meth:`StableDiffusion.generate` -> a request, expanded per image.

        Each prompt gives ``num_images_per_prompt`` images, in order. ``seed``:
        image b gets ``seed + b``, or one seed per image; None or -1 draws a
        random first seed (recorded in ``seeds``). ``height``/``width`` default
        to the init image's size rounded down to a multiple of 8, else 512.
        ``prompt_syntax``: "a1111" (weights, long prompts) or "plain" (literal, 77 tokens).
        """
        prompts = [prompt] if isinstance(prompt, str) else _as_list(prompt, "prompt")
        if not prompts:
            raise RequestError(("prompt",), " must be a string or a non-empty list of strings")
        if isinstance(negative_prompt, str) or negative_prompt is None:
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = _as_list(negative_prompt, "negative_prompt")
            if len(negatives) != len(prompts):
                raise RequestError(f"{len(negatives)} ", ("negative_prompt",), f" for {len(prompts)} prompts")
        _check_int("num_images_per_prompt", num_images_per_prompt, 1, MAX_IMAGES)
        total = len(prompts) * num_images_per_prompt
        if total > MAX_IMAGES:  # checked before anything is expanded per image
            raise RequestError(f"{total} images in one request; at most {MAX_IMAGES} (", ("num_images_per_prompt",),
                               " x prompts); generate.py streams longer runs in batches")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        if _is_number(guidance_scale):
            scales = [guidance_scale] * total
        else:
            scales = _as_list(guidance_scale, "guidance_scale")
            if len(scales) != total:
                raise RequestError(("guidance_scale",), f" has {len(scales)} values for {total} images; give one "
                                   "or one per image")
        init = mask = None
        if init_image is not None:
            first = init_image[0] if _is_batch(init_image) else init_image
            if height is None or width is None:
                w, h = image_size(first)
                height = height if height is not None else _round_down(h, "init_image height")
                width = width if width is not None else _round_down(w, "init_image width")
            _check_size(height, width)
            init = _image_stack(init_image, height, width, 3, "init_image")
            if mask_image is not None:
                mask = (_image_stack(mask_image, height, width, 1, "mask_image") >= 0.5).astype(np.float32)
        elif mask_image is not None:
            raise RequestError(("mask_image",), " needs ", ("init_image",), " (the image to inpaint)")
        height = DEFAULT_SIZE if height is None else height
        width = DEFAULT_SIZE if width is None else width
        if latents is not None:
            latents = np.asarray(latents, np.float32)
        return cls(prompts=tuple(prompts), negative_prompts=tuple(negatives), seeds=image_seeds(seed, total),
                   guidance_scales=tuple(scales), scheduler=scheduler, steps=num_inference_steps, height=height,
                   width=width, eta=eta, init_image=init, mask_image=mask, strength=strength, latents=latents,
                   batch_size=batch_size, clip_skip=clip_skip, loras=tuple(loras), prompt_syntax=prompt_syntax)


# ----------------------------------------------------------------------------- helpers


def _setter(obj: Any):
    """Setter for a frozen dataclass's own ``__post_init__`` normalisation."""
    return lambda name, value: object.__setattr__(obj, name, value)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise RequestError((name, short(value)), f" must be an integer in [{low}, {high}]")


def _check_size(height: Any, width: Any) -> None:
    for name, value in (("height", height), ("width", width)):
        if not _is_int(value) or not 0 < value <= MAX_SIDE or value % LATENT_FACTOR:
            raise RequestError((name, short(value)), f" must be a positive multiple of {LATENT_FACTOR} up to "
                               f"{MAX_SIDE}")


def _as_list(value: Any, name: str) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise RequestError((name, short(value)), " must be a value or a list")
    if len(value) > MAX_IMAGES:
        raise RequestError((name,), f" has {len(value)} entries; at most {MAX_IMAGES}")
    return list(value)


def _is_batch(x: Any) -> bool:
    """A list/tuple of images (rather than one image)."""
    return isinstance(x, (list, tuple))


def _round_down(pixels: int, what: str) -> int:
    size = pixels - pixels % LATENT_FACTOR
    if size < LATENT_FACTOR:
        raise RequestError(f"{what} {pixels} is smaller than {LATENT_FACTOR} pixels")
    return min(size, MAX_SIDE)


def image_size(image: Any) -> tuple[int, int]:
    """(width, height) of a PIL image, an image file (read from its header) or an (H, W[, C]) array."""
    from sd_jax import images as imageio

    if isinstance(image, (str, Path)):
        try:
            return imageio.image_file_size(image)
        except ValueError as err:
            raise RequestError(("init_image",), f": {err}") from None
    if hasattr(image, "size") and not isinstance(image, np.ndarray):
        return tuple(image.size)
    shape = np.shape(image)
    if len(shape) not in (2, 3):
        raise RequestError(("init_image",), f" must be an image or an (H, W, C) array, got shape {shape}")
    return shape[1], shape[0]


def _image_stack(value: Any, height: int, width: int, channels: int, name: str) -> np.ndarray:
    """One image or a list -> (1 or B, H, W, C) float32 in [0, 1]."""
    from sd_jax import images as imageio

    items = list(value) if _is_batch(value) else [value]
    if len(items) > MAX_IMAGES:
        raise RequestError((name,), f" has {len(items)} images; at most {MAX_IMAGES}")
    try:
        return np.stack([imageio.image_to_array(im, height, width, channels) for im in items])
    except RequestError:
        raise
    except ValueError as err:
        raise RequestError((name,), f": {err}") from None


def random_seed(total: int) -> int:
    """A random first seed for ``total`` images (image b gets seed + b, all within 32 bits)."""
    return int(np.random.default_rng().integers(0, MAX_SEED - total + 1))


def image_seeds(seed: int | Sequence[int] | None, total: int) -> tuple[int, ...]:
    """Per-image seeds: ``seed + b`` for an int, the list itself, or a random first seed for None / -1."""
    if seed is None or (_is_int(seed) and seed == RANDOM_SEED):
        seed = random_seed(total)
    if _is_int(seed):
        if not 0 <= seed <= MAX_SEED - total + 1:
            raise RequestError(("seed", short(seed)), f" must be an integer in [0, {MAX_SEED - total + 1}] for "
                               f"{total} image(s) (image b gets seed + b, seeds are 32-bit), or -1 for a random one")
        return tuple(int(seed) + b for b in range(total))
    seeds = _as_list(seed, "seed")
    if len(seeds) != total:
        raise RequestError(f"{len(seeds)} seeds given for {total} images; give one per image or one int")
    return tuple(seeds)
