"""The converted-layout cache: parameters already in sd_jax's layout, memory-mapped on the next load.

Converting a model means reading every PyTorch tensor and re-laying the convolution and linear
weights for Flax (transposes) in the storage dtype: seconds per GB. The result is a function of
the source files' bytes, the options that pick what is read (``variant``, ``use_ema``, ``config``),
the storage dtype and this converter's code, so after the first load it is written to

    <cache>/<key>.safetensors          # one entry: every parameter, 64-byte aligned, plus metadata

and the next load of the same model maps that file and hands the arrays to ``jax.device_put``
(on the CPU it adopts the mapped pages, no copy: a warm load costs the file's pages, which the
page cache shares between processes).

Where: ``cache=`` of ``StableDiffusion.from_pretrained`` (a folder, or False), else
``$SD_JAX_CACHE`` (a folder; ``0`` switches it off), else ``converted/`` beside the persistent
compilation cache (``~/.cache/sd_jax/converted``); off whenever that cache is
(``SD_JAX_COMPILATION_CACHE=0``, as the test suite sets) unless ``SD_JAX_CACHE`` names a folder.

The key. A SHA-256 over: the absolute source path; for each file that is read (a folder's three
``config.json``, its weight files and shard indexes, ``scheduler_config.json``; a single file and a
``config=`` override's files) its name, size and full-content SHA-256; the options; the storage
dtype; and a digest of sd_jax's converter and model source. Hashing a 4 GB model costs seconds, so
each file's digest is remembered in ``<cache>/digests.json`` under its (device, inode, size,
mtime_ns, ctime_ns), and a lookup uses remembered digests only: a file without one (new, or
changed since) makes the load a miss, and is hashed by the thread that writes the entry. Any write
to a file, and restoring its mtime with ``utime`` too, changes its ctime, which no user call can
set back: a changed file is hashed again, never served stale. As git does for its index, a digest
is not remembered while the file's times are within ``RACY_SECONDS`` of the hashing (a write in
the same clock tick could keep all the times equal).

Writing. A cold load returns as soon as its parameters are converted; a background thread (not a
daemon: the interpreter waits for it at exit; ``wait_for_writes()`` waits for it sooner) hashes,
checks that no source file changed since it was read, and writes. Entries are written to a
temporary name, fsynced and renamed, so a reader sees a whole entry or none; two processes
converting the same model both write and the last rename wins (the entries are identical).

Integrity. On a hit the header is parsed and checked against the file's size (a truncated
entry fails), the key stored inside must equal the one looked up, and every tensor must
match the model's parameter shapes and dtype. Each tensor's 64-bit word sum is stored too and is
checked with ``SD_JAX_CACHE_VERIFY=1`` (it reads every page, which a default warm load does not).
A bad entry is removed (it is ours) and rebuilt with one warning line; a cache that cannot be
written (disk full, read-only) only warns.

Bounds. After each write the entries are trimmed, least recently used first (a hit refreshes an
entry's mtime), to ``$SD_JAX_CACHE_MAX_GB`` (default 20) in all; an entry larger than that is not
written. Only files this module writes are ever removed: ``<64 hex>.safetensors`` entries and its
own temporary files (left by a killed writer, removed after an hour). Clear it by deleting the
folder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sd_jax.convert.limits import short, short_error
from sd_jax.convert.model_files import MODEL_KEYS, ModelFiles
from sd_jax.convert.safetensors_io import CheckpointFormatError, load_safetensors, save_safetensors

CONVERTER_VERSION = 1  # bump when the meaning of an entry changes in a way the code digest would miss
ENTRY_SUFFIX = ".safetensors"
ALIGN = 64                # bytes; jax.device_put on the CPU adopts arrays aligned like this
RACY_SECONDS = 3.0        # coarser than any file system's timestamp granularity (FAT: 2 s)
DIGEST_INDEX_LIMIT = 512  # remembered file digests
DEFAULT_MAX_GB = 20.0
STALE_TEMP_SECONDS = 3600
_CHUNK = 8 << 20
_META_KEY = "sd_jax_converted_cache"
_CODE_DIRS = ("convert", "models")


class ConvertedCacheWarning(UserWarning):
    """The converted-layout cache could not be used or written; loading went on without it."""


def _warn(message: str) -> None:
    warnings.warn(message, ConvertedCacheWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Where
# ---------------------------------------------------------------------------------------------

def cache_dir(cache: bool | str | os.PathLike | None = None) -> Path | None:
    """The cache folder for a ``cache=`` argument (None: from the environment), or None when off."""
    if cache is False:
        return None
    if cache is not None and cache is not True:
        return Path(cache).expanduser()
    value = os.environ.get("SD_JAX_CACHE")
    if value == "0":
        return None
    if value:
        return Path(value).expanduser()
    from sd_jax._runtime import compilation_cache_dir

    root = compilation_cache_dir()
    return None if root is None else root.parent / "converted"


def max_bytes() -> int:
    """The cap on the cache's total size, from ``SD_JAX_CACHE_MAX_GB``."""
    value = os.environ.get("SD_JAX_CACHE_MAX_GB", "")
    try:
        gb = float(value) if value else DEFAULT_MAX_GB
    except ValueError:
        raise ValueError(f"SD_JAX_CACHE_MAX_GB={short(value)} is not a number of gigabytes, e.g. 20") from None
    if not gb >= 0:
        raise ValueError(f"SD_JAX_CACHE_MAX_GB={short(value)} must be >= 0")
    return int(gb * 1e9)


