"""Round trips through the torch-free weight-file readers and the safetensors writer (tiny tensors)."""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from sd_jax.convert.files import (
    CheckpointFormatError,
    detect_format,
    read_state_dict,
    read_weight_file,
    save_safetensors,
)
from sd_jax.convert.safetensors_io import load_safetensors
from sd_jax.convert.torch_pickle import extract_state_dict, load_torch_checkpoint

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _to_numpy(t: "torch.Tensor") -> np.ndarray:
    """Convert a torch tensor to numpy, bfloat16 included (as ml_dtypes.bfloat16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _assert_same(ours: dict[str, np.ndarray], reference: dict[str, "torch.Tensor"]) -> None:
    """Assert two state dicts hold the same names, shapes, dtypes and values."""
    assert list(ours) == list(reference)
    for name, tensor in reference.items():
        expected = _to_numpy(tensor.detach().contiguous())
        assert ours[name].dtype == expected.dtype, name
        assert ours[name].shape == expected.shape, name
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)


def _all_dtypes() -> dict[str, "torch.Tensor"]:
    """A small tensor of every dtype sd_jax reads."""
    base = torch.arange(-3, 3, dtype=torch.float64).reshape(2, 3) / 4
    return {
        "f32": base.float(), "f16": base.half(), "bf16": base.bfloat16(), "f64": base.clone(),
        "i64": torch.arange(5), "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(-2, 2, dtype=torch.int16), "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(4, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
    }


# --- torch.save files ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_torch_save_all_dtypes_round_trip(tmp_path: Path, suffix: str) -> None:
    """Every dtype torch.save writes comes back equal, with bfloat16 as ml_dtypes.bfloat16."""
    tensors = _all_dtypes()
    path = tmp_path / f"weights{suffix}"
    torch.save(tensors, path)
    assert detect_format(path) == "torch"
    _assert_same(read_state_dict(path), tensors)


def test_non_contiguous_views_and_shared_storage(tmp_path: Path) -> None:
    """Views (transposed, sliced, offset, broadcast) of one storage come back as their values."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "base": base, "transposed": base.t(), "strided": base[1:3, ::2], "row": base[2],
        "tail": base.view(-1)[20:], "broadcast": base[:, 1:2].expand(4, 3), "param": torch.nn.Parameter(base[0]),
    }
    path = tmp_path / "views.bin"
    torch.save(tensors, path)
    with zipfile.ZipFile(path) as zf:
        assert sum("/data/" in n and not n.endswith("serialization_id") for n in zf.namelist()) == 1
    out = read_state_dict(path)
    _assert_same(out, tensors)
    assert np.shares_memory(out["base"], out["row"])  # one storage, read once, shared like torch


