"""Load generator for ``python -m sd_jax.serve``: images/s and latency at several concurrencies, beside
``StableDiffusion.generate`` called one request at a time on the same machine.

    python bench/serve.py --tiny                                   # tiny random model, 64x64 (minutes on a CPU)
    python bench/serve.py --model sd14/ --size 256 --steps 10      # a full-size model at a small resolution

What runs: a server subprocess on a free local port (``--max-batch``, ``--max-wait-ms``; warm-up
compiles every batch bucket at the benchmark's size and sampler before anything is timed), then
for each ``--concurrency`` C, ``--requests`` single-image A1111 txt2img requests from C client
threads (a bounded load: at most C in flight), each with its own prompt and seed. One warm-up
round (C requests) precedes each timed round. Then the server is stopped (SIGTERM) and the same
requests are made by ``generate()`` in this process, one at a time, after one warm-up call.

Printed per row: images/s (requests / wall time of the round), p50 and p95 request latency, and
the images/s ratio to the sequential ``generate()`` row. ``--json PATH`` also writes the rows.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = 3600) -> float:
    """One txt2img request; returns its latency in seconds (raises unless 200 with one image)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        answer = json.loads(resp.read())
    if len(answer["images"]) != 1:
        raise RuntimeError(f"expected one image, got {len(answer['images'])}")
    return time.perf_counter() - start


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name)] in " {")


def body(args: argparse.Namespace, i: int) -> dict:
    return {"prompt": f"benchmark prompt {i}", "seed": 1000 + i, "steps": args.steps, "cfg_scale": 7.0,
            "width": args.size, "height": args.size, "sampler_name": args.sampler}


def start_server(args: argparse.Namespace, model: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sd_jax.serve", "--model", model, "--port", str(port), "--max-batch",
           str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--queue-size",
           str(max(256, 2 * max(args.concurrency))), "--warmup", f"{args.size}x{args.size}:{args.sampler}"]
    if args.batch_sizes:
        cmd += ["--batch-sizes", args.batch_sizes]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=sys.stderr, stderr=sys.stderr)
    deadline = time.monotonic() + args.start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                return proc
        except OSError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"the server was not healthy within {args.start_timeout_s} s")


def round_at(args: argparse.Namespace, port: int, concurrency: int, first: int) -> dict:
    """``--requests`` requests from ``concurrency`` threads; images/s, latency percentiles, batches run."""
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: post(port, body(args, i)), range(first - concurrency, first)))  # warm-up round
        batches = metric(port, "sd_jax_serve_batches_total")
        start = time.perf_counter()
        latencies = list(pool.map(lambda i: post(port, body(args, i)), range(first, first + args.requests)))
        wall = time.perf_counter() - start
    ran = metric(port, "sd_jax_serve_batches_total") - batches
    return {"mode": "server", "concurrency": concurrency, "requests": args.requests,
            "images_per_s": args.requests / wall, "p50_s": float(np.percentile(latencies, 50)),
            "p95_s": float(np.percentile(latencies, 95)), "mean_batch": args.requests / max(ran, 1)}


def sequential(args: argparse.Namespace, model: str) -> dict:
    """The same requests through ``generate()``, one at a time, in this process."""
    from sd_jax import StableDiffusion

    pipe = StableDiffusion.from_pretrained(model)

    def one(i: int) -> float:
        b = body(args, i)
        start = time.perf_counter()
        pipe.generate(b["prompt"], seed=b["seed"], num_inference_steps=args.steps, guidance_scale=7.0,
                      height=args.size, width=args.size, scheduler=args.sampler)
        return time.perf_counter() - start

    one(0)  # compile
    latencies = [one(i) for i in range(1, args.requests + 1)]
    return {"mode": "generate() one at a time", "concurrency": 1, "requests": args.requests,
            "images_per_s": args.requests / sum(latencies), "p50_s": float(np.percentile(latencies, 50)),
            "p95_s": float(np.percentile(latencies, 95)), "mean_batch": 1.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="diffusers folder, single file or hub id")
    src.add_argument("--tiny", action="store_true", help="a tiny random model built in a temp folder (tests/tiny.py)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sampler", default="Euler a")
    p.add_argument("--requests", type=int, default=32, help="timed requests per concurrency (default 32)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=50.0)
    p.add_argument("--batch-sizes", help="the server's --batch-sizes (default: powers of 2 up to --max-batch)")
    p.add_argument("--start-timeout-s", type=float, default=1800.0)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    if args.requests < 1 or min(args.concurrency) < 1:
        p.error("--requests and --concurrency must be >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.tiny:
            sys.path.insert(0, str(REPO / "tests"))
            from tiny import make_tiny_sd

            model = str(make_tiny_sd(Path(tmp) / "tiny"))
        port = free_port()
        server = start_server(args, model, port)
        rows, first = [], 10_000
        try:
            for c in args.concurrency:
                rows.append(round_at(args, port, c, first))
                first += args.requests + c
                print(f"concurrency {c}: {rows[-1]['images_per_s']:.2f} images/s", file=sys.stderr, flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=600)
        rows.append(sequential(args, model))

    from common import machine  # bench/common.py (this script runs from bench/)

    base = rows[-1]["images_per_s"]
    print(f"\nsd_jax serve: {'tiny model' if args.tiny else args.model}, {args.size}x{args.size}, {args.steps} steps "
          f"{args.sampler}, CFG 7, --max-batch {args.max_batch}, --max-wait-ms {args.max_wait_ms:g}, "
          f"--batch-sizes {args.batch_sizes or 'default'}, "
          f"{args.requests} requests per row; {machine()}\n")
    print("| mode | concurrency | images/s | p50 latency s | p95 latency s | images per batch | vs sequential |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['concurrency']} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} "
              f"| {r['mean_batch']:.1f} | {r['images_per_s'] / base:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "machine": machine(), "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