# ---------------------------------------------------------------------------------------------
# The key
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """Digest of sd_jax's converter and model source: what an entry's arrays are a function of."""
    package = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(str(CONVERTER_VERSION).encode())
    for folder in _CODE_DIRS:
        for path in sorted((package / folder).glob("*.py")):
            h.update(f"{folder}/{path.name}".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


class DigestIndex:
    """Remembered file digests, keyed by path and checked against (dev, inode, size, mtime, ctime)."""

    def __init__(self, folder: Path):
        self.path = folder / "digests.json"
        self.entries: dict[str, list] = {}
        self.changed = False
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                self.entries = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 6}
        except (OSError, ValueError):
            pass  # no index yet, or an unreadable one: digests are computed again

    def known(self, path: Path) -> str | None:
        """The remembered digest if the file is provably unchanged since it was hashed, else None."""
        known = self.entries.get(str(path))
        return known[5] if known is not None and known[:5] == _stat_key(os.stat(path)) else None

    def digest(self, path: Path) -> str:
        """The file's SHA-256, from the index when the file is provably unchanged since."""
        key = str(path)
        before = os.stat(path)
        known = self.entries.get(key)
        if known is not None and known[:5] == _stat_key(before):
            return known[5]
        started = time.time_ns()
        digest = _sha256(path)
        after = os.stat(path)
        racy = max(after.st_mtime_ns, after.st_ctime_ns) > started - int(RACY_SECONDS * 1e9)
        if _stat_key(after) == _stat_key(before) and not racy:
            self.entries.pop(key, None)
            self.entries[key] = _stat_key(after) + [digest]
            while len(self.entries) > DIGEST_INDEX_LIMIT:
                self.entries.pop(next(iter(self.entries)))
            self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        try:
            _write_text_atomically(self.path, json.dumps(self.entries))
        except OSError:
            pass  # the digests are computed again next time


def source_files(source: Path, *, variant: str | None, config: str | os.PathLike | None) -> list[Path]:
    """Every file whose bytes the conversion of ``source`` reads (raises what loading would raise)."""
    from sd_jax.convert.diffusers import component_folder, locate_weights

    files: list[Path] = []
    if source.is_dir():
        for name in MODEL_KEYS:
            folder = component_folder(source, name)
            located = locate_weights(folder, name, variant)
            files += [folder / "config.json", *located.files] + ([located.index] if located.index else [])
        files.append(source / "scheduler" / "scheduler_config.json")
    else:
        files.append(source)
    if config is not None:
        override = Path(config).expanduser()
        if override.is_dir():
            files += [override / name / "config.json" for name in MODEL_KEYS]
            files.append(override / "scheduler" / "scheduler_config.json")
        else:
            files.append(override)
    return [f for f in files if f.is_file()]


