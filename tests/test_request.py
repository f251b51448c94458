"""The one sampling request: building, validation (one line naming the argument or flag), batches,
bounds on sizes, counts, images and memory, and non-finite outputs as errors."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sd_jax.schedulers  # noqa: F401 - imported once here, not inside a timed check
from sd_jax import memory
from sd_jax.request import MAX_IMAGES, GenerationRequest, LoraRef, RequestError

FLAGS = {"height": "--height", "num_inference_steps": "--steps", "init_image": "--init-image",
         "strength": "--strength", "mask_image": "--mask-image"}


def _bomb(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A PNG that declares width x height pixels (900 megapixels) in a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_build_expands_per_image_and_is_frozen():
    req = GenerationRequest.build(["a", "b"], ["x", "y"], num_images_per_prompt=2, seed=10, guidance_scale=6.0,
                                  height=64, width=32, batch_size=3)
    assert req.prompts == ("a", "a", "b", "b") and req.negative_prompts == ("x", "x", "y", "y")
    assert req.seeds == (10, 11, 12, 13) and req.guidance_scales == (6.0,) * 4 and req.guided
    assert (req.height, req.width, req.steps, req.mode, req.strength) == (64, 32, 50, "txt2img", None)
    with pytest.raises(AttributeError):
        req.height = 8
    parts = list(req.batches())
    assert [p.seeds for p in parts] == [(10, 11, 12), (13,)] and parts[1].batch_size == 3
    assert GenerationRequest.build("a", guidance_scale=1.0).guided is False


def test_errors_name_the_argument_or_the_flag():
    with pytest.raises(RequestError) as info:
        GenerationRequest.build("a", height=60)
    assert str(info.value).startswith("height=60 must be a positive multiple of 8")
    assert info.value.render(FLAGS).startswith("--height 60 must be a positive multiple of 8")
    with pytest.raises(RequestError) as info:
        GenerationRequest.build("a", strength=0.5)
    assert info.value.render(FLAGS) == ("--strength 0.5 needs --init-image (strength is how much img2img "
                                        "changes it)")
    with pytest.raises(RequestError) as info:
        GenerationRequest.build("a", num_inference_steps=0)
    assert info.value.render(FLAGS).startswith("--steps 0 must be an integer in [1, 1000]")
    with pytest.raises(RequestError, match="mask_image needs init_image"):
        GenerationRequest.build("a", mask_image=np.zeros((64, 64)))
    long_prompt = "x" * 100_000
    with pytest.raises(RequestError) as info:
        GenerationRequest.build(long_prompt)
    assert len(str(info.value)) < 300  # a short prefix of the value, never the value


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=800000), "height=800000 must be a positive multiple of 8 up to 8192"),
    (dict(width=-8), "width=-8"),
    (dict(num_images_per_prompt=10**9), rf"num_images_per_prompt=1000000000 must be an integer in \[1, {MAX_IMAGES}\]"),
    (dict(num_images_per_prompt=MAX_IMAGES, prompt=["a", "b"]), f"20000 images in one request; at most {MAX_IMAGES}"),
    (dict(seed=-2), "seed=-2"),
    (dict(seed=2**32 - 1, num_images_per_prompt=2), "seed=4294967295"),
    (dict(guidance_scale=float("inf")), "guidance_scale=inf"),
    (dict(scheduler="heun"), "unknown scheduler 'heun'"),
    (dict(eta=0.5, scheduler="pndm"), "eta=0.5 only applies to the ddim"),
    (dict(latents=np.full((1, 8, 8, 4), np.nan)), "latents must be finite"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(prompt_syntax="comfy"), "prompt_syntax='comfy' must be one of a1111, plain"),
])
def test_bad_values_are_refused_at_once(kwargs, match):
    t0 = time.perf_counter()
    with pytest.raises(RequestError, match=match):
        GenerationRequest.build(**{"prompt": "a cat", **kwargs})
    assert time.perf_counter() - t0 < 5.0  # refused before anything is expanded per image or allocated


def test_seed_none_and_minus_1_draw_a_random_first_seed():
    a, b = GenerationRequest.build("a", seed=None, num_images_per_prompt=3), GenerationRequest.build("a", seed=-1)
    assert a.seeds[1:] == (a.seeds[0] + 1, a.seeds[0] + 2) and a.seeds[0] != b.seeds[0]


def test_init_image_sets_the_size_and_the_strength_defaults(tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((45, 63, 3), np.uint8)).save(photo)
    img2img = GenerationRequest.build("a", init_image=photo)
    assert (img2img.width, img2img.height, img2img.strength, img2img.mode) == (56, 40, 0.8, "img2img")
    assert img2img.init_image.shape == (1, 40, 56, 3) and img2img.init_image.dtype == np.float32
    inpaint = GenerationRequest.build("a", init_image=Image.open(photo), mask_image=np.ones((40, 56)))
    assert (inpaint.strength, inpaint.mode, inpaint.mask_image.shape) == (1.0, "inpaint", (1, 40, 56, 1))
    explicit = GenerationRequest.build("a", init_image=photo, height=32, width=32, strength=0.3)
    assert (explicit.height, explicit.width, explicit.strength) == (32, 32, 0.3)
    with pytest.raises(RequestError, match="init_image width 7 is smaller than 8"):
        GenerationRequest.build("a", init_image=np.zeros((16, 7, 3), np.uint8))


def test_a_decompression_bomb_is_one_error_before_decoding(tmp_path):
    from sd_jax import images as imageio
    from sd_jax.dreambooth.data import load_images

    bomb = _bomb(tmp_path / "bomb.png")
    big = _bomb(tmp_path / "big.png", 10000, 9000)  # under PIL's own limit, over sd_jax's
    for path in (bomb, big):
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match="megapixels"):
            imageio.open_image(path)
        with pytest.raises(RequestError, match="megapixels"):
            GenerationRequest.build("a", init_image=path)
        assert time.perf_counter() - t0 < 5.0
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16)).save(good)
    with pytest.warns(UserWarning, match="bomb.png"):  # training data: --skip-bad-images skips it
        examples = load_images([bomb, good], "a dog", skip_bad=True)
    assert [e.path.name for e in examples] == ["good.png"]
    with pytest.raises(ValueError, match="megapixels"):
        load_images([bomb], "a dog")


def test_a_missing_lora_is_refused_by_the_pipeline_before_sampling(tiny_pipe):
    req = GenerationRequest.build("a", height=32, width=32, num_inference_steps=2, loras=[LoraRef("x.safetensors")])
    with pytest.raises(RequestError, match=r"x\.safetensors' does not exist"):
        tiny_pipe.run(req)
    with pytest.raises(RequestError, match="scale must be a finite number"):
        LoraRef("x", float("nan"))


def test_model_checks_name_the_argument(tiny_pipe):
    with pytest.raises(RequestError, match=r"latents must have shape \(1, 4, 4, 4\)"):
        tiny_pipe.generate("a", height=32, width=32, latents=np.zeros((1, 4, 4, 3)))
    with pytest.raises(RequestError, match="clip_skip=5 must be below the text encoder's 2 layers"):
        tiny_pipe.generate("a", height=32, width=32, clip_skip=5)


def test_memory_estimate_refuses_what_cannot_fit(tiny_pipe, monkeypatch):
    """A batch's activations and the returned images are estimated and refused before any work."""
    calls = []
    monkeypatch.setattr(type(tiny_pipe), "_run_batch", lambda *a, **k: calls.append(a))
    big = GenerationRequest.build("a", height=8192, width=8192, num_images_per_prompt=64)
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 64 * 2**30)
    with pytest.raises(memory.RequestTooLarge, match=r"needs at least .* GiB of memory .* 64.0 GiB is available"):
        tiny_pipe.run(big)
    small = GenerationRequest.build("a", height=64, width=64, num_images_per_prompt=4)
    per_image = memory.sampling_bytes_per_image(32, 8, 8, 4, 64, 64, True)
    assert 0 < per_image < 2**20
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 2**20)  # 1 MiB: not even one batch
    with pytest.raises(memory.RequestTooLarge):
        tiny_pipe.run(small)
    assert calls == []


