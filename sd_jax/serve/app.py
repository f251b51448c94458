"""The HTTP service: configuration, the running service (model, batcher, metrics) and its FastAPI routes.

Every image request is parsed into one :class:`~sd_jax.request.GenerationRequest` (A1111's or
OpenAI's fields, :mod:`sd_jax.serve.a1111` / :mod:`sd_jax.serve.openai_api`), checked against the
model (``StableDiffusion.check_request``: model-dependent values, memory) and queued in the
:class:`~sd_jax.serve.batcher.Batcher`, which runs it with other clients' images through
``StableDiffusion.run``. Limits: request bodies (413), queued images (429 + Retry-After), images per
request, a per-request timeout (504); bad fields are 422 naming the field (OpenAI's API: 400).
"""


import asyncio
import base64
import binascii
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from sd_jax.request import GenerationRequest, RequestError
from sd_jax.serve import a1111, openai_api
from sd_jax.serve.batcher import Batcher, JobCancelled, NotAccepting, NullProgress, QueueFull, bucket_for
from sd_jax.serve.fields import FieldError, from_request_error

log = logging.getLogger("sd_jax.serve")

LOOPBACK_NAMES = ("localhost", "ip6-localhost")
POLL_S = 0.1  # how often a waiting request checks that its client is still there


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """What ``python -m sd_jax.serve`` is started with (checked before the model loads).

    ``warmup``: sizes compiled before /health answers 200, each ``WxH[:sampler[:img2img]]``
    (default: 512x512 with the model's solver, txt2img); ``warmup_batches``: the bucket sizes
    compiled for each (default: all). Other shapes compile on their first request.
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 7860
    dtype: str = "float32"
    max_batch: int = 8
    max_wait_ms: float = 50.0
    queue_size: int = 256
    api_key: str | None = None
    api_auth: str | None = None
    insecure_no_auth: bool = False
    devices: int | None = None
    warmup: tuple[str, ...] = ("512x512",)
    warmup_batches: tuple[int, ...] | None = None
    batch_sizes: tuple[int, ...] | None = None
    max_body_mb: float = 50.0
    max_images: int = 64
    timeout_s: float = 600.0
    safety_checker: bool = True
    model_name: str | None = None

    def __post_init__(self):
        for name, low, high in (("max_batch", 1, 4096), ("queue_size", 1, 1_000_000), ("max_images", 1, 10_000),
                                ("port", 0, 65535)):
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"--{name.replace('_', '-')} {value!r} must be an integer in [{low}, {high}]")
        for name, low, high in (("max_wait_ms", 0, 60_000), ("max_body_mb", 0.001, 4096), ("timeout_s", 0.1, 86_400)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
                raise ValueError(f"--{name.replace('_', '-')} {value!r} must be a number in [{low}, {high}]")
        if self.queue_size < self.max_batch:
            raise ValueError(f"--queue-size {self.queue_size} must be at least --max-batch {self.max_batch}")
        if self.max_images > self.queue_size:
            raise ValueError(f"--max-images {self.max_images} must be at most --queue-size {self.queue_size}")
        if self.batch_sizes is not None and (not self.batch_sizes or max(self.batch_sizes) < self.max_batch
                                             or min(self.batch_sizes) < 1):
            raise ValueError(f"--batch-sizes {self.batch_sizes} must be sizes >= 1, the largest at least --max-batch "
                             f"{self.max_batch}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key must not be empty")
        if self.api_auth is not None:
            parse_credentials(self.api_auth)
        for spec in self.warmup:
            parse_warmup(spec)
        if not self.insecure_no_auth and not is_loopback(self.host) and not (self.api_key or self.api_auth):
            raise ValueError(f"--host {self.host} is reachable from other machines and no --api-key or --api-auth "
                             "is set: give one, bind to 127.0.0.1, or pass --insecure-no-auth to serve without "
                             "authentication")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the service on this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_credentials(text: str) -> dict[str, str]:
    """``user:pass[,user2:pass2]`` (A1111's --api-auth) -> {user: password}."""
    users = {}
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError("--api-auth must be USER:PASSWORD (several separated by commas), got an entry "
                             f"without {'a password' if user else 'a user'}")
        users[user] = password
    return users


def parse_warmup(spec: str) -> tuple[int, int, str | None, str]:
    """``WxH[:sampler[:txt2img|img2img]]`` -> (width, height, solver or None, mode)."""
    from sd_jax.request import canonical_scheduler

    size, _, rest = spec.partition(":")
    sampler, _, mode = rest.partition(":")
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--warmup {spec[:40]!r} must be WxH[:sampler[:txt2img|img2img]], e.g. 512x512:euler_a"
                         ) from None
    if mode not in ("", "txt2img", "img2img"):
        raise ValueError(f"--warmup {spec[:40]!r}: the mode must be txt2img or img2img")
    try:
        solver = canonical_scheduler(sampler) if sampler else None
    except RequestError as err:
        raise ValueError(f"--warmup {spec[:40]!r}: {err}") from None
    return width, height, solver, mode or "txt2img"


