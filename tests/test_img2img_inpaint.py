"""img2img and inpainting parity with diffusers' img2img and inpaint pipelines (tiny random models).

diffusers draws the VAE posterior sample and the start noise from torch
generators; the tests make it draw sd_jax's draws instead (same per-image keys),
so that both pipelines do the same arithmetic.

They run on the parity models (``tiny.make_tiny_sd(parity=True)``), whose VAE latents carry the
image: ``test_init_image_matters`` checks that a flat grey init image moves every case's output by
>= 10 x TOL (on tiny_pipe the init latents are ~0.05 and a grey init passed the blend test).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sd_jax import StableDiffusion, sampling
from test_pipeline import TOL, diffusers_scheduler
from tiny import load_reference, make_tiny_sd, nchw, read_json

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


def _grey() -> Image.Image:
    return Image.fromarray(np.full((H, W, 3), 128, np.uint8))


IMG2IMG = dict(seeds=[3, 4], steps=6)
BLEND = dict(seeds=[8, 9], steps=5)
NATIVE = dict(seeds=[21, 22], steps=5)


def _img2img(pipe, scheduler, strength, image):
    return pipe.generate(PROMPTS, negative_prompt="ugly", height=H, width=W, num_inference_steps=IMG2IMG["steps"],
                         scheduler=scheduler, seed=IMG2IMG["seeds"], init_image=image, strength=strength)


def _inpaint(pipe, case, scheduler, strength, image):
    return pipe.generate(PROMPTS, height=H, width=W, num_inference_steps=case["steps"], scheduler=scheduler,
                         seed=case["seeds"], init_image=image, mask_image=_mask_image(), strength=strength)


# (scheduler, strength) cases of the default run, and the slow ones.
IMG2IMG_CASES, IMG2IMG_SLOW = [("pndm", 0.6), ("ddim", 0.75), ("dpm++2m", 0.8)], [("euler", 0.5), ("lms", 1.0)]
BLEND_CASES, BLEND_SLOW = [("pndm", 1.0), ("ddim", 0.7), ("lms", 0.6)], [("euler_a", 1.0)]
NATIVE_CASES = [("pndm", 1.0), ("ddim", 0.8)]


def _with_slow(cases, slow):
    return cases + [pytest.param(*case, marks=SLOW) for case in slow]


@pytest.mark.parametrize("scheduler,strength", _with_slow(IMG2IMG_CASES, IMG2IMG_SLOW))
def test_img2img_matches_diffusers(parity_pipe, parity_reference, scheduler, strength, monkeypatch):
    from diffusers import StableDiffusionImg2ImgPipeline

    seeds, steps = IMG2IMG["seeds"], IMG2IMG["steps"]
    noise = np.asarray(sampling.initial_noise(sampling.seed_keys(seeds), (H // 8, W // 8, 4)))
    image = _init_image()
    ours = _img2img(parity_pipe, scheduler, strength, image)
    ref = StableDiffusionImg2ImgPipeline(**parity_reference.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(scheduler, parity_reference.folder_scheduler_config)
    _patch_draws(monkeypatch, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
                 seeds, noise)
    out = ref(PROMPTS, negative_prompt=["ugly"] * 2, image=image, strength=strength,
              num_inference_steps=steps, guidance_scale=7.5, output_type="np").images
    err = np.abs(ours.array - out).max()
    assert err <= TOL, f"{scheduler} strength {strength}: {err:.4g}"


@pytest.mark.parametrize("scheduler,strength", _with_slow(BLEND_CASES, BLEND_SLOW))
def test_blend_inpaint_matches_diffusers(parity_pipe, parity_reference, scheduler, strength, monkeypatch):
    """4-channel model: latent blending, as diffusers' inpaint pipeline does for such UNets."""
    from diffusers import StableDiffusionInpaintPipeline

    from test_pipeline import patch_step_noise

    seeds, steps = BLEND["seeds"], BLEND["steps"]
    noise = np.asarray(sampling.initial_noise(sampling.seed_keys(seeds), (H // 8, W // 8, 4)))
    ours = _inpaint(parity_pipe, BLEND, scheduler, strength, _init_image(1))
    ref = StableDiffusionInpaintPipeline(**parity_reference.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(scheduler, parity_reference.folder_scheduler_config)
    _patch_draws(monkeypatch, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
                 seeds, noise)
    patch_step_noise(monkeypatch, scheduler, seeds, steps, (H // 8, W // 8, 4))
    out = ref(PROMPTS, image=_init_image(1), mask_image=_mask_image(), height=H, width=W, strength=strength,
              num_inference_steps=steps, guidance_scale=7.5, output_type="np").images
    err = np.abs(ours.array - out).max()
    assert err <= TOL, f"{scheduler} strength {strength}: {err:.4g}"


@pytest.fixture(scope="module")
def inpaint_pair(tmp_path_factory):
    """The 9-channel parity model: sd_jax's pipeline, diffusers' (with the folder's scheduler config file)."""
    folder = make_tiny_sd(tmp_path_factory.mktemp("parity_inpaint"), seed=3, in_channels=9, parity=True)
    ref = load_reference(folder)
    ref.folder_scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    return StableDiffusion.from_pretrained(folder), ref


@pytest.mark.parametrize("scheduler,strength", NATIVE_CASES)
def test_native_inpaint_matches_diffusers(inpaint_pair, scheduler, strength, monkeypatch):
    """9-channel inpainting UNet: [latents, mask, masked-image latents] as UNet input."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe, reference = inpaint_pair
    seeds, steps = NATIVE["seeds"], NATIVE["steps"]
    noise = np.asarray(sampling.initial_noise(sampling.seed_keys(seeds), (H // 8, W // 8, 4)))
    ours = _inpaint(pipe, NATIVE, scheduler, strength, _init_image(2))
    ref = StableDiffusionInpaintPipeline(**reference.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(scheduler, reference.folder_scheduler_config)
    _patch_draws(monkeypatch, "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
                 seeds, noise)
    out = ref(PROMPTS, image=_init_image(2), mask_image=_mask_image(), height=H, width=W, strength=strength,
              num_inference_steps=steps, guidance_scale=7.5, output_type="np").images
    err = np.abs(ours.array - out).max()
    assert err <= TOL, f"{scheduler} strength {strength}: {err:.4g}"


def test_init_image_matters(parity_pipe, inpaint_pair):
    """The mutation check of the three parity tests above: in each of their default cases, a flat grey
    init image instead of theirs moves some pixel by >= 10 x TOL, so a pipeline that dropped or
    replaced the init image fails them by >= 9 x TOL."""
    runs = [(f"img2img {s} {k}", lambda img, s=s, k=k: _img2img(parity_pipe, s, k, img), _init_image())
            for s, k in IMG2IMG_CASES]
    runs += [(f"blend {s} {k}", lambda img, s=s, k=k: _inpaint(parity_pipe, BLEND, s, k, img), _init_image(1))
             for s, k in BLEND_CASES]
    runs += [(f"native {s} {k}", lambda img, s=s, k=k: _inpaint(inpaint_pair[0], NATIVE, s, k, img), _init_image(2))
             for s, k in NATIVE_CASES]
    gaps = {name: float(np.abs(run(image).array - run(_grey()).array).max()) for name, run, image in runs}
    close = {name: round(gap, 4) for name, gap in gaps.items() if not gap >= 10 * TOL}
    assert not close, f"a grey init image changes these by less than 10 x TOL = {10 * TOL:.3f}: {close}"


def test_inpainting_model_requires_mask(inpaint_pair):
    pipe, _ = inpaint_pair
    with pytest.raises(ValueError, match="inpainting model"):
        pipe.generate("a cat", height=H, width=W, num_inference_steps=2)
