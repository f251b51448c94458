"""The pipeline runs a model folder's safety checker and reports, without altering images."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch

from sd_jax import StableDiffusion
from sd_jax.safety import preprocess
from tiny import randomise


@pytest.fixture(scope="module")
def folder_with_checker(tiny_folder, tmp_path_factory):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    folder = tmp_path_factory.mktemp("with_checker") / "sd"
    shutil.copytree(tiny_folder, folder)
    config = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2),
                        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=224, patch_size=32),
                        projection_dim=8)
    checker = randomise(StableDiffusionSafetyChecker(config), seed=5)
    checker.save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224}).save_pretrained(
        folder / "feature_extractor")
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_flags_match_diffusers_and_images_are_kept(folder_with_checker):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusion.from_pretrained(folder_with_checker)
    assert pipe.safety_checker is not None
    prompts = ["a", "b", "c", "d"]
    latents = np.random.default_rng(0).standard_normal((4, 8, 8, 4)).astype(np.float32)
    kwargs = dict(height=64, width=64, num_inference_steps=2, guidance_scale=1.0)
    ours = pipe.generate(prompts, scheduler="ddim", latents=latents, **kwargs)
    # Thresholds that split this batch: concept 0 between its two highest cosines, the rest never.
    check = pipe.safety_checker
    pixels = preprocess((ours.array * 255).round().astype(np.uint8), check.processor)
    cos0 = np.asarray(check.module.apply({"params": check.params}, pixels).concept_cos)[:, 0]
    thresholds = np.full(17, 10.0, np.float32)
    top = np.sort(cos0)[-2:]
    assert top[1] - top[0] > 2e-3, "cosines too close to split above the 3-decimal rounding"
    thresholds[0] = float(top.mean())
    check.params = dict(check.params, concept_embeds_weights=jax.numpy.asarray(thresholds),
                        special_care_embeds_weights=jax.numpy.full(3, 10.0))
    ours = pipe.generate(prompts, scheduler="ddim", latents=latents, **kwargs)
    ref = StableDiffusionPipeline.from_pretrained(folder_with_checker)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref.safety_checker.concept_embeds_weights.copy_(torch.from_numpy(thresholds))
        ref.safety_checker.special_care_embeds_weights.fill_(10.0)
    from diffusers import DDIMScheduler

    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    out = ref(prompts, output_type="np", latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), **kwargs)
    assert ours.nsfw == list(out.nsfw_content_detected)
    assert any(ours.nsfw) and not all(ours.nsfw), ours.nsfw  # both outcomes exercised
    # diffusers blacks flagged images out; sd_jax reports and keeps them.
    for i, flagged in enumerate(ours.nsfw):
        if flagged:
            assert ours.array[i].max() > 0


def test_checker_can_be_switched_off(folder_with_checker):
    pipe = StableDiffusion.from_pretrained(folder_with_checker, safety_checker=False)
    assert pipe.safety_checker is None
    res = pipe.generate("a", height=32, width=32, num_inference_steps=1, scheduler="ddim")
    assert res.nsfw is None
