"""The dynamic batcher: many clients' images, grouped into one compiled sampling call.

Each client request is one validated :class:`~sd_jax.request.GenerationRequest` (a *job*).
Jobs whose settings can share one compiled call (:func:`batch_key`: size, solver, step count,
mode, guidance on/off, strength, eta, clip skip, prompt syntax) wait in one group for up to
``max_wait_s`` after the oldest arrived, or until the group holds ``max_batch`` images; then
up to ``max_batch`` of their images (prompts, negative prompts, seeds and guidance scales
per image) become ONE request, padded to a bucket size (:func:`buckets`), and go through
``StableDiffusion.run`` like any other request. The result is split back per job.

Fairness: groups take turns (round robin), so a request that cannot share a batch waits
behind at most one batch of each other group. A job larger than ``max_batch`` is spread over
several batches. A batch that fails is rerun job by job, so a bad request fails alone.

One worker thread owns the accelerator; clients wait on a ``concurrent.futures.Future``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sd_jax.request import GenerationRequest

log = logging.getLogger("sd_jax.serve")


class QueueFull(Exception):
    """The queue holds ``queue_size`` images already: try again in ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class NotAccepting(Exception):
    """The service is warming up or draining (shutting down)."""


class JobCancelled(Exception):
    """The client went away (or its time ran out) before its images were made."""


def buckets(max_batch: int, devices: int = 1) -> tuple[int, ...]:
    """Compiled batch sizes: powers of two below ``max_batch`` and ``max_batch`` itself, each rounded
    up to a multiple of ``devices`` (the batch is split evenly over them)."""
    if max_batch < 1 or devices < 1:
        raise ValueError(f"max_batch {max_batch} and devices {devices} must be >= 1")
    sizes = {max_batch} | {2 ** k for k in range(max_batch.bit_length()) if 2 ** k < max_batch}
    return tuple(sorted({s + (-s % devices) for s in sizes}))


def bucket_for(images: int, sizes: Sequence[int]) -> int:
    """The smallest bucket holding ``images``."""
    for size in sizes:
        if size >= images:
            return size
    raise ValueError(f"{images} images exceed the largest batch {sizes[-1]}")


def batch_key(request: GenerationRequest) -> tuple[Any, ...]:
    """What two requests must share to run in one compiled call (everything not per image)."""
    return (request.height, request.width, request.scheduler, request.steps, request.mode, request.guided,
            request.strength, request.eta, request.clip_skip, request.prompt_syntax, request.loras)


@dataclasses.dataclass(eq=False)
class Job:
    """One client's images and where they stand."""

    request: GenerationRequest
    future: concurrent.futures.Future
    created: float
    deadline: float
    taken: int = 0                                     # images handed to batches so far
    parts: dict[int, tuple[np.ndarray, Any]] = dataclasses.field(default_factory=dict)  # start -> (images, nsfw)
    cancelled: bool = False
    scheduler: str = ""

    @property
    def key(self) -> tuple[Any, ...]:
        return batch_key(self.request)

    @property
    def waiting(self) -> int:
        """Images not yet handed to a batch."""
        return self.request.total - self.taken

    def cancel(self) -> None:
        """Drop the images not yet started (the worker skips them)."""
        self.cancelled = True


@dataclasses.dataclass
class JobResult:
    """A job's images (N, H, W, 3) float32 in [0, 1], the safety checker's flags and the solver that ran."""

    array: np.ndarray
    nsfw: list[bool] | None
    scheduler: str


class Listener:
    """What the batcher reports (metrics, progress); every method is optional."""

    def batch_done(self, images: int, padded: int, seconds: float) -> None: ...

    def queue_changed(self, images: int) -> None: ...

    def job_dropped(self, reason: str) -> None: ...

    def progress(self, step: int, steps: int) -> None: ...


