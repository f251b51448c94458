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
from collections.abc import Iterator
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
    if count > 1 and cfg.grid:
        raise ValueError(f"--grid across {count} processes is not supported (each process holds only its own "
                         "images); run without --grid, or with one process")
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
