"""The service's Prometheus metrics (``GET /metrics``), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sd_jax.serve.batcher import Listener

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics(Listener):
    """Requests, images, batches, batch sizes, queue depth and request latency."""

    def __init__(self, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sd_jax_serve_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.images = Counter("sd_jax_serve_images", "Images generated for clients", registry=r)
        self.batches = Counter("sd_jax_serve_batches", "Sampling batches run (one compiled call each)", registry=r)
        self.batch_size = Histogram("sd_jax_serve_batch_size", "Client images per batch", registry=r,
                                    buckets=tuple(float(b) for b in range(1, max_batch + 1)))
        self.padding = Counter("sd_jax_serve_padding_images", "Images computed only to fill a batch bucket",
                               registry=r)
        self.batch_seconds = Histogram("sd_jax_serve_batch_seconds", "Seconds per batch (sampling and decoding)",
                                       registry=r, buckets=LATENCY_BUCKETS)
        self.queue_depth = Gauge("sd_jax_serve_queue_depth", "Images waiting for a batch", registry=r)
        self.latency = Histogram("sd_jax_serve_request_latency_seconds", "Seconds from request to response",
                                 ["endpoint"], registry=r, buckets=LATENCY_BUCKETS)
        self.dropped = Counter("sd_jax_serve_dropped_requests", "Requests dropped from the queue (client gone, "
                               "timeout)", ["reason"], registry=r)
        self.sampling_step = Gauge("sd_jax_serve_sampling_step", "Denoising step of the batch now running",
                                   registry=r)

    def batch_done(self, images: int, padded: int, seconds: float) -> None:
        self.batches.inc()
        self.batch_size.observe(images)
        self.padding.inc(padded - images)
        self.batch_seconds.observe(seconds)

    def queue_changed(self, images: int) -> None:
        self.queue_depth.set(images)

    def job_dropped(self, reason: str) -> None:
        self.dropped.labels(reason).inc()

    def progress(self, step: int, steps: int) -> None:
        self.sampling_step.set(step)

    def render(self) -> bytes:
        return generate_latest(self.registry)