class Batcher:
    """Groups jobs into batches and runs them on one worker thread.

    ``run_batch(request, progress) -> result`` runs one combined request (``StableDiffusion.run``
    with the service's devices); ``check(request)`` checks one job against the model before it
    is queued (model-dependent values, memory). Neither is called under the lock.
    """

    def __init__(self, run_batch: Callable[[GenerationRequest, Any], Any], *, max_batch: int, max_wait_s: float,
                 queue_size: int, devices: int = 1, sizes: Sequence[int] | None = None,
                 listener: Listener | None = None):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.sizes = buckets(max_batch, devices) if sizes is None else tuple(
            sorted({s + (-s % devices) for s in sizes}))
        if self.sizes[-1] < max_batch:
            raise ValueError(f"the largest batch size {self.sizes[-1]} is below max_batch {max_batch}")
        self.listener = listener or Listener()
        self._cond = threading.Condition()
        self._groups: collections.OrderedDict[tuple[Any, ...], collections.deque[Job]] = collections.OrderedDict()
        self._queued = 0            # images waiting
        self._running = 0           # images in the batch now running
        self._accepting = False
        self._stopping = False
        self._batch_seconds = 1.0   # running mean, for Retry-After
        self.step = (0, 0)          # (step, steps) of the batch now running
        self._thread = threading.Thread(target=self._work, name="sd_jax-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ clients
    def submit(self, request: GenerationRequest, timeout_s: float) -> Job:
        """Queue a job; raises NotAccepting or QueueFull (nothing is queued then)."""
        now = time.monotonic()
        job = Job(request, concurrent.futures.Future(), now, now + timeout_s)
        with self._cond:
            if not self._accepting:
                raise NotAccepting()
            if self._queued + request.total > self.queue_size:
                raise QueueFull(self.retry_after_s())
            self._groups.setdefault(job.key, collections.deque()).append(job)
            self._queued += request.total
            self.listener.queue_changed(self._queued)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """A client left or timed out: its images not yet started are dropped from the queue."""
        with self._cond:
            if job.cancelled or job.future.done():
                return
            job.cancel()
            group = self._groups.get(job.key)
            if group is not None and job in group:
                group.remove(job)
                self._queued -= job.waiting
                job.taken = job.request.total
                if not group:
                    del self._groups[job.key]
                self.listener.queue_changed(self._queued)
            self.listener.job_dropped(reason)
        if not job.future.done():
            job.future.set_exception(JobCancelled(reason))

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely moved on by one full queue (at least 1)."""
        batches = self._queued / max(self.max_batch, 1)
        return max(1, int(np.ceil(batches * self._batch_seconds)))

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def jobs_waiting(self) -> int:
        with self._cond:
            return sum(len(g) for g in self._groups.values())

    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        with self._cond:
            return self._queued == 0 and self._running == 0

    def accept(self, on: bool) -> None:
        """Start or stop taking jobs (warm-up done; drain)."""
        with self._cond:
            self._accepting = on
            self._cond.notify_all()

    def stop(self, timeout_s: float | None = None) -> None:
        """Finish what is queued, then end the worker."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            with self._cond:
                picked = self._next_batch()
                if picked is None:
                    return
            self._run(picked)

    def _next_batch(self) -> list[tuple[Job, int, int]] | None:
        """Under the lock: wait for the front group's window, then take up to max_batch of its images."""
        while True:
            self._expire()
            if not self._groups:
                if self._stopping:
                    return None
                self._cond.wait()
                continue
            key, group = next(iter(self._groups.items()))
            images = sum(job.waiting for job in group)
            ready_at = group[0].created + self.max_wait_s
            now = time.monotonic()
            if images < self.max_batch and now < ready_at and not self._stopping and self._accepting:
                self._cond.wait(ready_at - now)
                continue
            picked, room = [], self.max_batch
            while group and room:
                job = group[0]
                count = min(job.waiting, room)
                picked.append((job, job.taken, job.taken + count))
                job.taken += count
                room -= count
                if not job.waiting:
                    group.popleft()
            del self._groups[key]
            if group:  # round robin: the rest of this group waits behind the other groups
                self._groups[key] = group
            taken = self.max_batch - room
            self._queued -= taken
            self._running = taken
            self.listener.queue_changed(self._queued)
            return picked

    def _expire(self) -> None:
        """Fail queued jobs whose time ran out before they started."""
        now = time.monotonic()
        for key in list(self._groups):
            group = self._groups[key]
            for job in [j for j in group if j.deadline <= now and j.taken == 0]:
                group.remove(job)
                self._queued -= job.waiting
                job.taken = job.request.total
                job.cancel()
                job.future.set_exception(JobCancelled("timed out in the queue"))
                self.listener.job_dropped("timeout")
            if not group:
                del self._groups[key]

    def _run(self, picked: list[tuple[Job, int, int]]) -> None:
        """Run one batch (the picked image ranges of a few jobs) and hand each job its images."""
        live = [(job, a, b) for job, a, b in picked if not job.future.done()]
        try:
            if not live:
                return
            start = time.monotonic()
            try:
                results = self._run_together(live)
            except Exception as err:  # noqa: BLE001 - a failed batch is rerun job by job below
                if len(live) == 1:
                    results = [err]
                else:
                    log.warning("a batch of %d requests failed (%s); running them one by one", len(live), err)
                    results = [self._run_alone(part) for part in live]
            seconds = time.monotonic() - start
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
            for (job, a, b), res in zip(live, results):
                self._deliver(job, a, b, res)
        finally:
            with self._cond:
                self._running = 0
                self.step = (0, 0)
                self._cond.notify_all()

    def _run_together(self, live: list[tuple[Job, int, int]]) -> list[Any]:
        parts = [job.request.select(a, b) for job, a, b in live]
        combined = combine(parts, bucket_for(sum(p.total for p in parts), self.sizes))
        start = time.monotonic()
        result = self.run_batch(combined, _StepCounter(self))
        self.listener.batch_done(combined.total, combined.batch_size, time.monotonic() - start)
        out, offset = [], 0
        for part in parts:
            nsfw = None if result.nsfw is None else result.nsfw[offset:offset + part.total]
            out.append((result.array[offset:offset + part.total], nsfw, result.scheduler))
            offset += part.total
        return out

    def _run_alone(self, part: tuple[Job, int, int]) -> Any:
        try:
            return self._run_together([part])[0]
        except Exception as err:  # noqa: BLE001 - handed to that client alone
            return err

    def _deliver(self, job: Job, a: int, b: int, res: Any) -> None:
        if job.future.done():
            return
        if isinstance(res, Exception):
            job.future.set_exception(res)
            return
        array, nsfw, job.scheduler = res
        job.parts[a] = (array, nsfw)
        if sum(len(arr) for arr, _ in job.parts.values()) == job.request.total:
            ordered = [job.parts[k] for k in sorted(job.parts)]
            flags = None if ordered[0][1] is None else [f for _, n in ordered for f in n]
            job.future.set_result(JobResult(np.concatenate([arr for arr, _ in ordered]), flags, job.scheduler))


class NullProgress:
    """Step events to nowhere: the warm-up compiles the same reporting loop the service runs."""

    def batch_started(self, steps: int, compiling: bool) -> None:
        pass

    def step(self) -> None:
        pass

    def batch_done(self) -> None:
        pass


class _StepCounter:
    """sd_jax.sampling.Progress for the batch now running: keeps (step, steps) for /progress."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher

    def batch_started(self, steps: int, compiling: bool) -> None:
        self.batcher.step = (0, steps)

    def step(self) -> None:
        step, steps = self.batcher.step
        self.batcher.step = (step + 1, steps)
        self.batcher.listener.progress(step + 1, steps)

    def batch_done(self) -> None:
        pass


def combine(parts: Sequence[GenerationRequest], batch_size: int) -> GenerationRequest:
    """Requests that share a :func:`batch_key` as ONE request (their images in order), compiled at
    ``batch_size`` images (the request is padded up to it)."""
    first = parts[0]
    if any(batch_key(p) != batch_key(first) for p in parts):
        raise ValueError("requests with different settings cannot share a batch")
    total = sum(p.total for p in parts)

    def stacked(name: str) -> np.ndarray | None:
        if getattr(first, name) is None:
            return None
        arrays = [getattr(p, name) for p in parts]
        if len(arrays) == 1:
            return arrays[0]
        return np.concatenate([np.broadcast_to(a, (p.total, *a.shape[1:])) for a, p in zip(arrays, parts)])

    return dataclasses.replace(
        first, prompts=sum((p.prompts for p in parts), ()),
        negative_prompts=sum((p.negative_prompts for p in parts), ()), seeds=sum((p.seeds for p in parts), ()),
        guidance_scales=sum((p.guidance_scales for p in parts), ()), init_image=stacked("init_image"),
        mask_image=stacked("mask_image"), latents=None, batch_size=max(batch_size, total))
