"""The one writer of sd_jax's images: numbered PNGs, their metadata (one schema) and grids.

Every image sd_jax writes (generate.py, the notebooks, Dreambooth's class
images and validation samples) carries the same PNG text: what it takes to
regenerate it (:func:`image_metadata`). Numbered files are
``OUTDIR/NNNNN-SEED.png``, NNNNN counting on from the highest number of any
file already in OUTDIR, so nothing is overwritten; grids are
``OUTDIR/grid-NNNNN.png``. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sd_jax import images as imageio

NUMBERED = re.compile(r"^(\d+)-")
GRID = re.compile(r"^grid-(\d+)\.png$")
MAX_GRID_PIXELS = 4 * imageio.MAX_PIXELS  # a grid past this is refused (it is held in memory whole)


def next_index(outdir: Path) -> int:
    """One past the highest ``NNNNN-`` number of any file in ``outdir`` (0 for none)."""
    numbers = [int(m.group(1)) for p in Path(outdir).iterdir() if (m := NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def next_grid_index(outdir: Path) -> int:
    """One past the highest ``grid-NNNNN.png`` in ``outdir``."""
    numbers = [int(m.group(1)) for p in Path(outdir).iterdir() if (m := GRID.match(p.name))]
    return max(numbers, default=-1) + 1


def image_metadata(result: Any, index: int, *, model: str | None = None, dtype: str | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The PNG text of image ``index`` of a :class:`~sd_jax.pipeline.GenerationResult`.

    ``model``/``dtype`` default to the result's (the pipeline's source and compute dtype); a caller may
    name the model as its user did (a hub id rather than the cache folder).

    Keys: prompt, negative_prompt, steps, scheduler, guidance_scale, seed, width,
    height, model, dtype, batch_size (images per compiled call: pixel-exact
    regeneration needs the same), eta, clip_skip, strength (img2img and
    inpainting), sd_jax_version, then ``extra`` (e.g. the init image's name).
    """
    from sd_jax import __version__

    request = result.request
    meta = {"prompt": result.prompts[index], "negative_prompt": result.negative_prompts[index],
            "steps": result.num_inference_steps, "scheduler": result.scheduler,
            "guidance_scale": result.guidance_scales[index], "seed": result.seeds[index],
            "width": result.width, "height": result.height,
            "model": model if model is not None else getattr(result, "model", ""),
            "dtype": dtype if dtype is not None else getattr(result, "dtype", ""),
            "batch_size": (request.batch_size or request.total) if request is not None else len(result.images)}
    if request is not None:
        meta.update(eta=request.eta, clip_skip=request.clip_skip)
        if request.init_image is not None:
            meta["strength"] = request.strength
    meta["sd_jax_version"] = __version__
    meta.update(extra or {})
    return meta


def grid_metadata(metas: Sequence[Mapping[str, Any]], files: Sequence[Path]) -> dict[str, Any]:
    """A grid's PNG text: the settings its images share, their prompts, seeds and files."""
    shared = {k: v for k, v in metas[0].items()
              if k not in ("prompt", "seed", "negative_prompt") and all(m.get(k) == v for m in metas)}
    return {"prompts": " | ".join(dict.fromkeys(str(m["prompt"]) for m in metas)),
            "negative_prompt": " | ".join(dict.fromkeys(str(m["negative_prompt"]) for m in metas)),
            "seeds": " ".join(str(m["seed"]) for m in metas), **shared,
            "images": " ".join(p.name for p in files)}


def check_grid(images: int, height: int, width: int) -> None:
    """Refuse a grid too large to hold in memory and write (before any work)."""
    pixels = images * height * width
    if pixels > MAX_GRID_PIXELS:
        raise ValueError(f"a grid of {images} images of {width}x{height} would be {pixels / 1e6:.0f} megapixels; "
                         f"at most {MAX_GRID_PIXELS / 1e6:.0f}: leave out the grid or make fewer images")


class ImageWriter:
    """Writes numbered PNGs with :func:`image_metadata` into one folder, and grids of them.

    ``model`` and ``dtype`` go into every file's metadata; ``extra`` too (e.g.
    the init image's name); ``watermark`` embeds the invisible watermark.
    Keeps the metadata of what it wrote for :meth:`write_grid` only when
    ``keep_for_grid``.
    """

    def __init__(self, outdir: str | Path, *, model: str, dtype: str, extra: Mapping[str, Any] | None = None,
                 watermark: bool = False, keep_for_grid: bool = False):
        self.outdir = prepare(outdir)
        self.model, self.dtype, self.extra, self.watermark = model, dtype, dict(extra or {}), watermark
        self.index = next_index(self.outdir)
        self.keep_for_grid = keep_for_grid
        self.kept: list[tuple[Any, dict[str, Any], Path]] = []

    def write(self, result: Any) -> list[Path]:
        """Every image of a result as ``NNNNN-SEED.png``; returns the paths."""
        images = result.images
        if self.watermark:
            from sd_jax.watermark import put_watermark

            images = put_watermark(images)
        paths = []
        for i, image in enumerate(images):
            while any(self.outdir.glob(f"{self.index:05d}-*")):  # another process may write here too
                self.index += 1
            meta = image_metadata(result, i, model=self.model, dtype=self.dtype, extra=self.extra)
            path = imageio.save_png(image, self.outdir / f"{self.index:05d}-{result.seeds[i]}.png", meta)
            paths.append(path)
            if self.keep_for_grid:
                self.kept.append((image, meta, path))
            self.index += 1
        return paths

    def write_grid(self) -> Path:
        """The images written so far (kept with ``keep_for_grid``) as ``grid-NNNNN.png``."""
        if not self.kept:
            raise ValueError("no images to put in a grid")
        images, metas, files = zip(*self.kept)
        path = self.outdir / f"grid-{next_grid_index(self.outdir):05d}.png"
        return imageio.save_png(imageio.grid(list(images)), path, grid_metadata(metas, files))


def prepare(outdir: str | Path, what: str = "output folder") -> Path:
    """Create the folder if needed and prove it is writable; an error names it."""
    import tempfile

    path = Path(outdir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".sd_jax-write-test-"):
            pass
    except OSError as err:
        raise OSError(f"{what} {str(path)!r} is not a writable folder: {err.strerror or err}") from None
    return path


def save_result(result: Any, outdir: str | Path, *, model: str, dtype: str, grid: bool = False,
                extra: Mapping[str, Any] | None = None) -> list[Path]:
    """Write a whole result (and its grid when asked); returns the paths, the grid last."""
    writer = ImageWriter(outdir, model=model, dtype=dtype, extra=extra, keep_for_grid=grid)
    paths = writer.write(result)
    return paths + ([writer.write_grid()] if grid else [])
