"""Tiny random Stable Diffusion models built with diffusers/transformers, for parity tests.

``make_tiny_sd(folder)`` writes a complete diffusers folder (the layout
``StableDiffusionPipeline.save_pretrained`` writes) with small random weights:
every parameter is re-drawn so no zero-initialised path hides a bug.

``make_tiny_sd(folder, parity=True)`` is the model the whole-pipeline parity tests use: random
models are blind to what those tests must see (which solver ran, which init image was given),
so it adds the few properties of a trained model that make those differences show; see
``denoiser_like``, ``readable_vae`` and ``PARITY_SCHEDULER``.
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


# The parity model's noise schedule: SD v1.4's with clip_sample on (diffusers' own default for
# DDIM and DDPM). With it off, DDIM is Euler on the same timesteps but for its last step (it stops at
# noise level sqrt(1 - alphas_cumprod[0]) = 0.03) and DDPM is Euler-ancestral on the same timesteps
# (the same update, Karras et al. 2022 app. B): their images agree to 0.004 and 1e-5, so running one
# for the other would pass any image comparison. Clipping x0 to [-1, 1] is what tells them apart.
PARITY_SCHEDULER = {**V14_SCHEDULER, "clip_sample": True}


def denoiser_like(unet: torch.nn.Module, rest: float = 0.1) -> torch.nn.Module:
    """Give a random UNet the one property of a trained one that solvers depend on, in place:
    its noise prediction follows the noise in its input.

    A random UNet's prediction is unrelated to its input, so x0 = (x - sigma eps) / alpha is
    sigma-scaled noise (~20 at sigma_max), and every GroupNorm downstream (UNet and VAE decoder)
    sees only its direction: solvers that take different paths end on nearly the same image.
    Here a direct path carries the input to the output: conv_in copies +x and -x into channels
    0-7, the last up-block resnet's shortcut carries that skip on, and conv_out reads them back
    (silu(u) - silu(-u) = u), so eps ~ GroupNorm(x_in) + ``rest`` x the random network's output.
    """
    with torch.no_grad():
        latent = unet.conv_out.weight.shape[0]  # 4
        conv_in = unet.conv_in.weight  # (C, in, 3, 3): the first `latent` inputs are the noisy latents
        shortcut = unet.up_blocks[-1].resnets[-1].conv_shortcut.weight  # (C, C + C_skip, 1, 1)
        skip = shortcut.shape[1] - shortcut.shape[0]  # concat order: [hidden, skip]; the skip is conv_in's
        conv_out = unet.conv_out.weight  # (latent, C, 3, 3)
        conv_out *= rest
        for c in range(latent):
            conv_in[c, c, 1, 1] += 1.0
            conv_in[latent + c, c, 1, 1] -= 1.0
            conv_out[c, c, 1, 1] += 1.0
            conv_out[c, latent + c, 1, 1] -= 1.0
        for k in range(2 * latent):
            shortcut[k, skip + k] += 4.0  # dominate the resnet branch in these channels
    return unet


def readable_vae(vae: torch.nn.Module, images: np.ndarray, posterior_std: float = 0.1) -> torch.nn.Module:
    """Make a random VAE's latents carry its input image, in place.

    A random encoder's posterior mean is ~0.3 (x 0.18215: ~0.05) under a posterior std ~1, so
    an init image is lost in the draw and next to the UNet's latents. Here ``scaling_factor`` gives
    the latents of ``images`` (N, H, W, 3 in [0, 1]) unit variance (how SD's 0.18215 was chosen)
    and the posterior std is ``posterior_std`` in those units, small but not zero so the draw counts.
    """
    with torch.no_grad():
        weight, bias = vae.quant_conv.weight, vae.quant_conv.bias  # (2C, 2C, 1, 1): mean | logvar
        c = weight.shape[0] // 2
        latents = vae.encode(nchw(images) * 2 - 1).latent_dist.mean
        scale = float(1.0 / latents.std())
        weight[c:] = 0.0
        bias[c:] = 2.0 * float(np.log(posterior_std / scale))
    vae.register_to_config(scaling_factor=scale)
    return vae


def parity_images(n: int = 4, hw: tuple[int, int] = (64, 64), seed: int = 7) -> np.ndarray:
    """(n, H, W, 3) blocky random images in [0, 1]: what ``readable_vae`` calibrates on."""
    rng = np.random.default_rng(seed)
    smooth = rng.random((n, hw[0] // 8, hw[1] // 8, 3))
    return np.kron(smooth, np.ones((1, 8, 8, 1))).astype(np.float32)


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
                 safe_serialization: bool = True, learnable_on: np.ndarray | None = None,
                 parity: bool = False) -> Path:
    """Write a tiny random SD model as a diffusers folder; returns the folder.

    ``learnable_on``: images (N, H, W, 3) in [0, 1] to make the model trainable on (see
    ``learnable``), for tests that check a fine-tune learns. ``parity``: the model of the
    whole-pipeline parity tests (``denoiser_like`` UNet, ``readable_vae``, ``PARITY_SCHEDULER``).
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from sd_jax.tokenizer import load_tokenizer

    folder = Path(folder)
    unet, vae, text = tiny_components(seed, in_channels)
    if learnable_on is not None:
        unet, vae, text = learnable(unet, vae, text, learnable_on, seed)
    if parity:
        denoiser_like(unet)
        readable_vae(vae, parity_images())
    load_tokenizer(None).save(folder / "tokenizer")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(V14_SCHEDULER),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=safe_serialization)
    if parity:  # diffusers' PNDMScheduler does not keep clip_sample: set it in the saved config
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**read_json(path), **PARITY_SCHEDULER}, indent=2))
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
