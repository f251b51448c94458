"""Hostile and broken weight files: each gives a clear error and provably runs nothing.

Every code-execution payload would create a marker file in tmp_path if it ran; each test asserts
the marker is absent, and ``test_payloads_are_live`` shows the same payloads do create it under an
unrestricted ``pickle.loads``, so these tests cannot pass while code runs.
"""
from __future__ import annotations

import builtins
import collections
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from pickle_ops import pickle_int as _int
from pickle_ops import pickle_int_tuple as _tuple
from pickle_ops import pickle_str as _str

from sd_jax.convert.files import CheckpointFormatError, UnsafeCheckpointError, read_state_dict
from sd_jax.convert.safetensors_io import load_safetensors
from sd_jax.convert.torch_pickle import InertObject, load_torch_checkpoint

torch = pytest.importorskip("torch")


# --- building checkpoints by hand --------------------------------------------------------------


def _write_torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """Write a zip laid out exactly like torch.save's, around the given pickle and storages."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", "3\n")
    return path


def _tensor(key: str, numel: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
            storage: str = "FloatStorage") -> bytes:
    """Pickle opcodes for a tensor exactly as torch.save writes it (rebuild_tensor_v2 + persistent id)."""
    pid = (b"(" + _str("storage") + b"ctorch\n" + storage.encode() + b"\n" + _str(key) + _str("cpu")
           + _int(numel) + b"tQ")
    args = pid + _int(offset) + _tuple(size) + _tuple(stride) + b"\x89" + b"ccollections\nOrderedDict\n)R"
    return b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tR"


def _dict_pickle(entries: dict[str, bytes]) -> bytes:
    """A protocol-2 pickle of a dict whose values are already-encoded opcodes."""
    return b"\x80\x02}(" + b"".join(_str(k) + v for k, v in entries.items()) + b"u."


_FOUR_FLOATS = np.arange(4, dtype=np.float32).tobytes()


# --- payloads ------------------------------------------------------------------------------------


class _Reduce:
    """An object whose unpickling calls func(*args) (the classic pickle exploit)."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        """Remember the callable and its arguments."""
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """Ask pickle to call func(*args) at load time."""
        return self.func, self.args


def _system(marker: Path) -> _Reduce:
    """os.system('touch marker')."""
    return _Reduce(os.system, f"touch {marker}")


def _eval(marker: Path) -> _Reduce:
    """builtins.eval creating the marker."""
    return _Reduce(builtins.eval, f"open({str(marker)!r}, 'w').close()")


def _popen(marker: Path) -> _Reduce:
    """subprocess.Popen(['touch', marker])."""
    return _Reduce(subprocess.Popen, ["touch", str(marker)])


PAYLOADS = {"os.system": _system, "builtins.eval": _eval, "subprocess.Popen": _popen}
GLOBAL_NAMES = {"os.system": f"{os.system.__module__}.system", "builtins.eval": "builtins.eval",
                "subprocess.Popen": "subprocess.Popen"}


@pytest.mark.parametrize("kind", PAYLOADS)
def test_payloads_are_live(tmp_path: Path, kind: str) -> None:
    """Control: under an unrestricted unpickler each payload really creates its marker."""
    marker = tmp_path / "control"
    result = pickle.loads(pickle.dumps(PAYLOADS[kind](marker), protocol=2))
    if isinstance(result, subprocess.Popen):
        result.wait(timeout=30)
    assert marker.exists()


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("kind", PAYLOADS)
def test_top_level_payload_refused(tmp_path: Path, kind: str, strict: bool) -> None:
    """A payload as the whole pickle is refused in both modes, naming the file and the global."""
    marker = tmp_path / "pwned"
    path = _write_torch_zip(tmp_path / "evil.ckpt", pickle.dumps(PAYLOADS[kind](marker), protocol=2))
    with pytest.raises(UnsafeCheckpointError) as err:
        read_state_dict(path, strict=strict)
    assert GLOBAL_NAMES[kind] in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("strict", [True, False])
def test_payload_nested_in_state_dict_value(tmp_path: Path, strict: bool) -> None:
    """A payload hidden among real tensors (written by torch.save itself) is refused."""
    marker = tmp_path / "pwned"
    state = collections.OrderedDict(w=torch.ones(2), meta=[{"deep": _system(marker)}])
    path = tmp_path / "evil.bin"
    torch.save({"state_dict": state, "global_step": 1}, path)
    with pytest.raises(UnsafeCheckpointError, match=GLOBAL_NAMES["os.system"]):
        load_torch_checkpoint(path, strict=strict)
    assert not marker.exists()


def _hand_written_payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Raw-opcode exploits using GLOBAL, STACK_GLOBAL, INST, Python-2 names and gadget chains."""
    cmd = f"touch {marker}".encode()
    code = f"open({str(marker)!r}, 'w').close()".encode()
    return {
        "GLOBAL posix.system": (b"cposix\nsystem\n(X" + struct.pack("<I", len(cmd)) + cmd + b"tR.", "posix.system"),
        "STACK_GLOBAL exec": (b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93\x8c" + bytes([len(code)]) + code + b"\x85R.",
                              "builtins.exec"),
        "INST os.system": (b"(S'" + cmd + b"'\nios\nsystem\n.", "os.system"),
        "py2 __builtin__.eval": (b"c__builtin__\neval\n(S\"" + code + b"\"\ntR.", "builtins.eval"),
        "getattr(__import__)": (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'" + cmd
                                + b"'\ntR.", "builtins.getattr"),
        "numpy runstring gadget": (b"cnumpy.testing._private.utils\nrunstring\n(S\"" + code + b"\"\n}tR.",
                                   "numpy.testing._private.utils.runstring"),
        "importlib": (b"cimportlib\nimport_module\n(S'os'\ntR.", "importlib.import_module"),
        "torch.load": (b"ctorch\nload\n(S'x'\ntR.", "torch.load"),
        "extension opcode": (b"\x80\x02\x82\x01.", "EXT1"),
        "lookalike prefix": (b"cpytorch_lightning_evil\nrun\n(tR.", "pytorch_lightning_evil.run"),
        "payload as storage arg": (_dict_pickle({"w": b"ctorch._utils\n_rebuild_tensor_v2\n(cposix\nsystem\n(S'"
                                                     + cmd + b"'\ntRK\x00)))tR"}), "posix.system"),
    }


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("name", list(_hand_written_payloads(Path("m"))))
def test_hand_written_opcode_payloads_refused(tmp_path: Path, name: str, strict: bool) -> None:
    """Hand-assembled exploit pickles are refused at find_class, before anything runs."""
    marker = tmp_path / "pwned"
    data, forbidden = _hand_written_payloads(marker)[name]
    path = _write_torch_zip(tmp_path / "evil.ckpt", data)
    with pytest.raises(UnsafeCheckpointError, match=forbidden.replace(".", r"\.")) as err:
        load_torch_checkpoint(path, strict=strict)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_legacy_pickle_with_payload_is_not_unpickled(tmp_path: Path) -> None:
    """A bare pickle (legacy torch format) is refused with advice, and its payload never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.ckpt"
    path.write_bytes(pickle.dumps(_system(marker), protocol=2))
    with pytest.raises(CheckpointFormatError, match="re-save it with torch.save in the zip format"):
        read_state_dict(path)
    with pytest.raises(CheckpointFormatError, match="legacy"):
        load_torch_checkpoint(path)
    assert not marker.exists()


def test_real_legacy_torch_file_refused(tmp_path: Path) -> None:
    """torch.save(..., _use_new_zipfile_serialization=False) output gets the legacy-format message."""
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointFormatError, match=r"legacy .*convert to \.safetensors"):
        read_state_dict(path)


# --- storages that lie ---------------------------------------------------------------------------


def test_hand_built_checkpoint_control(tmp_path: Path) -> None:
    """Control: the hand-built layout used below loads correctly when it is honest."""
    data = _dict_pickle({"w": _tensor("0", 4, 1, (3,), (1,)), "t": _tensor("0", 4, 0, (2, 2), (1, 2))})
    out = read_state_dict(_write_torch_zip(tmp_path / "ok.bin", data, {"0": _FOUR_FLOATS}))
    np.testing.assert_array_equal(out["w"], [1, 2, 3])
    np.testing.assert_array_equal(out["t"], [[0, 2], [1, 3]])


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (_tensor("7", 4, 0, (4,), (1,)), r"storage '7' .*not in the archive"),
        (_tensor("0", 4, 3, (2,), (1,)), r"reaches element 4 but storage '0' holds only 4"),
        (_tensor("0", 4, 5, (1,), (1,)), r"reaches element 5"),
        (_tensor("0", 4, 0, (2, 2), (4, 1)), r"reaches element 5"),
        (_tensor("0", 100, 0, (100,), (1,)), r"holds 16 bytes but the pickle needs 100"),
        (_tensor("0", 4, 0, (2,), (1,), storage="ComplexFloatStorage"), r"torch\.ComplexFloatStorage"),
    ],
    ids=["missing-key", "offset-past-end", "offset-beyond", "stride-past-end", "numel-too-big", "unknown-storage"],
)
def test_lying_storage_references(tmp_path: Path, tensor: bytes, message: str) -> None:
    """Storage keys absent from the archive and offsets/strides past a storage are clear errors."""
    path = _write_torch_zip(tmp_path / "lie.bin", _dict_pickle({"w": tensor}), {"0": _FOUR_FLOATS})
    with pytest.raises((CheckpointFormatError, UnsafeCheckpointError), match=message) as err:
        read_state_dict(path)
    assert str(path) in str(err.value)


def test_storage_removed_from_real_archive(tmp_path: Path) -> None:
    """A torch.save archive with one storage file deleted names the missing key."""
    src, dst = tmp_path / "full.bin", tmp_path / "holed.bin"
    torch.save({"a": torch.ones(2), "b": torch.zeros(3)}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/data/1"):
                zout.writestr(info, zin.read(info))
    with pytest.raises(CheckpointFormatError, match=r"storage '1'.*not in the archive"):
        read_state_dict(dst)


@pytest.mark.parametrize("keep", [0.5, 0.95, 100])
def test_truncated_zip(tmp_path: Path, keep: float) -> None:
    """A torch checkpoint cut short is reported as truncated, naming the file."""
    path = tmp_path / "cut.ckpt"
    torch.save({"w": torch.ones(64)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep) if keep < 1 else int(keep)])
    with pytest.raises(CheckpointFormatError, match=r"cut\.ckpt: .*truncated"):
        read_state_dict(path)


def test_corrupted_storage_bytes_fail_crc(tmp_path: Path) -> None:
    """A storage whose bytes were altered after writing fails the zip CRC check."""
    path = tmp_path / "flipped.bin"
    torch.save({"w": torch.ones(16)}, path)
    raw = bytearray(path.read_bytes())
    at = raw.index(np.ones(16, np.float32).tobytes())
    raw[at + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointFormatError, match="corrupt"):
        read_state_dict(path)


# --- safetensors headers that lie ----------------------------------------------------------------


def _safetensors_bytes(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """Assemble a safetensors file from raw header bytes, optionally lying about the length."""
    return (len(header) if length is None else length).to_bytes(8, "little") + header + data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_safetensors_bytes(b"{}", length=10**6), "header length 1000000 is larger than the file"),
        (_safetensors_bytes(b"{}", length=2**63), "exceeds the"),
        (b"\x05\x00\x00", "too short"),
        (_safetensors_bytes(b'{"a": '), "not valid UTF-8 JSON"),
        (_safetensors_bytes(b"[1, 2]"), "must be a JSON object"),
        (_safetensors_bytes(b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', bytes(8)),
         "past the end of the data"),
        (_safetensors_bytes(b'{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}', bytes(16)),
         "needs 12"),
        (_safetensors_bytes(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
                            b'"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}', bytes(24)), "overlap"),
        (_safetensors_bytes(b'{"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', bytes(8)),
         "dtype 'C64' is not supported; valid: F64"),
        (_safetensors_bytes(b'{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}}'), "non-negative"),
        (_safetensors_bytes(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}', bytes(4)), "begin <= end"),
        (_safetensors_bytes(b'{"__metadata__":{"step":3}}'), "string -> string"),
        (_safetensors_bytes(b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                            b'"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', bytes(1)), "duplicate key"),
    ],
    ids=["length-past-file", "huge-length", "too-short", "bad-json", "not-object", "offsets-past-end",
         "size-mismatch", "overlap", "bad-dtype", "negative-shape", "reversed-offsets", "bad-metadata", "dup-key"],
)
def test_lying_safetensors_header(tmp_path: Path, content: bytes, message: str) -> None:
    """Every lie in a safetensors header is a CheckpointFormatError naming the file and the problem."""
    path = tmp_path / "lie.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=message) as err:
        read_state_dict(path)
    assert str(err.value).startswith(str(path))
    with pytest.raises(CheckpointFormatError, match=message):
        load_safetensors(path)


# --- files that are not weights ------------------------------------------------------------------

_PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(40)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.ckpt", b"", "empty"),
        ("empty.bin", b"", "empty"),
        ("empty.safetensors", b"", "empty"),
        ("image.ckpt", _PNG, "looks like a PNG image"),
        ("image.safetensors", b"\xff\xd8\xff\xe0" + bytes(40), "looks like a JPEG image"),
        ("pointer.bin", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 4\n", "Git LFS pointer"),
        ("page.ckpt", b"<!DOCTYPE html><html>403 Forbidden</html>", "HTML"),
        ("notes.pt", b"hello, these are not weights\n", "text file"),
        ("model.onnx", b"\x08\x07", r"unknown weight-file extension '\.onnx'; valid: \.safetensors, \.bin, \.ckpt"),
    ],
)
def test_not_a_weight_file(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    """Empty, renamed and unknown files give a CheckpointFormatError saying what they look like."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=message) as err:
        read_state_dict(path)
    assert str(path) in str(err.value)


