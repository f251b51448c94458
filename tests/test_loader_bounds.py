"""Weight files crafted to hang a load or grow it by gigabytes: each is refused quickly, in one line.

Cases from issue 11 (item 2). The full-size attacks run in a child process with a time and memory
limit, so a regression fails the test instead of hanging the suite or exhausting the machine.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pickle_ops import pickle_int as _int
from pickle_ops import pickle_int_tuple as _tuple
from pickle_ops import pickle_str as _str

from sd_jax.convert import limits
from sd_jax.convert.files import CheckpointFormatError, read_state_dict
from sd_jax.convert.limits import short

# --- hand-built checkpoints -----------------------------------------------------------------------


def _zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None,
         compress: dict[str, int] | None = None) -> Path:
    """A zip laid out like torch.save's; ``compress`` maps a member suffix to a zip compression method."""
    compress = compress or {}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        members = {"archive/data.pkl": data_pkl, "archive/byteorder": b"little"}
        members |= {f"archive/data/{k}": v for k, v in (storages or {}).items()}
        for name, raw in members.items():
            method = next((m for suffix, m in compress.items() if name.endswith(suffix)), zipfile.ZIP_STORED)
            zf.writestr(name, raw, compress_type=method)
    return path


def _tensor(key: str, numel: int, size: bytes, stride: bytes, storage: str = "FloatStorage") -> bytes:
    """Opcodes of torch's _rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())."""
    pid = (b"(" + _str("storage") + b"ctorch\n" + storage.encode() + b"\n" + _str(key) + _str("cpu") + _int(numel)
           + b"tQ")
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + _int(0) + size + stride + b"\x89"
            + b"ccollections\nOrderedDict\n)R" + b"tR")


def _shared_tuple(levels: int) -> bytes:
    """A tuple nested ``levels`` deep whose two halves are the same object: 2**levels paths in 7 bytes a level."""
    return b")q\x01" + b"0h\x01h\x01\x86q\x01" * levels  # POP, GET, GET, TUPLE2, PUT


def _dict(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A protocol-2 pickle of a dict from already-encoded (key, value) opcodes."""
    return b"\x80\x02}(" + b"".join(k + v for k, v in entries) + b"u."


# --- running a load in a bounded child -------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
    from sd_jax.convert.files import read_state_dict
    for path in sys.argv[1:]:
        start = time.perf_counter()
        try:
            read_state_dict(path)
            outcome = {{"error": None}}
        except BaseException as err:
            text = str(err)
            outcome = {{"error": type(err).__name__, "length": len(text), "message": text[:300]}}
        outcome["seconds"] = time.perf_counter() - start
        print(json.dumps({{"path": path, **outcome}}), flush=True)
""")


def _load_in_child(paths: list[Path], timeout: float = 60, mem_gib: float = 3) -> dict[str, dict]:
    """Load each file in one child process limited in time and address space; {file name: outcome}."""
    code = _CHILD.format(mem=int(mem_gib * (1 << 30)))
    try:
        done = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True,
                              timeout=timeout, cwd=paths[0].parent)  # sd_jax from this process's sys.path
        out = done.stdout
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    results = {}
    for line in out.splitlines():
        record = json.loads(line)
        results[Path(record["path"]).name] = record
    return results


def _hostile_files(folder: Path) -> list[Path]:
    """Write the full-size attacks of issue 11 into folder."""
    files = {
        # a dict key of 40-deep shared tuples (240 bytes): hashing it walks 2**40 paths
        "hash_bomb.bin": _dict([(_shared_tuple(40), b"K\x01")]),
        # a 22-deep shared tuple as a key: its str() for the skipped list is ~30 MB
        "str_bomb.bin": _dict([(_shared_tuple(22), b"K\x01")]),
        # a 30-deep shared tuple as a tensor size: the old error message printed 2**30 tuples
        "size_bomb.bin": _dict([(_str("w"), _tensor("0", 1, _shared_tuple(30), _tuple((1,))))]),
        # six stride-0 tensors over one double: 6 x 512 MiB from a 2.8 KB file
        "broadcast.bin": _dict([(_str(f"w{i}"), _tensor("0", 1, _tuple((1 << 26,)), _tuple((0,)), "DoubleStorage"))
                                for i in range(6)]),
    }
    paths = [_zip(folder / name, data, {"0": np.zeros(1, np.float64).tobytes()}) for name, data in files.items()]
    # a storage inflating 1000-fold, from 256 KB to 256 MiB (a 2 GiB one is refused the same way)
    inflate = folder / "inflate.bin"
    info = zipfile.ZipInfo("archive/data/0")
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(inflate, "w") as zf:
        zf.writestr("archive/data.pkl", _dict([(_str("w"), _tensor("0", 1 << 26, _tuple((1 << 26,)), _tuple((1,))))]))
        zf.writestr("archive/byteorder", b"little")
        with zf.open(info, "w") as member:
            chunk = bytes(64 << 20)
            for _ in range(4):
                member.write(chunk)
    # a compressed data.pkl of 64 MiB of NONE opcodes (the old reader spent minutes on it)
    nones = folder / "nones.bin"
    info = zipfile.ZipInfo("archive/data.pkl")
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(nones, "w") as zf:
        zf.writestr(info, b"\x80\x02" + b"N" * (64 << 20) + b".")
        zf.writestr("archive/byteorder", b"little")
    return [*paths, inflate, nones]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, dict]:
    """The full-size attacks, loaded once in a bounded child."""
    return _load_in_child(_hostile_files(tmp_path_factory.mktemp("hostile")))


