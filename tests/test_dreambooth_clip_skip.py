"""Dreambooth with clip skip (``train.clip_skip``, ``--clip-skip``; sd_jax's N is AUTOMATIC1111's "Clip skip" N+1).

The loss's text encoder (frozen and trained), the cached text embeddings, the class images, the samples and the
kohya metadata all use it; a bad value is refused before any work; a resumed run must keep it. The tiny model's
text encoder has 2 layers, so clip_skip=1 is its penultimate layer (A1111's Clip skip 2).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import step_harness as H
from flax import linen as nn
from PIL import Image

from sd_jax.dreambooth.config import ConfigError, TrainConfig, load_config

PROMPTS = ["a photo of sks dog", "a sks dog on the moon", "a photo of dog", "a dog"]


def _images(folder, n=2, color=(220, 30, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((40, 40, 3), 128, np.uint8)
        img[8 + i:28 + i, 8:28] = color
        Image.fromarray(img).save(folder / f"{i}.png")
    return folder


# ------------------------------------------------------------------------------ the loss


class ContextProbe(nn.Module):
    """Stands in for the UNet (whose compile would take most of this file's time; the trainer run below uses the
    real one): its prediction depends on every entry of the context, so the loss tells contexts apart and its
    gradient reaches each text-encoder weight the context depends on."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t, context):  # (B, h, w, C), (B,), (B, L, D)
        w = self.param("w", nn.initializers.normal(1.0), (context.shape[-1], x.shape[-1]))
        return x + jnp.einsum("bld,dc->bc", context, w)[:, None, None, :] / context.shape[1]  # (B, h, w, C)


def _loss_setup(tiny_pipe, **train):
    """make_loss_fn of the probe conditioned by the tiny model's text encoder (2 layers, width 32), its
    parameters, and a batch of 2 instance + 2 class rows with their randomness."""
    from sd_jax.dreambooth.step import StepModels, make_loss_fn

    cfg = H.train_config(data={"cache_text_embeddings": False}, train=train)
    models = dataclasses.replace(H.models(), unet=ContextProbe(),
                                 text_encoder=StepModels.from_pipeline(tiny_pipe, cfg).text_encoder)
    rng = np.random.default_rng(0)
    probe = {"unet": {"w": rng.standard_normal((32, H.LATENT[-1])).astype(np.float32) / np.sqrt(32)}}
    batch = {"latents": rng.standard_normal((4, *H.LATENT)).astype(np.float32),
             "timesteps": np.array([10, 500, 999, 250], np.int32),
             "noise": rng.standard_normal((4, *H.LATENT)).astype(np.float32),
             "prior_mask": np.array([0, 0, 1, 1], np.float32)}
    return make_loss_fn(models, cfg), probe, batch


def _embeddings(tiny_pipe, clip_skip):
    return np.asarray(tiny_pipe.encode_prompt(PROMPTS, clip_skip=clip_skip, prompt_syntax="plain"))


def test_loss_of_the_frozen_text_encoder_uses_the_penultimate_layer(tiny_pipe):
    """clip_skip=1: the loss from input_ids through the frozen text encoder equals the loss from the pipeline's
    clip_skip=1 embeddings, and not the one from its clip_skip=0 embeddings (the comparison can fail)."""
    loss_fn, probe, batch = _loss_setup(tiny_pipe, clip_skip=1)
    loss = jax.jit(loss_fn)
    ids = {**batch, "input_ids": tiny_pipe.tokenize(PROMPTS)}
    from_ids = float(loss(probe, {"text_encoder": tiny_pipe.params["text_encoder"]}, ids)[0])
    skip1 = float(loss(probe, {}, {**batch, "text_embeddings": _embeddings(tiny_pipe, 1)})[0])
    skip0 = float(loss(probe, {}, {**batch, "text_embeddings": _embeddings(tiny_pipe, 0)})[0])
    assert from_ids == pytest.approx(skip1, rel=1e-6)
    assert abs(skip0 - skip1) > 1e-3 * abs(skip1)


def test_trained_text_encoder_gets_gradient_only_in_the_layers_used(tiny_pipe):
    """The trained text encoder with clip_skip=1: the loss is that of the pipeline's clip_skip=1 embeddings; the
    last layer gets zero gradient (it is not computed), the layer below, the embeddings and the final layer
    norm get gradient."""
    loss_fn, probe, batch = _loss_setup(tiny_pipe, clip_skip=1, train_text_encoder=True)
    ids = {**batch, "input_ids": tiny_pipe.tokenize(PROMPTS)}
    trainable = {**probe, "text_encoder": tiny_pipe.params["text_encoder"]}
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trainable, {}, ids)
    cached = {**batch, "text_embeddings": _embeddings(tiny_pipe, 1)}
    assert float(loss) == pytest.approx(float(jax.jit(loss_fn)(probe, {}, cached)[0]), rel=1e-6)
    size = lambda tree: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))  # noqa: E731
    g = grads["text_encoder"]
    assert size(g["encoder"]["layers_1"]) == 0.0  # the skipped (last) layer
    assert size(g["encoder"]["layers_0"]) > 0 and size(g["final_layer_norm"]) > 0 and size(g["embeddings"]) > 0


