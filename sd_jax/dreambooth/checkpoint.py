"""Training checkpoints: a thin wrapper over Orbax's ``CheckpointManager`` with named items.

A checkpoint of step N is the directory ``<directory>/N/`` holding one Orbax item per
top-level part of the state plus ``meta`` (JSON)::

    ckpt = Checkpointer(out / "checkpoints", keep=3)          # async saves
    ckpt.save(step, state, {"data_position": pos, "config": cfg_dict})
    ...
    abstract = shd.abstract(jax.eval_shape(make_state), shardings)  # shapes + shardings
    state, meta = ckpt.restore(None, abstract)                # latest, straight into its shardings
    ckpt.close()                                              # waits for the last save

**Items.** A ``Mapping`` state saves each key as its own item, a dataclass (e.g. a
``flax.struct.dataclass`` TrainState) each pytree field: ``step/``, ``params/``,
``opt_state/``, ``ema/``, ``rng/``, ``meta/``. Any other pytree is one item ``state``.
Empty parts (``ema=None``) are not written and come back as they are in the restore
target. A restore may ask for a subset (``{"params": abstract_params}`` restores
only the weights).

**PRNG keys.** Typed keys (``jax.random.key``) are saved as their ``key_data`` (uint32)
and rebuilt with ``wrap_key_data`` when the restore target's leaf is a typed key, so
either a typed key or raw key data may live in the state (:func:`keys_to_data`,
:func:`data_to_keys` are the same conversions for other uses).

**Atomicity.** Orbax writes ``N.orbax-checkpoint-tmp/`` and renames it to ``N/`` only
after every array, the metadata and ``commit_success.txt`` are written; step listing
ignores tmp directories, which are removed when the next ``Checkpointer`` opens the
directory. Old checkpoints are dropped by an atomic rename into ``.trash/`` (emptied
after each save and on open) rather than a recursive delete, so a kill during the
clean-up cannot leave a half-deleted ``N/`` that looks complete. A process killed at
any moment (SIGKILL included) leaves the last complete checkpoint as the latest
(tests/test_dreambooth_checkpoint.py kills a saving child process to check this).
That is tested for a killed process; a power loss or OS crash is not (durability of the
rename then depends on the filesystem).

**Async saves.** ``save`` returns once the arrays are copied off the devices; the
state may then be donated to the next train step. Writing to disk continues in the
background; the next ``save``, ``restore``, ``wait`` or ``close`` waits for it.
Only one job may write a directory at a time (Orbax is multi-process, not multi-job,
safe); in multi-host runs every process calls every method.

**Checksums.** Once a save has completed (committed by Orbax), a background thread
writes ``N/sd_jax_checksums.json``: the size and SHA-256 of every file of the step.
``restore`` (and :meth:`Checkpointer.verify`) check them first, so a flipped bit or a
truncated file is a :class:`CheckpointDamaged` error naming the step and the file, never
silently different weights; Orbax's own read errors become one line too. A checkpoint
without the file (killed between the commit and the checksums, or written by an older
sd_jax) is restored unverified, with a warning.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import operator
import os
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger("sd_jax")

META = "meta"             # the JSON item
SINGLE = "state"          # item name of a state that is neither a Mapping nor a dataclass
TRASH = ".trash"          # old checkpoints are renamed here, then removed
SET_ASIDE = ".set_aside"  # steps a resume from an earlier step moves away (kept, never deleted)
CHECKSUMS = "sd_jax_checksums.json"
_LEAF = "value"           # a part that is a single array is saved as {"value": array}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_RESERVED = {META, "metrics", "descriptor", "_CHECKPOINT_METADATA"}


# ----------------------------------------------------------------------------- PRNG keys

def is_typed_key(x: Any) -> bool:
    """True for a typed PRNG key array (or its ShapeDtypeStruct)."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def keys_to_data(tree: Any) -> Any:
    """Every typed key leaf -> its raw ``jax.random.key_data`` (uint32); other leaves unchanged."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_typed_key(x) else x, tree)


def _key_impl(ref: Any) -> Any:
    """The PRNG implementation of a typed key array or of its ShapeDtypeStruct."""
    if isinstance(ref, jax.Array):
        return jax.random.key_impl(ref)
    return ref.dtype._impl  # jax exposes no public dtype -> impl; KeyTy has carried ``_impl`` since 0.4.16


def data_to_keys(tree: Any, like: Any) -> Any:
    """Inverse of :func:`keys_to_data`: leaves where ``like`` holds a typed key (array or
    ShapeDtypeStruct) are wrapped with that key's implementation."""
    return jax.tree.map(
        lambda x, ref: jax.random.wrap_key_data(x, impl=_key_impl(ref)) if is_typed_key(ref) else x,
        tree, like)


