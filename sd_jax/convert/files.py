"""Open any single weight file users hold as a flat {name: np.ndarray}, safely and without torch.

The format is chosen from the file's content (its first bytes), not only its extension, and an
extension outside ``VALID_SUFFIXES`` is refused. Torch zip checkpoints go through the restricted
unpickler in ``torch_pickle``; safetensors through ``safetensors_io``. Every failure is a
``CheckpointFormatError`` (or ``UnsafeCheckpointError``) naming the file and what is wrong.

Arrays from safetensors files are read-only views into a memory map of the file (copy them to
modify); arrays from torch files are ordinary in-memory arrays, read from the archive once.
``strict`` applies to torch files only: True (for diffusers ``.bin``) admits tensors alone, False
(for CompVis ``.ckpt``) also admits Lightning objects as inert placeholders.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sd_jax.convert.limits import short
from sd_jax.convert.safetensors_io import CheckpointFormatError, load_safetensors, save_safetensors
from sd_jax.convert.torch_pickle import UnsafeCheckpointError, extract_state_dict, load_torch_checkpoint

__all__ = [
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "VALID_SUFFIXES",
    "WeightFile",
    "detect_format",
    "read_state_dict",
    "read_weight_file",
    "save_safetensors",
]

SAFETENSORS_SUFFIXES: tuple[str, ...] = (".safetensors",)
TORCH_SUFFIXES: tuple[str, ...] = (".bin", ".ckpt", ".pt", ".pth")
VALID_SUFFIXES: tuple[str, ...] = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES

# (magic prefix, what the file looks like) for files that are clearly not weights.
_LOOKALIKES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"version https://git-lfs", "a Git LFS pointer file, not the weights (run `git lfs pull`)"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive (unpack it first)"),
    (b"Rar!", "a RAR archive (unpack it first)"),
    (b"%PDF", "a PDF document"),
    (b"\x80", "a bare pickle: a legacy (pre-1.6, non-zip) torch checkpoint, which sd_jax does not "
              "unpickle; re-save it with torch.save in the zip format, or convert to .safetensors"),
)


@dataclass(frozen=True)
class WeightFile:
    """Tensors read from one weight file, the entries that were not tensors, and any metadata."""

    path: Path
    format: str  # "safetensors" or "torch"
    tensors: dict[str, np.ndarray]
    skipped: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


def _fail(path: str | os.PathLike, problem: str) -> CheckpointFormatError:
    """Build a CheckpointFormatError that names the file and what is wrong with it."""
    return CheckpointFormatError(f"{os.fspath(path)}: {problem}")


def _looks_like_safetensors(head: bytes) -> bool:
    """True if the first bytes are an 8-byte length field followed by the start of a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{"


def _lookalike(head: bytes) -> str | None:
    """Name what a file looks like if its magic bytes say it is clearly not weights, else None."""
    for magic, what in _LOOKALIKES:
        if head.startswith(magic):
            return what
    return None


def _describe(head: bytes) -> str:
    """Say in words what a file that is neither safetensors nor a torch zip looks like."""
    if (what := _lookalike(head)) is not None:
        return what
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    stripped = head.lstrip()
    if stripped[:1] == b"<":
        return "an HTML/XML text file (perhaps an error page saved instead of the download)"
    if stripped[:1] in (b"{", b"["):
        return "a JSON text file"
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return f"a text file starting with {head[:40].decode('ascii')!r}"
    return f"unrecognised binary data starting with {head[:16].hex(' ')}"


def detect_format(path: str | os.PathLike) -> str:
    """Return "safetensors" or "torch" for a weight file, judged by content; raise naming the problem."""
    p = Path(path)
    if not p.exists():
        raise _fail(path, "no such file")
    if p.is_dir():
        raise _fail(path, "is a directory, expected a weight file (a diffusers folder is loaded by the pipeline)")
    if p.suffix.lower() not in VALID_SUFFIXES:
        raise _fail(path, f"unknown weight-file extension {short(p.suffix)}; valid: {', '.join(VALID_SUFFIXES)}")
    file_size = p.stat().st_size
    if file_size == 0:
        raise _fail(path, "is empty (0 bytes); the download or copy probably failed")
    with open(p, "rb") as f:
        head = f.read(64)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "torch"
    if _lookalike(head) is None and (_looks_like_safetensors(head) or p.suffix.lower() in SAFETENSORS_SUFFIXES):
        return "safetensors"  # the reader reports precisely what is wrong with a damaged header
    raise _fail(path, f"is not a weight file: it looks like {_describe(head)}")


def read_weight_file(path: str | os.PathLike, *, strict: bool = True) -> WeightFile:
    """Read a .safetensors or torch zip (.bin/.ckpt/.pt/.pth) file into a WeightFile."""
    kind = detect_format(path)
    if kind == "safetensors":
        tensors, metadata = load_safetensors(path)
        return WeightFile(Path(path), kind, tensors, metadata=metadata)
    tensors, skipped = extract_state_dict(load_torch_checkpoint(path, strict=strict), source=path)
    return WeightFile(Path(path), kind, tensors, skipped=tuple(skipped))


def read_state_dict(path: str | os.PathLike, *, strict: bool = True) -> dict[str, np.ndarray]:
    """Read a weight file as a flat {name: array}; strict=False admits inert Lightning objects (.ckpt)."""
    return read_weight_file(path, strict=strict).tensors