# ------------------------------------------------------------------------------ the trainer


def test_cached_text_embeddings_use_clip_skip(tiny_pipe, tmp_path):
    """BatchBuilder's cached embeddings (the frozen text encoder) are the pipeline's clip_skip ones."""
    from sd_jax import sharding as shd
    from sd_jax.dreambooth import data as dbdata
    from sd_jax.dreambooth.trainer import BatchBuilder

    concept = dbdata.Concept(instance_dir=str(_images(tmp_path / "sks")), instance_prompt="a photo of sks dog")
    dataset = dbdata.DreamboothDataset([concept], resolution=32, batch_size=1)
    mesh = shd.make_mesh()
    got = {}
    for clip_skip in (0, 1):
        cfg = TrainConfig.from_dict({"data": {"resolution": 32, "cache_latents": False},
                                     "train": {"clip_skip": clip_skip}})
        batch = BatchBuilder(tiny_pipe, cfg, dataset).micro_batch(0, mesh)
        got[clip_skip] = batch["text_embeddings"][0]
        want = tiny_pipe.encode_prompt("a photo of sks dog", clip_skip=clip_skip, prompt_syntax="plain")[0]
        np.testing.assert_allclose(got[clip_skip], np.asarray(want), rtol=1e-6, atol=1e-6)
    assert np.abs(got[1] - got[0]).max() > 1e-2


