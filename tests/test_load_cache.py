"""The converted-layout cache (sd_jax.convert.cache): warm loads equal cold ones, never stale, never partial."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from sd_jax import StableDiffusion
from sd_jax.convert import cache as converted_cache
from sd_jax.convert.safetensors_io import load_safetensors, save_safetensors

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def shape_cache(tmp_path_factory):
    """Parameter shapes traced once for the module (the suite switches sd_jax's disk caches off)."""
    folder = tmp_path_factory.mktemp("sd_jax_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SD_JAX_COMPILATION_CACHE", str(folder / "jax"))
        mp.setenv("SD_JAX_CACHE", "0")  # each test names its converted-layout cache
        mp.setattr(converted_cache, "RACY_SECONDS", 0.0)  # remember digests of files seconds old
        yield folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny diffusers folder of this module's own (tests here modify its files)."""
    from tiny import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("cache_sd"), seed=5)


def entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if converted_cache._is_entry(p))


def leaves(pipe) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(pipe.params)}


def assert_same_params(a, b) -> None:
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for key in la:
        assert la[key].dtype == lb[key].dtype and la[key].tobytes() == lb[key].tobytes(), key


def load(folder, cache, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", converted_cache.ConvertedCacheWarning)
        pipe = StableDiffusion.from_pretrained(folder, cache=cache, safety_checker=False, **kw)
        converted_cache.wait_for_writes()
        return pipe


def test_warm_load_is_bit_identical_and_maps_the_entry(model, tmp_path):
    cold = load(model, tmp_path)
    [entry] = entries(tmp_path)
    warm = load(model, tmp_path)
    assert_same_params(cold, warm)
    assert warm.unet.config == cold.unet.config and warm.scheduler_config == cold.scheduler_config
    # the warm arrays are the mapped file's pages (adopted by device_put on the CPU), not a conversion
    tensors, _ = load_safetensors(entry)
    assert len(tensors) == len(leaves(cold))
    kernel = warm.params["unet"]["conv_in"]["kernel"]
    assert kernel.shape[:2] == (3, 3)  # Flax HWIO, as the converter lays it out
    if jax.default_backend() == "cpu":
        assert kernel.unsafe_buffer_pointer() % converted_cache.ALIGN == 0
    assert_same_params(cold, load(model, False))  # and both equal a load without the cache


def test_cache_disabled_writes_nothing(model, tmp_path, monkeypatch):
    monkeypatch.setenv("SD_JAX_CACHE", str(tmp_path / "env"))
    load(model, False)
    monkeypatch.setenv("SD_JAX_CACHE", "0")
    load(model, None)
    assert not (tmp_path / "env").exists()
    monkeypatch.setenv("SD_JAX_CACHE", str(tmp_path / "env"))
    load(model, None)  # the environment variable names the folder when the argument does not
    assert len(entries(tmp_path / "env")) == 1


def test_dtype_is_part_of_the_key(model, tmp_path):
    load(model, tmp_path, dtype="float32")
    half = load(model, tmp_path, dtype="float32", param_dtype="bfloat16")
    assert len(entries(tmp_path)) == 2
    assert half.params["unet"]["conv_in"]["kernel"].dtype == jax.numpy.bfloat16
    assert_same_params(half, load(model, tmp_path, dtype="float32", param_dtype="bfloat16"))
    assert len(entries(tmp_path)) == 2


def test_modified_file_with_same_size_and_mtime_is_not_served_stale(model, tmp_path):
    """A weight changed in place, size kept and mtime put back: the ctime in the digest key notices."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    cold = load(folder, tmp_path / "cache")
    index = json.loads((tmp_path / "cache" / "digests.json").read_text())
    assert str(weights.resolve()) in index  # the digest was remembered, so the next check is by stat
    before = weights.stat()
    tensors, meta = load_safetensors(weights, copy=True)
    tensors["conv_in.bias"] = tensors["conv_in.bias"] + np.float32(1.0)
    save_safetensors(weights, tensors, meta)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    warm = load(folder, tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(warm.params["unet"]["conv_in"]["bias"]),
                                  np.asarray(cold.params["unet"]["conv_in"]["bias"]) + 1)
    assert len(entries(tmp_path / "cache")) == 2


def test_truncated_entry_is_rebuilt_with_a_warning(model, tmp_path):
    cold = load(model, tmp_path)
    [entry] = entries(tmp_path)
    size = entry.stat().st_size
    with open(entry, "r+b") as f:
        f.truncate(size - 100)
    with pytest.warns(converted_cache.ConvertedCacheWarning, match="unusable") as record:
        again = StableDiffusion.from_pretrained(model, cache=tmp_path, safety_checker=False)
        converted_cache.wait_for_writes()
    assert len(record) == 1 and len(str(record[0].message).splitlines()) == 1
    assert_same_params(cold, again)
    assert [p.stat().st_size for p in entries(tmp_path)] == [size]  # rebuilt whole


def test_corrupt_data_is_caught_by_the_checksum_when_verifying(model, tmp_path, monkeypatch):
    cold = load(model, tmp_path)
    [entry] = entries(tmp_path)
    with open(entry, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x7f" * 8)
    monkeypatch.setenv("SD_JAX_CACHE_VERIFY", "1")
    with pytest.warns(converted_cache.ConvertedCacheWarning, match="checksum"):
        again = StableDiffusion.from_pretrained(model, cache=tmp_path, safety_checker=False)
        converted_cache.wait_for_writes()
    assert_same_params(cold, again)


def test_an_entry_for_another_key_is_not_used(model, tmp_path):
    load(model, tmp_path, dtype="float32")
    [entry] = entries(tmp_path)
    other = converted_cache.entry_for(model, cache=tmp_path, variant=None, use_ema=True, config=None,
                                      dtype=np.dtype("float16"))
    assert other.key is not None  # the digests were remembered by the first load
    entry.rename(other.path)  # a float32 entry under the float16 key
    with pytest.warns(converted_cache.ConvertedCacheWarning, match="another key"):
        pipe = StableDiffusion.from_pretrained(model, dtype="float16", cache=tmp_path, safety_checker=False)
        converted_cache.wait_for_writes()
    assert pipe.params["unet"]["conv_in"]["kernel"].dtype == jax.numpy.float16


_WRITER = """
import sys, warnings
sys.path.insert(0, {tests!r})
warnings.simplefilter("error")
from sd_jax import StableDiffusion
StableDiffusion.from_pretrained({model!r}, cache={cache!r}, safety_checker=False)
"""


def test_two_concurrent_writers_leave_one_valid_entry(model, tmp_path):
    code = _WRITER.format(tests=str(ROOT / "tests"), model=str(model), cache=str(tmp_path))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    assert len(entries(tmp_path)) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert_same_params(load(model, False), load(model, tmp_path))


def test_write_failure_only_warns(model, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(converted_cache, "save_safetensors", disk_full)
    with pytest.warns(converted_cache.ConvertedCacheWarning, match="No space left"):
        pipe = StableDiffusion.from_pretrained(model, cache=tmp_path, safety_checker=False)
        converted_cache.wait_for_writes()
    assert entries(tmp_path) == []
    assert_same_params(pipe, load(model, False))


def test_trim_keeps_the_most_recent_within_the_cap(tmp_path):
    names = [f"{i:064x}.safetensors" for i in range(4)]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(b"x" * 1000)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    (tmp_path / "notes.txt").write_bytes(b"y" * 5000)  # not ours: never removed
    removed = converted_cache.trim(tmp_path, cap=2500, keep=tmp_path / names[0])
    assert sorted(p.name for p in removed) == names[1:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[0], names[3], "notes.txt"])


def test_aligned_safetensors_stay_standard(tmp_path):
    """The filler tensors keep an aligned file readable by the official library, every tensor 64-aligned."""
    from safetensors.numpy import load_file

    tensors = {"a": np.arange(3, dtype=np.float16), "b": np.arange(5, dtype=np.float32).reshape(5, 1),
               "c": np.ones((2, 3), np.int8)}
    save_safetensors(tmp_path / "x.safetensors", tensors, align=64)
    ours, _ = load_safetensors(tmp_path / "x.safetensors")
    assert ours.keys() == tensors.keys()
    for name, array in tensors.items():
        np.testing.assert_array_equal(ours[name], array)
        assert ours[name].ctypes.data % 64 == 0
    official = load_file(tmp_path / "x.safetensors")
    assert {k for k in official if not k.startswith("__padding_")} == set(tensors)


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_converted_source_pages_are_released_and_still_read_right(tmp_path):
    """The cold path's peak memory: a tensor's mapped source pages leave the process once copied."""
    from sd_jax.convert.safetensors_io import release_pages

    expected = np.arange(1 << 24, dtype=np.float32).reshape(4096, 4096)  # 64 MiB
    save_safetensors(tmp_path / "w.safetensors", {"w": expected})
    tensors, _ = load_safetensors(tmp_path / "w.safetensors")
    view = tensors["w"].T  # as the converter sees a linear weight
    before = _rss_file_kib()
    assert float(view[::64].sum()) > 0  # touch every page
    touched = _rss_file_kib()
    release_pages(view)
    released = _rss_file_kib()
    assert touched - before > 48 << 10 and touched - released > 48 << 10, (before, touched, released)
    np.testing.assert_array_equal(tensors["w"], expected)  # read back from the file
