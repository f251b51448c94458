"""Reading JSON request fields with types and bounds; errors name the API field (-> HTTP 422).

A request's own values are checked by :class:`~sd_jax.request.GenerationRequest`; its
:class:`~sd_jax.request.RequestError` is rendered with the API's field names
(:func:`from_request_error`), so a client reads ``cfg_scale -1 must be ...`` in its own words.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from sd_jax.limits import short
from sd_jax.request import RequestError


class FieldError(ValueError):
    """A bad value of one API field: HTTP 422 with the field and a message naming what is valid."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def from_request_error(err: RequestError, names: Mapping[str, str]) -> FieldError:
    """A RequestError in the API's words: its first field, named as ``names`` maps it."""
    fields = [part[0] for part in err.parts if isinstance(part, tuple)]
    field = names.get(fields[0], fields[0]) if fields else ""
    return FieldError(field, err.render(names))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(body: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    """An integer field in [low, high] (a float with no fraction is accepted, as pydantic does)."""
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not is_int(value) or not low <= value <= high:
        raise FieldError(name, f"{name} {short(value)} must be an integer in [{low}, {high}]")
    return value


def number(body: Mapping[str, Any], name: str, default: float | None, low: float, high: float) -> float | None:
    """A finite number field in [low, high]; None stays None when the default is None."""
    value = body.get(name, default)
    if value is None:
        return default
    if not is_number(value) or not math.isfinite(value) or not low <= value <= high:
        raise FieldError(name, f"{name} {short(value)} must be a number in [{low:g}, {high:g}]")
    return float(value)


def text(body: Mapping[str, Any], name: str, default: str, max_chars: int) -> str:
    """A string field of at most ``max_chars`` characters (null means the default)."""
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise FieldError(name, f"{name} must be a string, got {type(value).__name__} {short(value)}")
    if len(value) > max_chars:
        raise FieldError(name, f"{name} must be at most {max_chars} characters, got {len(value)}: {short(value)}")
    return value


def boolean(body: Mapping[str, Any], name: str, default: bool | None) -> bool | None:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FieldError(name, f"{name} must be true or false, got {short(value)}")
    return value


def decode_image(data: Any, field: str, max_pixels: int) -> Any:
    """A base64 image (PNG/JPEG/WebP..., with or without a ``data:image/...;base64,`` prefix) -> PIL image;
    its size is checked from the header before the pixels are decoded."""
    from PIL import Image

    if not isinstance(data, str) or not data:
        raise FieldError(field, f"{field} must be a base64-encoded image, got {short(data)}")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise FieldError(field, f"{field} is not valid base64: {short(data)}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw))
            width, height = image.size
            if width * height > max_pixels:
                raise FieldError(field, f"{field} is {width}x{height}; at most {max_pixels} pixels")
            image.load()
        except FieldError:
            raise
        except Exception as err:  # noqa: BLE001 - any decoder error is a bad image from the client
            raise FieldError(field, f"{field} is not a readable image ({type(err).__name__}: "
                                    f"{short(str(err))})") from None
    return image


def encode_png(image_01: np.ndarray, text_chunks: Mapping[str, str] | None = None) -> str:
    """(H, W, 3) float in [0, 1] -> base64 PNG (rounded as sd_jax writes PNGs), with optional text chunks."""
    from PIL import PngImagePlugin

    from sd_jax.images import to_pil

    info = PngImagePlugin.PngInfo()
    for key, value in (text_chunks or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    to_pil(image_01[None])[0].save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")
