"""The one writer of sd_jax's images: numbered PNGs, their metadata (one schema) and grids.

Every image sd_jax writes (generate.py, the notebooks, Dreambooth's class
images and validation samples) carries the same PNG text: what it takes to
regenerate it (:func:`image_metadata`), one text chunk per key, and under
``parameters`` the same in AUTOMATIC1111's infotext layout
(:func:`a1111_parameters`), which A1111's PNG Info, ComfyUI and model sites read. Numbered files are
``OUTDIR/NNNNN-SEED.png``, NNNNN counting on from the highest number of any
file already in OUTDIR, so nothing is overwritten; grids are
``OUTDIR/grid-NNNNN.png``. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import functools
import hashlib
import json
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
                   extra: Mapping[str, Any] | None = None,
                   embeddings: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The PNG text of image ``index`` of a :class:`~sd_jax.pipeline.GenerationResult`.

    ``model``/``dtype`` default to the result's (the pipeline's source and compute dtype); a caller may
    name the model as its user did (a hub id rather than the cache folder).

    Keys: prompt, negative_prompt, steps, scheduler, guidance_scale, seed, width,
    height, model, dtype, batch_size (images per compiled call: pixel-exact
    regeneration needs the same), eta, clip_skip, prompt_syntax, strength (img2img
    and inpainting), loras (JSON: name, scale, hash, source of each) and
    lora_hashes, embeddings (``embeddings``: prompt token -> short hash of each
    loaded textual-inversion file, those the prompts use), sd_jax_version, then
    ``extra`` (e.g. the init image's name), and last ``parameters``: all of it as
    AUTOMATIC1111's infotext (:func:`a1111_parameters`).
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
        meta.update(eta=request.eta, clip_skip=request.clip_skip, prompt_syntax=request.prompt_syntax)
        if request.init_image is not None:
            meta["strength"] = request.strength
    loras = [dict(r) for r in getattr(result, "loras", None) or []]
    if loras:
        meta["loras"] = json.dumps(loras)
        meta["lora_hashes"] = _hash_list({r["name"]: r["hash"] for r in loras})
    used = {token: digest for token, digest in (embeddings or {}).items()
            if _mentions(meta["prompt"], token) or _mentions(meta["negative_prompt"], token)}
    if used:
        meta["embeddings"] = _hash_list(used)
    meta["sd_jax_version"] = __version__
    meta.update(extra or {})
    meta["parameters"] = a1111_parameters(
        meta["prompt"], meta["negative_prompt"], steps=meta["steps"], sampler=meta["scheduler"],
        cfg_scale=meta["guidance_scale"], seed=meta["seed"], width=meta["width"], height=meta["height"],
        model=meta["model"], model_hash=model_hash(meta["model"]), clip_skip=meta.get("clip_skip", 0),
        denoising_strength=meta.get("strength"), eta=meta.get("eta", 0.0), loras=loras, embeddings=used)
    return meta


# ----------------------------------------------------------------------------- AUTOMATIC1111 infotext


def a1111_parameters(prompt: str, negative_prompt: str = "", *, steps: int, sampler: str | None, cfg_scale: float,
                     seed: int, width: int, height: int, model: str | None = None, model_hash: str | None = None,
                     clip_skip: int = 0, denoising_strength: float | None = None, eta: float = 0.0,
                     loras: Sequence[Mapping[str, Any]] = (), embeddings: Mapping[str, str] | None = None,
                     extra: Mapping[str, Any] | None = None) -> str:
    """One image's parameters in AUTOMATIC1111's infotext layout (its ``create_infotext``)::

        <prompt>
        Negative prompt: <negative prompt>            (only when there is one)
        Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5, ...

    ``sampler``: sd_jax's solver name or A1111's (written as A1111's, e.g. "DPM++ 2M Karras").
    ``clip_skip`` is sd_jax's (layers skipped, 0 = none), written as A1111's "Clip skip" = ``clip_skip + 1``
    and only when above 1, as A1111 does. ``model``: a file or folder path (written as its name) or a hub id;
    ``model_hash``: A1111's short hash of a checkpoint file (:func:`model_hash`). ``loras``: records with
    ``name`` and ``hash`` ("Lora hashes"); ``embeddings``: token -> short hash ("TI hashes"). A value with a
    comma, colon or newline is quoted as A1111 quotes it (JSON).
    """
    fields: dict[str, Any] = {"Steps": steps, "Sampler": a1111_sampler_name(sampler), "CFG scale": f"{cfg_scale:g}",
                              "Seed": seed, "Size": f"{width}x{height}", "Model hash": model_hash,
                              "Model": _model_name(model) if model else None,
                              "Denoising strength": None if denoising_strength is None else f"{denoising_strength:g}",
                              "Clip skip": clip_skip + 1 if clip_skip else None,
                              "Eta DDIM": f"{eta:g}" if eta else None}
    if loras:
        fields["Lora hashes"] = _hash_list({r["name"]: r["hash"] for r in loras})
    if embeddings:
        fields["TI hashes"] = _hash_list(embeddings)
    fields.update(extra or {})
    text = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{text}"


def a1111_sampler_name(name: str | None) -> str | None:
    """A1111's name of a solver named in sd_jax's or A1111's words; an unknown name is kept as it is."""
    from sd_jax.schedulers import A1111_SAMPLER_NAMES, canonical_scheduler_name

    if name is None:
        return None
    ours = canonical_scheduler_name(name)
    return next((a1111 for a1111, solver in A1111_SAMPLER_NAMES.items() if solver == ours), name)


def model_hash(model: str | None) -> str | None:
    """A1111's "Model hash" of a checkpoint file: the first 10 hex digits of its SHA-256 (None for a folder or
    hub id). Hashed once per process and file version (path, size, mtime)."""
    if not model:
        return None
    path = Path(model).expanduser()
    if not path.is_file():
        return None
    stat = path.stat()
    return _sha256_prefix(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_prefix(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def _model_name(model: str) -> str:
    """A1111 names a checkpoint by its file name without the extension; a folder by its name; a hub id as is."""
    path = Path(model).expanduser()
    if path.is_file():
        return path.stem
    if path.is_dir():
        return path.resolve().name
    return model


def _quote(value: Any) -> str:
    """A1111's ``infotext_utils.quote``: JSON-quoted when the value holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _hash_list(hashes: Mapping[str, str]) -> str:
    """'name: hash, name2: hash2' (A1111 drops ':' and ',' from the names)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {digest}" for name, digest in hashes.items())


def _mentions(prompt: str, token: str) -> bool:
    """Whether a prompt holds an embedding's token (matched as the tokenizer does: case-insensitive)."""
    return token.lower() in str(prompt).lower()


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
    the init image's name); ``embeddings``: token -> short hash of the loaded
    textual-inversion files (recorded where a prompt uses them); ``watermark``
    embeds the invisible watermark.
    Keeps the metadata of what it wrote for :meth:`write_grid` only when
    ``keep_for_grid``.
    """

    def __init__(self, outdir: str | Path, *, model: str, dtype: str, extra: Mapping[str, Any] | None = None,
                 watermark: bool = False, keep_for_grid: bool = False, embeddings: Mapping[str, str] | None = None):
        self.outdir = prepare(outdir)
        self.embeddings = dict(embeddings or {})
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
            meta = image_metadata(result, i, model=self.model, dtype=self.dtype, extra=self.extra,
                                  embeddings=self.embeddings)
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
                extra: Mapping[str, Any] | None = None, embeddings: Mapping[str, str] | None = None) -> list[Path]:
    """Write a whole result (and its grid when asked); returns the paths, the grid last."""
    writer = ImageWriter(outdir, model=model, dtype=dtype, extra=extra, keep_for_grid=grid, embeddings=embeddings)
    paths = writer.write(result)
    return paths + ([writer.write_grid()] if grid else [])
