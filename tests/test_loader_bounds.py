"""Weight files crafted to hang a load or grow it by gigabytes: each is refused quickly, in one line.

Cases from issue 11 (item 2). The full-size attacks run in a child process with a time and memory
limit, so a regression fails the test instead of hanging the suite or exhausting the machine.
"""
from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from sd_jax.convert import limits, torch_pickle
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


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _tuple(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def _tensor(key: str, numel: int, size: bytes, stride: bytes, storage: str = "FloatStorage") -> bytes:
    """Opcodes of torch's _rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())."""
    pid = b"(" + _str("storage") + b"ctorch\n" + storage.encode() + b"\n" + _str(key) + _str("cpu") + _int(numel) + b"tQ"
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
