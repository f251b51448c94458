"""Export round trips through diffusers: save_pretrained folders, CompVis single files, dtypes, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from parity_helpers import (PROMPTS, assert_outputs_close, assert_same_state, inputs, max_rel_error,  # noqa: E402
                            ours, reference, torch_state)
from sd_jax import StableDiffusion  # noqa: E402
from sd_jax.convert import export  # noqa: E402
from sd_jax.convert.__main__ import main  # noqa: E402
from sd_jax.convert.compvis import diffusers_to_compvis  # noqa: E402
from sd_jax.convert.safetensors_io import load_safetensors  # noqa: E402
from sd_jax.convert.source import load_model_files  # noqa: E402
from sd_jax.models.clip import CLIPTextConfig  # noqa: E402
from tiny import load_reference, make_tiny_sd  # noqa: E402

# Weight-rounding bounds for the low-precision exports, in units of each output's scale (max |out|).
# Casting moves each weight by at most u = 2^-11 (float16) or 2^-8 (bfloat16) of itself; an output
# sums such independent perturbations over the layers it passes through, so its relative error is
# a small multiple of u that grows with depth. Measured on the tiny model (diffusers, float32 math
# on the rounded weights): text 1.0u / 0.9u, UNet 2.5u / 2.1u, VAE encode 2.2u / 2.7u, VAE decode
# (the deepest path) 3.9u / 4.6u for float16 / bfloat16. The bound is 8u: about 2x headroom, and
# far below the O(1) error a wrongly mapped or transposed weight gives.
LOW_PRECISION_BOUND = {"float16": 8 * 2.0 ** -11, "bfloat16": 8 * 2.0 ** -8}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return StableDiffusion.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def x():
    return inputs(seed=3)


@pytest.fixture(scope="module")
def ref_outputs(tiny_dir, pipe, x):
    """diffusers' outputs of the original folder (float32), the truth for every exported copy."""
    return reference(load_reference(tiny_dir), pipe.tokenize(PROMPTS), x)


@pytest.fixture(scope="module")
def our_outputs(pipe, x, ref_outputs):
    return ours(pipe, x, text_emb=ref_outputs["text"])


def weights_of(ref) -> dict[str, dict[str, np.ndarray]]:
    return {name: torch_state(getattr(ref, name)) for name in ("unet", "vae", "text_encoder")}


def test_save_pretrained_round_trip_through_diffusers(pipe, tiny_dir, tmp_path, ref_outputs, our_outputs, x):
    folder = export.save_pretrained(pipe, tmp_path / "exported")
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                     "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
                     "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                     "vae/diffusion_pytorch_model.safetensors"]
    text_keys = load_safetensors(folder / "text_encoder" / "model.safetensors")[0]
    assert all(k.startswith("text_model.") for k in text_keys)
    exported = load_reference(folder)
    original = load_reference(tiny_dir)
    for name, state in weights_of(original).items():
        assert_same_state(weights_of(exported)[name], state, name)
    assert dict(exported.scheduler.config) == dict(original.scheduler.config)
    ids = pipe.tokenize(PROMPTS)
    assert np.array_equal(exported.tokenizer(PROMPTS, padding="max_length", max_length=77).input_ids, ids)
    got = reference(exported, ids, x)
    assert_outputs_close(got, ref_outputs, rel=0)  # identical weights: identical outputs
    assert_outputs_close(our_outputs, got, rel=1e-4)
    # and sd_jax reads its own export back
    again = load_model_files(folder)
    assert again.configs == load_model_files(tiny_dir).configs


