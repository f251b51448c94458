"""Model loading, cold and warm: time and peak memory of sd_jax against diffusers, side by side.

One full-size SD v1.4 diffusers folder with random float32 weights (1.07 B parameters, 4.3 GB of
safetensors; ``common.write_random_sd_v14``) is written once under ``--dir``. Every measurement is
one load in a fresh Python process, after the folder was read once so every loader finds it in
the page cache. The child reports the load's wall time (imports and the backend's start
excluded) and its peak resident memory (``VmHWM``, which counts the memory-mapped file pages it
touched), then the same after reading every weight once (a float32 sum of each), because both
loaders can map files lazily and the first image is where such a load pays.

    sd_jax, no cache     StableDiffusion.from_pretrained(folder, cache=False): convert every tensor
    sd_jax, cold         the same with an empty converted-layout cache: convert, then write it
    sd_jax, warm         a second process: memory-map the cache entry, no conversion
    diffusers            StableDiffusionPipeline.from_pretrained(folder), float32 on the CPU

The runs alternate (warm, diffusers, warm, diffusers, ...) and the table gives medians; ratios are
sd_jax / diffusers. The parameter-shape cache (``~/.cache/sd_jax/shapes``) is warm in every
sd_jax run: it depends on the architecture, not on the weights. Results: ``--out`` (default
``bench/results/load-<device>-<date>.json`` and ``.md``).

    python bench/load.py                  # full size: ~4.3 GB under --dir plus 4.3 GB of cache, minutes
    python bench/load.py --size tiny      # the tiny test model, seconds (checks the script works)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("sd_jax_nocache", "sd_jax_cold", "sd_jax_warm", "diffusers")


def write_model(folder: Path, size: str) -> Path:
    """The random v1.4 (or tiny) diffusers folder, written once."""
    if size == "full":
        from common import write_random_sd_v14

        start = time.perf_counter()
        if write_random_sd_v14(folder):
            print(f"wrote the full-size model to {folder} ({time.perf_counter() - start:.0f} s)", flush=True)
        return folder
    if not (folder / "model_index.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import make_tiny_sd

        make_tiny_sd(folder)
    return folder


def read_once(folder: Path) -> None:
    """Read every file of the folder once, so it is in the page cache."""
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass


def child(kind: str, folder: str, cache: str) -> None:
    """In a fresh process: import, start the backend, then time one load; print JSON.

    Each loader's timer starts after its imports: diffusers' import brings in transformers, so the
    sd_jax child imports the transformers tokenizer class its load uses first. ``process_seconds``
    is the whole of it, from the interpreter's start (imports included) to the loaded model.
    """
    if kind.startswith("sd_jax"):
        import jax
        import numpy as np
        from transformers import CLIPTokenizerFast  # noqa: F401  (diffusers' import brings it too)

        from sd_jax import StableDiffusion

        jax.devices()
        start = time.perf_counter()
        pipe = StableDiffusion.from_pretrained(folder, cache=False if kind == "sd_jax_nocache" else cache,
                                               safety_checker=False)
        jax.block_until_ready(pipe.params)
        seconds = time.perf_counter() - start
        process_seconds = since_process_start()
        peak = peak_rss_gib()
        leaves = jax.tree.leaves(pipe.params)
        total = sum(float(np.asarray(leaf).sum(dtype=np.float32)) for leaf in leaves)
        nbytes = sum(leaf.nbytes for leaf in leaves)
        touched = time.perf_counter() - start, peak_rss_gib()
        # the cold load's cache entry is written by a background thread, which the exit waits for
        from sd_jax.convert import cache as converted_cache

        converted_cache.wait_for_writes()
        extra = {"write_wait_seconds": time.perf_counter() - start - touched[0]}
    else:
        import torch
        from diffusers import StableDiffusionPipeline

        start = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        seconds = time.perf_counter() - start
        process_seconds = since_process_start()
        peak = peak_rss_gib()
        tensors = [p for part in (pipe.unet, pipe.vae, pipe.text_encoder) for p in part.parameters()]
        with torch.no_grad():
            total = sum(float(p.sum(dtype=torch.float32)) for p in tensors)
        nbytes = sum(p.numel() * p.element_size() for p in tensors)
        touched, extra = (time.perf_counter() - start, peak_rss_gib()), {}
    print(json.dumps({"seconds": seconds, "process_seconds": process_seconds, "peak_rss_gib": peak,
                      "touched_seconds": touched[0], "touched_peak_rss_gib": touched[1],
                      "weights_gib": nbytes / 2**30, "checksum": total, **extra}))


def since_process_start() -> float:
    """Seconds since this process started (its start time in /proc/self/stat, in clock ticks since boot)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM: reset by exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(kind: str, folder: Path, cache: Path) -> dict:
    """One measurement in a fresh process (the JSON its last line prints)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(folder), str(cache)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{kind} failed with exit status {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{kind:15s} {result['seconds']:7.2f} s  peak RSS {result['peak_rss_gib']:5.2f} GiB; after reading every "
          f"weight {result['touched_seconds']:7.2f} s, {result['touched_peak_rss_gib']:5.2f} GiB", flush=True)
    return result


FIGURES = (("seconds", "load (s)"), ("process_seconds", "process start to loaded, imports included (s)"),
           ("peak_rss_gib", "peak RSS (GiB)"),
           ("touched_seconds", "load + read every weight (s)"), ("touched_peak_rss_gib", "... peak RSS (GiB)"))


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Median of each figure per kind."""
    return {kind: {key: statistics.median(r[key] for r in rs) for key, _ in FIGURES} for kind, rs in runs.items()}


