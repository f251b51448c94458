"""Model loading: time and peak memory of sd_jax against diffusers, for every weight format.

One full-size SD v1.4 model with random weights (float32, 1.07 B parameters) is written once as
a diffusers folder (safetensors), a CompVis single ``.safetensors`` and a CompVis ``.ckpt``
(``torch.save({"state_dict": ..., "global_step": ...})``). Each (format, loader) pair then loads
in a fresh Python process, after the file has been read once so both loaders find it in the page
cache; the child reports the load time (imports and backend start excluded) and its peak
resident memory (``VmHWM``, which includes memory-mapped file pages it touched), then the same
after reading every weight once: diffusers maps files lazily, so its copy happens at first use.

    python bench/load.py                  # full size: ~13 GB of files under --dir, several minutes
    python bench/load.py --size tiny      # the tiny test model, seconds (checks the script works)

sd_jax: ``StableDiffusion.from_pretrained(path)`` (single files by shape detection, parameters on
the default JAX device). diffusers: ``StableDiffusionPipeline.from_pretrained(folder)`` /
``from_single_file(path, config=folder, local_files_only=True)``, float32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("folder", "safetensors", "ckpt")
LOADERS = ("sd_jax", "diffusers")
V14_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                cross_attention_dim=768, sample_size=64)
V14_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
V14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4, cross_attention_dim=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=32,
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
TINY_VAE = dict(V14_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1)
TINY_TEXT = dict(V14_TEXT, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32)


def write_model(work: Path, size: str) -> dict[str, Path]:
    """Write the random model in the three formats (skipped when already there)."""
    paths = {"folder": work / "diffusers", "safetensors": work / "model.safetensors", "ckpt": work / "model.ckpt"}
    if all(p.exists() for p in paths.values()):
        return paths
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sd_jax.convert.compvis import SD_V1_SCHEDULER
    from sd_jax.convert.export import convert
    from sd_jax.tokenizer import load_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    full = size == "full"
    start = time.perf_counter()
    unet = UNet2DConditionModel(**(V14_UNET if full else TINY_UNET)).eval()
    vae = AutoencoderKL(**(V14_VAE if full else TINY_VAE)).eval()
    text = CLIPTextModel(CLIPTextConfig(**(V14_TEXT if full else TINY_TEXT))).eval()
    load_tokenizer(None).save(work / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(SD_V1_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(paths["folder"], safe_serialization=True)
    del pipe, unet, vae, text
    convert(paths["folder"], paths["safetensors"], dtype="float32", overwrite=True)
    from safetensors.torch import load_file

    state = load_file(paths["safetensors"])
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, paths["ckpt"])
    print(f"wrote the {size} model in three formats under {work} ({time.perf_counter() - start:.0f} s)", flush=True)
    return paths


def warm(path: Path) -> None:
    """Read a file (or every file of a folder) once, so it is in the page cache."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass


def child(loader: str, fmt: str, path: str, folder: str) -> None:
    """In a fresh process: import, start the backend, then time one load; print JSON."""
    if loader == "sd_jax":
        import jax

        import sd_jax  # noqa: F401
        from sd_jax import StableDiffusion

        jax.devices()
        start = time.perf_counter()
        pipe = StableDiffusion.from_pretrained(path)
        jax.block_until_ready(pipe.params)
    else:
        import torch  # noqa: F401
        from diffusers import StableDiffusionPipeline

        start = time.perf_counter()
        if fmt == "folder":
            pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
        else:
            pipe = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True,
                                                            safety_checker=None)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "peak_rss_gib": peak_rss_gib()}
    # diffusers maps safetensors/.ckpt files lazily: reading every weight once (as the first image
    # does) is where its copy happens. Touching the weights makes the two loaders comparable.
    if loader == "sd_jax":
        import numpy as np

        total = sum(float(np.asarray(leaf, np.float32).sum()) for leaf in jax.tree.leaves(pipe.params))
    else:
        total = sum(float(p.sum()) for part in (pipe.unet, pipe.vae, pipe.text_encoder) for p in part.parameters())
    result.update(touched_seconds=time.perf_counter() - start, touched_peak_rss_gib=peak_rss_gib(),
                  checksum=total)
    print(json.dumps(result))


def peak_rss_gib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child
    would report its parent's peak when that is larger."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def available_gib() -> float:
    """MemAvailable of the machine."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def run_child(loader: str, fmt: str, path: Path, folder: Path, need_gib: float) -> dict:
    """One measurement in a fresh process; skipped (not run) when the machine lacks the memory."""
    if available_gib() < need_gib:
        return {"skipped": f"needs ~{need_gib:.0f} GiB, {available_gib():.1f} GiB available"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", loader, fmt, str(path), str(folder)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        return {"skipped": f"failed with exit status {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--dir", type=Path, help="where the model files go (default /tmp/sd_jax_load_bench_<size>)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS))
    parser.add_argument("--child", nargs=4, metavar=("LOADER", "FORMAT", "PATH", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from common import machine, table

    paths = write_model(args.dir or Path(f"/tmp/sd_jax_load_bench_{args.size}"), args.size)
    rows = []
    for fmt in args.formats:
        size_gib = sum(p.stat().st_size for p in ([paths[fmt]] if paths[fmt].is_file() else paths[fmt].rglob("*"))
                       if p.is_file()) / 2**30
        results = {}
        for loader in args.loaders:
            warm(paths[fmt])
            # a conservative guess of the peak: three float32 copies of the model at once
            results[loader] = run_child(loader, fmt, paths[fmt], paths["folder"], need_gib=3 * size_gib + 1)
            r = results[loader]
            print(f"{fmt:12s} {loader:10s} " + (f"skipped: {r['skipped']}" if "skipped" in r else
                  f"{r['seconds']:7.2f} s  peak RSS {r['peak_rss_gib']:6.2f} GiB; after reading every weight "
                  f"{r['touched_seconds']:7.2f} s, {r['touched_peak_rss_gib']:6.2f} GiB"), flush=True)
        ours, ref = results.get("sd_jax", {}), results.get("diffusers", {})
        for key, label in (("seconds", "load s"), ("peak_rss_gib", "peak RSS GiB"),
                           ("touched_seconds", "load + read every weight s"),
                           ("touched_peak_rss_gib", "... peak RSS GiB")):
            a, b = ours.get(key), ref.get(key)
            rows.append((f"{fmt} ({size_gib:.2f} GiB) {label}", "-" if a is None else f"{a:.2f}",
                         "-" if b is None else f"{b:.2f}", "-" if a is None or b is None else f"{a / b:.2f}"))
    print(f"\n{args.size}-size SD v1.4, random float32 weights; {machine()}\n")
    print(table(rows, header=("figure", "sd_jax", "diffusers", "ratio")))


if __name__ == "__main__":
    main()
