"""``generate.py``: prompts in, numbered PNGs with their generation parameters out.

    python generate.py --model CompVis/stable-diffusion-v1-4 --prompt "an astronaut riding a horse"
    python generate.py --model sd14/ --from-file prompts.txt --n-images 4 --grid --scheduler dpm++2m-karras
    python generate.py --model sd14/ --prompt "a castle" --init-image sketch.png --strength 0.6

``run(config)`` is the library function (notebooks and tests call it); ``main``
parses the command line into a :class:`GenerateConfig` and calls it.

Files. Image i of a run (prompt-major: every image of the first prompt, then
the second, ...) gets seed ``seed + i`` and is written as
``OUTDIR/NNNNN-SEED.png``, NNNNN counting on from the highest number already
in OUTDIR, so nothing is overwritten. Each PNG carries its prompt, negative
prompt, steps, scheduler, guidance scale, seed, size, model, dtype, batch
size and sd_jax version as text chunks: ``--seed SEED --n-images 1`` with that
prompt and those values regenerates it. Pixel-identical regeneration also
needs the same ``--batch-size`` on the same devices (the compiled batch shape;
other shapes agree to about 1e-6 before rounding to 8 bits).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd_jax.cli import common
from sd_jax.sampling import MAX_SEED  # seeds become 32-bit PRNG keys

PROG = "generate.py"
DEFAULT_MAX_BATCH = 8
LATENT_FACTOR = 8             # SD v1 VAE: pixels per latent; the pipeline re-checks with the model's own
_NUMBERED = re.compile(r"^(\d+)-")
_GRID = re.compile(r"^grid-(\d+)\.png$")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """One generate run, validated on construction (every error names the bad value)."""

    model: str
    prompts: tuple[str, ...]
    negative_prompt: str = ""
    steps: int = 50
    scheduler: str | None = None          # None: the model folder's own scheduler
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    seed: int = 0
    n_images: int = 1                     # images per prompt
    batch_size: int | None = None         # images per compiled call; None: min(total, 8)
    outdir: Path = Path("outputs")
    grid: bool = False
    dtype: str = "float32"
    init_image: Path | None = None
    strength: float = 0.8
    mask_image: Path | None = None
    safety_checker: bool = True
    watermark: bool = False
    eta: float = 0.0
    clip_skip: int = 0

    def __post_init__(self):
        from sd_jax.schedulers import SCHEDULER_NAMES

        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "outdir", Path(self.outdir))
        for name in ("init_image", "mask_image"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if not self.model:
            raise ValueError("model is required: a diffusers folder, a .ckpt/.safetensors file or a hub id")
        if not self.prompts:
            raise ValueError("no prompt given: pass --prompt TEXT or --from-file FILE")
        if self.watermark:
            import importlib.util

            if importlib.util.find_spec("imwatermark") is None:
                raise ValueError("--watermark needs the 'invisible-watermark' package: "
                                 "pip install 'sd_jax[watermark]'")
        if not all(isinstance(p, str) for p in self.prompts):
            raise ValueError(f"prompts must be strings, got {self.prompts!r}")
        _check_int("steps", self.steps, 1)
        for name in ("height", "width"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0 or value % LATENT_FACTOR:
                raise ValueError(f"{name}={value!r} must be a positive multiple of {LATENT_FACTOR}")
        if self.scheduler is not None and self.scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale!r} must be a finite number >= 0")
        _check_int("n_images", self.n_images, 1)
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
        if self.seed + self.total - 1 > MAX_SEED:
            raise ValueError(f"seed={self.seed} is too large: its {self.total} images would use seeds up to "
                             f"{self.seed + self.total - 1}, above the largest seed {MAX_SEED}")
        if self.dtype not in common.DTYPE_CHOICES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(common.DTYPE_CHOICES)}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength={self.strength!r} must be in (0, 1]")
        if self.mask_image is not None and self.init_image is None:
            raise ValueError(f"--mask-image {str(self.mask_image)!r} needs --init-image (the image to inpaint)")
        if not math.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"eta={self.eta!r} must be a finite number >= 0")
        if self.eta and self.scheduler not in (None, "ddim"):
            raise ValueError(f"eta={self.eta!r} only applies to the ddim scheduler (scheduler is {self.scheduler!r})")
        _check_int("clip_skip", self.clip_skip, 0)

    @property
    def total(self) -> int:
        """Images in the run."""
        return len(self.prompts) * self.n_images

    @property
    def batch(self) -> int:
        """Images per compiled call."""
        return self.batch_size or min(self.total, DEFAULT_MAX_BATCH)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GenerateConfig:
        """The parsed command line -> a config (reads --from-file)."""
        prompts = list(args.prompt or [])
        if args.from_file is not None:
            prompts = common.read_lines(args.from_file, "--from-file")
            if not prompts:
                raise ValueError(f"--from-file {args.from_file!r} has no prompts (blank lines and # comments "
                                 "are skipped)")
        return cls(model=args.model, prompts=tuple(prompts), negative_prompt=args.negative_prompt,
                   steps=args.steps, scheduler=args.scheduler, guidance_scale=args.guidance_scale,
                   height=args.height, width=args.width, seed=args.seed, n_images=args.n_images,
                   batch_size=args.batch_size, outdir=Path(args.outdir), grid=args.grid, dtype=args.dtype,
                   init_image=args.init_image, strength=args.strength, mask_image=args.mask_image,
                   safety_checker=not args.no_safety_checker, watermark=args.watermark, eta=args.eta,
                   clip_skip=args.clip_skip)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


# ----------------------------------------------------------------------------- files


def next_index(outdir: Path) -> int:
    """One past the highest ``NNNNN-`` number of any file in ``outdir`` (0 for none)."""
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def next_grid_index(outdir: Path) -> int:
    """One past the highest ``grid-NNNNN.png`` in ``outdir``."""
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := _GRID.match(p.name))]
    return max(numbers, default=-1) + 1


def _free_index(outdir: Path, index: int) -> int:
    """``index`` or the next number no file in ``outdir`` starts with (another process may write there)."""
    while any(outdir.glob(f"{index:05d}-*")):
        index += 1
    return index


def image_metadata(cfg: GenerateConfig, prompt: str, seed: int, scheduler: str, dtype: str) -> dict[str, Any]:
    """The PNG text chunks of one image: what it takes to regenerate it."""
    from sd_jax import __version__

    meta = {"prompt": prompt, "negative_prompt": cfg.negative_prompt, "steps": cfg.steps,
            "scheduler": scheduler, "guidance_scale": cfg.guidance_scale, "seed": seed,
            "width": cfg.width, "height": cfg.height, "model": cfg.model, "dtype": dtype,
            "batch_size": cfg.batch, "eta": cfg.eta, "clip_skip": cfg.clip_skip,
            "sd_jax_version": __version__}
    if cfg.init_image is not None:
        meta.update(strength=cfg.strength, init_image=cfg.init_image.name)
    if cfg.mask_image is not None:
        meta["mask_image"] = cfg.mask_image.name
    return meta


# ----------------------------------------------------------------------------- run


def run(config: GenerateConfig | argparse.Namespace, pipe: Any = None) -> list[Path]:
    """Generate every image of ``config`` and write them; returns the image files, then the grid if asked.

    Cheap checks (values, files, output folder) run before the model loads.
    ``pipe``: an already loaded :class:`~sd_jax.pipeline.StableDiffusion` to reuse.
    Progress is reported per batch: the denoising loop is one compiled call.
    """
    cfg = config if isinstance(config, GenerateConfig) else GenerateConfig.from_args(config)
    from sd_jax import images as imageio

    if pipe is None:
        common.check_model_source(cfg.model)
    init = _open_image(cfg.init_image, "--init-image")
    mask = _open_image(cfg.mask_image, "--mask-image")
    outdir = common.prepare_output_dir(cfg.outdir)

    t_start = time.perf_counter()
    if pipe is None:
        from sd_jax.pipeline import StableDiffusion

        print(f"loading {cfg.model} ({cfg.dtype}) ...", flush=True)
        pipe = StableDiffusion.from_pretrained(cfg.model, dtype=cfg.dtype, safety_checker=cfg.safety_checker)
        print(f"loaded in {time.perf_counter() - t_start:.1f} s", flush=True)
    elif not cfg.safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe = dataclasses.replace(pipe, safety_checker=None)  # a shallow copy; the caller's pipe keeps its checker
    dtype = _dtype_name(pipe)

    prompts = [p for p in cfg.prompts for _ in range(cfg.n_images)]
    seeds = [cfg.seed + i for i in range(cfg.total)]
    batch = cfg.batch
    n_batches = math.ceil(cfg.total / batch)
    kwargs = dict(negative_prompt=cfg.negative_prompt, height=cfg.height, width=cfg.width,
                  num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler,
                  num_images_per_prompt=1, eta=cfg.eta, init_image=init, strength=cfg.strength,
                  mask_image=mask, clip_skip=cfg.clip_skip, batch_size=batch)
    print(f"generating {cfg.total} image(s) of {cfg.width}x{cfg.height}, {cfg.steps} steps, in {n_batches} "
          f"batch(es) of {batch}; the first batch compiles the sampler", flush=True)

    index = next_index(outdir)
    written: list[Path] = []
    pil_images: list[Any] = []
    flagged: list[Path] = []
    batch_times: list[float] = []
    first_image_at = None
    bar = None
    t_gen = time.perf_counter()
    try:
        for b in range(n_batches):
            sl = slice(b * batch, min((b + 1) * batch, cfg.total))
            t0 = time.perf_counter()
            # Every call has the same compiled shape: the pipeline pads a short last batch to batch_size.
            result = pipe.generate(prompts[sl], seed=seeds[sl], **kwargs)
            batch_times.append(time.perf_counter() - t0)
            paths, index = _write_images(cfg, result, outdir, index, dtype)
            written += paths
            pil_images += result.images
            flagged += [path for path, bad in zip(paths, result.nsfw or []) if bad]
            if first_image_at is None:
                first_image_at = time.perf_counter() - t_start
            # The bar starts after the first batch: an error in that batch stays one stderr line,
            # and its rate leaves out the compilation.
            if bar is None:
                bar = _progress_bar(cfg.total, len(written))
            else:
                bar.update(len(paths))
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t_gen

    grid_path = None
    if cfg.grid:
        grid_path = outdir / f"grid-{next_grid_index(outdir):05d}.png"
        imageio.save_png(imageio.grid(pil_images), grid_path, _grid_metadata(cfg, written, result.scheduler, dtype))

    _report_timing(cfg.total, batch_times, batch, first_image_at, elapsed)
    print(f"wrote {len(written)} image(s): {common.format_paths(written)}")
    if grid_path is not None:
        print(f"wrote grid {grid_path}")
    if flagged:
        print(f"warning: the safety checker flagged {len(flagged)} of {len(written)} image(s) (files left "
              f"unchanged): {', '.join(map(str, flagged))}", file=sys.stderr)
    return written + ([grid_path] if grid_path is not None else [])


def _write_images(cfg: GenerateConfig, result: Any, outdir: Path, index: int, dtype: str
                  ) -> tuple[list[Path], int]:
    """Save one batch's images as numbered PNGs with their metadata; returns the paths and the next number."""
    from sd_jax import images as imageio

    paths = []
    images = result.images
    if cfg.watermark:
        from sd_jax.watermark import put_watermark

        images = put_watermark(images)
    for image, prompt, seed in zip(images, result.prompts, result.seeds):
        index = _free_index(outdir, index)
        meta = image_metadata(cfg, prompt, seed, result.scheduler, dtype)
        paths.append(imageio.save_png(image, outdir / f"{index:05d}-{seed}.png", meta))
        index += 1
    return paths, index


