"""Pickle opcodes written by hand, for tests that build hostile or broken torch checkpoints."""
from __future__ import annotations

import struct


def pickle_str(text: str) -> bytes:
    """Opcode BINUNICODE for a str."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def pickle_int(value: int) -> bytes:
    """Opcode BININT for a 32-bit int."""
    return b"J" + struct.pack("<i", value)


def pickle_int_tuple(values: tuple[int, ...]) -> bytes:
    """Opcodes for a tuple of ints."""
    return b"(" + b"".join(pickle_int(v) for v in values) + b"t"
