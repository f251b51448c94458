"""Tiny random Stable Diffusion models built with diffusers/transformers, for parity tests.

``make_tiny_sd(folder)`` writes a complete diffusers folder (the layout
``StableDiffusionPipeline.save_pretrained`` writes) with small random weights:
every parameter is re-drawn so no zero-initialised path hides a bug.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

V14_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=4, norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
TINY_CLIP = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=32,
)


def randomise(model: torch.nn.Module, seed: int, scale: float = 0.08) -> torch.nn.Module:
    """Re-draw every parameter: norms around 1, everything else N(0, scale^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            is_norm_weight = name.endswith("weight") and p.ndim == 1
            p.copy_(1.0 + noise if is_norm_weight else noise)
    return model.eval()


def tiny_components(seed: int = 0, in_channels: int = 4):
    """(unet, vae, text_encoder) torch modules with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = randomise(UNet2DConditionModel(**{**TINY_UNET, "in_channels": in_channels}), seed)
    vae = randomise(AutoencoderKL(**TINY_VAE), seed + 1)
    text = randomise(CLIPTextModel(CLIPTextConfig(**TINY_CLIP)), seed + 2, scale=0.05)
    return unet, vae, text


def learnable(unet, vae, text, images: np.ndarray, seed: int = 0):
    """Make tiny random components trainable the way a real checkpoint is, in place.

    A random VAE is not an autoencoder: its posterior std (~1) dwarfs its mean (~0.08), so
    its latents are noise, and a random CLIP at scale 0.05 barely mixes a prompt into the
    padding positions the UNet mostly attends to. So: the posterior is made near-deterministic
    (log-variance -30, as a trained VAE's is small), ``scaling_factor`` gives the latents of
    ``images`` (N, H, W, 3 in [0, 1]) unit variance (how SD's 0.18215 was chosen), and the
    text encoder is drawn at scale 0.3, so prompts differ at every position after the first
    differing token. The UNet stays random.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.no_grad():
        weight, bias = vae.quant_conv.weight, vae.quant_conv.bias  # (2C, 2C, 1, 1): mean | logvar
        c = weight.shape[0] // 2
        weight[c:] = 0.0
        bias[c:] = -30.0
        latents = vae.encode(nchw(images) * 2 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    text = randomise(CLIPTextModel(CLIPTextConfig(**TINY_CLIP)), seed + 2, scale=0.3)
    return unet, vae, text


def make_tiny_sd(folder: str | Path, seed: int = 0, in_channels: int = 4,
                 safe_serialization: bool = True, learnable_on: np.ndarray | None = None) -> Path:
    """Write a tiny random SD model as a diffusers folder; returns the folder.

    ``learnable_on``: images (N, H, W, 3) in [0, 1] to make the model trainable on (see
    ``learnable``), for tests that check a fine-tune learns.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from sd_jax.tokenizer import load_tokenizer

    folder = Path(folder)
    unet, vae, text = tiny_components(seed, in_channels)
    if learnable_on is not None:
        unet, vae, text = learnable(unet, vae, text, learnable_on, seed)
    load_tokenizer(None).save(folder / "tokenizer")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(V14_SCHEDULER),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=safe_serialization)
    return folder


def load_reference(folder: str | Path):
    """diffusers' StableDiffusionPipeline from a folder, float32, CPU."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_json(path: Path) -> dict:
    """Load a JSON file."""
    return json.loads(Path(path).read_text())


def nchw(x) -> torch.Tensor:
    """NHWC numpy/jax array -> NCHW torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))
