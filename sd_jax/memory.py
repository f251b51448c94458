"""How much memory a sampling request needs, and whether it fits, checked before any work.

The estimate is deliberately a lower bound built from the few largest tensors
that must exist at once, so a refusal is never wrong, while requests that
would reach the allocator and die (a 800000-pixel side, thousands of images
in one call) are refused with one line instead:

- per device, for its share of a batch: the UNet's widest activations at the
  latent size (its first block's channels, the skip connections kept for the
  up path; doubled with classifier-free guidance) and the VAE decoder's
  full-resolution activations (its first block's channels, three live buffers);
- on the host: the float32 results that one call returns at once (for
  :meth:`StableDiffusion.generate`, every image; generate.py streams batches).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

UNET_LIVE_BUFFERS = 6   # hidden state, residual, norm output, and the skips the up path keeps
VAE_LIVE_BUFFERS = 3    # a resnet block's input, hidden state and output at full resolution
RESULT_BYTES_PER_PIXEL = 3 * 4 + 3  # the float32 (H, W, 3) array and the 8-bit PIL image


class RequestTooLarge(ValueError):
    """A request that cannot fit in memory (a user-fixable value: smaller size or batch)."""


def host_available_bytes() -> int | None:
    """Memory the OS can still give this process (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_available_bytes(device: Any) -> int | None:
    """Free memory of an accelerator (limit minus in use), or None (CPU devices share the host's)."""
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some plugins report nothing
        return None
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def sampling_bytes_per_image(unet_channels: int, vae_channels: int, latent_factor: int, itemsize: int,
                             height: int, width: int, guided: bool) -> int:
    """Lower bound of the activation bytes one image of a batch needs while it is sampled and decoded."""
    latent_pixels = (height // latent_factor) * (width // latent_factor)
    unet = (2 if guided else 1) * latent_pixels * unet_channels * UNET_LIVE_BUFFERS * itemsize
    vae = height * width * vae_channels * VAE_LIVE_BUFFERS * itemsize
    return max(unet, vae)


def compiled_peak_bytes(compiled: Any) -> int | None:
    """XLA's own per-device estimate for one call of a compiled function: its arguments, outputs
    and temporaries, less the outputs that reuse (donated) argument buffers. None when the
    backend does not report it."""
    try:
        mem = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if mem is None:
        return None
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(*, per_image: int, batch: int, results: int, height: int, width: int,
               devices: Sequence[Any], what: str = "this request") -> None:
    """Refuse (one line) when a batch's activations or the returned images cannot fit.

    ``per_image``: :func:`sampling_bytes_per_image`; ``batch``: images per
    compiled call (split over ``devices``); ``results``: images returned at once.
    """
    share = math.ceil(batch / max(len(devices), 1))
    need_device = per_image * share
    result_bytes = results * height * width * RESULT_BYTES_PER_PIXEL
    host = host_available_bytes()
    device = devices[0] if devices else None
    free_device = device_available_bytes(device) if device is not None else None
    if free_device is not None:
        if need_device > free_device:
            raise RequestTooLarge(f"{what} needs at least {_gib(need_device)} per device ({share} image(s) of "
                               f"{width}x{height} each) but {device.device_kind} has {_gib(free_device)} free; "
                               "use a smaller size or batch size")
        need_host = result_bytes
    else:
        need_host = need_device * len(devices) + result_bytes  # CPU devices share the host's memory
    if host is not None and need_host > host:
        raise RequestTooLarge(f"{what} needs at least {_gib(need_host)} of memory ({batch} image(s) of "
                              f"{width}x{height} per batch, {results} returned at once) but {_gib(host)} is available; "
                              "use a smaller size, batch size or number of images")
