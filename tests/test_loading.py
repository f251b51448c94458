"""Loading diffusers folders: formats, variants, key spellings, and clear errors naming the file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sd_jax import StableDiffusion
from sd_jax.convert.core import WeightMismatchError
from sd_jax.convert.diffusers import ModelFolderError
from sd_jax.convert.files import CheckpointFormatError, read_state_dict
from sd_jax.convert.safetensors_io import save_safetensors


def _copy(tiny_folder, tmp_path, name="sd"):
    dst = tmp_path / name
    shutil.copytree(tiny_folder, dst)
    return dst


def _outputs(pipe):
    emb = np.asarray(pipe.encode_prompt(["a cat"]))
    lat = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    eps = np.asarray(pipe.predict_noise(lat, 500, emb))
    img = np.asarray(pipe.decode_latents(lat))
    return emb, eps, img


@pytest.fixture(scope="module")
def baseline(tiny_pipe):
    return _outputs(tiny_pipe)


def _assert_same(pipe, baseline, atol=1e-6):
    for ours, ref in zip(_outputs(pipe), baseline):
        np.testing.assert_allclose(ours, ref, atol=atol)


def test_pytorch_bin_folder_loads_without_torch_load(tiny_folder, tmp_path, baseline, monkeypatch):
    folder = _copy(tiny_folder, tmp_path)
    for sub, stem, bin_name in (("unet", "diffusion_pytorch_model", "diffusion_pytorch_model"),
                                ("vae", "diffusion_pytorch_model", "diffusion_pytorch_model"),
                                ("text_encoder", "model", "pytorch_model")):
        file = folder / sub / f"{stem}.safetensors"
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in read_state_dict(file).items()},
                   folder / sub / f"{bin_name}.bin")
        file.unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    _assert_same(StableDiffusion.from_pretrained(folder), baseline)


def test_fp16_variant_preferred_when_asked(tiny_folder, tmp_path, baseline):
    folder = _copy(tiny_folder, tmp_path)
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = read_state_dict(file)
    save_safetensors(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors",
                     {k: np.asarray(v, np.float16) for k, v in state.items()})
    pipe = StableDiffusion.from_pretrained(folder, variant="fp16")
    leaf = pipe.params["unet"]["conv_in"]["kernel"]
    expected = np.asarray(state["conv_in.weight"], np.float16).astype(np.float32).transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(leaf), expected)  # the fp16 file was the one read
    _assert_same(pipe, baseline, atol=5e-2)


def test_sharded_weights_with_index(tiny_folder, tmp_path, baseline):
    folder = _copy(tiny_folder, tmp_path)
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = read_state_dict(file)
    names = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_safetensors(folder / "unet" / shard, {k: np.array(state[k]) for k in keys})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    file.unlink()
    _assert_same(StableDiffusion.from_pretrained(folder), baseline)


def test_text_encoder_without_prefix_and_old_vae_names(tiny_folder, tmp_path, baseline):
    folder = _copy(tiny_folder, tmp_path)
    te = folder / "text_encoder" / "model.safetensors"
    state = read_state_dict(te)
    save_safetensors(te, {k.removeprefix("text_model."): np.array(v) for k, v in state.items()})
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in read_state_dict(vae).items():
        for new, legacy in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        renamed[k] = np.array(v)
    assert any(".proj_attn." in k for k in renamed)
    save_safetensors(vae, renamed)
    _assert_same(StableDiffusion.from_pretrained(folder), baseline)


def test_position_ids_buffer_is_named_as_skipped(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    te = folder / "text_encoder" / "model.safetensors"
    state = {k: np.array(v) for k, v in read_state_dict(te).items()}
    state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_safetensors(te, state)
    pipe = StableDiffusion.from_pretrained(folder)
    assert pipe.skipped_weights["text_encoder"] == ["embeddings.position_ids"]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        StableDiffusion.from_pretrained(tmp_path / "nowhere")


def test_missing_sub_model_names_it(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelFolderError, match=r"no vae/ folder"):
        StableDiffusion.from_pretrained(folder)


def test_missing_weights_name_the_files_looked_for(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"diffusion_pytorch_model\.safetensors.*diffusion_pytorch_model\.bin"):
        StableDiffusion.from_pretrained(folder)


def test_wrong_config_names_the_file(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    cfg_file = folder / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["addition_embed_type"] = "text_time"  # an SDXL switch
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"(?s)unet/config\.json.*addition_embed_type"):
        StableDiffusion.from_pretrained(folder)


def test_config_for_other_weights_lists_mismatches(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    cfg_file = folder / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["cross_attention_dim"] = 48  # as if these were 2.x-style weights for another text encoder
    cfg_file.write_text(json.dumps(cfg))
    expected = r"attn2\.to_k\.weight: file has \(64, 32\), model expects \(64, 48\)"
    with pytest.raises(WeightMismatchError, match=expected):
        StableDiffusion.from_pretrained(folder)


def test_truncated_safetensors_names_the_file(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match=r"vae/diffusion_pytorch_model\.safetensors"):
        StableDiffusion.from_pretrained(folder)


def test_not_json_config_names_the_file(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "text_encoder" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"text_encoder/config\.json is not valid JSON"):
        StableDiffusion.from_pretrained(folder)


def test_bad_dtype_is_refused_before_loading(tiny_folder):
    with pytest.raises(ValueError, match="dtype 'float8' is not supported"):
        StableDiffusion.from_pretrained(tiny_folder, dtype="float8")


def test_bf16_storage_and_compute(tiny_folder, baseline):
    pipe = StableDiffusion.from_pretrained(tiny_folder, dtype="bfloat16")
    assert pipe.params["unet"]["conv_in"]["kernel"].dtype == np.dtype("bfloat16")
    emb, eps, img = _outputs(pipe)
    # bf16 weights and activations: 8 mantissa bits, so a few 1e-2 relative through the whole stack
    # (the per-model bf16 bounds are argued in test_unet/test_vae/test_clip).
    assert np.abs(eps.astype(np.float32) - baseline[1]).max() < 0.1 * max(1, np.abs(baseline[1]).max())


# --- sharded weights follow their index exactly (issue 11) -----------------------------------------

_SHARD_1 = "diffusion_pytorch_model-00001-of-00002.safetensors"
_SHARD_2 = "diffusion_pytorch_model-00002-of-00002.safetensors"


def _sharded(tmp_path, shards, weight_map):
    """A unet/ folder holding the given shards ({file: {name: array}}) and an index with weight_map."""
    folder = tmp_path / "unet"
    folder.mkdir()
    for shard, tensors in shards.items():
        save_safetensors(folder / shard, tensors)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_sharded_control_reads_every_tensor_once(tmp_path):
    from sd_jax.convert.diffusers import read_component_state

    folder = _sharded(tmp_path, {_SHARD_1: {"a": np.ones(2)}, _SHARD_2: {"b": np.zeros(3)}},
                      {"a": _SHARD_1, "b": _SHARD_2})
    state = read_component_state(folder, "unet")
    assert sorted(state) == ["a", "b"] and state["a"].shape == (2,)


@pytest.mark.parametrize(("shards", "weight_map", "message"), [
    ({_SHARD_1: {"a": np.ones(2)}, _SHARD_2: {"a": np.zeros(2)}}, {"a": _SHARD_1, "b": _SHARD_2},
     f"tensor 'a' is in two shards, '{_SHARD_1}' and '{_SHARD_2}'"),
    ({_SHARD_1: {"a": np.ones(2)}, _SHARD_2: {"b": np.zeros(2)}}, {"a": _SHARD_2, "b": _SHARD_1},
     f"tensor 'a' is in shard '{_SHARD_1}' but the index assigns it to '{_SHARD_2}'"),
    ({_SHARD_1: {"a": np.ones(2), "c": np.ones(1)}, _SHARD_2: {"b": np.zeros(2)}}, {"a": _SHARD_1, "b": _SHARD_2},
     f"tensor 'c' is in shard '{_SHARD_1}' but the index does not list it"),
    ({_SHARD_1: {"a": np.ones(2)}, _SHARD_2: {"b": np.zeros(2)}}, {"a": _SHARD_1, "b": _SHARD_2, "z": _SHARD_2},
     f"1 tensors the index lists are in no shard, e.g. 'z' \\(assigned to '{_SHARD_2}'\\)"),
], ids=["duplicate", "wrong-shard", "unlisted", "missing"])
def test_sharded_weights_must_match_their_index(tmp_path, shards, weight_map, message):
    """Two shards with one name, a name in the wrong shard, unlisted or missing: one error naming both."""
    from sd_jax.convert.diffusers import ShardIndexError, read_component_state

    folder = _sharded(tmp_path, shards, weight_map)
    with pytest.raises(ShardIndexError, match=message) as err:
        read_component_state(folder, "unet")
    assert "index.json" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "a/../../outside.safetensors",
                                   "..\\outside.safetensors"])
def test_shard_outside_the_model_folder_is_refused(tmp_path, shard):
    from sd_jax.convert.diffusers import ShardIndexError, read_component_state

    save_safetensors(tmp_path / "outside.safetensors", {"a": np.ones(2)})
    folder = _sharded(tmp_path, {}, {"a": shard})
    with pytest.raises(ShardIndexError, match="points outside the model folder"):
        read_component_state(folder, "unet")


@pytest.mark.parametrize("index", [[1, 2], {"weight_map": ["a"]}, {"weight_map": {"a": 3}}, {"weight_map": {}},
                                   {"weight_map": {"a": None}}, {"weight_map": {"a": ["x"]}}, "text"],
                         ids=["list", "map-list", "int-shard", "empty", "null-shard", "list-shard", "string"])
def test_odd_index_is_one_line(tmp_path, index):
    """Indexes of the wrong shape give one ValueError naming the file, never TypeError/AttributeError."""
    from sd_jax.convert.diffusers import read_component_state

    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="index.json") as err:
        read_component_state(folder, "unet")
    assert "\n" not in str(err.value)


def test_deeply_nested_config_json_is_refused(tmp_path):
    """A 5000-deep config.json is a one-line error (it was a RecursionError)."""
    from sd_jax.convert.diffusers import read_json

    path = tmp_path / "config.json"
    path.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ValueError, match="nested 5000 deep"):
        read_json(path)


# --- nothing silently wrong: non-finite weights and config numbers (issue 11) ----------------------

def test_nan_in_a_unet_bias_is_named_at_load(tiny_folder, tmp_path):
    """One NaN in a UNet bias used to give black images with exit 0; now the load names the tensor."""
    from sd_jax.convert.core import NonFiniteWeightsError

    folder = _copy(tiny_folder, tmp_path)
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = {k: np.array(v) for k, v in read_state_dict(file).items()}
    state["conv_in.bias"][0] = np.nan
    save_safetensors(file, state)
    with pytest.raises(NonFiniteWeightsError, match=r"unet weights hold NaN or infinite values in 1 tensor\(s\): "
                                                    r"conv_in\.bias"):
        StableDiffusion.from_pretrained(folder)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_vae_scaling_factor_is_refused(tiny_folder, tmp_path, value):
    from sd_jax.convert.source import load_model_files

    folder = _copy(tiny_folder, tmp_path)
    config_file = folder / "vae" / "config.json"
    text = json.dumps({**json.loads(config_file.read_text()), "scaling_factor": 1.5})
    config_file.write_text(text.replace("1.5", value))
    with pytest.raises(ValueError, match=r"vae/config\.json: .*scaling_factor=.*finite"):
        load_model_files(folder)
