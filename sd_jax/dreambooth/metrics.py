"""Training logs: TensorBoard event files, a console progress bar and an end-of-run summary.

    logger = MetricsLogger(out / "logs", purge_step=start_step)  # process 0 writes, others no-op
    bar = Progress(total=max_steps, initial=start_step)
    summary = RunSummary(images_per_step=global_batch)
    for step in range(start_step, max_steps):
        state, m = train_step(state, frozen, batch)
        summary.tick()
        if (step + 1) % log_every == 0:
            m = jax.device_get(m)                  # one sync per log interval
            logger.scalars(step + 1, {"train/loss": m["loss"], "train/lr": m["lr"], ...})
            bar.update(log_every, {"loss": m["loss"]})
            summary.record_loss(m["loss"])
    logger.images(step, "samples/prompt0", pil_images)
    bar.close(); logger.close(); print(summary.table())

``MetricsLogger`` writes with ``tensorboardX.SummaryWriter`` (no TensorFlow or
TensorBoard needed to write; ``tensorboard --logdir out/logs`` to view) and keeps a
``metrics.jsonl`` of the scalars beside the event files for scripts and tests.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import numpy as np

# ------------------------------------------------------------------------------ TensorBoard


def _process_index() -> int:
    """jax.process_index() when JAX is in use (it is, in training), else 0."""
    jax = sys.modules.get("jax")
    return int(jax.process_index()) if jax is not None else 0


def _scalar(name: str, value: Any) -> float:
    try:
        arr = np.asarray(value)
        if arr.size != 1:
            raise TypeError
        return float(arr.reshape(()))
    except (TypeError, ValueError):
        raise ValueError(f"scalar {name!r}: expected a number or a one-element array, got "
                         f"{type(value).__name__} {getattr(value, 'shape', '')}") from None


def to_uint8_rgb(image: Any, name: str = "image") -> np.ndarray:
    """A PIL image or an (H, W[, C]) array (uint8, or float in [0, 1]) -> (H, W, 3) uint8."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: expected an (H, W, 3) image (or (H, W), (H, W, 1), (H, W, 4)), "
                         f"got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{name}: expected uint8 or float pixels in [0, 1], got {arr.dtype}")
        arr = np.round(np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def truncate_jsonl(path: str | os.PathLike, step: int) -> int:
    """Keep the rows of ``path`` (a metrics.jsonl) whose step is below ``step``; drop the rest and any torn
    line. Written to a temporary file and renamed over ``path``. Returns the number of rows dropped."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
            if int(row["step"]) < step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # torn by a kill mid-write, or not ours: dropped
            continue
    if len(kept) == len(lines):
        return 0
    tmp = f"{os.fspath(path)}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(lines) - len(kept)


class MetricsLogger:
    """TensorBoard scalars, images and text for one run; a no-op unless enabled on process 0.

    ``flush_every``: flush the event file (and ``metrics.jsonl``) every N ``scalars`` calls;
    images and text are flushed at once. ``purge_step``: when resuming from step S, pass S
    so TensorBoard drops events at steps >= S written by the interrupted run, and
    ``metrics.jsonl`` is rewritten (atomically) without its rows of steps >= S (and without a
    line torn by a kill), so each step appears once.
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True, flush_every: int = 10,
                 purge_step: int | None = None, jsonl: bool = True):
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every={flush_every!r}: expected a positive integer")
        self.logdir = os.fspath(logdir)
        self.enabled = bool(enabled) and _process_index() == 0
        self.flush_every = flush_every
        self._writer = None
        self._jsonl: TextIO | None = None
        self._pending = 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(self.logdir, exist_ok=True)
        # tensorboardX names files by the second and opens them "wb": a unique suffix keeps a
        # writer opened within the same second (a quick resume, a test) from erasing another's.
        suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._writer = SummaryWriter(self.logdir, purge_step=purge_step, max_queue=100, flush_secs=60,
                                     filename_suffix=suffix)
        if jsonl:
            path = os.path.join(self.logdir, "metrics.jsonl")
            if purge_step is not None:
                truncate_jsonl(path, int(purge_step))
            self._jsonl = open(path, "a", encoding="utf-8")

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """One point per tag (e.g. ``train/loss``); values may be Python, NumPy or JAX scalars."""
        if not self.enabled:
            return
        step = int(step)
        floats = {str(k): _scalar(str(k), v) for k, v in values.items() if v is not None}
        for tag, value in floats.items():
            self._writer.add_scalar(tag, value, step)
        if self._jsonl is not None:
            row = {"step": step, "time": round(time.time(), 3),
                   **{k: (v if math.isfinite(v) else str(v)) for k, v in floats.items()}}
            self._jsonl.write(json.dumps(row) + "\n")
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    def images(self, step: int, name: str, images: Any) -> None:
        """Images as ``name/0``, ``name/1``, ...: a list of PIL images or (H, W, 3) arrays
        (uint8, or float in [0, 1]), or one (N, H, W, 3) array."""
        if not self.enabled:
            return
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, Sequence):
            images = [images]
        for i, image in enumerate(images):
            rgb = to_uint8_rgb(image, f"{name}[{i}]")
            self._writer.add_image(f"{name}/{i}", rgb, int(step), dataformats="HWC")
        self.flush()

    def text(self, step: int, name: str, text: str) -> None:
        """A text entry (markdown), e.g. the run config or the validation prompts."""
        if not self.enabled:
            return
        self._writer.add_text(name, str(text), int(step))
        self.flush()

    def flush(self) -> None:
        if not self.enabled:
            return
        self._writer.flush()
        if self._jsonl is not None:
            self._jsonl.flush()
        self._pending = 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        self.enabled = False

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------ console


