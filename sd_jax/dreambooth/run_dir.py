"""A run's output folder: a marker, a lock, and the rule that sd_jax only replaces files it wrote.

    run = RunDir.open(output_dir, overwrite=False)   # refuses a stranger's folder; locks it
    ...                                              # train, checkpoint, log
    with run.replacing_final():                      # final/ must hold only what sd_jax wrote
        save_pretrained(pipe, run.final, overwrite=True)
    run.close()                                      # releases the lock

Rules (the README's "output folder" section):

* A new or empty folder becomes a run: the marker ``.sd_jax_run.json`` is written first.
* A folder holding the marker is an sd_jax run and is resumed (or reported complete).
* A non-empty folder without the marker is refused (:class:`OutputDirError`) unless
  ``overwrite=True``; even then the names sd_jax writes (``checkpoints/``, ``logs/``,
  ``samples/``, ``final/``, ``model.safetensors``, ``config.json``) must not exist there:
  sd_jax never deletes or replaces a file it did not write.
* ``final/`` is replaced (atomically, by the exporter) only while it holds exactly the
  files recorded in the marker when sd_jax wrote it; ``model.safetensors`` likewise.
* One trainer per folder: ``.sd_jax.lock`` is locked (``fcntl.flock``) for the whole run and
  names its holder (pid, host, start time); a second trainer gets :class:`OutputDirBusy`.
  The lock is released when the run ends or the process dies (the file itself stays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MARKER = ".sd_jax_run.json"
LOCK = ".sd_jax.lock"
SINGLE_FILE = "model.safetensors"
OWNED = ("checkpoints", "logs", "samples", "final", SINGLE_FILE, "config.json")


class OutputDirError(ValueError):
    """The output folder cannot be used as it is (it holds someone else's files)."""


class OutputDirBusy(OutputDirError):
    """Another trainer holds the output folder's lock."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite."""


class TrainingInterrupted(Exception):
    """Ctrl-C stopped the run cleanly: the state is checkpointed and the run resumes."""


def _short(path: Path | str, limit: int = 120) -> str:
    text = os.fspath(path)
    return text if len(text) <= limit else "..." + text[-limit:]


def umask() -> int:
    """The process's file-creation mask: from /proc on Linux (read without changing it, so a thread
    creating files meanwhile is not affected), else set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give a folder made by ``mkdtemp`` (mode 0700) the mode ``mkdir`` would have given it."""
    os.chmod(path, 0o777 & ~umask())


def _older_run(root: Path) -> bool:
    """True when a folder without the marker holds exactly what an sd_jax run written before the marker
    existed holds: a train config.json and checkpoints/ of Orbax step folders only."""
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
        steps = list((root / "checkpoints").iterdir())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or not {"train", "optim", "concepts", "output_dir"} <= set(config):
        return False
    return bool(steps) and all(p.name.startswith(".") or (p.name.isdigit() and
                                                          (p / "_CHECKPOINT_METADATA").is_file()) for p in steps)


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclasses.dataclass
class RunDir:
    """An sd_jax run folder this process holds (see the module doc for the rules)."""

    root: Path
    primary: bool = True
    _lock_fd: int | None = None

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def single_file(self) -> Path:
        return self.root / SINGLE_FILE

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @classmethod
    def open(cls, root: str | os.PathLike, *, overwrite: bool = False, primary: bool = True) -> RunDir:
        """Check the folder may be used (nothing is written before that), lock it, mark it as a run."""
        root = Path(root).expanduser()
        run = cls(root, primary)
        if not primary:  # process 0 checks, locks and marks a multi-host run's folder
            return run
        if root.exists() and not root.is_dir():
            raise OutputDirError(f"--output-dir {_short(root)!r} is a file, not a folder")
        entries = sorted(p.name for p in root.iterdir() if p.name != LOCK) if root.is_dir() else []
        if entries and not run.marker.is_file():
            older = _older_run(root)
            if not overwrite:
                shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
                raise OutputDirError(
                    f"--output-dir {_short(root)!r} is not empty ({shown}) and is not an sd_jax run (no {MARKER}): "
                    + ("it looks like a run of an older sd_jax, pass --overwrite to adopt and resume it" if older
                       else "choose a new or empty folder, or pass --overwrite to train in it beside its files"))
            # An older sd_jax's run is adopted with its checkpoints, logs, samples and config (its final/ and
            # single file are still refused: the marker cannot tell they are unchanged).
            adopted = ("checkpoints", "logs", "samples", "config.json") if older else ()
            clash = [name for name in OWNED if (root / name).exists() and name not in adopted]
            if clash:
                raise OutputDirError(
                    f"--output-dir {_short(root)!r} already holds {', '.join(clash)}, which sd_jax did not write; "
                    "move them away first (sd_jax never deletes or replaces files it did not write)")
        root.mkdir(parents=True, exist_ok=True)
        run._lock()
        try:
            if not run.marker.is_file():
                run._write_marker({"sd_jax_run": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                   "final_files": None, "single_file": False})
            run.check_final()
        except BaseException:
            run.close()
            raise
        return run

    # -- the lock
    def _lock(self) -> None:
        import fcntl

        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 300).decode("utf-8", "replace").strip() or "a process that is starting"
            os.close(fd)
            raise OutputDirBusy(f"--output-dir {_short(self.root)!r} is in use by another trainer ({holder}); "
                                "wait for it to end or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n"
                  .encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        """Release the lock (closing the descriptor does it; the file stays)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- what sd_jax wrote
    def _read_marker(self) -> dict[str, Any]:
        try:
            data = json.loads(self.marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_marker(self, data: dict[str, Any]) -> None:
        _write_json(self.marker, data)

    def write_json(self, name: str, data: Any) -> None:
        """A JSON file of the run (e.g. config.json), written atomically."""
        if self.primary:
            _write_json(self.root / name, data)

    def check_final(self) -> None:
        """Refuse (before any work) when final/ or the single file holds something sd_jax did not write."""
        if not self.primary:
            return
        marker = self._read_marker()
        if self.final.exists():
            recorded = marker.get("final_files")
            foreign = _files(self.final) if not isinstance(recorded, list) else \
                sorted(set(_files(self.final)) - set(recorded))
            if foreign or not self.final.is_dir():
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                raise OutputDirError(f"{_short(self.final)} holds files sd_jax did not write ({shown or 'a file'}); "
                                     "move them away, sd_jax replaces final/ only when it holds just its own files")
        if self.single_file.exists() and not marker.get("single_file"):
            raise OutputDirError(f"{_short(self.single_file)} was not written by this run; move it away "
                                 "(sd_jax never replaces a file it did not write)")

    def final_is_current(self, step: int) -> bool:
        """True when final/ is this run's export of checkpoint ``step``."""
        return self.final.is_dir() and self._read_marker().get("final_step") == step

    @contextlib.contextmanager
    def replacing_final(self, step: int, single: bool) -> Iterator[None]:
        """Around the export of step ``step``: check final/ (and the single file) are sd_jax's, then record
        the written files in the marker and give final/ the mode the user's umask asks for."""
        self.check_final()
        yield
        if not self.primary:
            return
        honour_umask(self.final)
        marker = self._read_marker()
        marker.update(final_files=_files(self.final), final_step=step,
                      single_file=bool(single or marker.get("single_file")))
        self._write_marker(marker)


class StopOnInterrupt:
    """SIGINT (Ctrl-C) during training: the first asks the loop to stop cleanly after the current step
    (``requested``), a second raises KeyboardInterrupt at once. Only the main thread can install it."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def install(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