def test_directory_is_refused(tmp_path: Path) -> None:
    """A directory named like a weight file is refused clearly."""
    path = tmp_path / "unet.bin"
    path.mkdir()
    with pytest.raises(CheckpointFormatError, match="is a directory"):
        read_state_dict(path)


def test_zip_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    """A zip without <name>/data.pkl is not mistaken for a checkpoint."""
    path = tmp_path / "other.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointFormatError, match=r"not a torch\.save checkpoint .*readme\.txt"):
        read_state_dict(path)


# --- Lightning checkpoints (strict=False) --------------------------------------------------------

_LIGHTNING_MODULES = ("pytorch_lightning", "pytorch_lightning.callbacks",
                      "pytorch_lightning.callbacks.model_checkpoint")


def _save_lightning_ckpt(path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """torch.save a CompVis-like dict holding a fake Lightning callback; remove the fake module after."""
    module = types.ModuleType(_LIGHTNING_MODULES[-1])

    class ModelCheckpoint:
        """Fake callback whose restore would create the marker if it were ever really run."""

        def __init__(self) -> None:
            """Give it some state, as the real callback has."""
            self.monitor, self.best_model_score, self.dirpath = None, np.float64(0.25), "/logs"

        def __setstate__(self, state: dict[str, Any]) -> None:
            """Side effect that proves execution if it happens."""
            marker.touch()

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in _LIGHTNING_MODULES:
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    state = collections.OrderedDict(
        [("model.diffusion_model.w", torch.arange(4.0)), ("first_stage_model.b", torch.ones(2, dtype=torch.float16))])
    torch.save({
        "state_dict": state, "global_step": 470000, "epoch": 6, "pytorch-lightning_version": "1.4.2",
        "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.5), "seen": {1, 2}, "blob": b"\x00\xff"}},
        "loops": [ModelCheckpoint()], "optimizer_states": [], "lr_schedulers": [],
    }, path)
    for name in _LIGHTNING_MODULES:
        monkeypatch.delitem(sys.modules, name)
    return state


def test_lightning_ckpt_loads_with_inert_placeholders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """strict=False loads a Lightning .ckpt: its state_dict comes out, Lightning is never imported."""
    marker = tmp_path / "pwned"
    path = tmp_path / "sd.ckpt"
    state = _save_lightning_ckpt(path, marker, monkeypatch)
    assert not any(m.startswith("pytorch_lightning") for m in sys.modules)

    out = read_state_dict(path, strict=False)
    raw = load_torch_checkpoint(path, strict=False)

    assert list(out) == list(state)
    for name, tensor in state.items():
        np.testing.assert_array_equal(out[name], tensor.numpy())
    assert raw["global_step"] == 470000 and raw["epoch"] == 6
    (callback_class, callback_state), = raw["callbacks"].items()
    assert issubclass(callback_class, InertObject)
    assert callback_class.inert_global == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert callback_state["seen"] == {1, 2} and callback_state["blob"] == b"\x00\xff"
    assert isinstance(callback_state["best_model_score"], InertObject)  # numpy scalar, not rebuilt
    instance = raw["loops"][0]
    assert isinstance(instance, InertObject) and instance.inert_state["dirpath"] == "/logs"
    assert not marker.exists()
    assert not any(m.startswith("pytorch_lightning") for m in sys.modules)


def test_lightning_ckpt_refused_when_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """strict=True (the .bin policy) refuses the Lightning global by name."""
    marker = tmp_path / "pwned"
    path = tmp_path / "sd.ckpt"
    _save_lightning_ckpt(path, marker, monkeypatch)
    expected = r"pytorch_lightning\.callbacks\.model_checkpoint\.ModelCheckpoint"
    with pytest.raises(UnsafeCheckpointError, match=expected) as err:
        read_state_dict(path, strict=True)
    assert "strict=False" in str(err.value)  # tells the user how to load a CompVis .ckpt
    assert not marker.exists()


def test_inert_placeholder_calls_stay_inert(tmp_path: Path) -> None:
    """REDUCE/BUILD/calls on placeholders (a gadget chain under an inert prefix) yield placeholders only."""
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}".encode()
    data = (b"\x80\x02cpytorch_lightning.utilities\nrun_anything\n(S'" + cmd + b"'\ntR(S'again'\ntR"
            + b"}(S'x'\nK\x01ub.")
    path = _write_torch_zip(tmp_path / "inert.ckpt", data)
    result = load_torch_checkpoint(path, strict=False)
    assert isinstance(result, InertObject) and result.inert_state == {"x": 1}
    assert result.inert_global == "pytorch_lightning.utilities.run_anything"
    assert not marker.exists()