class HTTPProblem(Exception):
    """An HTTP error answer: status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, field: str | None = None):
        super().__init__(message)
        self.status, self.headers, self.field = status, headers or {}, field


class Service:
    """The model, the batcher and the metrics, with the state /health reports."""

    def __init__(self, cfg: ServeConfig, pipe: Any):
        import jax

        from sd_jax import sharding
        from sd_jax.request import PROMPT_SYNTAXES
        from sd_jax.serve.metrics import Metrics

        self.cfg, self.pipe = cfg, pipe
        self.devices = jax.local_devices()[: cfg.devices] if cfg.devices else jax.local_devices()
        self.mesh = sharding.sampling_mesh(self.devices)
        self.model_name = cfg.model_name or str(cfg.model).rstrip("/").split("/")[-1] or str(cfg.model)
        self.a1111_syntax = "a1111" if "a1111" in PROMPT_SYNTAXES else "plain"  # A1111's (word:1.2) weights
        self.users = parse_credentials(cfg.api_auth) if cfg.api_auth else {}
        self.state = "starting"
        self.model_hash: str | None = None  # A1111's short hash of a checkpoint file (set during warm-up)
        self.inflight = 0
        self._lock = threading.Lock()
        self.metrics = Metrics(cfg.max_batch)
        self.batcher = Batcher(self._run_batch, max_batch=cfg.max_batch, max_wait_s=cfg.max_wait_ms / 1000.0,
                               queue_size=cfg.queue_size, devices=len(self.devices), sizes=cfg.batch_sizes,
                               listener=self.metrics)

    # ------------------------------------------------------------------ lifecycle
    def _run_batch(self, request: GenerationRequest, progress: Any) -> Any:
        return self.pipe.run(request, devices=self.devices, progress=progress)

    def warm_up(self, say: Callable[[str], None] = print) -> None:
        """Compile every configured (size, solver, mode) at every warm-up batch size, then take work."""
        import numpy as np

        from sd_jax.outputs import model_hash

        self.model_hash = model_hash(str(self.cfg.model))
        sizes = self.cfg.warmup_batches or self.batcher.sizes
        plan = [(parse_warmup(spec), b) for spec in self.cfg.warmup for b in sizes]
        for i, ((width, height, solver, mode), batch) in enumerate(plan, 1):
            start = time.monotonic()
            init = np.full((1, height, width, 3), 0.5, np.float32) if mode == "img2img" else None
            req = GenerationRequest.build(["warm-up"] * batch, height=height, width=width, num_inference_steps=2,
                                          scheduler=solver, seed=0, init_image=init,
                                          strength=0.5 if init is not None else None)
            req = dataclasses.replace(req, batch_size=bucket_for(batch, self.batcher.sizes))
            self.pipe.check_request(req, self.mesh)
            self._run_batch(req, NullProgress())  # the reporting loop, as served
            say(f"warm-up {i}/{len(plan)}: {width}x{height} {solver or self.pipe.scheduler_name(req)} {mode}, "
                f"batch {req.batch_size}: {time.monotonic() - start:.1f} s")
        self.state = "ready"
        self.batcher.accept(True)

    def start_drain(self, done: Callable[[], None]) -> None:
        """Stop taking work (503), finish what is queued, running and being answered, then call ``done``."""
        self.state = "draining"
        self.batcher.accept(False)

        def wait():
            while not (self.batcher.idle() and self.inflight == 0):
                time.sleep(0.05)
            self.batcher.stop(timeout_s=5)
            done()

        threading.Thread(target=wait, name="sd_jax-drain", daemon=True).start()

    # ------------------------------------------------------------------ requests
    def authorized(self, header: str | None) -> bool:
        """A valid ``Authorization``: Bearer (--api-key) or Basic (--api-auth); always true without auth."""
        if not self.cfg.api_key and not self.users:
            return True
        scheme, _, value = (header or "").partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and self.cfg.api_key:
            return hmac.compare_digest(value.strip().encode(), self.cfg.api_key.encode())
        if scheme == "basic" and self.users:
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return False
            expected = self.users.get(user, "")
            same = hmac.compare_digest(password.encode(), expected.encode())
            return same and bool(expected)
        return False

    def check(self, request: GenerationRequest, names: dict[str, str]) -> None:
        """Model-dependent checks and memory for the batch this request will run in (422 if refused)."""
        bucket = bucket_for(min(request.total, self.cfg.max_batch), self.batcher.sizes)
        try:
            self.pipe.check_request(dataclasses.replace(request, batch_size=bucket), self.mesh,
                                    results=request.total)
        except RequestError as err:
            raise from_request_error(err, names) from None

    async def generate(self, request: GenerationRequest, http: Any) -> Any:
        """Queue the request's images and wait for them; drops the job if the client goes away."""
        if self.state != "ready":
            raise HTTPProblem(503, f"the service is {self.state}; try again later", {"Retry-After": "5"})
        try:
            job = self.batcher.submit(request, self.cfg.timeout_s)
        except NotAccepting:
            raise HTTPProblem(503, "the service is not taking work now (warming up or shutting down)",
                              {"Retry-After": "5"}) from None
        except QueueFull as full:
            raise HTTPProblem(429, str(full), {"Retry-After": str(full.retry_after_s)}) from None
        waiting = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=POLL_S)
                if done:
                    break
                if await http.is_disconnected():
                    self.batcher.cancel(job, "disconnected")
                elif time.monotonic() > job.deadline:
                    self.batcher.cancel(job, "timeout")
        except asyncio.CancelledError:  # the server cancelled the handler (client gone): drop the job
            self.batcher.cancel(job, "disconnected")
            raise
        try:
            return waiting.result()
        except JobCancelled as err:
            raise HTTPProblem(504, f"the request was not done within {self.cfg.timeout_s:g} s ({err})") from None


