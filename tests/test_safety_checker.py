"""Safety checker: parity with diffusers' StableDiffusionSafetyChecker and the CLIPImageProcessor."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers.pipelines.stable_diffusion import safety_checker as diffusers_safety
from PIL import Image
from transformers import CLIPImageProcessor

from sd_jax.convert.core import WeightMismatchError, flatten_tree
from sd_jax.convert.diffusers import read_component_state
from sd_jax.convert.safetensors_io import save_safetensors
from sd_jax.convert.safety_checker import (BARE_PARAMETERS, normalise_safety_checker_keys,
                                          safety_checker_state_to_params)
from sd_jax.models.safety_checker import (CLIPVisionConfig, SafetyChecker,
                                          SafetyCheckerConfig, abstract_params, check_images,
                                          safety_scores)
from sd_jax.safety import ImageProcessorConfig, preprocess, read_preprocessor_config

BATCH = 24
SIZE = 32  # tiny tower: 32x32 images, 8x8 patches -> 16 patches + CLS


def _hf_config():
    return transformers.CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=SIZE, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4),
        projection_dim=16)


def _randomise(model, seed):
    """Every parameter random: LayerNorms, biases, class token, the 17 + 3 embeddings."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 2 and "embedding" not in name and "embeds" not in name:
                p.copy_(noise / p.shape[1] ** 0.5)  # linear (out, in)
            elif p.ndim == 4:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))  # patch conv
            else:
                p.copy_(0.5 * noise)
    return model


def _torch_cos(reference, pixels_nhwc):
    """Reference image embeddings and diffusers' own cosine_distance against both embedding sets."""
    with torch.no_grad():
        pooled = reference.vision_model(torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2))).pooler_output
        embeds = reference.visual_projection(pooled)
        special = diffusers_safety.cosine_distance(embeds, reference.special_care_embeds)
        concept = diffusers_safety.cosine_distance(embeds, reference.concept_embeds)
    return pooled.numpy(), embeds.numpy(), special.numpy(), concept.numpy()


def _set_thresholds(reference, pixels):
    """Thresholds that flag some images and not others, and make the 0.01 adjustment decide one.

    special_care_embeds[0] is made equal to concept_embeds[0]; the image t with
    the largest cosine to it fires special care 0 (threshold between the top
    two) and has concept 0's threshold 0.005 above its cosine: concept 0 fires
    for t only through the adjustment. Concepts 1-16 flag their top image
    (threshold between the top two), so at most 17 of 24 images are flagged
    (measured: 13, one of them only through the adjustment).
    """
    with torch.no_grad():
        reference.special_care_embeds[0] = reference.concept_embeds[0]
    _, _, special, concept = _torch_cos(reference, pixels)
    mid_top2 = lambda cos: np.sort(cos, axis=0)[-2:].mean(axis=0)  # per concept
    special_thr, concept_thr = mid_top2(special), mid_top2(concept)
    top = int(np.argmax(concept[:, 0]))
    concept_thr[0] = concept[top, 0] + 0.005
    with torch.no_grad():
        reference.special_care_embeds_weights.copy_(torch.from_numpy(special_thr))
        reference.concept_embeds_weights.copy_(torch.from_numpy(concept_thr))
    return top


