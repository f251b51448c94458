"""Shared helpers for the bench scripts: machine description, timing, tables."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

V14_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def machine() -> str:
    """CPU model, core count and JAX device, for the table's machine column."""
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import jax

    dev = jax.devices()[0]
    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {dev.platform}:{dev.device_kind}"


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Run each function in turn (A B A B ...) ``repeats`` times; wall seconds per call."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    """Median of a list."""
    return statistics.median(xs)


def table(rows: list[tuple[str, str, str, str]], header=("figure", "sd_jax", "reference", "ratio")) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def peak_rss_hwm_gib() -> float:
    """Peak resident memory of this process (``VmHWM``), GiB.

    Unlike ``ru_maxrss`` it is reset by ``exec``, so a child process reports its
    own peak even when its parent's is larger.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return peak_rss_gib()


def available_gib() -> float:
    """MemAvailable of the machine, GiB (inf where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def write_random_sd_v14(folder, seed: int = 0) -> bool:
    """Write a full-size SD v1.4 diffusers folder with random float32 weights (safetensors).

    diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` with the v1.4 configs, transformers
    ``CLIPTextModel`` with SD v1's text config (CLIP ViT-L/14), the tokenizer saved from
    ``sd_jax.tokenizer.load_tokenizer(None)`` and v1.4's PNDM scheduler config, written by
    ``StableDiffusionPipeline.save_pretrained``. About 4.3 GB on disk; building it holds about
    two copies of the weights in memory (run it in a process of its own). Returns False (and
    writes nothing) when the folder already holds a complete model.
    """
    import gc
    from pathlib import Path

    folder = Path(folder)
    weights = [folder / part / "diffusion_pytorch_model.safetensors" for part in ("unet", "vae")]
    weights.append(folder / "text_encoder" / "model.safetensors")
    if (folder / "model_index.json").exists() and all(p.exists() for p in weights):
        return False
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sd_jax.tokenizer import load_tokenizer

    vae_config = {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu", "layers_per_block": 2,
        "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "sample_size": 512,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    text_config = {
        "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5, "projection_dim": 768,
    }
    scheduler_config = {  # CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**V14_UNET_CONFIG).eval()
    vae = AutoencoderKL(**vae_config).eval()
    text = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
    load_tokenizer(None).save(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe, unet, vae, text, tokenizer
    gc.collect()
    return True
