"""A generate run: a :class:`GenerateConfig` in, numbered PNGs with their parameters out, batch by batch.

    from sd_jax.generation import GenerateConfig, run
    run(GenerateConfig(prompts=("an astronaut riding a horse",), n_images=4))

``generate.py`` parses its command line into a GenerateConfig and calls
:func:`run`; tests and notebooks call the same function. Image i of a run
(prompt-major: every image of the first prompt, then the second, ...) gets
seed ``seed + i`` and is written as ``OUTDIR/NNNNN-SEED.png``
(:mod:`sd_jax.outputs`). Images are made ``batch`` at a time and written as
each batch ends, so a run of any length holds one batch in memory (plus the
grid's images when a grid is asked for).

Before the model loads: every value is checked (the first batch's
:class:`~sd_jax.request.GenerationRequest`), the init image and mask are read
(their size bounded before decoding), the output folder is proven writable,
the disk has room for the run, and a hub id can be reached (or is cached).
After loading, before sampling: the model's checks and the memory a batch needs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sd_jax.limits import MAX_SEED, short
from sd_jax.request import (DEFAULT_GUIDANCE, DEFAULT_STEPS, RANDOM_SEED, GenerationRequest, RequestError,
                            random_seed)

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
DEFAULT_MAX_BATCH = 8
DTYPES = ("float32", "bfloat16", "float16")   # sd_jax.pipeline.DTYPES, without importing JAX
MIN_PNG_BYTES_PER_PIXEL = 1.0   # a lower bound for the disk check (SD images take ~1.5 bytes per pixel as PNG)
HUB_PROBE_TIMEOUT_S = 3.0


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """One generate run: the request's settings plus what the run adds (model, count, files).

    ``seed`` None or -1: a random first seed, drawn here (so it is printed and
    recorded). ``height``/``width`` None: the init image's size rounded down
    to a multiple of 8, else 512. ``strength`` None: 0.8 for img2img, 1.0 for
    inpainting. The request's own values are validated by
    :class:`~sd_jax.request.GenerationRequest` (see :meth:`request`).
    """

    prompts: tuple[str, ...]
    model: str = DEFAULT_MODEL
    negative_prompt: str = ""
    steps: int = DEFAULT_STEPS
    scheduler: str | None = None          # None: the model folder's own scheduler
    guidance_scale: float = DEFAULT_GUIDANCE
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    n_images: int = 1                     # images per prompt
    batch_size: int | None = None         # images per compiled call; None: min(total, 8)
    outdir: Path = Path("outputs")
    grid: bool = False
    dtype: str = "float32"
    init_image: Path | None = None
    strength: float | None = None
    mask_image: Path | None = None
    safety_checker: bool = True
    watermark: bool = False
    eta: float = 0.0
    clip_skip: int = 0
    progress: bool = True                 # a per-step progress bar on stderr
    loras: tuple[Any, ...] = ()           # LoRA adapters: LoraRef(path, scale) or "FILE[:SCALE]" strings
    prompt_syntax: str = "a1111"          # AUTOMATIC1111's weights and long prompts (sd_jax.prompts); "plain": literal
    embeddings: tuple[tuple[str, str | None], ...] = ()  # textual inversion: (path, token or None) or "FILE[:TOKEN]"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("prompts", tuple(self.prompts))
        set_("outdir", Path(self.outdir))
        from sd_jax.lora.files import parse_lora_arg

        set_("loras", tuple(parse_lora_arg(x) if isinstance(x, str) else x for x in self.loras))
        from sd_jax.embeddings import parse_embedding_arg

        set_("embeddings", tuple(parse_embedding_arg(e) if isinstance(e, str) else tuple(e) for e in self.embeddings))
        for name in ("init_image", "mask_image"):
            if getattr(self, name) is not None:
                set_(name, Path(getattr(self, name)))
        if not self.model:
            raise ValueError("model is required: a diffusers folder, a .ckpt/.safetensors file or a hub id")
        if not self.prompts:
            raise ValueError("no prompt given: pass --prompt TEXT or --from-file FILE")
        for name in ("n_images", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RequestError((name, short(value)), " must be an integer >= 1")
        if self.dtype not in DTYPES:
            raise RequestError(("dtype", short(self.dtype)), f" is not supported; choose one of {', '.join(DTYPES)}")
        if self.watermark:
            import importlib.util

            if importlib.util.find_spec("imwatermark") is None:
                raise ValueError("--watermark needs the 'invisible-watermark' package: "
                                 "pip install 'sd_jax[watermark]'")
        if self.seed is None or self.seed == RANDOM_SEED:
            set_("seed", random_seed(self.total))  # the run's images are streamed: never a list of every seed
        elif isinstance(self.seed, int) and self.seed + self.total - 1 > MAX_SEED:
            raise RequestError(("seed", self.seed), f" is too large: its {self.total} images would use seeds up to "
                               f"{self.seed + self.total - 1}, above the largest seed {MAX_SEED}")

    @property
    def total(self) -> int:
        """Images in the run."""
        return len(self.prompts) * self.n_images

    @property
    def batch(self) -> int:
        """Images per compiled call."""
        return self.batch_size or min(self.total, DEFAULT_MAX_BATCH)

    def request(self, start: int, stop: int, init: Any = None, mask: Any = None) -> GenerationRequest:
        """The request for images ``start:stop`` of the run (``init``/``mask``: the opened images)."""
        prompts = [self.prompts[i // self.n_images] for i in range(start, stop)]
        return GenerationRequest.build(
            prompts, self.negative_prompt, height=self.height, width=self.width, num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale, scheduler=self.scheduler, seed=self.seed + start, eta=self.eta,
            init_image=init, strength=self.strength, mask_image=mask, clip_skip=self.clip_skip,
            batch_size=self.batch, loras=self.loras, prompt_syntax=self.prompt_syntax)

    def requests(self, init: Any = None, mask: Any = None) -> Iterator[GenerationRequest]:
        """The run's requests, one per batch, built as they are needed."""
        for start in range(0, self.total, self.batch):
            yield self.request(start, min(start + self.batch, self.total), init, mask)


