"""``python -m sd_jax.serve --model PATH_OR_HUB_ID``: parse, check, load the model, serve.

    python -m sd_jax.serve --model sd14/ --max-batch 8 --max-wait-ms 50
    python -m sd_jax.serve --model sd14/ --host 0.0.0.0 --api-key "$KEY" --warmup 512x512:euler_a

Bad values exit with status 2 and one line, before the model loads; /health answers 503
while the configured shapes compile, then 200. SIGTERM drains (503 to new work, queued and
running requests finish) and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sd_jax.cli import common

PROG = "python -m sd_jax.serve"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{text[:40]!r} must be comma-separated integers, e.g. 1,8") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{text[:40]!r}: batch sizes must be >= 1")
    return values


def build_parser() -> common.ArgumentParser:
    p = common.ArgumentParser(prog=PROG, description="Serve Stable Diffusion over HTTP (AUTOMATIC1111- and "
                              "OpenAI-compatible) with dynamic batching across requests.",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[2])
    p.add_argument("--model", required=True, help="diffusers folder, .ckpt/.safetensors file or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs "
                                                       "--api-key or --api-auth)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860, as AUTOMATIC1111)")
    p.add_argument("--dtype", choices=common.DTYPE_CHOICES, default="float32", help="compute dtype (default float32)")
    p.add_argument("--max-batch", type=int, default=8, help="most images per compiled call (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=50.0,
                   help="how long a request waits for others to share its batch (default 50)")
    p.add_argument("--queue-size", type=int, default=256, help="images waiting at most; more get 429 (default 256)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (what OpenAI clients send)")
    p.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS]", help="require HTTP Basic credentials, as "
                                                                          "AUTOMATIC1111's --api-auth")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without authentication")
    p.add_argument("--devices", type=int, help="use the first N local devices (default all)")
    p.add_argument("--warmup", action="append", metavar="WxH[:SAMPLER[:MODE]]",
                   help="shape to compile before serving; repeatable (default 512x512 with the model's sampler, "
                        "txt2img); 'none' for no warm-up")
    p.add_argument("--warmup-batches", type=common.argument_type(_int_list), metavar="N,N",
                   help="batch sizes compiled per --warmup shape (default: every bucket: powers of 2 up to "
                        "--max-batch, multiples of the device count)")
    p.add_argument("--batch-sizes", type=common.argument_type(_int_list), metavar="N,N",
                   help="the compiled batch sizes a batch is padded to (default: powers of 2 up to --max-batch; each "
                        "rounded up to a multiple of the device count)")
    p.add_argument("--max-body-mb", type=float, default=50.0, help="largest request body (default 50 MB; "
                                                                   "larger: 413)")
    p.add_argument("--max-images", type=int, default=64, help="most images one request may ask for (default 64)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-request time limit (default 600; then 504)")
    p.add_argument("--no-safety-checker", action="store_true", help="do not run the model folder's safety checker")
    p.add_argument("--model-name", help="the name /sdapi/v1/sd-models and infotexts show (default: the folder name)")
    return p


def config_from_args(args: argparse.Namespace):
    from sd_jax.serve.app import ServeConfig

    warmup = tuple(args.warmup or ("512x512",))
    if warmup == ("none",):
        warmup = ()
    return ServeConfig(model=args.model, host=args.host, port=args.port, dtype=args.dtype, max_batch=args.max_batch,
                       max_wait_ms=args.max_wait_ms, queue_size=args.queue_size, api_key=args.api_key,
                       api_auth=args.api_auth, insecure_no_auth=args.insecure_no_auth, devices=args.devices,
                       warmup=warmup, warmup_batches=args.warmup_batches, batch_sizes=args.batch_sizes,
                       max_body_mb=args.max_body_mb, max_images=args.max_images, timeout_s=args.timeout_s,
                       safety_checker=not args.no_safety_checker, model_name=args.model_name)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # every value checked before the model loads
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise OSError(f"{err.name} is missing: pip install 'sd_jax[serve]'") from None
    common.check_model_source(cfg.model)
    import jax

    from sd_jax import StableDiffusion
    from sd_jax.serve.app import serve

    if cfg.devices is not None and not 1 <= cfg.devices <= jax.local_device_count():
        raise ValueError(f"--devices {cfg.devices} must be in [1, {jax.local_device_count()}] (local devices)")
    print(f"loading {cfg.model} ({cfg.dtype}) ...", flush=True)
    pipe = StableDiffusion.from_pretrained(cfg.model, dtype=cfg.dtype, safety_checker=cfg.safety_checker)
    return serve(cfg, pipe, say=lambda line: print(line, flush=True))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return common.run_main(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
