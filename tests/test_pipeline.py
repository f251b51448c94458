"""Whole-pipeline parity with diffusers' StableDiffusionPipeline on a tiny random model.

The solver parity test runs on the parity model (``tiny.make_tiny_sd(parity=True)``), on which every
two solvers give images at least 10 x TOL apart (``test_every_solver_pair_is_far_apart``): running the
wrong solver fails it by far.
"""

from __future__ import annotations

import importlib
import itertools

import jax
import numpy as np
import pytest
import torch

from tiny import nchw

H, W = 64, 48          # non-square; latents 8 x 6
PROMPTS = ["a photo of a cat", "a red car on a street"]
NEGATIVE = "blurry, low quality"
TOL = 2 / 255           # images in [0, 1]


@pytest.fixture
def pipe(tiny_pipe):
    return tiny_pipe


@pytest.fixture
def reference(tiny_reference):
    return tiny_reference


def diffusers_scheduler(name: str, folder_config: dict):
    """The diffusers solver as a user swaps it in: ``Cls.from_config(pipe.scheduler.config)``."""
    import diffusers

    classes = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
               "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
               "dpm++2m": "DPMSolverMultistepScheduler", "dpm++2m-karras": "DPMSolverMultistepScheduler",
               "ddpm": "DDPMScheduler"}
    extra = {}
    if name.startswith("dpm++"):
        extra = dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=name.endswith("karras"))
    return getattr(diffusers, classes[name]).from_config(folder_config, **extra)


def patch_step_noise(monkeypatch, name, pipe_result_seeds, steps, shape):
    """Make diffusers' stochastic solvers draw exactly sd_jax's per-image step noise."""
    from sd_jax import sampling

    modules = {"euler_a": "diffusers.schedulers.scheduling_euler_ancestral_discrete",
               "ddpm": "diffusers.schedulers.scheduling_ddpm"}
    if name not in modules:
        return
    keys = sampling.seed_keys(pipe_result_seeds)
    noises = [nchw(sampling.step_noise(keys, i, shape)) for i in range(steps + 1)]
    calls = iter(noises)
    module = importlib.import_module(modules[name])
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: next(calls))


SOLVER_CASES = [("pndm", 6), ("ddim", 5), ("lms", 5), ("euler", 5), ("euler_a", 5),
                ("dpm++2m", 5), ("dpm++2m-karras", 5), ("ddpm", 4)]
SEEDS = [11, 12]


def _latents() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, H // 8, W // 8, 4)).astype(np.float32)


def _txt2img(pipe, scheduler: str, steps: int):
    """sd_jax's images for one solver case of test_txt2img_matches_diffusers."""
    return pipe.generate(PROMPTS, negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=steps,
                         guidance_scale=7.5, scheduler=scheduler, seed=SEEDS, latents=_latents())