def report(summary: dict, runs: dict, weights_gib: float, title: str) -> str:
    """The Markdown table: each sd_jax mode against diffusers, and against the weights' size."""
    ref = summary["diffusers"]
    lines = [title, "", "| figure | sd_jax no cache | sd_jax cold | sd_jax warm | diffusers | warm / diffusers |",
             "|---|---|---|---|---|---|"]
    for key, label in FIGURES:
        cells = [f"{summary[k][key]:.2f}" for k in ("sd_jax_nocache", "sd_jax_cold", "sd_jax_warm", "diffusers")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {summary['sd_jax_warm'][key] / ref[key]:.2f} |")
    lines += ["", f"Weights: {weights_gib:.2f} GiB. Peak RSS / weights: "
              + ", ".join(f"{k.replace('sd_jax_', 'sd_jax ')} {summary[k]['touched_peak_rss_gib'] / weights_gib:.2f}"
                          for k in KINDS) + " (after reading every weight).",
              "Runs per kind: " + ", ".join(f"{k} {len(runs[k])}" for k in KINDS) + "; medians shown.",
              "sd_jax cold writes the cache entry in a background thread after the load returns (hashing the "
              f"source files, then writing): {runs['sd_jax_cold'][0].get('write_wait_seconds', float('nan')):.1f} s "
              "more before that process could exit."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--dir", type=Path, help="where the model goes (default /tmp/sd_jax_load_bench_<size>)")
    parser.add_argument("--repeats", type=int, default=3, help="warm and diffusers runs each (alternated)")
    parser.add_argument("--out", type=Path, help="results stem (default bench/results/load-<device>-<date>)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "FOLDER", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be at least 1")
    from common import machine

    folder = write_model((args.dir or Path(f"/tmp/sd_jax_load_bench_{args.size}")) / "model", args.size)
    size_gib = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30
    cache = Path(tempfile.mkdtemp(prefix="sd_jax_converted_", dir=folder.parent))
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    try:
        read_once(folder)
        runs["sd_jax_nocache"].append(run_child("sd_jax_nocache", folder, cache))
        # cold: the first load of these files ever (no digest remembered, no entry)
        runs["sd_jax_cold"].append(run_child("sd_jax_cold", folder, cache))
        for _ in range(args.repeats):
            read_once(folder)
            runs["diffusers"].append(run_child("diffusers", folder, cache))
            runs["sd_jax_warm"].append(run_child("sd_jax_warm", folder, cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    checksums = {kind: rs[0]["checksum"] for kind, rs in runs.items()}
    summary = summarise(runs)
    weights_gib = runs["sd_jax_warm"][0]["weights_gib"]
    import jax
    import torch

    date = datetime.date.today().isoformat()
    device = jax.devices()[0].platform
    title = (f"# Loading a {args.size}-size SD v1.4 diffusers folder ({size_gib:.2f} GiB, float32), {date}\n\n"
             f"{machine()}; torch {torch.__version__}. Fresh process per load, files in the page cache.")
    table = report(summary, runs, weights_gib, title)
    print("\n" + table)
    out = args.out or ROOT / "bench" / "results" / f"load-{device}{'-tiny' if args.size == 'tiny' else ''}-{date}"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({
        "date": date, "machine": machine(), "size": args.size, "folder_gib": size_gib, "weights_gib": weights_gib,
        "summary": summary, "runs": runs, "checksums": checksums}, indent=1))
    Path(f"{out}.md").write_text(table + "\n")
    print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