@dataclasses.dataclass
class RunResult:
    """What a run wrote and how long it took."""

    files: list[Path]
    grid: Path | None
    seed: int
    flagged: list[Path]
    timing: dict[str, float]


# ----------------------------------------------------------------------------- checks before loading


def open_input(path: Path | None, what: str) -> Any:
    """The decoded image (PIL) of an init image or mask, or None; errors name ``what``."""
    from sd_jax import images as imageio

    if path is None:
        return None
    try:
        return imageio.open_image(path)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"{what}: {err}") from None


def check_disk(outdir: Path, images: int, height: int, width: int) -> None:
    """Refuse a run whose PNGs cannot fit on the output folder's disk (a lower bound of their size)."""
    need = images * height * width * MIN_PNG_BYTES_PER_PIXEL
    free = shutil.disk_usage(outdir).free
    if need > free:
        raise ValueError(f"{images} images of {width}x{height} need at least {need / 2**30:.1f} GiB of disk "
                         f"(~{MIN_PNG_BYTES_PER_PIXEL:g} byte per pixel as PNG) but {str(outdir)!r} has "
                         f"{free / 2**30:.1f} GiB free: make fewer images")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set (huggingface_hub's own spelling of true)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub endpoint (``HF_ENDPOINT``, default huggingface.co) accepts a connection quickly."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def check_model_source(model: str) -> str:
    """A local path, or a hub id that is cached or reachable; returns 'path' or 'hub'.

    Offline (``HF_HUB_OFFLINE``, or no answer from the hub within a few
    seconds) a hub id must be in the local cache: otherwise one line says so at
    once, instead of the hub client's retries.
    """
    from sd_jax.convert.source import looks_like_hub_id

    if Path(model).expanduser().exists():
        return "path"
    if not looks_like_hub_id(model):
        raise FileNotFoundError(f"--model {model!r} does not exist: pass a diffusers folder, a .ckpt/.safetensors "
                                f"file, or a hub id such as {DEFAULT_MODEL}")
    if not hub_offline() and not hub_reachable():
        # Offline from here on: the loader reads the cache at once (or says in one line that the model is not
        # there) instead of retrying the network for tens of seconds.
        os.environ["HF_HUB_OFFLINE"] = "1"
        if "huggingface_hub.constants" in sys.modules:
            sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    return "hub"


# ----------------------------------------------------------------------------- progress


class StepBar:
    """A tqdm bar over every denoising step of the run, with the compile phase shown and timed."""

    def __init__(self, batches: int, batch: int, size: str, enabled: bool = True):
        self.batches, self.batch, self.size, self.enabled = batches, batch, size, enabled
        self.bar: Any = None
        self.compile_s = 0.0
        self._started = 0.0
        self._waiting_first_step = False

    def batch_started(self, steps: int, compiling: bool) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps * self.batches, unit="step", desc="denoising", dynamic_ncols=True,
                            file=sys.stderr, disable=not self.enabled)
        self._started = time.perf_counter()
        self._waiting_first_step = compiling
        if compiling:
            self.bar.set_description("compiling")
            self._write(f"compiling the sampler for batches of {self.batch} at {self.size} (once per size and "
                        "batch; later batches reuse it) ...")

    def step(self) -> None:
        if self._waiting_first_step:
            self._waiting_first_step = False
            self.compile_s += time.perf_counter() - self._started
            self.bar.set_description("denoising")
            self._write(f"compiled in {self.compile_s:.1f} s")
        self.bar.update(1)

    def batch_done(self) -> None:
        pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr)