@pytest.mark.parametrize("name", ["hash_bomb.bin", "str_bomb.bin", "size_bomb.bin", "broadcast.bin",
                                  "inflate.bin", "nones.bin"])
def test_hostile_file_is_refused_quickly(hostile: dict[str, dict], name: str) -> None:
    """Each attack ends in one short CheckpointFormatError within seconds, within 3 GiB of address space."""
    assert name in hostile, f"{name}: the load did not finish (it hung or was killed)"
    outcome = hostile[name]
    assert outcome["error"] == "CheckpointFormatError", outcome
    assert outcome["length"] < 600 and "\n" not in outcome["message"], outcome
    assert outcome["seconds"] < 10, outcome
    expected = {"broadcast.bin": "expands far beyond", "inflate.bin": "zip bomb", "nones.bin": "zip bomb"}
    assert expected.get(name, "unfolded") in outcome["message"], outcome


# --- in-process cases (fast on the old code too, so no child is needed) ----------------------------


def test_short_is_bounded_for_any_value() -> None:
    """Shared, cyclic, deep, huge and opaque values print in at most 80 characters, at once."""
    shared: tuple = ()
    for _ in range(200):
        shared = (shared, shared)
    cyclic: list = []
    cyclic.append(cyclic)
    deep: list = []
    for _ in range(10_000):
        deep = [deep]

    class Loud:
        def __repr__(self) -> str:
            raise AssertionError("repr of an unknown object must never run")

    start = time.perf_counter()
    for value in (shared, cyclic, deep, 7 ** 100_000, "x" * 10_000_000, b"\x00" * 10_000_000, Loud(),
                  {i: str(i) for i in range(100_000)}, np.zeros((1000, 1000)), (1,)):
        text = short(value)
        assert len(text) <= limits.ECHO_CHARS, text
    assert time.perf_counter() - start < 1
    assert short((1,)) == "(1,)" and short({"a": [1, None]}) == "{'a': [1, None]}"


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    """1000 nested lists as a value (no sharing): refused by depth, naming the limit."""
    data = _dict([(_str("deep"), b"]" + b"(]" * 1000 + b"e" * 1000)])
    path = _zip(tmp_path / "deep.bin", data)
    with pytest.raises(CheckpointFormatError, match=rf"nests objects 100\d deep; the limit is {limits.MAX_NESTING}"):
        read_state_dict(path)


def test_long_tensor_size_is_echoed_short(tmp_path: Path) -> None:
    """A 100k-entry size with one bad entry: the error shows a short prefix (it printed all 100k before)."""
    size = b"(" + _int(1) * 100_000 + _int(-1) + b"t"
    path = _zip(tmp_path / "size.bin", _dict([(_str("w"), _tensor("0", 1, size, _tuple((1,))))]),
                {"0": bytes(4)})
    with pytest.raises(CheckpointFormatError, match="tensor size must be a tuple of non-negative ints") as err:
        read_state_dict(path)
    assert len(str(err.value)) < 300