_BUILD_TARGETS = {
    "torch dtype": b"ctorch\nfloat32\n",
    "storage type": b"ctorch\nFloatStorage\n",
    "rebuild function": b"ctorch._utils\n_rebuild_tensor_v2\n",
    "OrderedDict class": b"ccollections\nOrderedDict\n",
    "codecs stand-in": b"c_codecs\nencode\n",
    "rebuilt tensor": _tensor("0", 4, 0, (4,), (1,)),
}
_BUILD_STATES = {
    "dict": b"}(S'x'\nK\x01u",
    "slots": b"(N}(S'__defaults__'\n(K\x01tut",
    "ndarray": b"(K\x01(K\x02tS'f4'\n\x89C\x08" + bytes(8) + b"t",
}


@pytest.mark.parametrize("state", list(_BUILD_STATES))
@pytest.mark.parametrize("target", list(_BUILD_TARGETS))
def test_build_on_allowlisted_objects_is_refused(tmp_path: Path, target: str, state: str) -> None:
    """BUILD (setstate / __dict__ update) aimed at any object the loader hands out fails cleanly."""
    data = b"\x80\x02" + _BUILD_TARGETS[target] + _BUILD_STATES[state] + b"b."
    path = _write_torch_zip(tmp_path / "build.ckpt", data, {"0": _FOUR_FLOATS})
    with pytest.raises(CheckpointFormatError, match="malformed checkpoint pickle") as err:
        load_torch_checkpoint(path, strict=False)
    assert str(path) in str(err.value)
    assert np.dtype(np.float32).itemsize == 4
    honest = _write_torch_zip(tmp_path / "ok.ckpt", _dict_pickle({"w": _tensor("0", 4, 1, (3,), (1,))}),
                              {"0": _FOUR_FLOATS})
    np.testing.assert_array_equal(read_state_dict(honest, strict=False)["w"], [1, 2, 3])