_pending: dict[str, threading.Thread] = {}  # key (or source path) -> the thread writing that entry
_pending_lock = threading.Lock()


def wait_for_writes(timeout: float | None = None) -> None:
    """Wait until every entry this process is writing is written (or given up with a warning)."""
    with _pending_lock:
        threads = list(_pending.values())
    for thread in threads:
        thread.join(timeout)


@dataclasses.dataclass
class Entry:
    """One model's place in the cache, before it is known to exist.

    ``key`` is None when a source file's digest is not remembered yet: that is a miss (hashing
    gigabytes to look up would slow the first load), and the digests are computed when the
    entry is written, in the background.
    """

    folder: Path
    source: Path
    material: dict[str, Any]        # what the key is made of, besides the files
    watched: dict[Path, list[int]]  # every source file's stat key when looked up: a change since means no write
    key: str | None

    @property
    def path(self) -> Path:
        return self.folder / f"{self.key}{ENTRY_SUFFIX}"

    # ------------------------------------------------------------------ reading
    def load(self) -> tuple[ModelFiles, dict[str, dict[tuple[str, ...], np.ndarray]]] | None:
        """(ModelFiles without states, {component: {param path: mapped array}}), or None on a miss."""
        if self.key is None:
            return None
        with _pending_lock:
            writing = _pending.get(self.key) or _pending.get(str(self.source))
        if writing is not None:
            writing.join()  # this process is writing this entry: use it once it is whole
        if not self.path.is_file():
            return None
        try:
            tensors, metadata = load_safetensors(self.path, private=True)
            meta = json.loads(metadata.get(_META_KEY, "null"))
            if not isinstance(meta, dict) or meta.get("key") != self.key:
                raise ValueError("it was written for another key")
            self._check_size()
            if os.environ.get("SD_JAX_CACHE_VERIFY") == "1":
                self._verify(tensors, meta.get("sums", {}))
            files = _model_files_from(meta)
            params: dict[str, dict[tuple[str, ...], np.ndarray]] = {name: {} for name in MODEL_KEYS}
            for name, array in tensors.items():
                component, *path = name.split("/")
                params[component][tuple(path)] = array
        except (CheckpointFormatError, OSError, ValueError, KeyError, TypeError) as err:
            self.discard(short_error(err, 160))
            return None
        try:
            os.utime(self.path)  # least recently used goes first
        except OSError:
            pass
        return files, params

    def _check_size(self) -> None:
        """The file must end where its last tensor does: a truncated or extended file is not ours."""
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            declared = json.loads(f.read(header_len))
        data = max((e["data_offsets"][1] for k, e in declared.items() if k != "__metadata__"), default=0)
        if size != 8 + header_len + data:
            raise ValueError(f"it is {size} bytes, its header describes {8 + header_len + data}")

    @staticmethod
    def _verify(tensors: Mapping[str, np.ndarray], sums: Mapping[str, str]) -> None:
        bad = [name for name, array in tensors.items() if sums.get(name) != word_sum(array)]
        if bad:
            raise ValueError(f"{len(bad)} tensor(s) fail their checksum, e.g. {short(bad[0])}")

    def discard(self, why: str) -> None:
        """Remove a bad entry (we wrote it) and say so in one line."""
        _warn(f"converted-layout cache entry {self.path.name} is unusable ({why}); converting the model again")
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass

    # ------------------------------------------------------------------ writing
    def store(self, files: ModelFiles, params: Mapping[str, Mapping[str, Any]]) -> threading.Thread | None:
        """Write the converted parameters (numpy trees per component) in a background thread.

        The load returns at once; the thread (not a daemon: the interpreter waits for it at
        exit) hashes the source files whose digests are not known, checks that no source file
        changed since it was read, and writes the entry. Every failure is a warning.
        """
        try:
            meta = _describe(files)
        except ValueError as err:
            _warn(f"not caching this model: {short_error(err, 160)}")
            return None
        from sd_jax.convert.core import flatten_tree

        tensors = {"/".join((name, *path)): np.asarray(leaf)
                   for name in MODEL_KEYS for path, leaf in flatten_tree(params[name]).items()}
        name = self.key or str(self.source)
        thread = threading.Thread(target=self._write, args=(tensors, meta, name),
                                  name=f"sd_jax-cache-{name[:12]}", daemon=False)
        with _pending_lock:
            _pending[name] = thread
        thread.start()
        return thread

    def _write(self, tensors: dict[str, np.ndarray], meta: dict[str, Any], name: str) -> None:
        try:
            self._write_entry(tensors, meta)
        except Exception as err:  # noqa: BLE001  (a cache must never break a load)
            _warn(f"could not write the converted-layout cache ({type(err).__name__}: {short_error(err, 120)})")
        finally:
            with _pending_lock:
                _pending.pop(name, None)

    def _write_entry(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        nbytes = sum(a.nbytes for a in tensors.values())
        cap = max_bytes()
        if nbytes > cap:
            _warn(f"not caching this model: {nbytes / 1e9:.2f} GB is above SD_JAX_CACHE_MAX_GB={cap / 1e9:g}")
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.key is None:
                self.key = _key(self.material, self.watched, DigestIndex(self.folder), self.source)
            if any(_stat_key(os.stat(p)) != st for p, st in self.watched.items()):
                _warn("a source file changed while the model was loading; not caching this conversion")
                return
            meta.update(key=self.key, sums={name: word_sum(a) for name, a in tensors.items()})
            free = shutil.disk_usage(self.folder).free
            if free < nbytes + (256 << 20):
                raise OSError(f"{free / 1e9:.2f} GB free, {nbytes / 1e9:.2f} GB needed")
            save_safetensors(self.path, tensors, {_META_KEY: json.dumps(meta)}, align=ALIGN)
        except OSError as err:
            _warn(f"could not write the converted-layout cache in {short(str(self.folder), 120)} "
                  f"({short_error(err, 120)}); the next load converts again")
            return
        trim(self.folder, cap, keep=self.path)


def _key(material: Mapping[str, Any], watched: Mapping[Path, list[int]], index: DigestIndex, source: Path,
         known_only: bool = False) -> str | None:
    """The entry's key: the material and each file's name, size and SHA-256 (None if one is unknown)."""
    described = []
    for file, st in watched.items():
        digest = index.known(file) if known_only else index.digest(file)
        if digest is None:
            return None
        described.append([os.path.relpath(file, source if source.is_dir() else source.parent), st[2], digest])
    index.save()
    return hashlib.sha256(json.dumps({**material, "files": described}, sort_keys=True).encode()).hexdigest()


def entry_for(source: str | os.PathLike, *, cache: bool | str | os.PathLike | None, variant: str | None,
              use_ema: bool, config: str | os.PathLike | None, dtype: Any) -> Entry | None:
    """The cache entry of a local model source, or None (cache off, or a hub id)."""
    folder = cache_dir(cache)
    path = Path(source).expanduser()
    if folder is None or not path.exists():
        return None
    path = path.resolve()
    watched = {f: _stat_key(os.stat(f)) for f in source_files(path, variant=variant, config=config)}
    material = {
        "code": code_digest(), "source": str(path), "dtype": np.dtype(dtype).name,
        "variant": variant if path.is_dir() else None, "use_ema": None if path.is_dir() else bool(use_ema),
        "config": None if config is None else str(Path(config).expanduser().resolve()),
    }
    key = _key(material, watched, DigestIndex(folder), path, known_only=True)
    return Entry(folder, path, material, watched, key)


# ---------------------------------------------------------------------------------------------
# What an entry stores besides the arrays
# ---------------------------------------------------------------------------------------------

def _config_classes() -> dict[str, type]:
    from sd_jax.models.clip import CLIPTextConfig
    from sd_jax.models.unet import UNetConfig
    from sd_jax.models.vae import VAEConfig

    return {"text_encoder": CLIPTextConfig, "unet": UNetConfig, "vae": VAEConfig}


def _describe(files: ModelFiles) -> dict[str, Any]:
    """The ModelFiles fields an entry restores, as JSON; refuses configs that do not round-trip."""
    classes = _config_classes()
    configs = {name: dataclasses.asdict(files.configs[name]) for name in MODEL_KEYS}
    for name in MODEL_KEYS:
        if classes[name](**json.loads(json.dumps(configs[name]))) != files.configs[name]:
            raise ValueError(f"the {name} config does not survive JSON")
    return {
        "configs": configs, "scheduler_config": files.scheduler_config,
        "tokenizer_dir": None if files.tokenizer_dir is None else str(files.tokenizer_dir),
        "source": files.source, "extra_dirs": {k: str(v) for k, v in files.extra_dirs.items()},
        "notes": list(files.notes), "pad_token": files.pad_token,
    }


def _model_files_from(meta: Mapping[str, Any]) -> ModelFiles:
    classes = _config_classes()
    configs = {name: classes[name](**meta["configs"][name]) for name in MODEL_KEYS}
    extra = {k: Path(v) for k, v in meta["extra_dirs"].items() if Path(v).is_dir()}
    tokenizer = meta["tokenizer_dir"]
    return ModelFiles(configs=configs, states={}, scheduler_config=dict(meta["scheduler_config"]),
                      tokenizer_dir=None if tokenizer is None else Path(tokenizer), source=meta["source"],
                      extra_dirs=extra, notes=list(meta["notes"]), pad_token=meta["pad_token"])


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def word_sum(array: np.ndarray) -> str:
    """The array's bytes as little-endian 64-bit words (zero-padded), summed modulo 2**64, in hex."""
    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    whole = raw.size // 8 * 8
    total = int(np.add.reduce(raw[:whole].view("<u8"), dtype=np.uint64)) if whole else 0
    tail = bytes(raw[whole:]) + b"\0" * (-(raw.size - whole) % 8) if raw.size > whole else b""
    total = (total + (int.from_bytes(tail, "little") if tail else 0)) % 2**64
    return f"{total:016x}"


def _write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _is_entry(path: Path) -> bool:
    stem = path.name[:-len(ENTRY_SUFFIX)] if path.name.endswith(ENTRY_SUFFIX) else ""
    return len(stem) == 64 and all(c in "0123456789abcdef" for c in stem)


def _is_our_temp(path: Path) -> bool:
    """save_safetensors' and _write_text_atomically's temporary names: .<name>.<32 hex>.tmp"""
    parts = path.name.split(".")
    return (path.name.startswith(".") and path.name.endswith(".tmp") and len(parts) >= 4
            and len(parts[-2]) == 32 and (_is_entry(Path(".".join(parts[1:-2]))) or parts[1] == "digests"))


def trim(folder: Path, cap: int, keep: Path | None = None) -> list[Path]:
    """Remove entries, least recently used first, until they total at most ``cap`` bytes; returns them."""
    now = time.time()
    entries = []
    for path in folder.iterdir():
        try:
            st = path.stat()
        except OSError:
            continue
        if _is_our_temp(path) and now - st.st_mtime > STALE_TEMP_SECONDS:
            path.unlink(missing_ok=True)
        elif _is_entry(path):
            entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in sorted(entries):
        if total <= cap:
            break
        if path == keep:
            continue
        try:
            path.unlink(missing_ok=True)
        except OSError:
            continue
        total -= size
        removed.append(path)
    return removed