# ----------------------------------------------------------------------------- run


def run(config: GenerateConfig, pipe: Any = None) -> RunResult:
    """Generate every image of ``config`` and write them as they are made; returns the files.

    Cheap checks (values, images, output folder, disk, model source) run before
    the model loads. ``pipe``: an already loaded
    :class:`~sd_jax.pipeline.StableDiffusion` to reuse.
    """
    from sd_jax import multihost, outputs

    from sd_jax.embeddings import add_embedding, read_embedding

    cfg = config
    embeddings = [read_embedding(path, token) for path, token in cfg.embeddings]  # read (and checked) before loading
    init = open_input(cfg.init_image, "--init-image")
    mask = open_input(cfg.mask_image, "--mask-image")
    first = cfg.request(0, min(cfg.batch, cfg.total), init, mask)  # validates every request value
    from sd_jax.lora.files import check_lora_source

    for lora in cfg.loras:  # read once the model is loaded; here only that each can be found
        check_lora_source(lora.path)
    outdir = outputs.prepare(cfg.outdir, "--outdir")
    check_disk(outdir, cfg.total, first.height, first.width)
    if cfg.grid:
        outputs.check_grid(cfg.total, first.height, first.width)
    if pipe is None:
        check_model_source(cfg.model)

    t_start = time.perf_counter()
    if pipe is None:
        from sd_jax.sharding import initialize_distributed

        initialize_distributed()  # joins a multi-process job when the environment describes one (before JAX starts)
        from sd_jax.pipeline import StableDiffusion

        print(f"loading {cfg.model} ({cfg.dtype}) ...", flush=True)
        pipe = StableDiffusion.from_pretrained(cfg.model, dtype=cfg.dtype, safety_checker=cfg.safety_checker)
        print(f"loaded in {time.perf_counter() - t_start:.1f} s", flush=True)
    elif not cfg.safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe = dataclasses.replace(pipe, safety_checker=None)  # a shallow copy; the caller's pipe keeps its checker
    for embedding in embeddings:
        add_embedding(pipe, embedding)
    import numpy as np

    dtype = np.dtype(pipe.unet.dtype).name
    batches = math.ceil(cfg.total / cfg.batch)
    size = f"{first.width}x{first.height}"
    mode = "" if first.mode == "txt2img" else f", {first.mode} at strength {first.strength:g}"
    print(f"generating {cfg.total} image(s) of {size}, {cfg.steps} steps{mode}, seed {cfg.seed}"
          f"{f' to {cfg.seed + cfg.total - 1}' if cfg.total > 1 else ''}, in {batches} batch(es) of {cfg.batch}",
          flush=True)

    extra = {}
    if cfg.init_image is not None:
        extra["init_image"] = cfg.init_image.name
    if cfg.mask_image is not None:
        extra["mask_image"] = cfg.mask_image.name
    writer = outputs.ImageWriter(outdir, model=cfg.model, dtype=dtype, extra=extra, watermark=cfg.watermark,
                                 keep_for_grid=cfg.grid, embeddings={e.token: e.short_hash for e in embeddings})
    bar = StepBar(batches, cfg.batch, size, enabled=cfg.progress)
    written: list[Path] = []
    flagged: list[Path] = []
    first_image_at = None
    t_gen = time.perf_counter()
    try:
        for number, request in multihost.share_requests(cfg, writer.index, init, mask):  # this process's share
            writer.index = number
            result = pipe.run(request, progress=bar)
            paths = writer.write(result)
            written += paths
            flagged += [path for path, bad in zip(paths, result.nsfw or []) if bad]
            if first_image_at is None:
                first_image_at = time.perf_counter() - t_start
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_gen
    grid = None
    if cfg.grid:  # several processes: process 0 draws every process's images (a collective)
        kept = multihost.gather_images(writer.kept)
        if kept is not None:
            writer.kept = kept
            grid = writer.write_grid()

    timing = {"elapsed_s": elapsed, "compile_s": bar.compile_s, "first_image_s": first_image_at or 0.0}
    return RunResult(files=written, grid=grid, seed=cfg.seed, flagged=flagged, timing=timing)
