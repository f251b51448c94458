"""img2img and inpainting parity with diffusers' img2img and inpaint pipelines (tiny random models).

diffusers draws the VAE posterior sample and the start noise from torch
generators; the tests make it draw sd_jax's draws instead (same per-image keys),
so that both pipelines do the same arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sd_jax import StableDiffusion, sampling
from test_pipeline import TOL, diffusers_scheduler
from tiny import load_reference, nchw

H, W = 64, 48
PROMPTS = ["a photo of a cat", "a red car"]


def _init_image(seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = rng.random((H // 8, W // 8, 3))
    img = np.kron(smooth, np.ones((8, 8, 1)))  # blocky, so the VAE sees structure
    return Image.fromarray((img * 255).astype(np.uint8))


def _mask_image() -> Image.Image:
    mask = np.zeros((H, W), np.uint8)
    mask[16:48, 8:40] = 255  # white = repaint
    return Image.fromarray(mask, "L")


def _patch_draws(monkeypatch, module_name, seeds, latents_nhwc):
    """diffusers' posterior samples and start noise := sd_jax's for the same seeds."""
    import importlib

    from diffusers.models.autoencoders import vae as dvae

    keys = sampling.seed_keys(seeds)
    post_keys = __import__("jax").vmap(lambda k: __import__("jax").random.fold_in(k, 2))(keys)

    def sample(self, generator=None):
        draw = sampling.initial_noise(post_keys, tuple(self.mean.shape[2:]) + (self.mean.shape[1],))
        return self.mean + self.std * nchw(draw)

    monkeypatch.setattr(dvae.DiagonalGaussianDistribution, "sample", sample)
    module = importlib.import_module(module_name)
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: nchw(latents_nhwc))


# Two solvers per pipeline in the default run; the others (same code path, other solver) are slow.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("scheduler,strength", [("pndm", 0.6), ("ddim", 0.75), pytest.param("euler", 0.5, marks=SLOW),
                                                ("dpm++2m", 0.8), pytest.param("lms", 1.0, marks=SLOW)])
def test_img2img_matches_diffusers(tiny_pipe, tiny_reference, scheduler, strength, monkeypatch):
    from diffusers import StableDiffusionImg2ImgPipeline

    seeds, steps = [3, 4], 6
    noise = np.asarray(sampling.initial_noise(sampling.seed_keys(seeds), (H // 8, W // 8, 4)))
    image = _init_image()
    ours = tiny_pipe.generate(PROMPTS, negative_prompt="ugly", height=H, width=W, num_inference_steps=steps,
                              scheduler=scheduler, seed=seeds, init_image=image, strength=strength)
    ref = StableDiffusionImg2ImgPipeline(**tiny_reference.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(scheduler, tiny_reference.folder_scheduler_config)
    _patch_draws(monkeypatch, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
                 seeds, noise)
    out = ref(PROMPTS, negative_prompt=["ugly"] * 2, image=image, strength=strength,
              num_inference_steps=steps, guidance_scale=7.5, output_type="np").images
    err = np.abs(ours.array - out).max()
    assert err <= TOL, f"{scheduler} strength {strength}: {err:.4g}"


@pytest.mark.parametrize("scheduler,strength", [("pndm", 1.0), ("ddim", 0.7), pytest.param("euler_a", 1.0, marks=SLOW),
                                                ("lms", 0.6)])
def test_blend_inpaint_matches_diffusers(tiny_pipe, tiny_reference, scheduler, strength, monkeypatch):
    """4-channel model: latent blending, as diffusers' inpaint pipeline does for such UNets."""
    from diffusers import StableDiffusionInpaintPipeline

    from test_pipeline import patch_step_noise

    seeds, steps = [8, 9], 5
    noise = np.asarray(sampling.initial_noise(sampling.seed_keys(seeds), (H // 8, W // 8, 4)))
    ours = tiny_pipe.generate(PROMPTS, height=H, width=W, num_inference_steps=steps, scheduler=scheduler,
                              seed=seeds, init_image=_init_image(1), mask_image=_mask_image(),
                              strength=strength)
    ref = StableDiffusionInpaintPipeline(**tiny_reference.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(scheduler, tiny_reference.folder_scheduler_config)
    _patch_draws(monkeypatch, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
                 seeds, noise)
    patch_step_noise(monkeypatch, scheduler, seeds, steps, (H // 8, W // 8, 4))
    out = ref(PROMPTS, image=_init_image(1), mask_image=_mask_image(), height=H, width=W, strength=strength,
              num_inference_steps=steps, guidance_scale=7.5, output_type="np").images
    err = np.abs(ours.array - out).max()
    assert err <= TOL, f"{scheduler} strength {strength}: {err:.4g}"


@pytest.fixture(scope="module")
def inpaint_pair(tiny_inpaint_folder):
    ref = load_reference(tiny_inpaint_folder)
    return StableDiffusion.from_pretrained(tiny_inpaint_folder), ref


@pytest.mark.parametrize("scheduler,strength", [("pndm", 1.0), ("ddim", 0.8)])
def test_native_inpaint_matches_diffusers(inpaint_pair, scheduler, strength, monkeypatch):
    """9-channel inpainting UNet: [latents, mask, masked-image latents] as UNet input."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe, reference = inpaint_pair
    seeds, steps = [21, 22], 5
    noise = np.asarray(sampling.initial_noise(sampling.seed_keys(seeds), (H // 8, W // 8, 4)))
    ours = pipe.generate(PROMPTS, height=H, width=W, num_inference_steps=steps, scheduler=scheduler,
                         seed=seeds, init_image=_init_image(2), mask_image=_mask_image(), strength=strength)
    ref = StableDiffusionInpaintPipeline(**reference.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(scheduler, dict(reference.scheduler.config))
    _patch_draws(monkeypatch, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
                 seeds, noise)
    out = ref(PROMPTS, image=_init_image(2), mask_image=_mask_image(), height=H, width=W, strength=strength,
              num_inference_steps=steps, guidance_scale=7.5, output_type="np").images
    err = np.abs(ours.array - out).max()
    assert err <= TOL, f"{scheduler} strength {strength}: {err:.4g}"


def test_inpainting_model_requires_mask(inpaint_pair):
    pipe, _ = inpaint_pair
    with pytest.raises(ValueError, match="inpainting model"):
        pipe.generate("a cat", height=H, width=W, num_inference_steps=2)