def _patch_member(path: Path, member: str, flag: int | None = None, method: int | None = None) -> None:
    """Set a member's general-purpose flag or compression method in its local and central headers."""
    raw = bytearray(path.read_bytes())
    name = member.encode()
    for signature, flag_at, method_at, name_at in ((b"PK\x03\x04", 6, 8, 30), (b"PK\x01\x02", 8, 10, 46)):
        at = raw.find(signature)
        while at >= 0:
            if raw[at + name_at:at + name_at + len(name)] == name:
                if flag is not None:
                    raw[at + flag_at:at + flag_at + 2] = struct.pack("<H", flag)
                if method is not None:
                    raw[at + method_at:at + method_at + 2] = struct.pack("<H", method)
            at = raw.find(signature, at + 4)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(("member", "flag", "method", "message"), [
    ("archive/data.pkl", 0x1, None, r"archive member 'archive/data.pkl' is encrypted"),
    ("archive/data/0", 0x1, None, r"archive member 'archive/data/0' is encrypted"),
    ("archive/data.pkl", None, 99, r"uses zip compression method 99, which sd_jax does not read"),
    ("archive/data/0", None, 99, r"uses zip compression method 99"),
], ids=["encrypted-pickle", "encrypted-storage", "method-pickle", "method-storage"])
def test_zip_flags_are_one_line_errors(tmp_path: Path, member: str, flag, method, message: str) -> None:
    """Encryption (a RuntimeError before) and unknown compression (NotImplementedError) name the file."""
    path = _zip(tmp_path / "flags.bin", _dict([(_str("w"), _tensor("0", 1, _tuple((1,)), _tuple((1,))))]),
                {"0": bytes(4)})
    _patch_member(path, member, flag, method)
    with pytest.raises(CheckpointFormatError, match=message) as err:
        read_state_dict(path)
    assert str(path) in str(err.value)


def test_opcode_count_is_limited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_PICKLE_OPCODES", 10_000)
    path = _zip(tmp_path / "nones.bin", b"\x80\x02" + b"N" * 20_000 + b".")
    with pytest.raises(CheckpointFormatError, match="more than 10000 opcodes"):
        read_state_dict(path)


def test_pickle_size_is_limited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_PICKLE_BYTES", 1000)
    path = _zip(tmp_path / "big.bin", _dict([(_str("note"), _str("x" * 2000))]))
    with pytest.raises(CheckpointFormatError, match=r"data.pkl' is \d+ bytes, over the 1000-byte limit"):
        read_state_dict(path)


def test_materialised_bytes_are_limited_in_total(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six stride-0 tensors, each small, together past the budget: refused (the old limit was per tensor)."""
    monkeypatch.setattr(limits, "MATERIALISED_ALLOWANCE", 1 << 20)
    data = _dict([(_str(f"w{i}"), _tensor("0", 1, _tuple((1 << 17,)), _tuple((0,)))) for i in range(6)])
    path = _zip(tmp_path / "broadcast.bin", data, {"0": bytes(4)})
    with pytest.raises(CheckpointFormatError, match="expands far beyond its size"):
        read_state_dict(path)
    one = _dict([(_str("w0"), _tensor("0", 1, _tuple((1 << 17,)), _tuple((0,))))])
    path = _zip(tmp_path / "one.bin", one, {"0": bytes(4)})  # control: one such tensor is within the budget
    assert read_state_dict(path)["w0"].shape == (1 << 17,)


def test_compressed_storage_within_ratio_but_past_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A storage compressed ~4x (under the ratio limit) whose inflated size passes the budget is refused."""
    monkeypatch.setattr(limits, "MATERIALISED_ALLOWANCE", 1 << 20)
    raw = np.random.default_rng(0).integers(0, 4, 8 << 20, dtype=np.uint8).tobytes()
    data = _dict([(_str("w"), _tensor("0", len(raw), _tuple((len(raw),)), _tuple((1,)), "ByteStorage"))])
    path = _zip(tmp_path / "packed.bin", data, {"0": raw}, compress={"/data/0": zipfile.ZIP_DEFLATED})
    assert path.stat().st_size < len(raw) // 3
    with pytest.raises(CheckpointFormatError, match="expands far beyond its size"):
        read_state_dict(path)


def test_compressed_storage_control_loads(tmp_path: Path) -> None:
    """An honest deflated storage (ratio ~1) still loads, bit for bit."""
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    data = _dict([(_str("w"), _tensor("0", 1000, _tuple((1000,)), _tuple((1,))))])
    path = _zip(tmp_path / "deflated.bin", data, {"0": values.tobytes()}, compress={"/data/0": zipfile.ZIP_DEFLATED})
    np.testing.assert_array_equal(read_state_dict(path)["w"], values)


def test_deep_safetensors_header_is_refused(tmp_path: Path) -> None:
    """A 5000-deep JSON header (a RecursionError before) is one line naming the file."""
    header = ('{"__metadata__": ' + "[" * 5000 + "]" * 5000 + "}").encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointFormatError, match=r"deep\.safetensors: safetensors header: JSON nested 5001 deep"):
        read_state_dict(path)


def test_short_path_keeps_the_file_name_of_a_long_path():
    from sd_jax.limits import ECHO_CHARS, short_path

    long = "/tmp/" + "d" * 300 + "/style-lora.safetensors"
    text = short_path(long)
    assert len(text) <= ECHO_CHARS + 2 and text.endswith("style-lora.safetensors'") and text.startswith("'...")
    assert short_path("a.pt") == "'a.pt'"