def _abstract_key_data(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """The uint32 key-data ShapeDtypeStruct of a typed-key one, sharded alike (trailing dims whole)."""
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    sharding = leaf.sharding
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(data.shape) - len(sharding.spec))
        sharding = NamedSharding(sharding.mesh, P(*spec))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


# ------------------------------------------------------------------------- state <-> items

def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in _RESERVED:
        raise ValueError(f"checkpoint item name {name!r} is not usable: expected a str of letters, digits, "
                         f"'_' or '-' starting with a letter, and none of {sorted(_RESERVED)}")
    return name


def split_items(state: Any) -> dict[str, Any]:
    """The named parts of a state: Mapping keys, dataclass pytree fields, or ``{"state": state}``."""
    if isinstance(state, Mapping):
        return {_check_name(k): v for k, v in state.items()}
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return {_check_name(f.name): getattr(state, f.name) for f in dataclasses.fields(state)
                if f.metadata.get("pytree_node", True)}
    return {SINGLE: state}


def _join_items(target: Any, parts: dict[str, Any]) -> Any:
    """Rebuild a state shaped like ``target`` from its restored parts."""
    if isinstance(target, Mapping):
        joined = {k: parts.get(k, v) for k, v in target.items()}
        return joined if isinstance(target, dict) else type(target)(joined)
    if dataclasses.is_dataclass(target) and not isinstance(target, type):
        return dataclasses.replace(target, **parts)
    return parts.get(SINGLE, target)


def _is_empty(tree: Any) -> bool:
    return not jax.tree.leaves(tree)


def _wrap(tree: Any) -> Any:
    """Orbax's StandardSave takes containers only: a bare leaf becomes {"value": leaf}."""
    return {_LEAF: tree} if jax.tree_util.treedef_is_leaf(jax.tree.structure(tree)) else tree


def _unwrap(restored: Any, target: Any) -> Any:
    return restored[_LEAF] if jax.tree_util.treedef_is_leaf(jax.tree.structure(target)) else restored


def _restore_target(name: str, tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings, typed keys as key data) Orbax restores into."""
    missing = []

    def leaf(path, x):
        sharding = getattr(x, "sharding", None)
        if not hasattr(x, "shape") or not hasattr(x, "dtype") or sharding is None:
            missing.append(name + jax.tree_util.keystr(path))
            return x
        sds = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return _abstract_key_data(sds) if is_typed_key(sds) else sds

    out = jax.tree_util.tree_map_with_path(leaf, tree)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"restore target leaves need a shape, dtype and sharding (a jax.ShapeDtypeStruct with "
                         f"sharding=..., or a jax.Array); these have none: {shown}")
    return out


def _step_int(step: Any) -> int:
    """A step as a Python int (int, NumPy or JAX integer scalar), >= 0."""
    try:
        if isinstance(step, bool):
            raise TypeError
        value = operator.index(step)
    except TypeError:
        value = -1
    if value < 0:
        raise ValueError(f"checkpoint step={step!r}: expected a non-negative integer")
    return value


def _short(err: BaseException, limit: int = 200) -> str:
    """The first line of an error message, cut to ``limit`` characters."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_json(meta: Any) -> dict:
    if not isinstance(meta, Mapping):
        raise ValueError(f"checkpoint meta must be a dict of JSON values, got {type(meta).__name__}")
    try:
        json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint meta is not JSON-serialisable ({e}); convert numpy/jax scalars, "
                         "paths and tuples to plain Python values") from e
    return dict(meta)


# ------------------------------------------------------------------------------- checksums