# ---------------------------------------------------------------------------------------------- the app


def create_app(service: Service) -> Any:
    """The FastAPI application of one :class:`Service`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    app = FastAPI(title="sd_jax serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, service=service)
    metrics = service.metrics

    @app.exception_handler(HTTPProblem)
    async def problem(request: Request, exc: HTTPProblem):
        return _error(request.url.path, exc)

    @app.get("/health")
    async def health():
        ok = service.state == "ready"
        return JSONResponse({"status": service.state, "queued_images": service.batcher.queued},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await _a1111(request, img2img=False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await _a1111(request, img2img=True)

    async def _a1111(request: Request, img2img: bool):
        body = await read_json(request, service.cfg.max_body_bytes)
        job = await asyncio.to_thread(_parse, lambda: a1111.parse(
            body, img2img=img2img, max_images=service.cfg.max_images, max_pixels=_max_pixels(),
            prompt_syntax=service.a1111_syntax))
        await asyncio.to_thread(_parse, lambda: service.check(job.request, a1111.NAMES))
        result = await _run(request, job.request)
        answer = await asyncio.to_thread(a1111.response, job, result.array, service.model_name, service.model_hash)
        return JSONResponse(answer)

    @app.post("/v1/images/generations")
    async def openai_generations(request: Request):
        body = await read_json(request, service.cfg.max_body_bytes)
        job = await asyncio.to_thread(_parse, lambda: openai_api.parse(body, max_images=service.cfg.max_images))
        await asyncio.to_thread(_parse, lambda: service.check(job.request, openai_api.NAMES))
        result = await _run(request, job.request)
        return JSONResponse(await asyncio.to_thread(openai_api.response, result.array))

    async def _run(request: Request, gen: GenerationRequest) -> Any:
        try:
            result = await service.generate(gen, request)
        except RequestError as err:  # a value only the model could refuse, found while running
            raise HTTPProblem(422, str(err)) from None
        except (HTTPProblem, asyncio.CancelledError):
            raise
        except Exception as err:  # noqa: BLE001 - the batch failed for this request alone (see Batcher)
            log.exception("request failed")
            raise HTTPProblem(500, f"generation failed: {type(err).__name__}: {str(err)[:300]}") from None
        metrics.images.inc(gen.total)
        return result

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return a1111.sampler_list()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return a1111.schedule_list()

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": service.model_name, "model_name": service.model_name, "hash": None, "sha256": None,
                 "filename": str(service.cfg.model), "config": None}]

    @app.get("/sdapi/v1/options")
    async def options():
        return {"sd_model_checkpoint": service.model_name, "CLIP_stop_at_last_layers": 1}

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/progress")
    async def progress():
        step, steps = service.batcher.step
        return {"progress": step / steps if steps else 0.0, "eta_relative": 0.0,
                "state": {"skipped": False, "interrupted": False, "job": "", "job_count": service.batcher.jobs_waiting,
                          "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "job_no": 0, "sampling_step": step,
                          "sampling_steps": steps},
                "current_image": None, "textinfo": None, "current_task": None}

    return app


class Guard:
    """ASGI middleware: credentials (401), the count of requests being answered (drain waits for it),
    request and latency metrics."""

    def __init__(self, app: Any, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, start, status = scope["path"], time.monotonic(), [500]
        headers = dict(scope.get("headers") or ())
        authorization = headers.get(b"authorization", b"").decode("latin-1")

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        service = self.service
        if path != "/health" and not service.authorized(authorization):
            problem = HTTPProblem(401, "missing or wrong credentials (Authorization: Bearer KEY, or HTTP Basic)",
                                  {"WWW-Authenticate": _challenge(service)})
            await _error(path, problem)(scope, receive, send_status)
        else:
            with service._lock:
                service.inflight += 1
            try:
                await self.app(scope, receive, send_status)
            finally:
                with service._lock:
                    service.inflight -= 1
        service.metrics.requests.labels(_endpoint(path), str(status[0])).inc()
        if scope["method"] == "POST":
            service.metrics.latency.labels(_endpoint(path)).observe(time.monotonic() - start)


def _parse(fn: Callable[[], Any]) -> Any:
    """Run a parser; a FieldError becomes a 422 naming the field."""
    try:
        return fn()
    except FieldError as err:
        raise HTTPProblem(422, str(err), field=err.field) from None


def _max_pixels() -> int:
    from sd_jax.images import MAX_PIXELS

    return MAX_PIXELS


def _challenge(service: Service) -> str:
    return 'Basic realm="sd_jax"' if service.users else 'Bearer realm="sd_jax"'


def _endpoint(path: str) -> str:
    """A bounded label for metrics: known routes by name, anything else as 'other'."""
    known = ("/health", "/metrics", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/samplers",
             "/sdapi/v1/schedulers", "/sdapi/v1/sd-models", "/sdapi/v1/options", "/sdapi/v1/scripts",
             "/sdapi/v1/progress", "/v1/images/generations")
    return path if path in known else "other"


def _error(path: str, problem: HTTPProblem) -> Any:
    """The error body in the API's own shape: OpenAI's for /v1/, A1111's (FastAPI's) otherwise."""
    from fastapi.responses import JSONResponse

    if path.startswith("/v1/"):
        status = 400 if problem.status == 422 else problem.status  # OpenAI answers bad fields with 400
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = openai_api.error_body(FieldError(problem.field, str(problem)) if problem.field else str(problem),
                                     kind)
    else:
        status = problem.status
        body = {"error": _reason(status), "detail": str(problem), "field": problem.field}
    return JSONResponse(body, status_code=status, headers=problem.headers)


def _reason(status: int) -> str:
    from http import HTTPStatus

    return HTTPStatus(status).phrase


async def read_json(request: Any, limit: int) -> Any:
    """The request body as JSON: 413 past ``limit`` bytes (checked as it arrives), 422 if not JSON."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise HTTPProblem(413, f"the request body is {length} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPProblem(413, f"the request body is over {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HTTPProblem(422, f"the request body is not valid JSON: {err}", field="body") from None


def serve(cfg: ServeConfig, pipe: Any, *, say: Callable[[str], None] = print,
          ready: Callable[[Service], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT: warm up in the background (/health 503 until done), then take work;
    on the signal drain (503 to new work, finish queued and running) and return 0."""
    import uvicorn

    service = Service(cfg, pipe)
    app = create_app(service)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # first signal drains, a second one forces
            if service.state == "draining":
                self.force_exit = True
                self.should_exit = True
                return
            say(f"signal {sig}: draining ({service.batcher.queued} image(s) queued), then exiting")
            service.start_drain(lambda: setattr(self, "should_exit", True))

    server = Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=30))
    failure: list[BaseException] = []

    def warm():
        try:
            service.warm_up(say)
            say(f"serving {service.model_name} on http://{cfg.host}:{cfg.port} (max batch {cfg.max_batch}, "
                f"{len(service.devices)} device(s))")
            if ready is not None:
                ready(service)
        except BaseException as err:  # noqa: BLE001 - reported by serve(), which then exits non-zero
            failure.append(err)
            server.should_exit = True

    threading.Thread(target=warm, name="sd_jax-warmup", daemon=True).start()
    server.run()
    if failure:
        raise failure[0]
    if not server.started:
        raise OSError(f"could not listen on {cfg.host}:{cfg.port} (in use, or not an address of this machine)")
    return 0

