"""Read PyTorch zip checkpoints (``torch.save``: diffusers ``*.bin``, CompVis ``.ckpt``) without torch.

A pickle can run arbitrary code while it loads, so this module never calls ``torch.load`` or an
unrestricted ``pickle.load``. ``_SafeUnpickler.find_class`` resolves only a fixed allowlist of
names, each mapped to a pure-numpy function defined here (the real torch functions are never
imported); any other global is refused inside ``find_class``, before anything can run.

What ``torch.save`` (torch 2.x) writes, checked with pickletools::

    <archive>/data.pkl        protocol-2 pickle; tensors are
                              torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
                                                              requires_grad, OrderedDict())
                              and storages are persistent ids
                              ('storage', torch.FloatStorage, '<key>', 'cpu', numel)
    <archive>/data/<key>      raw bytes of one storage (numel * itemsize, stored uncompressed)
    <archive>/byteorder       'little' or 'big'

Two policies:

* ``strict=True`` (diffusers ``.bin``): only the tensor-rebuild names of ``_strict_globals()``
  (the rebuild functions, ``collections.OrderedDict``, the typed storages, torch dtypes).
* ``strict=False`` (CompVis ``.ckpt`` written by PyTorch Lightning): additionally the names in
  ``_lenient_globals()`` (pure re-implementations of harmless builtins) and any global whose module
  is one of ``INERT_MODULE_PREFIXES`` or whose name is in ``INERT_GLOBALS``. Those become
  ``InertObject`` placeholder classes: the module is never imported and nothing of it runs;
  constructing, calling or restoring state on a placeholder only records the data it was given.

Everything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) raises
``UnsafeCheckpointError`` naming the file and the global.

Beyond find_class: the objects handed to the pickle are sealed (a hostile BUILD cannot mutate
them), the allowlist is rebuilt per load, EXT1/2/4 opcodes (which bypass find_class through
copyreg's process-wide cache) are refused, and every storage reference is bounds-checked before
any view is made.

Bounded (limits in ``sd_jax.convert.limits``): before unpickling, the pickle's size and opcode
count are capped and its opcodes are pre-scanned (never run) to bound how deep its objects nest
and how large they are with shared parts unfolded, which is what hashing or comparing them costs;
zip members that are encrypted, use an unknown compression method or inflate more than
``MAX_INFLATION_RATIO`` times are refused; and every byte made in memory (storages read, strided
tensors copied) is charged to a budget of twice the file's size plus an allowance, checked before
allocating. Values from the file are echoed into errors only through ``limits.short``.

Tensors are returned as numpy arrays; a contiguous tensor is a view of its
storage, so tensors saved as views of one storage share memory, as they do in torch.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import pickle
import pickletools
import zipfile
from types import MappingProxyType
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from sd_jax.convert import limits
from sd_jax.convert.limits import short
from sd_jax.convert.safetensors_io import CheckpointFormatError

# Globals found in real Lightning-era SD checkpoints that are harmless as inert data holders.
INERT_MODULE_PREFIXES: tuple[str, ...] = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf")
INERT_GLOBALS: frozenset[str] = frozenset({
    "numpy.core.multiarray.scalar",       # numpy scalars (e.g. ModelCheckpoint.best_model_score)
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",  # numpy arrays outside the state dict
    "numpy._core.multiarray._reconstruct",
    "numpy.dtype",
    "numpy.ndarray",
    "torch.torch_version.TorchVersion",    # a str subclass Lightning stores in hparams
})

# Read storages in chunks so a compressed or stored member never needs a second full-size copy.
_READ_CHUNK_BYTES = 16 << 20
# Zip compression methods zipfile can read (torch.save itself stores every member uncompressed).
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
                zipfile.ZIP_LZMA: "lzma"}

_STORAGE_DTYPES: Mapping[str, np.dtype] = MappingProxyType({
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "DoubleStorage": np.dtype(np.float64),
    "IntStorage": np.dtype(np.int32),
    "LongStorage": np.dtype(np.int64),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
})

_TORCH_DTYPES: Mapping[str, np.dtype] = MappingProxyType({
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64), "double": np.dtype(np.float64),
    "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
})


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle names a global outside the allowlist; nothing from it was run."""