def test_ordered_dict_state_dict_keeps_order(tmp_path: Path) -> None:
    """A real module state_dict (an OrderedDict with _metadata) loads with its key order."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.GroupNorm(1, 3), torch.nn.Linear(3, 2))
    state = model.state_dict()
    path = tmp_path / "model.bin"
    torch.save(state, path)
    loaded = load_torch_checkpoint(path)
    assert isinstance(loaded, collections.OrderedDict)
    _assert_same(read_state_dict(path), state)


def test_lightning_like_dict(tmp_path: Path) -> None:
    """A CompVis-style dict yields its state_dict; other top-level entries stay in the raw load."""
    state = collections.OrderedDict(
        [("model.diffusion_model.w", torch.ones(2, 2)), ("model_ema.decay", torch.tensor(0.9999))])
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, path)
    raw = load_torch_checkpoint(path, strict=False)
    assert raw["global_step"] == 470000 and raw["epoch"] == 6
    _assert_same(read_state_dict(path, strict=False), state)


def test_extract_state_dict_records_skipped_entries() -> None:
    """Non-tensor entries are skipped and named, not silently dropped."""
    tensors, skipped = extract_state_dict({"w": np.ones(2), "note": "hi", "step": 3, "nested": {"a": np.ones(1)}})
    assert list(tensors) == ["w"]
    assert skipped == ["note", "step", "nested"]


def test_read_weight_file_reports_skipped(tmp_path: Path) -> None:
    """read_weight_file returns the tensors plus the names of entries that were not tensors."""
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.ones(1), "version": 2}, path)
    result = read_weight_file(path)
    assert result.format == "torch" and list(result.tensors) == ["w"] and result.skipped == ("version",)


def test_big_endian_archive_is_byteswapped(tmp_path: Path) -> None:
    """An archive recorded as big-endian has its storages swapped to native order."""
    src, dst = tmp_path / "little.bin", tmp_path / "big.bin"
    torch.save({"w": torch.tensor([1.5, -2.0, 3.25])}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif info.filename.endswith("/data/0"):
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            zout.writestr(info, data)
    np.testing.assert_array_equal(read_state_dict(dst)["w"], np.array([1.5, -2.0, 3.25], np.float32))


def test_loading_never_imports_torch(tmp_path: Path) -> None:
    """Reading a torch checkpoint in a fresh interpreter leaves torch unimported."""
    path = tmp_path / "w.bin"
    torch.save({"w": torch.ones(3)}, path)
    code = (
        "import sys; from sd_jax.convert.files import read_state_dict; "
        f"sd = read_state_dict({str(path)!r}); assert sd['w'].sum() == 3; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- safetensors -----------------------------------------------------------------------------


def test_official_safetensors_round_trip(tmp_path: Path) -> None:
    """Files from safetensors.torch.save_file (bf16 included) read back equal, with metadata."""
    tensors = _all_dtypes()
    path = tmp_path / "official.safetensors"
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt", "note": "tiny"})
    ours, metadata = load_safetensors(path)
    assert metadata == {"format": "pt", "note": "tiny"}
    _assert_same({k: ours[k] for k in tensors}, tensors)
    assert not ours["f32"].flags.writeable  # read-only views into the mapped file
    copied, _ = load_safetensors(path, copy=True)
    assert copied["f32"].flags.writeable


def test_official_numpy_safetensors_read(tmp_path: Path) -> None:
    """Files from safetensors.numpy.save_file read back equal through read_state_dict."""
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64)}
    path = tmp_path / "np.safetensors"
    safetensors_numpy.save_file(tensors, path)
    out = read_state_dict(path)
    assert set(out) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(out[name], value)


def test_our_writer_loads_in_official_library(tmp_path: Path) -> None:
    """save_safetensors output (bf16, fp16, non-contiguous, big-endian input) loads in safetensors.torch."""
    arrays = {name: _to_numpy(t) for name, t in _all_dtypes().items()}
    arrays["transposed"] = np.arange(6, dtype=np.float32).reshape(2, 3).T
    arrays["big_endian"] = np.array([1.0, 2.0], dtype=">f4")
    path = tmp_path / "ours.safetensors"
    save_safetensors(path, arrays, metadata={"format": "pt"})
    loaded = safetensors_torch.load_file(path)
    assert set(loaded) == set(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(_to_numpy(loaded[name]), value, err_msg=name)
    assert loaded["bf16"].dtype == torch.bfloat16 and loaded["f16"].dtype == torch.float16
    with safetensors_torch.safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    ours, _ = load_safetensors(path)
    for name, value in arrays.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
        assert ours[name].flags.aligned, name  # larger itemsizes are written first


def test_our_writer_loads_in_official_numpy_api(tmp_path: Path) -> None:
    """Non-bf16 output of save_safetensors also loads with safetensors.numpy."""
    arrays = {"x": np.arange(4, dtype=np.float16), "y": np.array([[True, False]])}
    path = tmp_path / "np.safetensors"
    save_safetensors(path, arrays)
    loaded = safetensors_numpy.load_file(path)
    for name, value in arrays.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_writer_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    """A failed write leaves the previous file intact; successful writes leave no temp files."""
    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"a": np.ones(2, np.float32)})
    with pytest.raises(ValueError, match="complex64"):
        save_safetensors(path, {"a": np.ones(2, np.complex64)})
    np.testing.assert_array_equal(read_state_dict(path)["a"], np.ones(2, np.float32))
    save_safetensors(path, {"b": np.zeros(3, np.float32)})
    assert list(read_state_dict(path)) == ["b"]
    assert os.listdir(tmp_path) == ["w.safetensors"]


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        ({"__metadata__": np.ones(1)}, None, "__metadata__"),
        ({"a": [1.0, 2.0]}, None, "expected a numpy array"),
        ({"a": np.ones(1)}, {"step": 3}, "str to str"),
    ],
)
def test_writer_rejects_bad_input(tmp_path: Path, tensors: dict, metadata: dict | None, message: str) -> None:
    """Writer validation errors name the bad value."""
    with pytest.raises(ValueError, match=message):
        save_safetensors(tmp_path / "x.safetensors", tensors, metadata)


def test_dispatch_is_by_content(tmp_path: Path) -> None:
    """A safetensors file named .bin is read as safetensors; a torch zip named .ckpt as torch."""
    path = tmp_path / "really_safetensors.bin"
    save_safetensors(path, {"a": np.arange(3, dtype=np.int32)})
    assert detect_format(path) == "safetensors"
    np.testing.assert_array_equal(read_state_dict(path)["a"], np.arange(3))


def test_missing_file_is_format_error(tmp_path: Path) -> None:
    """A missing path is a CheckpointFormatError naming it."""
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointFormatError, match="nope.safetensors: no such file"):
        read_state_dict(path)


# --- memory --------------------------------------------------------------------------------------


def test_torch_reader_copies_each_storage_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Peak memory for reading a storage is the array itself plus one small read chunk."""
    import tracemalloc

    from sd_jax.convert import torch_pickle

    monkeypatch.setattr(torch_pickle, "_READ_CHUNK_BYTES", 64 << 10)
    path = tmp_path / "one_mb.bin"
    torch.save({"w": torch.ones(256, 1024)}, path)  # 1 MiB storage
    tracemalloc.start()
    try:
        out = read_state_dict(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out["w"].nbytes == 1 << 20
    assert peak < (1 << 20) + (256 << 10), f"peak {peak} bytes for a 1 MiB storage"


def test_safetensors_reader_maps_instead_of_reading(tmp_path: Path) -> None:
    """Reading a safetensors file allocates almost nothing: arrays are views into the mapping."""
    import tracemalloc

    path = tmp_path / "one_mb.safetensors"
    save_safetensors(path, {"w": np.ones((256, 1024), np.float32)})
    tracemalloc.start()
    try:
        out, _ = load_safetensors(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out["w"].sum() == 256 * 1024
    assert peak < 64 << 10, f"peak {peak} bytes"