@pytest.mark.parametrize("scheduler,steps", SOLVER_CASES)
def test_txt2img_matches_diffusers(parity_pipe, parity_reference, scheduler, steps, monkeypatch):
    ours = _txt2img(parity_pipe, scheduler, steps)
    reference = parity_reference
    reference.scheduler = diffusers_scheduler(scheduler, reference.folder_scheduler_config)
    patch_step_noise(monkeypatch, scheduler, SEEDS, steps, (H // 8, W // 8, 4))
    ref = reference(PROMPTS, negative_prompt=[NEGATIVE] * 2, height=H, width=W, num_inference_steps=steps,
                    guidance_scale=7.5, latents=nchw(_latents()), output_type="np").images
    err = np.abs(ours.array - ref).max()
    assert err <= TOL, f"{scheduler}: max abs error {err:.4g} > {TOL:.4g}"


def test_every_solver_pair_is_far_apart(parity_pipe):
    """The mutation check of test_txt2img_matches_diffusers: at each step count it uses, any two solvers
    give images >= 10 x TOL apart, so a pipeline running the wrong solver fails that test by >= 9 x TOL.
    (On tiny_pipe DDIM and Euler differ by 0.004 < TOL, and DDPM and Euler-ancestral by 1e-5.)"""
    names = [name for name, _ in SOLVER_CASES]
    for steps in sorted({n for _, n in SOLVER_CASES}):
        images = {name: _txt2img(parity_pipe, name, steps).array for name in names}
        gaps = {(a, b): float(np.abs(images[a] - images[b]).max()) for a, b in itertools.combinations(names, 2)}
        close = {pair: round(gap, 4) for pair, gap in gaps.items() if not gap >= 10 * TOL}
        assert not close, f"{steps} steps: solvers closer than 10 x TOL = {10 * TOL:.3f}: {close}"


def test_no_guidance_skips_uncond_and_matches(pipe, reference):
    latents = np.random.default_rng(1).standard_normal((1, H // 8, W // 8, 4)).astype(np.float32)
    ours = pipe.generate(PROMPTS[0], height=H, width=W, num_inference_steps=4, guidance_scale=1.0,
                         scheduler="ddim", latents=latents)
    reference.scheduler = diffusers_scheduler("ddim", reference.folder_scheduler_config)
    ref = reference(PROMPTS[0], height=H, width=W, num_inference_steps=4, guidance_scale=1.0,
                    latents=nchw(latents), output_type="np").images
    assert np.abs(ours.array - ref).max() <= TOL


@pytest.mark.needs_8_devices
def test_sharded_equals_single_device(pipe):
    kwargs = dict(height=32, width=32, num_inference_steps=3, scheduler="euler_a", seed=5,
                  guidance_scale=[3.0, 7.5, 5.0])
    prompts = ["a", "b", "c"]  # 3 images: padded to 8 devices, trimmed back
    many = pipe.generate(prompts, devices=jax.devices(), **kwargs)
    one = pipe.generate(prompts, devices=jax.devices()[:1], **kwargs)
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(many.array, one.array, atol=1e-5)


def test_image_regenerates_alone_from_its_seed(pipe):
    batch = pipe.generate(["a", "b", "c"], height=32, width=32, num_inference_steps=3,
                          scheduler="euler_a", seed=100)
    assert batch.seeds == [100, 101, 102]
    alone = pipe.generate("b", height=32, width=32, num_inference_steps=3, scheduler="euler_a", seed=101)
    np.testing.assert_allclose(alone.array[0], batch.array[1], atol=1e-5)


def test_guidance_and_seed_changes_do_not_recompile(pipe):
    from sd_jax import sampling

    kwargs = dict(height=32, width=32, num_inference_steps=3, scheduler="ddim")
    pipe.generate(["a", "b"], guidance_scale=7.5, seed=0, **kwargs)
    run = sampling.compiled_denoise(pipe.unet, __import__("sd_jax.schedulers", fromlist=["x"]).get_scheduler("ddim"),
                                    "txt2img", True, sampling.data_mesh(None))
    before = run._cache_size()
    pipe.generate(["c", "d"], guidance_scale=[2.0, 9.0], seed=[7, 3], negative_prompt="x", **kwargs)
    assert run._cache_size() == before


@pytest.mark.parametrize("scheduler", ["pndm", "dpm++2m"])
def test_step_count_changes_do_not_recompile(pipe, scheduler):
    """The step count is traced (padded schedule, loop end in the state); results still match
    a fresh process's: each count equals its own run through a new jit of the same loop."""
    from sd_jax import sampling
    from sd_jax.schedulers import get_scheduler

    run = sampling.compiled_denoise(pipe.unet, get_scheduler(scheduler), "txt2img", True, sampling.data_mesh(None))
    kwargs = dict(height=32, width=24, scheduler=scheduler, seed=5)
    first = pipe.generate(["a", "b"], num_inference_steps=2, **kwargs)
    before = run._cache_size()
    outs = {n: pipe.generate(["a", "b"], num_inference_steps=n, **kwargs).array for n in (3, 9, 2)}
    assert run._cache_size() == before, "changing num_inference_steps recompiled the sampler"
    np.testing.assert_array_equal(outs[2], first.array)  # same executable, same count: same bits
    assert np.abs(outs[3] - outs[9]).max() > 1e-3  # the count does reach the loop


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=60), "height=60 must be a positive multiple of 8"),
    (dict(width=0), "width=0"),
    (dict(num_inference_steps=0), "num_inference_steps=0"),
    (dict(scheduler="heun"), "unknown scheduler 'heun'"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(eta=0.5, scheduler="pndm"), "eta=0.5 only applies to the ddim"),
    (dict(mask_image=np.zeros((64, 64))), "mask_image needs init_image"),
    (dict(latents=np.zeros((1, 4, 8, 8))), r"latents must have shape \(1, 8, 8, 4\)"),
    (dict(seed=[1, 2]), "2 seeds given for 1 images"),
    (dict(init_image=np.zeros((64, 64, 3)), strength=1.5), r"strength=1.5 must be in \(0, 1\]"),
])
def test_bad_values_fail_before_work(pipe, kwargs, match):
    args = dict(height=64, width=64, num_inference_steps=2) | kwargs
    with pytest.raises(ValueError, match=match):
        pipe.generate("a cat", **args)


def test_api_shapes(pipe):
    emb = pipe.encode_prompt(["a cat", ""])
    assert emb.shape == (2, 77, 32)
    lat = np.zeros((2, 8, 6, 4), np.float32)
    assert pipe.predict_noise(lat, 10, emb).shape == (2, 8, 6, 4)
    assert pipe.predict_noise(lat, np.array([1, 999]), emb).shape == (2, 8, 6, 4)
    img = pipe.decode_latents(lat)
    assert img.shape == (2, 64, 48, 3) and float(img.min()) >= 0 and float(img.max()) <= 1
    z = pipe.encode_image(img)
    assert z.shape == (2, 8, 6, 4)
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe.encode_image(np.zeros((1, 30, 32, 3)))


def test_api_matches_diffusers_components(pipe, reference):
    ids = reference.tokenizer(["a cat", ""], padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        ref_emb = reference.text_encoder(ids)[0].numpy()
    emb = np.asarray(pipe.encode_prompt(["a cat", ""]))
    np.testing.assert_allclose(emb, ref_emb, atol=1e-4 * max(1, np.abs(ref_emb).max()))
    lat = np.random.default_rng(0).standard_normal((2, 8, 6, 4)).astype(np.float32)
    with torch.no_grad():
        ref_eps = reference.unet(nchw(lat), torch.tensor([10, 500]), torch.from_numpy(ref_emb)).sample.numpy()
        ref_img = reference.vae.decode(nchw(lat) / 0.18215).sample.numpy()
    eps = np.asarray(pipe.predict_noise(lat, np.array([10, 500]), emb)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(eps, ref_eps, atol=1e-4 * max(1, np.abs(ref_eps).max()))
    img = np.asarray(pipe.decode_latents(lat)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(img, np.clip(ref_img / 2 + 0.5, 0, 1), atol=1e-4)