class _Sealed:
    """Base of the objects the unpickler hands to a pickle: BUILD and setattr on them are refused.

    A hostile pickle can aim BUILD (``__setstate__`` or a ``__dict__`` update) at any object on its
    stack; sealed objects have no ``__dict__``, a refusing ``__setstate__`` and no ``__setattr__``.
    """

    __slots__ = ()

    def __init__(self, **fields: Any) -> None:
        """Set the slot fields once."""
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        """Refuse mutation."""
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __setstate__(self, state: Any) -> None:
        """Refuse a pickle's BUILD."""
        raise pickle.UnpicklingError(f"the pickle tried to restore state on a {type(self).__name__}")

    def __repr__(self) -> str:
        """Show the class and (bounded) fields."""
        fields = ", ".join(f"{n}={short(getattr(self, n))}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class _StorageType(_Sealed):
    """Stand-in for a torch storage class (e.g. torch.FloatStorage): its name and element dtype."""

    __slots__ = ("name", "dtype")
    name: str
    dtype: np.dtype


class _Storage(_Sealed):
    """One storage read from the archive: its key and a flat array of its elements, shape (numel,)."""

    __slots__ = ("key", "array")
    key: str
    array: np.ndarray


class TorchDtype(_Sealed):
    """Stand-in for a torch dtype object (e.g. torch.float32) found outside tensors."""

    __slots__ = ("name", "dtype")
    name: str
    dtype: np.dtype


class _PureFunction(_Sealed):
    """A pure replacement for an allowlisted global function, named after the global it stands for."""

    __slots__ = ("name", "function")
    name: str
    function: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the pure replacement."""
        return self.function(*args, **kwargs)


class InertObject:
    """Placeholder for an allowlisted non-tensor object in a lenient load; it stores data and runs nothing."""

    inert_global: str = "?"  # 'module.name' the pickle referred to; set on each generated subclass

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertObject":
        """Create a placeholder and record the constructor arguments the pickle supplied."""
        obj = super().__new__(cls)
        obj.inert_args, obj.inert_kwargs, obj.inert_state = args, kwargs, None
        obj.inert_items, obj.inert_list = {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Accept any arguments (already recorded by __new__)."""

    def __call__(self, *args: Any, **kwargs: Any) -> "InertObject":
        """Calling a placeholder yields another placeholder of the same origin."""
        return type(self)(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        """Record the BUILD state instead of applying it."""
        self.inert_state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        """Record items of dict-like objects (SETITEM/SETITEMS)."""
        self.inert_items[key] = value

    def append(self, value: Any) -> None:
        """Record items of list-like objects (APPEND)."""
        self.inert_list.append(value)

    def extend(self, values: list[Any]) -> None:
        """Record items of list-like objects (APPENDS)."""
        self.inert_list.extend(values)

    def __repr__(self) -> str:
        """Show which global this placeholder stands for."""
        return f"<inert {self.inert_global}>"


def _fail(path: str | os.PathLike, problem: str) -> CheckpointFormatError:
    """Build a CheckpointFormatError that names the file and what is wrong with it."""
    return CheckpointFormatError(f"{os.fspath(path)}: {problem}")


def _is_int(value: Any) -> bool:
    """True for a plain integer (bool excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ints(path: str | os.PathLike, what: str, values: Any) -> tuple[int, ...]:
    """Return values as a tuple of non-negative ints, or raise naming the bad value."""
    if not isinstance(values, (tuple, list)) or not all(_is_int(v) and v >= 0 for v in values):
        raise _fail(path, f"tensor {what} must be a tuple of non-negative ints, got {short(values)}")
    return tuple(values)


def _is_c_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True if (size, stride) describe a C-ordered dense block (dims of length 1 may have any stride)."""
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


class _Budget:
    """Bytes a load may still make in memory (storages read, strided tensors copied); see limits."""

    def __init__(self, path: str | os.PathLike, file_size: int) -> None:
        """Allow limits.materialised_limit(file_size) bytes for the file at path."""
        self.path, self.limit, self.used = path, limits.materialised_limit(file_size), 0
        self.file_size = file_size

    def charge(self, nbytes: int, what: str) -> None:
        """Count nbytes about to be allocated for what; refuse before allocating past the limit."""
        if self.used + nbytes > self.limit:
            raise _fail(self.path, f"{what} would bring the memory this load makes to {self.used + nbytes} bytes, "
                        f"over the limit of {self.limit} for a {self.file_size}-byte file (twice its size plus "
                        f"{limits.MATERIALISED_ALLOWANCE >> 20} MiB); the file expands far beyond its size")
        self.used += nbytes


def _strided_view(path: str | os.PathLike, budget: _Budget, storage: Any, offset: Any, size: Any,
                  stride: Any) -> np.ndarray:
    """Return the (size, stride) window of a storage at offset, bounds-checked, as a numpy array.

    A contiguous window is a view (free); any other is copied, and the copy is charged to budget first.
    """
    if not isinstance(storage, _Storage):
        raise _fail(path, f"tensor storage must come from the archive, got {type(storage).__name__}")
    if not _is_int(offset) or offset < 0:
        raise _fail(path, f"tensor storage offset must be a non-negative int, got {short(offset)}")
    size, stride = _check_ints(path, "size", size), _check_ints(path, "stride", stride)
    if len(size) != len(stride):
        raise _fail(path, f"tensor size {short(size)} and stride {short(stride)} have different lengths")
    flat, numel = storage.array, math.prod(size)
    if numel == 0:
        return np.empty(size, dtype=flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise _fail(
            path, f"tensor (offset {offset}, size {short(size)}, stride {short(stride)}) reaches element "
            f"{short(last)} but storage {short(storage.key)} holds only {flat.size} elements")
    if _is_c_contiguous(size, stride):
        return flat[offset:offset + numel].reshape(size)  # a view: tensors sharing a storage share memory
    budget.charge(numel * flat.itemsize, f"a strided tensor of size {short(size)} (a copy of {numel} elements)")
    strides = tuple(s * flat.itemsize for s in stride)
    window = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=strides, writeable=False)
    return np.ascontiguousarray(window)


def _take_array(path: str | os.PathLike, data: Any) -> np.ndarray:
    """Return data if it is a rebuilt tensor, else raise (used by the parameter rebuilders)."""
    if not isinstance(data, np.ndarray):
        raise _fail(path, f"parameter data must be a tensor, got {type(data).__name__}")
    return data


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    """Pure stand-in for _codecs.encode as protocol-2 pickles use it to store bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed as encode(str, 'latin1'), got {short(encoding)}")
    return text.encode("latin-1")


def _strict_globals(path: str | os.PathLike, budget: _Budget) -> dict[str, Any]:
    """The tensor-rebuild allowlist: 'module.name' -> pure-numpy replacement."""

    def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                          metadata=None):
        """Pure stand-in for torch._utils._rebuild_tensor_v2 (gradient flags and hooks are dropped)."""
        return _strided_view(path, budget, storage, storage_offset, size, stride)

    def rebuild_parameter(data, requires_grad=True, backward_hooks=None):
        """Pure stand-in for torch._utils._rebuild_parameter: the parameter's data."""
        return _take_array(path, data)

    def rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
        """Pure stand-in for torch._utils._rebuild_parameter_with_state: the parameter's data."""
        return _take_array(path, data)

    functions: dict[str, Callable[..., Any]] = {
        "torch._utils._rebuild_tensor_v2": rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": rebuild_parameter_with_state,
    }
    table: dict[str, Any] = {name: _PureFunction(name=name, function=f) for name, f in functions.items()}
    table["collections.OrderedDict"] = collections.OrderedDict  # an immutable type; calling it is harmless
    for name in ("torch.UntypedStorage", "torch.storage.UntypedStorage"):
        table[name] = _StorageType(name="UntypedStorage", dtype=np.dtype(np.uint8))
    table.update({f"torch.{n}": _StorageType(name=n, dtype=d) for n, d in _STORAGE_DTYPES.items()})
    table.update({f"torch.{n}": TorchDtype(name=n, dtype=d) for n, d in _TORCH_DTYPES.items()})
    return table


def _lenient_globals() -> dict[str, Any]:
    """Extra pure globals for strict=False: how Lightning-era pickles store bytes and sets."""
    return {
        "_codecs.encode": _PureFunction(name="_codecs.encode", function=_latin1_encode),  # protocol 2's bytes
        "builtins.set": set,  # immutable builtin types: calling them only builds a container
        "builtins.frozenset": frozenset,
    }


def _is_inert(qualified: str) -> bool:
    """True if a global may become an InertObject placeholder in a lenient load."""
    module = qualified.rsplit(".", 1)[0]
    return qualified in INERT_GLOBALS or any(
        module == p or module.startswith(p + ".") for p in INERT_MODULE_PREFIXES
    )


def _normalise_name(module: str, name: str) -> tuple[str, str]:
    """Map Python-2 names (e.g. '__builtin__') to Python 3 ones, as pickle's own find_class does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allowlisted globals and reads storages from the zip archive."""

    def __init__(self, data: bytes, *, path: str | os.PathLike, strict: bool, budget: _Budget,
                 read_storage: Callable[[str, np.dtype, int], np.ndarray]) -> None:
        """Prepare to unpickle data.pkl bytes of the checkpoint at path."""
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._path, self._strict, self._read_storage = path, strict, read_storage
        # Built per load: whatever a hostile pickle does to these objects cannot outlive this load.
        self._globals = _strict_globals(path, budget) | ({} if strict else _lenient_globals())
        self._inert_classes: dict[str, type] = {}
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowlisted global to its safe replacement; refuse anything else before it runs."""
        module, name = _normalise_name(module, name)
        qualified = f"{module}.{name}"
        if qualified in self._globals:
            return self._globals[qualified]
        if not self._strict and _is_inert(qualified):
            return self._inert_class(qualified)
        if self._strict and _is_inert(qualified):
            policy = ("strict=True allows only tensors and storages; this global is a known training-framework "
                      "object that strict=False, the policy for CompVis .ckpt files, loads as an inert "
                      "placeholder")
        elif self._strict:
            policy = "strict=True allows only tensors and storages"
        else:
            policy = ("strict=False allows tensors plus inert placeholders for "
                      f"{', '.join(INERT_MODULE_PREFIXES)} and numpy scalars")
        raise UnsafeCheckpointError(
            f"{os.fspath(self._path)}: refusing to load: the pickle references the global "
            f"{short(qualified)}, which could run code ({policy}). Nothing was executed. "
            "If you trust the file, convert it to .safetensors in a sandbox.")

    def _inert_class(self, qualified: str) -> type:
        """Return (creating once per load) the placeholder class standing for a global."""
        if qualified not in self._inert_classes:
            name = "Inert_" + "".join(c if c.isalnum() else "_" for c in qualified)
            self._inert_classes[qualified] = type(name, (InertObject,), {"inert_global": qualified})
        return self._inert_classes[qualified]

    def persistent_load(self, pid: Any) -> _Storage:
        """Map ('storage', storage_type, key, location, numel) to the storage read from data/<key>."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _fail(self._path, f"unsupported persistent id {short(pid)}; "
                        "expected ('storage', storage_type, key, location, numel)")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _fail(self._path, f"persistent id names {short(storage_type)}, which is not a torch storage type")
        if not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise _fail(self._path, f"bad storage key {short(key)} or element count {short(numel)}")
        cached = self._storages.get(key)
        if cached is None:  # each storage is read from the archive once, however many tensors view it
            array = self._read_storage(key, storage_type.dtype, numel)
            cached = self._storages[key] = _Storage(key=key, array=array)
        elif cached.array.dtype != storage_type.dtype or cached.array.size < numel:
            raise _fail(self._path, f"storage {short(key)} is referenced with conflicting dtypes or sizes")
        return cached


def _archive_prefix(path: str | os.PathLike, zf: zipfile.ZipFile) -> str:
    """Return the archive's top folder name (the one holding data.pkl)."""
    prefixes = [n[: -len("/data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(prefixes) != 1:
        listing = ", ".join(short(n, 40) for n in zf.namelist()[:8])
        raise _fail(path, "zip archive is not a torch.save checkpoint "
                    f"(expected one <name>/data.pkl; entries: {listing})")
    return prefixes[0]


def _check_member(path: str | os.PathLike, info: zipfile.ZipInfo, file_size: int) -> None:
    """Refuse a member that is encrypted, compressed with an unknown method, or claims an absurd size."""
    name = short(info.filename, 60)
    if info.flag_bits & 0x1:
        raise _fail(path, f"archive member {name} is encrypted (zip password protection), which torch.save "
                    "never writes; sd_jax does not read encrypted checkpoints")
    if info.compress_type not in _ZIP_METHODS:
        raise _fail(path, f"archive member {name} uses zip compression method {info.compress_type}, which sd_jax "
                    f"does not read (readable: {', '.join(_ZIP_METHODS.values())}; torch.save stores members "
                    "uncompressed)")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size or info.compress_size > file_size:
            raise _fail(path, f"archive member {name} claims {info.file_size} bytes stored in {info.compress_size} "
                        f"of a {file_size}-byte file; the archive's directory is corrupt")
    elif info.file_size > limits.MAX_INFLATION_RATIO * max(info.compress_size, 1):
        raise _fail(path, f"archive member {name} would inflate from {info.compress_size} to {info.file_size} "
                    f"bytes, more than {limits.MAX_INFLATION_RATIO} times; refusing a possible zip bomb "
                    "(torch.save stores members uncompressed)")


def _read_member(path: str | os.PathLike, zf: zipfile.ZipFile, info: zipfile.ZipInfo, nbytes: int) -> np.ndarray:
    """Read the first nbytes of a zip member into a fresh uint8 array, chunk by chunk."""
    out = np.empty(nbytes, dtype=np.uint8)
    view, pos = memoryview(out), 0
    try:
        with zf.open(info) as f:
            while pos < nbytes:
                chunk = f.read(min(_READ_CHUNK_BYTES, nbytes - pos))
                if not chunk:
                    raise _fail(path, f"archive member {short(info.filename, 60)} ended after {pos} of {nbytes} "
                                "bytes")
                view[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
    except CheckpointFormatError:
        raise
    except Exception as e:  # BadZipFile (bad CRC), OSError, EOFError, zlib.error, ...
        raise _fail(path, f"cannot read archive member {short(info.filename, 60)} ({limits.short_error(e)}); "
                    "the file is corrupt or truncated") from None
    return out


def _storage_reader(path: str | os.PathLike, zf: zipfile.ZipFile, prefix: str, big_endian: bool,
                    budget: _Budget) -> Callable[[str, np.dtype, int], np.ndarray]:
    """Return a function reading storage <prefix>/data/<key> as a flat array of numel elements."""
    members = {info.filename: info for info in zf.infolist()}

    def read(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        """Read one storage, checking it exists and is as large as the pickle claims."""
        info = members.get(f"{prefix}/data/{key}")
        if info is None:
            raise _fail(path, f"storage {short(key)} is referenced by the pickle but "
                        f"{prefix}/data/{short(key, 40)} is not in the archive")
        nbytes = numel * dtype.itemsize
        if info.file_size < nbytes:
            raise _fail(path, f"storage {short(key)} holds {info.file_size} bytes but the pickle needs "
                        f"{numel} x {dtype} = {nbytes}")
        _check_member(path, info, budget.file_size)
        budget.charge(nbytes * (2 if big_endian and dtype.itemsize > 1 else 1), f"storage {short(key)}")
        raw = _read_member(path, zf, info, nbytes)
        if big_endian and dtype.itemsize > 1:
            raw = raw.reshape(-1, dtype.itemsize)[:, ::-1].copy().reshape(-1)
        return raw.view(dtype)

    return read


def _open_zip(path: str | os.PathLike) -> zipfile.ZipFile:
    """Open a torch zip checkpoint, explaining legacy, truncated and non-zip files."""
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, expected a checkpoint file") from None
    except OSError as e:
        raise _fail(path, f"cannot read file ({e.strerror or limits.short_error(e)})") from None
    except (zipfile.BadZipFile, ValueError, EOFError, OverflowError, NotImplementedError):
        with open(path, "rb") as f:
            head = f.read(4)
    if head.startswith(b"PK"):
        raise _fail(path, "looks like a zip archive but its directory is missing or unreadable: "
                    "the file is truncated or corrupt")
    if head.startswith(b"\x80"):
        raise _fail(path, "is a legacy (pre-1.6, non-zip) torch checkpoint, which sd_jax does not unpickle; "
                    "re-save it with torch.save in the zip format, or convert to .safetensors")
    raise _fail(path, f"is not a torch zip checkpoint (starts with {head!r})")


def _read_small_member(path: str | os.PathLike, zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """Read a whole member of at most limit bytes (the pickle, the byteorder record)."""
    info = zf.getinfo(name)
    file_size = os.path.getsize(path)
    _check_member(path, info, file_size)
    if info.file_size > limit:
        raise _fail(path, f"archive member {short(name, 60)} is {info.file_size} bytes, over the {limit}-byte "
                    "limit (the pickle of a real checkpoint is well under 1 MB; its weights are separate members)")
    return _read_member(path, zf, info, info.file_size).tobytes()


# How the pre-scan models each pickle opcode: (kind, items taken below any mark, takes a mark, fresh node).
_OP_BUILDS, _OP_MEMO_GET, _OP_MEMO_PUT, _OP_MARK, _OP_MUTATES, _OP_DISCARDS, _OP_DUP, _OP_NOTHING, _OP_EXTENSION = (
    range(9))


def _op_plan() -> dict[str, tuple[int, int, bool, bool]]:
    """The pre-scan's model of every opcode, from pickletools' stack descriptions."""
    special = {"GET": _OP_MEMO_GET, "BINGET": _OP_MEMO_GET, "LONG_BINGET": _OP_MEMO_GET,
               "PUT": _OP_MEMO_PUT, "BINPUT": _OP_MEMO_PUT, "LONG_BINPUT": _OP_MEMO_PUT, "MEMOIZE": _OP_MEMO_PUT,
               "MARK": _OP_MARK, "DUP": _OP_DUP, "POP": _OP_DISCARDS, "POP_MARK": _OP_DISCARDS,
               "STOP": _OP_DISCARDS, "PROTO": _OP_NOTHING, "FRAME": _OP_NOTHING,
               "APPEND": _OP_MUTATES, "APPENDS": _OP_MUTATES, "SETITEM": _OP_MUTATES, "SETITEMS": _OP_MUTATES,
               "ADDITEMS": _OP_MUTATES, "BUILD": _OP_MUTATES,
               "EXT1": _OP_EXTENSION, "EXT2": _OP_EXTENSION, "EXT4": _OP_EXTENSION}
    mutable = (pickletools.pylist, pickletools.pydict, pickletools.pyset, pickletools.anyobject)
    plan = {}
    for op in pickletools.opcodes:
        before, after = op.stack_before, op.stack_after
        has_mark = pickletools.markobject in before
        n_before = before.index(pickletools.markobject) if has_mark else len(before)
        kind = special.get(op.name, _OP_BUILDS)
        if kind == _OP_MUTATES:
            n_before = 0 if has_mark else len(before) - 1  # items, not the target below them
        if kind == _OP_BUILDS and len(after) != 1:
            raise AssertionError(f"pickle opcode {op.name} is not modelled by the pre-scan")
        plan[op.name] = (kind, n_before, has_mark, bool(after) and after[0] in mutable)
    return plan


_OP_PLAN = _op_plan()
_LEAF = 0  # one shared node for every value without parts (numbers, strings, None, globals)


def _scan_pickle(path: str | os.PathLike, data: bytes) -> None:
    """Refuse a pickle that is too long, nests too deep, unfolds too large, or uses EXT opcodes.

    Walks the opcodes (never running them) with a model of the unpickler's stack and memo, building
    the graph of which object holds which, including objects shared through the memo. The depth
    and the size of that graph fully unfolded bound what hashing, comparing or printing any object
    of the pickle can cost, so a 40-deep tuple of tuples that share their parts (2**40 paths in
    210 bytes) is refused here instead of hanging when it is hashed as a dict key.
    """
    children: list[list[int]] = [[]]
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[int, int] = {}
    roots: list[int] = []

    def node(parts: list[int], fresh: bool) -> int:
        """A new graph node holding parts (the shared leaf for values that have no parts and never will)."""
        if not parts and not fresh:
            return _LEAF
        children.append(parts)
        return len(children) - 1

    count = 0
    try:
        for opcode, arg, position in pickletools.genops(data):
            count += 1
            if count > limits.MAX_PICKLE_OPCODES:
                raise _fail(path, f"the pickle has more than {limits.MAX_PICKLE_OPCODES} opcodes; real checkpoints "
                            "have about 15 per tensor")
            kind, n_before, has_mark, fresh = _OP_PLAN[opcode.name]
            if kind == _OP_BUILDS:
                parts: list[int] = []
                if has_mark:
                    start = marks.pop()
                    parts = stack[start:]
                    del stack[start:]
                if n_before:
                    if len(stack) < n_before:
                        raise IndexError("stack underflow")
                    parts = stack[-n_before:] + parts
                    del stack[-n_before:]
                stack.append(node(parts, fresh))
            elif kind == _OP_MEMO_GET:
                stack.append(memo[arg])
            elif kind == _OP_MEMO_PUT:
                memo[len(memo) if arg is None else arg] = stack[-1]
            elif kind == _OP_MARK:
                marks.append(len(stack))
            elif kind == _OP_MUTATES:
                if has_mark:
                    start = marks.pop()
                    items = stack[start:]
                    del stack[start:]
                else:
                    if len(stack) <= n_before:
                        raise IndexError("stack underflow")
                    items = stack[-n_before:]
                    del stack[-n_before:]
                if stack[-1] == _LEAF:  # mutating a number or a string: the unpickler will fail on it
                    stack[-1] = node([], True)
                children[stack[-1]].extend(items)
            elif kind == _OP_DISCARDS:
                if has_mark:
                    start = marks.pop()
                    roots.extend(stack[start:])
                    del stack[start:]
                elif marks and marks[-1] == len(stack):  # POP of a mark
                    marks.pop()
                else:
                    roots.append(stack.pop())
            elif kind == _OP_DUP:
                stack.append(stack[-1])
            elif kind == _OP_EXTENSION:
                raise UnsafeCheckpointError(
                    f"{os.fspath(path)}: refusing to load: the pickle uses the {opcode.name} extension-registry "
                    f"opcode at byte {position}, which torch.save never writes. Nothing was executed.")
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except (ValueError, IndexError, KeyError) as e:  # genops' own errors, or a stack/memo the pickle misuses
        raise _fail(path, f"malformed checkpoint pickle ({type(e).__name__}: {limits.short_error(e)})") from None
    roots.extend(stack)
    depth, unfolded = _graph_extent(children, roots)
    if depth > limits.MAX_NESTING:
        raise _fail(path, f"the pickle nests objects {depth} deep; the limit is {limits.MAX_NESTING}")
    if unfolded > limits.unfolded_limit(count):
        raise _fail(path, f"the pickle's objects share parts so that, unfolded, they have over "
                    f"{limits.unfolded_limit(count)} nodes ({count} opcodes); refusing what would take "
                    "unbounded time to hash or compare")


def _graph_extent(children: list[list[int]], roots: list[int]) -> tuple[int, int]:
    """(longest path, total unfolded size) of the object graph from roots; cycles are cut, sizes saturate."""
    cap = 1 << 62
    depth = [0] * len(children)
    size = [1] * len(children)
    state = bytearray(len(children))  # 0 new, 1 open, 2 done
    state[_LEAF] = 2
    for root in roots:
        todo = [root]
        while todo:
            n = todo[-1]
            if state[n] == 2:
                todo.pop()
                continue
            if state[n] == 0:
                state[n] = 1
                todo.extend(c for c in children[n] if state[c] == 0)
                continue
            todo.pop()  # every child is done (or open: a cycle, counted as one node)
            state[n] = 2
            kids = children[n]
            depth[n] = 1 + max((depth[c] for c in kids if state[c] == 2), default=0)
            size[n] = min(cap, 1 + sum(size[c] for c in kids))
    total = min(cap, sum(size[r] for r in roots))
    return max((depth[r] for r in roots), default=0), total


def load_torch_checkpoint(path: str | os.PathLike, *, strict: bool = True) -> Any:
    """Unpickle a torch.save zip checkpoint safely; tensors come back as numpy arrays.

    Bounded: the pickle is pre-scanned (see ``_scan_pickle``), and the bytes read or copied are
    limited to ``limits.materialised_limit`` of the file's size.
    """
    with _open_zip(path) as zf:
        prefix = _archive_prefix(path, zf)
        has_byteorder = f"{prefix}/byteorder" in zf.namelist()  # absent in archives from torch < 1.10
        data = _read_small_member(path, zf, f"{prefix}/data.pkl", limits.MAX_PICKLE_BYTES)
        try:
            byteorder = (_read_small_member(path, zf, f"{prefix}/byteorder", 16).decode()
                         if has_byteorder else "little")
        except UnicodeDecodeError:
            byteorder = "?"
        if byteorder not in ("little", "big"):
            raise _fail(path, f"archive byteorder record is {short(byteorder)}; expected 'little' or 'big'")
        _scan_pickle(path, data)
        budget = _Budget(path, os.path.getsize(path))
        reader = _storage_reader(path, zf, prefix, big_endian=byteorder == "big", budget=budget)
        unpickler = _SafeUnpickler(data, path=path, strict=strict, budget=budget, read_storage=reader)
        try:
            return unpickler.load()
        except (UnsafeCheckpointError, CheckpointFormatError):
            raise
        except Exception as e:  # a malformed pickle: UnpicklingError, TypeError, EOFError, ...
            raise _fail(path, f"malformed checkpoint pickle ({type(e).__name__}: {limits.short_error(e)})") from None


def extract_state_dict(
    obj: Any, *, source: str | os.PathLike = "checkpoint"
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Return ({name: array}, skipped names) from a loaded checkpoint: its 'state_dict' if present, else itself."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise _fail(source, f"expected a dict of tensors (or a dict with 'state_dict'), got {type(obj).__name__}")
    tensors: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, np.ndarray):
            tensors[key] = value
        else:
            skipped.append(key[:limits.ECHO_CHARS] if isinstance(key, str) else short(key))
    return tensors, skipped
