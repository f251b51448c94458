"""The opt-in CompVis invisible watermark round-trips through the decoder."""

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("imwatermark", reason="the watermark extra (invisible-watermark) is not installed")

from sd_jax.watermark import WATERMARK, put_watermark, read_watermark  # noqa: E402


def test_roundtrip_and_invisible():
    rng = np.random.default_rng(0)
    # A photo-like image away from 0/255 (imwatermark, like the original scripts, wraps uint8 at the ends).
    ramp = np.linspace(60, 190, 512)[None, :, None] + np.linspace(-20, 20, 512)[:, None, None]
    image = Image.fromarray((ramp + rng.normal(0, 5, (512, 512, 3))).clip(0, 255).astype(np.uint8))
    marked = put_watermark([image])[0]
    assert read_watermark(marked) == WATERMARK
    diff = np.abs(np.asarray(marked, np.float32) - np.asarray(image, np.float32))
    assert diff.mean() < 3.0  # invisible: a few levels on average