def _open_image(path: Path | None, flag: str) -> Any:
    """The decoded image (PIL) of an image flag, or None; an unreadable file is an error naming the flag."""
    from sd_jax import images as imageio

    if path is None:
        return None
    try:
        return imageio.open_image(common.check_readable_file(path, flag))
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


def _dtype_name(pipe: Any) -> str:
    import numpy as np

    return np.dtype(pipe.unet.dtype).name


def _progress_bar(total: int, done: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="image", desc="images", dynamic_ncols=True, file=sys.stderr)


def _grid_metadata(cfg: GenerateConfig, files: Sequence[Path], scheduler: str, dtype: str) -> dict[str, Any]:
    from sd_jax import __version__

    return {"prompts": " | ".join(cfg.prompts), "negative_prompt": cfg.negative_prompt, "steps": cfg.steps,
            "scheduler": scheduler, "guidance_scale": cfg.guidance_scale,
            "seeds": f"{cfg.seed}..{cfg.seed + cfg.total - 1}", "width": cfg.width, "height": cfg.height,
            "model": cfg.model, "dtype": dtype, "images": " ".join(p.name for p in files),
            "sd_jax_version": __version__}


def _report_timing(total: int, batch_times: list[float], batch: int, first_image_at: float,
                   elapsed: float) -> None:
    """Compile time (first batch minus a steady batch), time to first image, images/s."""
    first, rest = batch_times[0], batch_times[1:]
    if rest:
        steady = statistics.median(rest)
        print(f"compile time ~ {max(first - steady, 0.0):.1f} s (first batch {first:.1f} s, then "
              f"{steady:.2f} s per batch of {batch})")
    else:
        print(f"first batch {first:.1f} s, including any compilation (one batch gives no separate compile time)")
    print(f"time to first image: {first_image_at:.1f} s (model load included)")
    rate = f"{total / elapsed:.2f} images/s"
    if rest:
        rate += f" overall, {(total - batch) / sum(rest):.2f} images/s after compilation"
    print(f"{total} image(s) in {elapsed:.1f} s: {rate}")


