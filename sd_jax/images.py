"""Images in and out: PIL/arrays to NHWC floats, floats to PIL, grids and PNG metadata."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin


MAX_PIXELS = 8192 * 8192   # an image file sd_jax decodes (generate's inputs, training photos): about 67 megapixels


def _open_header(path: Path) -> Image.Image:
    """The image's header only (nothing decoded); refuses more than MAX_PIXELS before any decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # sd_jax's own, lower limit follows
        try:
            img = Image.open(path)
        except Image.DecompressionBombError:
            raise ValueError(f"image {_name(path)} has more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels "
                             f"(a decompression bomb?); sd_jax reads images up to {MAX_PIXELS / 1e6:.0f} "
                             "megapixels") from None
    width, height = img.size
    if width * height > MAX_PIXELS:
        img.close()
        raise ValueError(f"image {_name(path)} is {width}x{height} ({width * height / 1e6:.0f} megapixels); sd_jax "
                         f"reads images up to {MAX_PIXELS / 1e6:.0f} megapixels (e.g. 8192x8192): downscale it first")
    return img


def _name(path: Path) -> str:
    """A path for a message: its repr, cut to a short prefix when long."""
    text = repr(str(path))
    return text if len(text) <= 200 else text[:200] + "..."


def image_file_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file after its EXIF rotation, from the header (nothing decoded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {_name(path)} does not exist")
    try:
        with _open_header(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {_name(path)}: {err}") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def open_image(path: str | Path) -> Image.Image:
    """Open an image file, apply its EXIF rotation, or raise a clear error naming it.

    The size is checked from the header before anything is decoded (at most
    :data:`MAX_PIXELS`), so a decompression bomb costs nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {_name(path)} does not exist")
    try:
        with _open_header(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {_name(path)}: {err}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (RGBA, LA, P, L, I;16, CMYK, ...) -> RGB; transparency over white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def image_to_array(image: Any, height: int, width: int, channels: int = 3) -> np.ndarray:
    """PIL image / path / (H, W, C) uint8 or [0, 1] float array -> (H, W, C) float32 in [0, 1].

    PIL inputs of another size are resized with Lanczos, as diffusers does.
    """
    if isinstance(image, (str, Path)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        image = to_rgb(image) if channels == 3 else image.convert("L")
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)
        arr = np.asarray(image, np.float32) / 255.0
        return arr[..., None] if channels == 1 else arr
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[:2] != (height, width):
        raise ValueError(f"image array must be ({height}, {width}, C) for a {width}x{height} generation, "
                         f"got shape {arr.shape}")
    arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    if channels == 1 and arr.shape[-1] != 1:
        arr = arr.mean(axis=-1, keepdims=True)
    if channels == 3 and arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.min() < 0 or arr.max() > 1:
        raise ValueError(f"float image arrays must lie in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]")
    return arr


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> PIL images (rounded as diffusers' numpy_to_pil)."""
    arr = (np.asarray(images, np.float32) * 255).round().clip(0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images in a near-square grid, row by row."""
    if not images:
        raise ValueError("grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    canvas = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, img in enumerate(images):
        canvas.paste(img, ((i % cols) * w, (i // cols) * h))
    return canvas


def save_png(image: Image.Image, path: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Write a PNG with ``metadata`` as text chunks (one per key, plus a 'parameters' summary unless the
    metadata has its own, e.g. AUTOMATIC1111's infotext from :func:`sd_jax.outputs.image_metadata`)."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(str(key), "" if value is None else str(value))
    if "parameters" not in metadata:
        info.add_text("parameters", ", ".join(f"{k}: {v}" for k, v in metadata.items()))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path