def _fmt(value: Any) -> str:
    try:
        x = _scalar("", value)
    except ValueError:
        return str(value)
    if math.isfinite(x) and x == int(x) and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.4g}"


class Progress:
    """A tqdm bar over optimizer steps with rate and ETA; ``initial`` for a resumed run."""

    def __init__(self, total: int, initial: int = 0, *, desc: str = "train", enabled: bool = True,
                 file: TextIO | None = None, mininterval: float = 0.5):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                         disable=not (enabled and _process_index() == 0), file=file,
                         mininterval=mininterval, smoothing=0.1)

    @property
    def n(self) -> int:
        return int(self._bar.n)

    def update(self, n: int = 1, postfix: Mapping[str, Any] | None = None) -> None:
        """Advance ``n`` steps; ``postfix`` (e.g. {"loss": 0.12}) is shown after the bar."""
        if postfix:
            self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
        self._bar.update(n)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        self._bar.write(message)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------ summary


def peak_rss_bytes() -> int:
    """This process's peak resident memory (``getrusage``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_device_bytes() -> int | None:
    """Largest ``peak_bytes_in_use`` over this process's devices (GPU/TPU), None where unknown."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    peaks = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats() or {}
        except Exception:  # noqa: BLE001 - CPU and some plugins do not implement it
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


class RunSummary:
    """Step timing and memory of a run, printed as a table at the end.

    Call :meth:`tick` after each step (or ``tick(n)`` after n steps); the first tick (the
    step that compiled) is left out of the mean. JAX dispatches asynchronously, so a tick
    times dispatch until something blocks; the mean is right over a run whose last tick
    follows a sync (e.g. fetching the loss), which the trainer's logging does.
    """

    def __init__(self, *, images_per_step: int, skip_first: int = 1,
                 clock: Callable[[], float] = time.perf_counter):
        if isinstance(images_per_step, bool) or not isinstance(images_per_step, int) or images_per_step < 1:
            raise ValueError(f"images_per_step={images_per_step!r}: expected a positive integer")
        self.images_per_step = images_per_step
        self.skip_first = skip_first
        self._clock = clock
        self.start()

    def start(self) -> None:
        """(Re)start the clock: call right before the training loop."""
        self._t0 = self._last = self._clock()
        self._ticks = 0
        self.steps = 0
        self._timed_steps = 0
        self._timed_seconds = 0.0
        self.final_loss: float | None = None

    def tick(self, n: int = 1, loss: Any = None) -> float:
        """Mark ``n`` more steps done; returns the seconds since the previous tick."""
        now = self._clock()
        dt, self._last = now - self._last, now
        self._ticks += 1
        self.steps += n
        if self._ticks > self.skip_first:
            self._timed_steps += n
            self._timed_seconds += dt
        if loss is not None:
            self.record_loss(loss)
        return dt

    def record_loss(self, loss: Any) -> None:
        self.final_loss = _scalar("loss", loss)

    @property
    def mean_step_s(self) -> float | None:
        return self._timed_seconds / self._timed_steps if self._timed_steps else None

    def as_dict(self) -> dict[str, Any]:
        mean = self.mean_step_s
        return {
            "steps": self.steps,
            "wall_time_s": self._last - self._t0 if self._ticks else self._clock() - self._t0,
            "mean_step_s": mean,
            "steps_per_s": 1.0 / mean if mean else None,
            "images_per_s": self.images_per_step / mean if mean else None,
            "final_loss": self.final_loss,
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_device_bytes": peak_device_bytes(),
        }

    def table(self) -> str:
        d = self.as_dict()
        num = lambda x, f: "n/a" if x is None else format(x, f)
        rows = [
            ("steps", str(d["steps"])),
            ("wall time", f"{d['wall_time_s']:.1f} s"),
            (f"mean s/step (excl. first {self.skip_first})", num(d["mean_step_s"], ".4f")),
            ("steps/s", num(d["steps_per_s"], ".3f")),
            ("images/s", num(d["images_per_s"], ".3f")),
            ("final loss", num(d["final_loss"], ".5g")),
            ("peak host memory (RSS)", _bytes(d["peak_rss_bytes"])),
            ("peak device memory", _bytes(d["peak_device_bytes"])),
        ]
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 3 + max(len(v) for _, v in rows))
        return "\n".join(["run summary", line, *(f"{k:<{width}}   {v}" for k, v in rows), line])

    def print(self, file: TextIO | None = None) -> None:
        print(self.table(), file=file or sys.stdout, flush=True)