class CheckpointDamaged(ValueError):
    """A checkpoint's files differ from the checksums recorded when it was saved, or Orbax cannot read it."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)  # hashlib releases the GIL on large chunks: training goes on meanwhile
    return digest.hexdigest()


def _step_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(step_dir: str | os.PathLike) -> Path:
    """Record the size and SHA-256 of every file of a complete checkpoint in ``step_dir/CHECKSUMS``."""
    step_dir = Path(step_dir)
    files = {p.relative_to(step_dir).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _step_files(step_dir)}
    out = step_dir / CHECKSUMS
    tmp = step_dir / f".{CHECKSUMS}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def verify_checksums(step_dir: str | os.PathLike) -> str | None:
    """None when every recorded file is there with its size and hash; otherwise what is wrong (one phrase).

    Raises FileNotFoundError when no checksums were recorded for the step.
    """
    step_dir = Path(step_dir)
    try:
        recorded = json.loads((step_dir / CHECKSUMS).read_text())["files"]
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its checksum file is unreadable ({type(e).__name__})"
    for rel, want in sorted(recorded.items()):
        path = step_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} were saved (truncated or overwritten)"
        if _sha256(path) != want["sha256"]:
            return f"{rel} differs from what was saved (checksum mismatch)"
    return None


def set_aside(directory: str | os.PathLike, steps: list[int]) -> list[Path]:
    """Move checkpoint ``steps`` out of the step listing into ``directory/.set_aside/`` (nothing is deleted)."""
    directory = Path(directory)
    moved = []
    for step in steps:
        target = directory / SET_ASIDE / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(directory / str(step), target)
        moved.append(target)
    return moved


# ---------------------------------------------------------------------------- Checkpointer

class Checkpointer:
    """Orbax CheckpointManager over ``directory``: async, atomic saves keeping the ``keep`` latest."""

    def __init__(self, directory: str | epath.PathLike, *, keep: int, async_save: bool = True):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r}: expected a positive integer (checkpoints to keep)")
        self.directory = epath.Path(directory).absolute() if "://" not in str(directory) else epath.Path(directory)
        self.keep = keep
        self._primary = jax.process_index() == 0
        self._closed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,      # half-written N.orbax-checkpoint-tmp from a killed run
            todelete_subdir=TRASH,             # drop old steps by rename (atomic), see module doc
            enable_async_checkpointing=async_save,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)
        # Checksums are written once a save has committed, on a thread (local directories only).
        self._local = "://" not in str(directory)
        self._unsealed: list[int] = []
        self._sealing: list[concurrent.futures.Future] = []
        self._sealer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sd_jax-checksums")
        # Finish removing stale tmp directories now, not lazily at the first save.
        getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self._empty_trash()

    # -- queries
    def all_steps(self) -> list[int]:
        """Steps of complete checkpoints (ascending), plus a save still in flight in this process."""
        return sorted(int(s) for s in self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest step, or None. In a new process: the newest *complete* checkpoint."""
        return self._mngr.latest_step()

    def items(self, step: int) -> list[str]:
        """Item names stored in checkpoint ``step`` (``meta`` included)."""
        path = self.directory / str(step)
        return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.exists() else []

    # -- save
    def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None) -> bool:
        """Start saving ``state`` (pytree of arrays) and ``meta`` (JSON dict) as checkpoint ``step``.

        Returns once the arrays are off the devices (the state may then be donated); the
        files are written in the background. False (nothing saved) when ``step`` is not
        newer than the latest checkpoint.
        """
        step = _step_int(step)
        meta = _check_json({} if meta is None else meta)
        args = {}
        for name, part in split_items(state).items():
            part = keys_to_data(part)
            if not _is_empty(part):
                args[name] = ocp.args.StandardSave(_wrap(part))
        args[META] = ocp.args.JsonSave(meta)
        self._mngr.wait_until_finished()  # Orbax waits for the previous save anyway; then it gets its checksums
        self._seal()
        saved = self._mngr.save(step, args=ocp.args.Composite(**args))
        if not saved:
            log.warning("checkpoint step %d not saved: the latest checkpoint is step %s", step, self.latest_step())
        else:
            self._unsealed.append(step)
        self._empty_trash()
        return bool(saved)

    def wait(self) -> None:
        """Block until a background save and its checksums are written (raises the save's error, if any)."""
        self._mngr.wait_until_finished()
        self._seal()
        for future in self._sealing:
            future.result()
        self._sealing.clear()
        self._empty_trash()

    def verify(self, step: int) -> bool:
        """Check checkpoint ``step`` against its recorded checksums: True when verified, False when it has
        none (a warning), CheckpointDamaged naming the step, the file and the good steps before it otherwise."""
        self.wait()
        step = self._resolve(step)
        if not self._local:
            return False
        try:
            problem = verify_checksums(Path(str(self.directory / str(step))))
        except FileNotFoundError:
            log.warning("checkpoint step %d has no checksums (saved by an older sd_jax, or killed just after "
                        "the save): restoring it unverified", step)
            return False
        if problem is not None:
            raise CheckpointDamaged(step, self._damaged(step, problem))
        return True

    def _intact(self, step: int) -> bool:
        """True unless checkpoint ``step``'s files contradict its recorded checksums."""
        try:
            return not self._local or verify_checksums(Path(str(self.directory / str(step)))) is None
        except FileNotFoundError:
            return True  # no checksums recorded: may be good

    def _damaged(self, step: int, problem: str) -> str:
        """One line: which step is broken, why, and what to do."""
        good = next((s for s in reversed(self.all_steps()) if s < step and self._intact(s)), None)
        advice = (f"resume from the previous good checkpoint with --resume-step {good} (later steps are moved "
                  f"to {SET_ASIDE}/, not deleted)" if good is not None
                  else "no good earlier checkpoint is left; start a new run")
        return f"checkpoint step {step} in {self.directory} is damaged: {problem}; {advice}"

    # -- restore
    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """Restore checkpoint ``step`` (None: the latest) into ``abstract_state``'s shapes and shardings.

        ``abstract_state`` is a pytree shaped like the saved state (or a subset of its named
        parts) whose leaves are ``jax.ShapeDtypeStruct`` with ``.sharding`` (or arrays).
        Shapes and tree structure must match what was saved (a clear ValueError otherwise);
        a different dtype is a cast (e.g. float32 masters restored as bfloat16).
        Returns ``(state, meta)``.
        """
        self.wait()
        step = self._resolve(step)
        self.verify(step)
        stored = self.items(step)
        parts, args = {}, {}
        for name, target in split_items(abstract_state).items():
            if _is_empty(target):
                continue
            if name not in stored:
                raise ValueError(f"checkpoint step {step} in {self.directory} has no item {name!r}; it holds "
                                 f"{[s for s in stored if s != META]}")
            parts[name] = target
            args[name] = ocp.args.StandardRestore(_wrap(_restore_target(name, target)))
        args[META] = ocp.args.JsonRestore()
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot restore checkpoint step {step} of {self.directory} into the given "
                             f"state (does it match the saved structure and shapes?): {_short(e)}") from e
        except Exception as e:  # noqa: BLE001 - TensorStore/Orbax read errors: one line, not 150
            raise CheckpointDamaged(step, self._damaged(step, f"Orbax cannot read it ({type(e).__name__}: "
                                                              f"{_short(e)})")) from e
        out = {}
        for name, target in parts.items():
            out[name] = data_to_keys(_unwrap(restored[name], target), target)
        return _join_items(abstract_state, out), dict(restored[META])

    def read_meta(self, step: int | None = None) -> dict:
        """Only the JSON meta of checkpoint ``step`` (None: the latest)."""
        self.wait()
        step = self._resolve(step)
        return dict(self._mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])

    # -- lifecycle
    def close(self) -> None:
        """Wait for the last save, then release Orbax's threads (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._mngr.close()
            self._sealer.shutdown(wait=True)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals
    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            return steps[-1]
        step = _step_int(step)
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; steps: {steps}")
        return step

    def _seal(self) -> None:
        """Start writing the checksums of the saves that have completed (call after Orbax's wait)."""
        steps, self._unsealed = self._unsealed, []
        if self._primary and self._local:
            for step in steps:
                self._sealing.append(self._sealer.submit(self._write_checksums, step))

    def _write_checksums(self, step: int) -> None:
        try:
            write_checksums(Path(str(self.directory / str(step))))
        except FileNotFoundError:  # dropped by keep-N meanwhile
            log.debug("checkpoint step %d vanished before its checksums were written", step)

    def _empty_trash(self) -> None:
        """Remove checkpoints Orbax has renamed into .trash/ (primary process only)."""
        trash = self.directory / TRASH
        if not self._primary or not trash.exists():
            return
        for entry in list(trash.iterdir()):
            try:
                entry.rmtree() if entry.is_dir() else entry.unlink()
            except OSError as e:  # a concurrent rename or a vanished file: next time
                log.debug("could not remove %s: %s", entry, e)

