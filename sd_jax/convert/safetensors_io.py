"""Read and write the safetensors format with numpy and ml_dtypes only (bfloat16 included).

File layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data
buffer. The JSON maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
(offsets relative to the data buffer) and may hold "__metadata__": {str: str}.

The reader memory-maps the file and returns read-only numpy views into the mapping (no copy,
so a 4 GB file costs no RAM until touched). The mapping stays open for as long as any returned
array is alive; pass ``copy=True`` to get ordinary in-memory arrays instead, or ``private=True``
for writable copy-on-write views (a write changes this process's page, never the file). Every
claim the header makes is checked against the file before a view is made, so a lying header is a
``CheckpointFormatError`` and never an out-of-bounds read.

The writer can align every tensor's data to ``align`` bytes (64: ``jax.device_put`` on the CPU
adopts such a memory-mapped array instead of copying it). The gaps are filled with ``uint8``
tensors named ``__padding_<n>__``, so the file stays standard safetensors (the official reader,
which refuses holes in the data buffer, loads it) and readers drop those names.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import uuid
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from sd_jax.convert.limits import InputLimitError, load_json, short, short_error

# The official library refuses headers above 100 MB; so do we (a hostile length field could
# otherwise ask us to read gigabytes of "JSON").
MAX_HEADER_BYTES = 100_000_000

DTYPES: Mapping[str, np.dtype] = MappingProxyType({
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
})


class CheckpointFormatError(ValueError):
    """A weight file is missing, malformed, truncated or not the format it claims to be."""


def _fail(path: str | os.PathLike, problem: str) -> CheckpointFormatError:
    """Build a CheckpointFormatError that names the file and what is wrong with it."""
    return CheckpointFormatError(f"{os.fspath(path)}: {problem}")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: refuse an object that names the same key twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {short(key)}")
        out[key] = value
    return out


def _parse_header(path: str | os.PathLike, raw: bytes) -> dict[str, Any]:
    """Decode the JSON header bytes into a dict, with clear errors for bad JSON."""
    try:
        header = load_json(raw, "safetensors header", max_bytes=MAX_HEADER_BYTES,
                           object_pairs_hook=_reject_duplicate_keys)
    except InputLimitError as e:
        raise _fail(path, str(e)) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"safetensors header is not valid UTF-8 JSON ({short_error(e)})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"safetensors header must be a JSON object, got {type(header).__name__}")
    return header


def _check_metadata(path: str | os.PathLike, metadata: Any) -> dict[str, str]:
    """Validate the optional __metadata__ entry: a flat {str: str} mapping."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "safetensors __metadata__ must be a JSON object of string -> string")
    return dict(metadata)


def _is_int(value: Any) -> bool:
    """True for a JSON integer (bool excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(
    path: str | os.PathLike, name: str, entry: Any, data_size: int
) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """Validate one tensor entry of the header; return (dtype, shape, begin, end)."""
    where = f"tensor {short(name)}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, f"{where}: header entry must have exactly dtype, shape, data_offsets; got {short(entry)}")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype_name not in DTYPES:
        raise _fail(path, f"{where}: dtype {short(dtype_name)} is not supported; valid: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(path, f"{where}: shape must be a list of non-negative integers, got {short(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _fail(path, f"{where}: data_offsets must be [begin, end] integers, got {short(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _fail(path, f"{where}: data_offsets {short(offsets)} must satisfy 0 <= begin <= end")
    if end > data_size:
        raise _fail(
            path, f"{where}: data_offsets end {short(end)} is past the end of the data ({data_size} bytes); "
            "the file is truncated or its header lies")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise _fail(
            path, f"{where}: data_offsets span {end - begin} bytes but shape {short(shape)} of {dtype_name} "
            f"needs {short(expected)}")
    return dtype, tuple(shape), begin, end


def _check_no_overlap(path: str | os.PathLike, spans: list[tuple[int, int, str]]) -> None:
    """Refuse two non-empty tensors whose byte ranges overlap."""
    previous_end, previous_name = 0, ""
    for begin, end, name in sorted(spans):
        if begin == end:
            continue
        if begin < previous_end:
            raise _fail(path, f"tensors {short(previous_name)} and {short(name)} overlap in the data buffer")
        previous_end, previous_name = end, name


def _read_prefix(path: str | os.PathLike, file_size: int) -> tuple[int, bytes]:
    """Read and check the header length field and header bytes; return (N, header bytes)."""
    if file_size < 8:
        raise _fail(path, f"file is {file_size} bytes, too short for a safetensors header (needs 8+)")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > MAX_HEADER_BYTES:
            raise _fail(path, f"safetensors header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + header_len > file_size:
            raise _fail(
                path, f"safetensors header length {header_len} is larger than the file allows "
                f"({file_size - 8} bytes after the length field); the file is truncated or not safetensors")
        return header_len, f.read(header_len)


class _FileMap(mmap.mmap):
    """A read-only shared mapping of a whole weight file; its pages can be dropped and re-read at will."""

    def __init__(self, *args: Any, **kwargs: Any):
        probe = np.frombuffer(self, np.uint8)
        self.address = probe.ctypes.data
        del probe


def release_pages(array: np.ndarray) -> None:
    """Drop the whole pages under ``array`` from this process's memory, if it views a file this module mapped.

    A converter calls this once it has copied a tensor, so a load holds the converted weights and
    not, besides them, every page of the source file it touched (peak memory 1x, not 2x). It is
    safe at any time: the mapping is read-only and shared, so a page touched again is read back
    from the file (page cache). Arrays that view anything else are left alone.
    """
    base = array
    while base is not None and not isinstance(base, memoryview):
        base = getattr(base, "base", None)
    if base is None or not isinstance(base.obj, _FileMap) or not array.size:
        return
    mapping = base.obj
    low, high = _byte_bounds(array)
    page = mmap.PAGESIZE
    first = -(-(low - mapping.address) // page) * page  # whole pages only: a neighbour may share the edges
    last = (high - mapping.address) // page * page
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def _byte_bounds(array: np.ndarray) -> tuple[int, int]:
    try:
        from numpy.lib.array_utils import byte_bounds
    except ImportError:  # numpy < 2
        byte_bounds = np.byte_bounds
    return byte_bounds(array)


PADDING_PREFIX = "__padding_"  # names of the filler tensors an aligned file holds (see save_safetensors)


def load_safetensors(
    path: str | os.PathLike, *, copy: bool = False, private: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a .safetensors file into ({name: array}, metadata).

    Arrays are read-only mmap views; with ``private`` writable copy-on-write views of a private
    mapping; with ``copy`` ordinary in-memory arrays. Filler tensors of an aligned file are dropped.
    """
    try:
        file_size = os.path.getsize(path)
    except OSError as e:
        raise _fail(path, f"cannot read file ({e.strerror or e})") from None
    header_len, raw = _read_prefix(path, file_size)
    header = _parse_header(path, raw)
    metadata = _check_metadata(path, header.pop("__metadata__", None))
    data_start = 8 + header_len
    data_size = file_size - data_start
    entries = {name: _check_entry(path, name, entry, data_size) for name, entry in header.items()}
    _check_no_overlap(path, [(b, e, n) for n, (_, _, b, e) in entries.items()])
    if not entries:
        return {}, metadata
    with open(path, "rb") as f:
        if private:
            buffer = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
        else:
            buffer = memoryview(_FileMap(f.fileno(), 0, access=mmap.ACCESS_READ))
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if name.startswith(PADDING_PREFIX) and dtype == np.uint8:
            continue
        array = np.frombuffer(buffer[data_start + begin:data_start + end], dtype=dtype).reshape(shape)
        tensors[name] = array.copy() if copy else array
    return tensors, metadata