# ----------------------------------------------------------------------------- command line


def build_parser() -> common.ArgumentParser:
    """The generate.py command line."""
    from sd_jax.schedulers import SCHEDULER_NAMES

    p = common.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate images with Stable Diffusion v1.x (text-to-image, img2img, inpainting).",
        epilog="Files: OUTDIR/NNNNN-SEED.png (numbering continues after the highest number in OUTDIR), with the\n"
               "generation parameters as PNG text. Image i of a run gets seed SEED+i; --seed S --n-images 1\n"
               "with its prompt regenerates one image (pixel-identical with the same --batch-size and devices).\n"
               "Progress is shown per batch, not per step: the whole denoising loop is one compiled call.\n"
               "Bad values exit with status 2 and one error line.")
    p.add_argument("--model", required=True, help="diffusers folder, .ckpt/.safetensors file or hub id")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="prompt; repeat the flag for several prompts")
    src.add_argument("--from-file", metavar="FILE",
                     help="prompts, one per line (blank lines and lines starting with # are skipped)")
    p.add_argument("--negative-prompt", default="", metavar="TEXT", help="negative prompt for every image")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, metavar="NAME",
                   help=f"one of {', '.join(SCHEDULER_NAMES)} (default: the model folder's own)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    p.add_argument("--height", type=int, default=512, help="pixels, a multiple of 8 (default 512)")
    p.add_argument("--width", type=int, default=512, help="pixels, a multiple of 8 (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i gets SEED+i (default 0)")
    p.add_argument("--n-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=int, help="images per compiled call (default: min(total images, 8)); "
                                                  "progress is reported per batch")
    p.add_argument("--outdir", default="outputs", help="output folder (default: outputs)")
    p.add_argument("--grid", action="store_true", help="also write all images of the run as grid-NNNNN.png")
    p.add_argument("--dtype", choices=common.DTYPE_CHOICES, default="float32", help="compute dtype (default float32)")
    p.add_argument("--init-image", metavar="FILE", help="img2img: start from this image (resized to the output size)")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how much to change the init image, "
                                                               "in (0, 1] (default 0.8)")
    p.add_argument("--mask-image", metavar="FILE", help="inpainting (needs --init-image): white = repaint")
    p.add_argument("--no-safety-checker", action="store_true",
                   help="do not run the model folder's safety checker (flagged images are reported, never altered)")
    p.add_argument("--watermark", action="store_true",
                   help="embed the CompVis invisible watermark (needs: pip install 'sd_jax[watermark]')")
    p.add_argument("--eta", type=float, default=0.0, help="ddim only: noise of each step, 0 = deterministic")
    p.add_argument("--clip-skip", type=int, default=0, help="use the text encoder's hidden state this many layers "
                                                            "before the last (default 0)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run, and return the exit status (2 with one error line for a bad value)."""
    args = build_parser().parse_args(argv)
    return common.run_main(PROG, lambda: run(args))