def test_save_single_file_round_trip_through_diffusers(pipe, tiny_dir, tmp_path, ref_outputs, our_outputs, x):
    path = export.save_single_file(pipe, tmp_path / "model.safetensors", dtype="float32")
    tensors, metadata = load_safetensors(path)
    assert metadata == {"format": "pt"}
    assert tensors["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (16, 16, 1, 1)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in tensors
    ref = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_dir), local_files_only=True,
                                                             safety_checker=None)
    for name, state in weights_of(load_reference(tiny_dir)).items():
        assert_same_state(weights_of(ref)[name], state, name)
    got = reference(ref, pipe.tokenize(PROMPTS), x)
    assert_outputs_close(got, ref_outputs, rel=0)
    assert_outputs_close(our_outputs, got, rel=1e-4)
    back = load_model_files(path, config=tiny_dir)
    original = load_model_files(tiny_dir)
    for name in ("unet", "vae"):
        assert_same_state(back.states[name], original.states[name], name)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_exports(dtype, pipe, tiny_dir, tmp_path, ref_outputs, x):
    np_dtype = export.EXPORT_DTYPES[dtype]
    folder = export.save_pretrained(pipe, tmp_path / "folder", dtype=dtype)
    single = export.save_single_file(pipe, tmp_path / "model.safetensors", dtype=dtype)
    original = load_model_files(tiny_dir).states
    # every floating tensor is the float32 weight rounded to nearest, nothing else
    unet_file = load_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors")[0]
    for k, v in original["unet"].items():
        assert unet_file[k].dtype == np_dtype and np.array_equal(unet_file[k], v.astype(np_dtype)), k
    assert {v.dtype for v in load_safetensors(single)[0].values()} == {np_dtype}
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["torch_dtype"] == dtype
    bound = LOW_PRECISION_BOUND[dtype]
    ids = pipe.tokenize(PROMPTS)
    for ref in (load_reference(folder),
                diffusers.StableDiffusionPipeline.from_single_file(str(single), config=str(tiny_dir),
                                                                   local_files_only=True, safety_checker=None)):
        ref.to(torch.float32)  # float32 math on the rounded weights: only the rounding differs
        got = reference(ref, ids, x)
        errors = {k: max_rel_error(got[k], ref_outputs[k]) for k in got}
        assert all(0 < e <= bound for e in errors.values()), (dtype, errors)
    # sd_jax loads its low-precision exports too
    again = StableDiffusion.from_pretrained(single, config=tiny_dir)
    assert max_rel_error(np.asarray(again.decode_latents(x["latents"])), ref_outputs["decode"]) <= bound


