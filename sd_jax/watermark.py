"""The invisible watermark of the original CompVis scripts (opt-in: ``pip install sd_jax[watermark]``).

CompVis ``txt2img.py`` embeds the bytes ``StableDiffusionV1`` with
``imwatermark``'s ``dwtDct`` method into each BGR image; this does the same,
so existing detectors (``WatermarkDecoder('bytes', 136)``) read it back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

WATERMARK = "StableDiffusionV1"


def _encoder() -> Any:
    """An imwatermark encoder loaded lazily, with a clear error when the extra is missing."""
    try:
        from imwatermark import WatermarkEncoder
    except ImportError:
        raise ImportError("the invisible watermark needs the 'invisible-watermark' package: "
                          "pip install 'sd_jax[watermark]'") from None
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", WATERMARK.encode("utf-8"))
    return encoder


def put_watermark(images: list[Image.Image]) -> list[Image.Image]:
    """Embed the CompVis watermark in each image (RGB in, RGB out)."""
    encoder = _encoder()
    out = []
    for image in images:
        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1].copy()
        out.append(Image.fromarray(np.ascontiguousarray(encoder.encode(bgr, "dwtDct")[:, :, ::-1])))
    return out


def read_watermark(image: Image.Image) -> str:
    """Decode the watermark bytes of an image (for checking)."""
    _encoder()  # the same clear error when missing
    from imwatermark import WatermarkDecoder

    decoder = WatermarkDecoder("bytes", len(WATERMARK) * 8)
    bgr = np.asarray(image.convert("RGB"))[:, :, ::-1].copy()
    return decoder.decode(bgr, "dwtDct").decode("utf-8", errors="replace")