def test_non_finite_sampling_is_an_error_not_a_black_image(tiny_pipe):
    import dataclasses

    import jax

    from sd_jax.pipeline import NonFiniteOutput

    unet = jax.tree_util.tree_map_with_path(
        lambda path, x: x * np.nan if "conv_out" in jax.tree_util.keystr(path) else x, tiny_pipe.params["unet"])
    broken = dataclasses.replace(tiny_pipe, params={**tiny_pipe.params, "unet": unet})
    with pytest.raises(NonFiniteOutput, match=r"NaN/inf values for 2 of 2 image\(s\) \(seeds 3, 4\)"):
        broken.generate("a", height=32, width=32, num_inference_steps=2, seed=3, num_images_per_prompt=2)
    ok = tiny_pipe.generate("a", height=32, width=32, num_inference_steps=2, seed=3)
    assert np.isfinite(ok.array).all()


def test_result_records_the_request_model_and_dtype(tiny_pipe):
    from sd_jax.outputs import image_metadata

    result = tiny_pipe.generate(["a", "b"], height=32, width=32, num_inference_steps=2, seed=5, batch_size=1,
                                scheduler="ddim", eta=0.25)
    assert result.request.total == 2 and result.seeds == [5, 6] and result.dtype == "float32"
    meta = image_metadata(result, 1)
    assert (meta["seed"], meta["prompt"], meta["eta"], meta["batch_size"], meta["model"]) == (
        6, "b", 0.25, 1, tiny_pipe.source)


def test_a_run_of_a_billion_images_is_streamed_not_listed():
    """GenerateConfig draws its random seed and builds each batch's request only when it is needed."""
    import itertools
    import tracemalloc

    from sd_jax.generation import GenerateConfig

    tracemalloc.start()
    cfg = GenerateConfig(prompts=("a", "b"), n_images=10**9, height=64, width=64)
    first, second = itertools.islice(cfg.requests(), 2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 2**20, peak  # listing 2e9 seeds would take tens of GB
    assert cfg.total == 2 * 10**9 and 0 <= cfg.seed <= 2**32 - 1 - cfg.total + 1
    assert first.seeds == tuple(range(cfg.seed, cfg.seed + 8)) and second.seeds[0] == cfg.seed + 8
    assert first.prompts == ("a",) * 8


@pytest.mark.parametrize("name, ours", [("Euler a", "euler_a"), ("euler  A", "euler_a"), ("PLMS", "pndm"),
                                        ("DPM++ 2M Karras", "dpm++2m-karras"), ("DPM++ 2M", "dpm++2m"),
                                        ("DDIM", "ddim"), ("LMS", "lms"), ("Euler", "euler"), ("lms", "lms")])
def test_a1111_sampler_names_mean_our_solvers(name, ours):
    assert GenerationRequest.build("a cat", scheduler=name).scheduler == ours


def test_unknown_sampler_lists_both_vocabularies():
    with pytest.raises(RequestError, match=r"unknown scheduler 'DPM\+\+ SDE'.*euler_a.*AUTOMATIC1111's: Euler a"):
        GenerationRequest.build("a cat", scheduler="DPM++ SDE")
