"""Pieces every sd_jax command line shares: one-line errors, exit codes, cheap early checks.

A bad value ends a command with ONE line on stderr (``prog: error: ...``) and
exit status 2, never a traceback (a bug gets its traceback, a line asking for a
report, and exit 1); the checks here are cheap (argument values, files exist
and are readable, the output folder is writable) so they run before any model
is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_BUG = 1          # an unexpected exception: a bug in sd_jax (traceback + a request to report it)
EXIT_USAGE = 2        # a bad value or an unusable file: the user can fix it
EXIT_INTERRUPTED = 130

# The compute dtypes sd_jax.pipeline.parse_dtype accepts (kept literal so `--help` needs no model code).
DTYPE_CHOICES = ("float32", "bfloat16", "float16")

# Errors a user can fix; anything else is a bug and keeps its traceback. The loader's own errors
# (CheckpointFormatError, UnsafeCheckpointError, WeightMismatchError, NonFiniteWeightsError,
# ShardIndexError, InputLimitError: ValueError; ModelFolderError, HubDownloadError: OSError) are among them.
USER_ERRORS = (ValueError, OSError)


def one_line(err: BaseException | str) -> str:
    """A message (or exception) as one line: its lines joined, its type named when it has no text."""
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def print_error(prog: str, err: BaseException | str) -> int:
    """Print ``prog: error: <one line>`` to stderr and return the exit status for it."""
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return EXIT_USAGE


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown choice, missing flag, bad number) are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def argument_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` from a converter whose ValueError message is the error to print."""
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = convert.__name__
    return parse


def run_main(prog: str, body: Callable[[], Any], *, passthrough: tuple[type[BaseException], ...] = ()) -> int:
    """Call ``body()`` and turn what it raises into an exit status.

    A user error (``USER_ERRORS``: bad values, unusable files, and every loader error, which all
    derive from them) is one stderr line and exit 2; Ctrl-C exit 130; any other exception is a
    bug: its traceback, one line asking for a report, exit 1. ``passthrough`` exception types
    propagate unchanged, for callers that give them their own exit status.
    """
    try:
        body()
    except passthrough:
        raise
    except USER_ERRORS as err:
        return print_error(prog, err)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 (everything else is a bug, reported as one)
        return print_bug(prog, err)
    return EXIT_OK


def print_bug(prog: str, err: BaseException) -> int:
    """Print the traceback of an unexpected exception and one line asking for a report; return EXIT_BUG."""
    traceback.print_exception(err, file=sys.stderr)
    print(f"{prog}: internal error ({type(err).__name__}): this is a bug in sd_jax, not a problem with your input; "
          "please report it with the traceback above and the command you ran", file=sys.stderr)
    return EXIT_BUG


def check_model_source(model: str) -> None:
    """A model path must exist; a hub id must be cached or reachable (one line at once offline)."""
    from sd_jax.generation import check_model_source as check  # the library's rule, shared with generate

    check(model)


def check_readable_file(path: str | Path, flag: str) -> Path:
    """The path of an existing, readable file, or an error naming the flag and the path."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {str(path)!r} does not exist or is not a file")
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as err:
        raise OSError(f"{flag} {str(path)!r} cannot be read: {err.strerror or err}") from None
    return path


def prepare_output_dir(path: str | Path, flag: str = "--outdir") -> Path:
    """Create the folder if needed and prove it is writable (by writing and removing a file)."""
    from sd_jax.outputs import prepare

    return prepare(path, flag)


def read_lines(path: str | Path, flag: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file, stripped, ``#`` comment lines skipped."""
    path = check_readable_file(path, flag)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{flag} {str(path)!r} is not UTF-8 text: {err.reason} at byte {err.start}") from None
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def format_paths(paths: Sequence[Path], limit: int = 6) -> str:
    """A few paths for a summary line: all of them, or the first and last few."""
    names = [os.fspath(p) for p in paths]
    if len(names) <= limit:
        return ", ".join(names)
    half = limit // 2
    return ", ".join(names[:half]) + f", ... ({len(names) - limit} more) ..., " + ", ".join(names[-half:])