@pytest.mark.parametrize("value, match", [
    (-1, r"train.clip_skip=-1 is not valid: expected an integer in \[0, 127\]"),
    ("2", r"train.clip_skip='2' is not valid: expected an integer in \[0, 127\].*Clip skip"),
    (True, r"train.clip_skip=True is not valid"),
    (1.0, r"train.clip_skip=1.0 is not valid"),
    (128, r"train.clip_skip=128 is not valid"),
])
def test_bad_clip_skip_is_a_config_error(value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict({"train": {"clip_skip": value}})


def test_clip_skip_past_the_text_encoder_is_refused_before_class_images(tiny_pipe, tmp_path):
    """clip_skip 2 of the tiny model's 2 layers: refused at trainer start, naming the value and the range,
    before any class image is generated."""
    from sd_jax.dreambooth.trainer import train

    class_dir = tmp_path / "class"
    cfg = load_config(None, {
        "model.path": "unused", "output_dir": str(tmp_path / "out"),
        "concepts": [{"instance_dir": str(_images(tmp_path / "sks")), "instance_prompt": "a photo of sks dog",
                      "class_prompt": "a photo of dog", "class_dir": str(class_dir), "num_class_images": 2}],
        "data.resolution": 32, "train.clip_skip": 2, "class_images.num_inference_steps": 2})

    class Watched:
        """tiny_pipe, noting the expensive calls: class images (generate) and cached latents (latent_moments)."""

        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            if name in ("generate", "latent_moments"):
                self.calls.append(name)
            return getattr(tiny_pipe, name)

    pipe = Watched()
    with pytest.raises(ConfigError, match=r"train.clip_skip 2 must be below the text encoder's 2 layers \(0 to 1; "
                                          r"AUTOMATIC1111's 'Clip skip' is N\+1\)"):
        train(cfg, pipe=pipe, progress=False)
    assert pipe.calls == [] and not list(class_dir.glob("*.png"))


def test_cli_clip_skip_flag_and_bad_values(tiny_folder, tmp_path, capsys):
    """--clip-skip maps to train.clip_skip; a bad value is one line and exit 2, before training."""
    from sd_jax.cli.train import build_parser, config_from_args, main

    base = ["--model", str(tiny_folder), "--instance-dir", str(_images(tmp_path / "sks")), "--instance-prompt",
            "a sks dog", "--output-dir", str(tmp_path / "out"), "--resolution", "32", "--no-progress"]
    assert config_from_args(build_parser().parse_args(base + ["--clip-skip", "1"])).train.clip_skip == 1
    assert config_from_args(build_parser().parse_args(base)).train.clip_skip == 0
    helptext = " ".join(build_parser().format_help().split())
    assert "AUTOMATIC1111's \"Clip skip\" and kohya's --clip_skip are N + 1" in helptext
    for value, match in (("-1", "train.clip_skip=-1 is not valid"),
                         ("2", "train.clip_skip 2 must be below the text encoder's 2 layers")):
        capsys.readouterr()
        assert main(base + ["--clip-skip", value]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list((tmp_path / "out").glob("checkpoints/*"))


class _Asked(Exception):
    """Raised by :class:`RecordingPipe` with the keyword arguments generate() was called with."""


@dataclasses.dataclass
class RecordingPipe:
    """Stands in for the pipeline where only generate()'s arguments matter (no sampler compile)."""

    params: dict

    def generate(self, prompts, **kwargs):
        raise _Asked(kwargs)


def test_class_images_and_samples_are_generated_with_clip_skip(tmp_path):
    """The trainer's class images and validation samples ask the pipeline for the run's clip skip (their PNG text
    then records it: sd_jax.outputs.image_metadata; the slow run below reads it back)."""
    from sd_jax.dreambooth.trainer import data_concepts, prepare_class_images, sample_images

    cfg = load_config(None, {
        "model.path": "unused", "output_dir": str(tmp_path / "out"), "train.clip_skip": 1,
        "concepts": [{"instance_dir": str(_images(tmp_path / "sks")), "instance_prompt": "a photo of sks dog",
                      "class_prompt": "a photo of dog", "class_dir": str(tmp_path / "class"), "num_class_images": 1}]})
    for generate in (lambda: prepare_class_images(RecordingPipe({}), cfg, data_concepts(cfg), progress=False),
                     lambda: sample_images(RecordingPipe({}), {}, cfg)):
        with pytest.raises(_Asked) as asked:
            generate()
        assert asked.value.args[0]["clip_skip"] == 1


def _lora_run(tiny_folder, tmp_path, *extra):
    """A 2-step LoRA run with --clip-skip 1 through the CLI (in-process): its output folder and what it printed."""
    from sd_jax.cli.train import main

    out = tmp_path / "out"
    argv = ["--model", str(tiny_folder), "--instance-dir", str(_images(tmp_path / "sks")), "--instance-prompt",
            "a photo of sks dog", "--output-dir", str(out), "--resolution", "32", "--max-train-steps", "2",
            "--checkpoint-every", "2", "--lora", "--clip-skip", "1", "--no-progress", *extra]
    assert main(argv) == 0
    return out


def test_lora_run_records_clip_skip(tiny_folder, tmp_path, capsys):
    """A 2-step LoRA run with --clip-skip 1: the kohya file's ss_clip_skip is "2" (kohya's and A1111's count),
    config.json holds train.clip_skip 1, the header and the end of the run say it and how to sample."""
    from sd_jax.dreambooth import lora
    from sd_jax.lora import read_lora

    out = _lora_run(tiny_folder, tmp_path)
    printed = capsys.readouterr().out
    assert "text encoder frozen (clip skip 1: A1111 2)" in printed  # the header
    assert "sample with clip_skip=1 (generate.py --clip-skip 1; AUTOMATIC1111's Clip skip 2)" in printed
    _, meta = read_lora(out / "final" / lora.KOHYA_FILE)
    assert meta["ss_clip_skip"] == "2"
    assert json.loads((out / "config.json").read_text())["train"]["clip_skip"] == 1


@pytest.mark.slow  # ~30-60 s: the test above plus a sampler compile
def test_lora_run_class_images_and_samples_record_clip_skip(tiny_folder, tmp_path):
    """The same run with prior preservation and samples: the class image and the sample carry clip_skip 1 in
    their PNG text and A1111's "Clip skip: 2" (they share one compiled sampler)."""
    class_dir = tmp_path / "class"
    out = _lora_run(tiny_folder, tmp_path, "--class-prompt", "a photo of dog", "--class-dir", str(class_dir),
                    "--num-class-images", "1", "--sample-every", "2", "--set", "logging.sample_steps=2",
                    "--set", "class_images.num_inference_steps=2", "--set", "class_images.batch_size=1")
    pngs = sorted(class_dir.glob("*.png")) + sorted((out / "samples").glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        text = Image.open(png).text
        assert text["clip_skip"] == "1" and "Clip skip: 2" in text["parameters"], png.name


def test_kohya_metadata_without_clip_skip_is_none():
    from sd_jax.dreambooth.lora import kohya_metadata

    assert kohya_metadata(TrainConfig(), 1)["ss_clip_skip"] == "None"  # kohya's str(None) for no --clip_skip
    cfg = TrainConfig.from_dict({"train": {"clip_skip": 3}})
    assert kohya_metadata(cfg, 1)["ss_clip_skip"] == "4"


# ------------------------------------------------------------------------------ resume


def test_resume_with_another_clip_skip_is_refused_and_an_older_run_resumes(tmp_path):
    """A run's checkpoints were trained with one clip skip: another is refused, naming train.clip_skip; a
    config.json written before the field existed compares as clip_skip 0 (the default) and resumes."""
    from sd_jax.dreambooth.trainer import RunPaths, _check_output_dir

    cfg = TrainConfig.from_dict({"model": "m", "output_dir": str(tmp_path),
                                 "concepts": [{"instance_dir": "d", "instance_prompt": "a sks dog"}]})
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    old = cfg.to_dict()
    del old["train"]["clip_skip"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert _check_output_dir(RunPaths(tmp_path), cfg, None) == 2
    skip = TrainConfig.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "clip_skip": 1}})
    with pytest.raises(ValueError, match=r"sections differ: train.clip_skip\)"):
        _check_output_dir(RunPaths(tmp_path), skip, None)
    (tmp_path / "config.json").write_text(json.dumps(skip.to_dict()))
    assert _check_output_dir(RunPaths(tmp_path), skip, None) == 2
    with pytest.raises(ValueError, match=r"sections differ: train.clip_skip\)"):
        _check_output_dir(RunPaths(tmp_path), cfg, None)
