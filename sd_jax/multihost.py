"""Who does what when one run is several processes (a TPU pod's hosts, or ``python -m sd_jax.launch``).

Sampling needs no collective: each process draws its share of every batch on
its own devices and writes those files itself, numbered as one process would
number them. The split keeps the per-device batch of a one-process run on the
same total device count: a batch of ``B`` images gives each of the ``P``
processes ``ceil(B / P)`` consecutive images (the last share shorter or
empty), and ``ceil(ceil(B / P) / d) == ceil(B / (P d))`` images per device.

The trainer's split is in :class:`sd_jax.dreambooth.step.BatchLayout`.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def agree(value: int) -> int:
    """Process 0's value of an integer, on every process (a collective: every process must call it)."""
    import jax

    if jax.process_count() == 1:
        return int(value)
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def share_requests(cfg: Any, first_number: int, init: Any = None, mask: Any = None) -> Iterator[tuple[int, Any]]:
    """This process's requests of a generate run (:class:`sd_jax.generation.GenerateConfig`), batch by batch,
    each with the file number of its first image.

    Image ``i`` of the run is file number ``first_number + i`` (process 0's
    ``first_number``, agreed by all) with seed ``cfg.seed + i`` on every process
    count, so the folder ends as a one-process run leaves it. One process: the
    run's own requests. Several: each batch's share, its batch size
    ``ceil(B / P)`` (the same compiled shape for every batch).
    """
    import jax

    count, index = jax.process_count(), jax.process_index()
    base = agree(first_number)
    per = -(-cfg.batch // count)
    for start in range(0, cfg.total, cfg.batch):
        stop = min(start + cfg.batch, cfg.total)
        if count == 1:
            yield base + start, cfg.request(start, stop, init, mask)
            continue
        lo = min(start + index * per, stop)
        hi = min(lo + per, stop)
        if lo < hi:
            yield base + lo, dataclasses.replace(cfg.request(lo, hi, init, mask), batch_size=per)


def gather_bytes(payload: bytes) -> list[bytes]:
    """Every process's ``payload``, in process order, on every process (a collective: every process
    calls it). Goes through JAX's own channel, so hosts need no shared file system."""
    import jax

    if jax.process_count() == 1:
        return [payload]
    import numpy as np
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(payload)))).reshape(-1)
    buffer = np.zeros(int(sizes.max()) or 1, np.uint8)
    buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buffer)).reshape(len(sizes), -1)
    return [row[:size].tobytes() for row, size in zip(rows, sizes)]


def gather_images(kept: Sequence[tuple[Any, dict[str, Any], Path]]) -> list[tuple[Any, dict[str, Any], Path]] | None:
    """The (image, metadata, path) triples every process wrote, in file-number order, on process 0
    (None on the others): a grid of a several-process run holds every image, as one process's would."""
    import jax

    if jax.process_count() == 1:
        return list(kept)
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    header = json.dumps([[meta, str(path)] for _, meta, path in kept], default=str).encode()
    pixels = np.stack([np.asarray(image, np.uint8) for image, _, _ in kept]) if kept else np.zeros((0,), np.uint8)
    np.savez(buffer, header=np.frombuffer(header, np.uint8), pixels=pixels)
    parts = gather_bytes(buffer.getvalue())
    if jax.process_index() != 0:
        return None
    items = []
    for part in parts:
        with np.load(io.BytesIO(part), allow_pickle=False) as data:
            entries = json.loads(data["header"].tobytes())
            items += [(Image.fromarray(pixels), meta, Path(path))
                      for pixels, (meta, path) in zip(data["pixels"], entries)]
    return sorted(items, key=lambda item: int(item[2].name.split("-", 1)[0]))  # NNNNN-SEED.png
