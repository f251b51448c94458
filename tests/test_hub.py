"""Hub ids: which files are fetched, how options reach huggingface_hub, and offline behaviour.

There is no network here: the download itself is monkeypatched, and the offline paths run for
real with HF_HUB_OFFLINE=1 (set by conftest) against temporary caches.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import errors

from sd_jax.convert.hub import HubDownloadError, download, select_files
from tiny import make_tiny_sd

# A v1.5-style repository listing: diffusers folders with .bin and .safetensors, fp16 and non_ema
# variants, a safety checker, and multi-GB CompVis single files at the root.
LISTING = [
    ".gitattributes", "README.md", "model_index.json", "v1-inference.yaml",
    "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/model.fp16.safetensors",
    "safety_checker/pytorch_model.bin", "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin", "unet/diffusion_pytorch_model.non_ema.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
]
SMALL = ["scheduler/scheduler_config.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
         "tokenizer/tokenizer_config.json", "tokenizer/vocab.json"]


def test_only_needed_files_safetensors_first():
    assert select_files(LISTING) == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json", "text_encoder/model.safetensors", *SMALL]


def test_variant_and_fallbacks():
    fp16 = select_files(LISTING, variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert "unet/diffusion_pytorch_model.safetensors" not in fp16
    bin_only = [f for f in LISTING if not f.startswith("vae/") or f.endswith((".json", ".bin"))]
    chosen = select_files(bin_only)
    assert "vae/diffusion_pytorch_model.bin" in chosen and "unet/diffusion_pytorch_model.bin" not in chosen
    no_fp16_vae = [f for f in LISTING if f != "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert "vae/diffusion_pytorch_model.fp16.bin" in select_files(no_fp16_vae, variant="fp16")  # as the reader


def test_sharded_weights_and_safety_checker():
    sharded = [f for f in LISTING if not f.startswith("unet/diffusion_pytorch_model")] + [
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors"]
    chosen = select_files(sharded)
    assert [f for f in chosen if f.startswith("unet/diffusion")] == [
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors"]
    with_checker = select_files(LISTING, safety_checker=True)
    assert {"safety_checker/config.json", "safety_checker/model.safetensors",
            "feature_extractor/preprocessor_config.json"} <= set(with_checker)
    assert not any(f.endswith(".ckpt") or f.endswith(".bin") for f in with_checker)


def test_single_file_repository_is_explained():
    with pytest.raises(HubDownloadError, match="v1-5-pruned.ckpt.*pass its path"):
        select_files(["README.md", "v1-5-pruned.ckpt", "v1-inference.yaml"], "org/ckpt-only")
    with pytest.raises(HubDownloadError, match="no weights for vae/"):
        select_files([f for f in LISTING if not f.startswith("vae/diffusion")], "org/broken")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def test_download_passes_options_and_loads(tiny_dir, monkeypatch):
    calls = {}

    def list_repo_files(self, repo_id, revision=None, **kwargs):
        calls["list"] = (repo_id, revision, self.token)
        return [str(p.relative_to(tiny_dir)) for p in tiny_dir.rglob("*") if p.is_file()] + ["big.ckpt"]

    def snapshot_download(repo_id, **kwargs):
        calls["snapshot"] = (repo_id, kwargs)
        return str(tiny_dir)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    from sd_jax import StableDiffusion

    pipe = StableDiffusion.from_pretrained("org/tiny", revision="v2", token="hf_x", cache_dir="/tmp/c")
    assert pipe.unet.config.block_out_channels == (32, 64)
    assert calls["list"] == ("org/tiny", "v2", "hf_x")
    repo, kwargs = calls["snapshot"]
    assert repo == "org/tiny" and kwargs["revision"] == "v2" and kwargs["token"] == "hf_x"
    assert kwargs["cache_dir"] == "/tmp/c" and "big.ckpt" not in kwargs["allow_patterns"]
    assert "unet/diffusion_pytorch_model.safetensors" in kwargs["allow_patterns"]


def _raising(exc):
    def fn(*args, **kwargs):
        raise exc
    return fn


def _hub_error(cls, message):
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


@pytest.mark.parametrize("cls,match", [
    (errors.RepositoryNotFoundError, "not found on the Hub .*token="),
    (errors.GatedRepoError, "gated.*token="),
    (errors.RevisionNotFoundError, "no revision 'nope'"),
])
def test_hub_answers_become_clear_errors(cls, match, monkeypatch):
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", _raising(_hub_error(cls, "404")))
    with pytest.raises(HubDownloadError, match=match):
        download("org/name", revision="nope")


def test_offline_gives_one_clear_message(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: no test may reach the network
    from sd_jax import StableDiffusion

    with pytest.raises(HubDownloadError) as err:
        StableDiffusion.from_pretrained("CompVis/stable-diffusion-v1-4", cache_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE=1" in msg and "not in the local Hugging Face cache" in msg
    assert "Pass a local path" in msg and "from_pretrained('DIR')" in msg


def test_no_network_falls_back_to_the_cache_or_explains(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    no_dns = ConnectionError("Name or service not known")
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", _raising(no_dns))
    with pytest.raises(HubDownloadError, match="cannot be reached \\(ConnectionError\\).*Pass a local path"):
        download("org/tiny", cache_dir=tmp_path)
    # a complete cached snapshot is used without the network
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_dir, snapshot)
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    assert download("org/tiny", cache_dir=tmp_path) == snapshot
    # an incomplete one is not
    (snapshot / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(HubDownloadError, match="not in the local Hugging Face cache"):
        download("org/tiny", cache_dir=tmp_path)


def test_cli_offline_hub_id(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "sd_jax.convert", "CompVis/stable-diffusion-v1-4", str(tmp_path / "o")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Pass a local path" in lines[0], proc.stderr