def test_cli_folder_to_single_to_folder(tiny_dir, tmp_path, capsys):
    single = tmp_path / "model.safetensors"
    assert main([str(tiny_dir), str(single), "--dtype", "float32"]) == 0
    assert main([str(single), str(tmp_path / "back"), "--config", str(tiny_dir)]) == 0
    assert "wrote" in capsys.readouterr().out
    a, b = load_model_files(tmp_path / "back"), load_model_files(tiny_dir)
    assert a.configs == b.configs and a.scheduler_config == b.scheduler_config
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(a.states[name], b.states[name], name)
    assert main([str(single), str(tmp_path / "half.safetensors")]) == 0  # default dtype of a single file: float16
    assert {v.dtype for v in load_safetensors(tmp_path / "half.safetensors")[0].values()} == {np.dtype(np.float16)}
    assert main([str(tiny_dir), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    unet = load_safetensors(tmp_path / "bf16" / "unet" / "diffusion_pytorch_model.safetensors")[0]
    assert {v.dtype for v in unet.values()} == {np.dtype(ml_dtypes.bfloat16)}


def test_cli_ema_choice(tiny_dir, tmp_path):
    """--ema / --no-ema pick the EMA or the raw UNet of a full-EMA file."""
    files = load_model_files(tiny_dir)
    cfg = files.configs
    raw = diffusers_to_compvis(files.states, cfg["unet"], cfg["vae"], cfg["text_encoder"])
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): v + 1.0
           for k, v in raw.items() if k.startswith("model.diffusion_model.")}
    export.save_safetensors(tmp_path / "full-ema.safetensors", {**raw, **ema, "model_ema.decay": np.float32(0.9999)})
    for flag, offset in (("--ema", 1.0), ("--no-ema", 0.0)):
        out = tmp_path / flag.strip("-")
        assert main([str(tmp_path / "full-ema.safetensors"), str(out), "--config", str(tiny_dir), flag]) == 0
        got = load_model_files(out).states["unet"]
        assert_same_state(got, {k: v + offset for k, v in files.states["unet"].items()}, flag)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    (tmp_path / "fake.ckpt").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    proc = subprocess.run([sys.executable, "-m", "sd_jax.convert", str(tmp_path / "fake.ckpt"), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("python -m sd_jax.convert: error: "), proc.stderr
    assert "PNG image" in lines[0]
    assert not (tmp_path / "o").exists()


def test_cli_multi_line_errors_become_one_line(tiny_dir, tmp_path, capsys):
    other = make_tiny_sd(tmp_path / "inpaint", in_channels=9)
    assert main([str(tiny_dir), str(tmp_path / "m.safetensors"), "--dtype", "float32"]) == 0
    capsys.readouterr()
    assert main([str(tmp_path / "m.safetensors"), str(tmp_path / "x"), "--config", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "conv_in.weight: file has" in err
    assert not (tmp_path / "x").exists()


def test_destinations_are_protected(pipe, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.save_pretrained(pipe, folder)
    assert (folder / "notes.txt").read_text() == "keep me"
    export.save_pretrained(pipe, folder, overwrite=True)
    assert not (folder / "notes.txt").exists() and (folder / "model_index.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    export.save_pretrained(pipe, empty)  # an empty folder is fine
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.save_single_file(pipe, path)
    with pytest.raises(ValueError, match="never writes pickles"):
        export.save_single_file(pipe, tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match="float64"):
        export.save_pretrained(pipe, tmp_path / "f64", dtype="float64")
    assert not (tmp_path / "f64").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m.safetensors", "mine"]  # no temporaries left


def test_failed_export_leaves_nothing_behind(pipe, tmp_path, monkeypatch):
    def broken_save(folder):
        raise OSError("disk full")

    monkeypatch.setattr(pipe.tokenizer, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export.save_pretrained(pipe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_inpainting_index_and_open_clip_single_file_refusal(pipe):
    import dataclasses

    configs = export.pipeline_configs(pipe)
    assert export.model_index(configs, "PNDMScheduler")["_class_name"] == "StableDiffusionPipeline"
    inpaint = {**configs, "unet": dataclasses.replace(configs["unet"], in_channels=9)}
    assert export.model_index(inpaint, "PNDMScheduler")["_class_name"] == "StableDiffusionInpaintPipeline"
    open_clip = CLIPTextConfig(hidden_size=32, num_attention_heads=4, hidden_act="gelu")
    with pytest.raises(ValueError, match="save_pretrained"):
        diffusers_to_compvis({"unet": {}, "vae": {}, "text_encoder": {}}, configs["unet"], configs["vae"], open_clip)


# ---- the destination's name decides the format (issue 11) ----------------------------------------

@pytest.mark.parametrize(("name", "kind"), [("out.safetensors", "single"), ("OUT.SafeTensors", "single"),
                                            ("out", "folder"), ("sd-v1.5/", "folder")])
def test_destination_kind(tmp_path, name, kind):
    assert export.destination_kind(str(tmp_path / name) + ("/" if name.endswith("/") else "")) == kind


def test_existing_dotted_folder_is_a_folder(tmp_path):
    (tmp_path / "sd-v1.5").mkdir()
    assert export.destination_kind(tmp_path / "sd-v1.5") == "folder"


@pytest.mark.parametrize(("name", "message"), [
    ("x.ckpt", "sd_jax writes .safetensors only, never pickles"), ("x.bin", "never pickles"),
    ("x.pt", "never pickles"), ("x.gguf", "unknown output suffix '.gguf'"), ("sd-v1.5", "unknown output suffix"),
])
def test_cli_refuses_pickle_and_unknown_destinations(tiny_dir, tmp_path, capsys, name, message):
    """`python -m sd_jax.convert SRC x.ckpt` wrote a *folder* named x.ckpt; now one line, exit 2, nothing written."""
    assert main([str(tiny_dir), str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_cli_trailing_slash_writes_a_dotted_folder(tiny_dir, tmp_path):
    assert main([str(tiny_dir), str(tmp_path / "sd-v1.5") + "/"]) == 0
    assert (tmp_path / "sd-v1.5" / "model_index.json").is_file()


def test_cli_refuses_non_finite_weights_before_writing(tiny_dir, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    file = src / "vae" / "diffusion_pytorch_model.safetensors"
    state = {k: np.array(v) for k, v in load_safetensors(file)[0].items()}
    state["decoder.conv_out.bias"][0] = np.inf
    export.save_safetensors(file, state)
    assert main([str(src), str(tmp_path / "out.safetensors")]) == 2
    assert "vae weights hold NaN or infinite values in 1 tensor(s): decoder.conv_out.bias" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_bug_is_traceback_and_exit_1(tiny_dir, tmp_path, capsys, monkeypatch):
    """An unexpected exception is not dressed up as a user error: traceback, a request to report, exit 1."""
    def broken(*args, **kwargs):
        raise KeyError("internal table")

    monkeypatch.setattr("sd_jax.convert.__main__.convert", broken)
    assert main([str(tiny_dir), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'internal table'" in err
    assert err.strip().splitlines()[-1].startswith("python -m sd_jax.convert: internal error (KeyError): this is a bug")