def _dtype_name(name: str, array: np.ndarray) -> str:
    """Return the safetensors dtype name of an array, or raise naming the valid ones."""
    for dtype_name, dtype in DTYPES.items():
        if array.dtype == dtype or (array.dtype.kind in "fiub" and array.dtype.newbyteorder("<") == dtype):
            return dtype_name
    raise ValueError(
        f"tensor {short(name)} has dtype {array.dtype}, which safetensors cannot store; "
        "valid: float64, float32, float16, bfloat16, int64, int32, int16, int8, uint8, bool")


def _check_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
    """Validate names and arrays for writing; return {name: (dtype name, array)} in file order.

    As in the official writer, larger itemsizes come first (then names), so with the 8-byte-padded
    header every tensor starts at a multiple of its itemsize and mmap views are aligned.
    """
    checked = {}
    for name in tensors:
        array = tensors[name]
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensor name {short(name)} is invalid: names must be non-empty strings "
                             "other than '__metadata__'")
        if not isinstance(array, (np.ndarray, np.generic)):
            raise ValueError(f"tensor {short(name)} is a {type(array).__name__}, expected a numpy array "
                             "(convert with np.asarray)")
        array = np.asarray(array)
        checked[name] = (_dtype_name(name, array), array)
    order = sorted(checked, key=lambda n: (-checked[n][1].dtype.itemsize, n))
    return {name: checked[name] for name in order}


def _check_write_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Validate writer metadata: string keys and string values only."""
    metadata = dict(metadata or {})
    bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise ValueError(f"safetensors metadata must map str to str; offending entries: {short(bad)}")
    return metadata


def _aligned(checked: dict[str, tuple[str, np.ndarray]], align: int) -> dict[str, tuple[str, np.ndarray]]:
    """Insert zero-filled ``uint8`` filler tensors so that every tensor starts at a multiple of ``align``."""
    if align <= 8:
        return checked
    out: dict[str, tuple[str, np.ndarray]] = {}
    offset = 0
    for name, (dtype_name, array) in checked.items():
        gap = -offset % align
        if gap and array.nbytes:
            out[f"{PADDING_PREFIX}{len(out)}__"] = ("U8", np.zeros(gap, np.uint8))
            offset += gap
        if name.startswith(PADDING_PREFIX):
            raise ValueError(f"tensor name {short(name)} is reserved for filler tensors of aligned files")
        out[name] = (dtype_name, array)
        offset += array.nbytes
    return out


def _header_bytes(checked: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str], align: int = 8) -> bytes:
    """Build the length-prefixed JSON header, padded with spaces so the data starts at a multiple of ``align``."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype_name, array) in checked.items():
        end = offset + array.nbytes
        header[name] = {"dtype": dtype_name, "shape": list(array.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % max(8, align))
    return len(raw).to_bytes(8, "little") + raw


def _little_endian_bytes(array: np.ndarray) -> memoryview:
    """Return the array's data as little-endian C-ordered bytes, copying only if needed."""
    if array.dtype.kind in "fiu" and array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None,
    *, align: int = 8,
) -> None:
    """Write tensors (and optional str metadata) to a .safetensors file atomically.

    ``align`` (a power of two): every tensor's data starts at a multiple of it in the file (and so in
    a page-aligned memory mapping), gaps filled by ``__padding_<n>__`` tensors; 8 writes no fillers.
    """
    if align < 8 or align & (align - 1):
        raise ValueError(f"align={short(align)} must be a power of two >= 8")
    checked = _aligned(_check_tensors(tensors), align)
    header = _header_bytes(checked, _check_write_metadata(metadata), align)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(header)
            for _, array in checked.values():
                f.write(_little_endian_bytes(array))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