def _diffusers_forward(reference, pixels, monkeypatch):
    """diffusers' forward; its `round` calls recorded to recover the per-concept scores."""
    recorded = []

    def recording_round(value, ndigits=None):
        out = round(value, ndigits)
        recorded.append(out)
        return out

    monkeypatch.setattr(diffusers_safety, "round", recording_round, raising=False)
    images = np.ones((len(pixels), 4, 4, 3), np.float32)
    with torch.no_grad():
        images, flags = reference(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), images)
    monkeypatch.undo()
    scores = np.array(recorded, np.float32).reshape(len(pixels), 3 + 17)  # per image: 3 special, 17
    return flags, scores[:, :3], scores[:, 3:], images, [type(v) for v in recorded]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    hf_config = _hf_config()
    reference = _randomise(diffusers_safety.StableDiffusionSafetyChecker(hf_config).eval(), seed=3)
    rng = np.random.RandomState(0)
    raw = rng.randint(0, 256, (BATCH, 48, 40, 3)).astype(np.uint8)  # resized to 38x32, cropped
    raw[: BATCH // 2] = (raw[: BATCH // 2] * np.linspace(0, 1, 40)[None, None, :, None]).astype(np.uint8)
    proc_config = ImageProcessorConfig(shortest_edge=SIZE, crop_size=(SIZE, SIZE))
    pixels = preprocess(raw, proc_config)
    flagged_by_adjustment = _set_thresholds(reference, pixels)
    config = SafetyCheckerConfig.from_transformers(hf_config.to_dict())
    module = SafetyChecker(config)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    params, skipped = safety_checker_state_to_params(state, abstract_params(module))
    return dict(reference=reference, hf_config=hf_config, raw=raw, pixels=pixels, config=config,
                module=module, state=state, params=params, skipped=skipped,
                proc_config=proc_config, flagged_by_adjustment=flagged_by_adjustment)


def test_embedding_parity(tiny):
    pooled_ref, embeds_ref, special_ref, concept_ref = _torch_cos(tiny["reference"], tiny["pixels"])
    out = jax.jit(tiny["module"].apply)({"params": tiny["params"]}, tiny["pixels"])
    for ours, ref in ((out.pooled_output, pooled_ref), (out.image_embeds, embeds_ref)):
        assert ours.shape == ref.shape and ours.dtype == np.float32
        # Measured 9.5e-7 (pooled, max|ref| 4.0) and 6.9e-7 (embeds, max|ref| 2.0).
        assert np.abs(np.asarray(ours) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    # Cosines in [-1, 1]; measured 2.4e-7.
    np.testing.assert_allclose(out.special_care_cos, special_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.concept_cos, concept_ref, rtol=0, atol=1e-5)


def test_scores_and_flags_parity(tiny, monkeypatch):
    reference = tiny["reference"]
    flags_ref, special_ref, concept_ref, images_ref, types = _diffusers_forward(
        reference, tiny["pixels"], monkeypatch)
    assert set(types) == {np.float32}  # NumPy >= 2: diffusers' scores are float32 throughout
    assert 0 < sum(flags_ref) < BATCH  # some flagged, some not
    top = tiny["flagged_by_adjustment"]
    assert flags_ref[top] and special_ref[top, 0] > 0 and 0 < concept_ref[top, 0] <= 0.01
    without_adjustment = (np.round(concept_ref - 0.01 * (special_ref > 0).any(1, keepdims=True), 3)
                          > 0).any(1)
    assert (without_adjustment != np.array(flags_ref)).any()  # the 0.01 decides at least one flag

    # Exact arithmetic: diffusers' own cosines through safety_scores reproduce its scores bit for bit.
    _, _, special_cos, concept_cos = _torch_cos(reference, tiny["pixels"])
    thresholds = (reference.special_care_embeds_weights.detach().numpy(),
                  reference.concept_embeds_weights.detach().numpy())
    exact = safety_scores(special_cos, concept_cos, *thresholds)
    np.testing.assert_array_equal(exact.special_scores, special_ref)
    np.testing.assert_array_equal(exact.concept_scores, concept_ref)
    assert exact.has_nsfw.tolist() == flags_ref

    # The Flax network: same flags; a score differs only where float32 noise (~1e-7) meets a
    # rounding boundary (k + 1/2) / 1000, and then by one step.
    flags, scores = check_images(tiny["module"], tiny["params"], tiny["pixels"])
    assert flags == flags_ref and isinstance(flags[0], bool)
    for ours, ref, cos, thr in ((scores.special_scores, special_ref, special_cos, thresholds[0]),
                                (scores.concept_scores, concept_ref, concept_cos, thresholds[1])):
        assert np.abs(ours - ref).max() <= 1e-3 + 1e-6
        unrounded = 1000 * (cos - thr)
        near_boundary = np.abs(unrounded - np.floor(unrounded) - 0.5) < 1e-2
        assert not np.any((ours != ref) & ~near_boundary)
    assert (scores.bad_concepts.any(axis=1) == scores.has_nsfw).all()
    assert scores.special_care[top, 0]
    # diffusers blacks out what it flags; check_images is given no images and changes none.
    assert all((images_ref[i] == 0).all() == flags_ref[i] for i in range(BATCH))


def test_special_care_adjustment_is_sequential():
    """An image's later special-care scores carry the 0.01 once an earlier one fired, as diffusers."""
    special_cos = np.array([[0.50, 0.296, 0.296], [0.10, 0.296, 0.296]], np.float32)
    concept_cos = np.full((2, 17), 0.296, np.float32)
    thr = np.float32(0.3)
    out = safety_scores(special_cos, concept_cos, np.full(3, thr), np.full(17, thr))
    np.testing.assert_array_equal(out.special_scores, np.float32([[0.2, 0.006, 0.006],
                                                                  [-0.2, -0.004, -0.004]]))
    assert out.has_nsfw.tolist() == [True, False]
    assert out.bad_concepts[0].all() and not out.bad_concepts[1].any()
    with pytest.raises(ValueError, match="thresholds"):
        safety_scores(special_cos, concept_cos, np.full(2, thr), np.full(17, thr))


def test_load_saved_folders(tiny, tmp_path):
    """save_pretrained (transformers 5 spelling) and a Hub-style file (transformers 4, + buffer)."""
    assert tiny["skipped"] == []
    folder = tmp_path / "safety_checker"
    tiny["reference"].save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert SafetyCheckerConfig.from_transformers(config) == tiny["config"]
    state = read_component_state(folder, "safety_checker")
    assert any(k.startswith("vision_model.embeddings.") for k in state)
    params, skipped = safety_checker_state_to_params(state, abstract_params(tiny["module"]))
    assert skipped == []
    jax.tree.map(np.testing.assert_array_equal, params, tiny["params"])

    hub = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in state.items()}
    hub["vision_model.vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    old = tmp_path / "old" / "safety_checker"
    old.mkdir(parents=True)
    save_safetensors(old / "model.safetensors", hub)
    params, skipped = safety_checker_state_to_params(read_component_state(old, "safety_checker"),
                                                     abstract_params(tiny["module"]))
    assert skipped == ["vision_model.vision_model.embeddings.position_ids"]
    jax.tree.map(np.testing.assert_array_equal, params, tiny["params"])
    assert set(BARE_PARAMETERS.values()) <= set(hub)


def test_strictness(tiny):
    shapes = abstract_params(tiny["module"])
    state = dict(tiny["state"])
    del state["concept_embeds"], state["vision_model.post_layernorm.bias"]
    state["vision_model.extra.weight"] = np.zeros(3, np.float32)
    state["special_care_embeds_weights"] = np.zeros(4, np.float32)
    with pytest.raises(WeightMismatchError) as err:
        safety_checker_state_to_params(state, shapes)
    message = str(err.value)
    for name in ("missing from the file: concept_embeds", "vision_model.vision_model.post_layernorm.bias",
                 "vision_model.vision_model.extra.weight",
                 "special_care_embeds_weights: file has (4,), model expects (3,)"):
        assert name in message, message
    with pytest.raises(WeightMismatchError, match="position_ids"):  # only the buffer is skipped
        safety_checker_state_to_params({**tiny["state"], "vision_model.embeddings.position_ids2":
                                        np.zeros(1)}, shapes)
    with pytest.raises(ValueError, match="both"):
        normalise_safety_checker_keys({"vision_model.pre_layrnorm.bias": 0,
                                       "vision_model.vision_model.pre_layrnorm.bias": 0})


def test_full_size_mapping():
    """SD v1 safety checker (ViT-L/14, projection 768): every key <-> one parameter."""
    sd_config = {  # the vision part of CompVis/stable-diffusion-safety-checker's config.json
        "model_type": "clip", "projection_dim": 768,
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "image_size": 224,
                          "model_type": "clip_vision_model", "layer_norm_eps": 1e-05},
        "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096,
                               "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14},
    }
    config = SafetyCheckerConfig.from_transformers(sd_config)
    assert config == SafetyCheckerConfig.sd_v1()
    hf_config = transformers.CLIPConfig(**sd_config)
    assert SafetyCheckerConfig.from_transformers(hf_config.to_dict()) == config
    with torch.device("meta"):
        reference = diffusers_safety.StableDiffusionSafetyChecker(hf_config)
    state = {("vision_model." + k if k.startswith("vision_model.") else k):
             np.broadcast_to(np.zeros((), np.float32), tuple(v.shape))
             for k, v in reference.state_dict().items()}
    state["vision_model.vision_model.embeddings.position_ids"] = np.zeros((1, 257), np.int64)
    shapes = abstract_params(SafetyChecker(config))
    params, skipped = safety_checker_state_to_params(state, shapes)
    assert len(skipped) == 1 and len(flatten_tree(params)) == len(state) - 1 == 24 * 16 + 12
    count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert count == sum(int(np.prod(v.shape)) for v in reference.state_dict().values())


@pytest.mark.parametrize("bad, match", [
    ({"model_type": "t5"}, "'t5'"),
    ({"vision_config": {"hidden_size": 30, "num_attention_heads": 4}}, "30 is not divisible"),
    ({"vision_config": {"hidden_act": "relu"}}, "'relu'"),
    ({"vision_config": {"model_type": "siglip_vision_model"}}, "siglip"),
    ({"projection_dim": 0}, "projection_dim must be a positive integer, got 0"),
    ({"vision_config": {"patch_size": 300}}, "patch_size 300"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        SafetyCheckerConfig.from_transformers(bad)


def test_config_defaults():
    """Missing keys take transformers' defaults (ViT-B/32 tower, projection 512)."""
    config = SafetyCheckerConfig.from_transformers({})
    ref = transformers.CLIPVisionConfig()
    assert config.projection_dim == transformers.CLIPConfig().projection_dim == 512
    assert config.vision == CLIPVisionConfig(**{k: getattr(ref, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps")})


def _uint8(seed, *shape):
    image = np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8)
    return (image // 2 + np.linspace(0, 127, shape[1]).astype(np.uint8)[None, :, None, None])


SD_LEGACY = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
             "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": 224,
             "image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711]}


@pytest.mark.parametrize("shape", [(2, 224, 224, 3), (2, 512, 512, 3), (1, 300, 400, 3),
                                   (1, 401, 250, 3), (1, 100, 150, 3)])
def test_preprocess_parity(shape):
    """Same PIL bicubic on the same uint8 images: bit-exact (measured max abs error 0)."""
    images = _uint8(sum(shape), *shape)
    ref = CLIPImageProcessor.from_dict(SD_LEGACY)(list(map(Image.fromarray, images)),
                                                   return_tensors="np").pixel_values
    ours = preprocess(images, ImageProcessorConfig.from_transformers(SD_LEGACY))
    assert ours.shape == (shape[0], 224, 224, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref.transpose(0, 2, 3, 1))


def test_preprocess_configs(tmp_path):
    modern = CLIPImageProcessor.from_dict({**SD_LEGACY, "size": {"shortest_edge": 224},
                                           "crop_size": {"height": 224, "width": 224}})
    assert ImageProcessorConfig.from_transformers(SD_LEGACY) == ImageProcessorConfig()
    assert ImageProcessorConfig.from_transformers(modern.to_dict()) == ImageProcessorConfig()
    assert read_preprocessor_config(tmp_path) == ImageProcessorConfig()  # no file: SD defaults
    square = {**SD_LEGACY, "size": {"height": 64, "width": 48}, "crop_size": 40, "resample": 2}
    CLIPImageProcessor.from_dict(square).save_pretrained(tmp_path / "feature_extractor")
    config = read_preprocessor_config(tmp_path)
    assert (config.resize_to, config.crop_size, config.resample) == ((64, 48), (40, 40), 2)
    images = _uint8(5, 2, 70, 90, 3)
    ref = CLIPImageProcessor.from_dict(square)(list(images), return_tensors="np").pixel_values
    np.testing.assert_array_equal(preprocess(images, config), ref.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(images.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="longest_edge"):
        ImageProcessorConfig.from_transformers({"size": {"shortest_edge": 224, "longest_edge": 300}})


def test_call_errors(tiny):
    with pytest.raises(ValueError, match=r"\(batch, 32, 32, 3\)"):
        check_images(tiny["module"], tiny["params"], np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="floating point"):
        check_images(tiny["module"], tiny["params"], np.zeros((1, 32, 32, 3), np.uint8))


def test_bf16_compute(tiny):
    """bfloat16 matmuls: float32 scores within a few bf16 roundoffs (u = 2^-8) of float32.

    Measured max score error 0.007 (cosine 0.0063, ~1.6u); allowed 8u = 0.031.
    Flags near a threshold can flip (1 of 24 here, thresholds 1e-3 apart), as
    diffusers' fp16 pipelines differ from fp32: run the checker in float32.
    """
    module = SafetyChecker(tiny["config"], dtype=jax.numpy.bfloat16)
    _, scores = check_images(module, tiny["params"], tiny["pixels"])
    _, exact = check_images(tiny["module"], tiny["params"], tiny["pixels"])
    assert scores.concept_scores.dtype == np.float32
    assert np.abs(scores.concept_scores - exact.concept_scores).max() <= 8 * 2.0 ** -8
