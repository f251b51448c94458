"""Exit codes of every sd_jax command line (cli.common.run_main): 2 for bad input, 1 for a bug, 130 for Ctrl-C."""
from __future__ import annotations

import pytest

from sd_jax.cli import common
from sd_jax.convert.core import NonFiniteWeightsError, WeightMismatchError
from sd_jax.convert.diffusers import ModelFolderError, ShardIndexError
from sd_jax.convert.files import CheckpointFormatError, UnsafeCheckpointError
from sd_jax.convert.hub import HubDownloadError
from sd_jax.convert.limits import InputLimitError


def _raise(err: BaseException):
    def body() -> None:
        raise err
    return body


@pytest.mark.parametrize("err", [
    ValueError("bad --steps 0\nvalid: 1..1000"), FileNotFoundError("no such file"), PermissionError("denied"),
    CheckpointFormatError("x.ckpt: truncated"), UnsafeCheckpointError("x.ckpt: refusing os.system"),
    WeightMismatchError("the unet weights do not match\n  - a\n  - b"), NonFiniteWeightsError("NaN in conv_in.bias"),
    ShardIndexError("index.json: tensor 'a' is in two shards"), InputLimitError("nested 5000 deep"),
    ModelFolderError("no unet/"), HubDownloadError("offline"),
], ids=lambda e: type(e).__name__)
def test_user_errors_are_one_line_exit_2(capsys, err):
    assert common.run_main("prog", _raise(err)) == common.EXIT_USAGE == 2
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and out.err.startswith("prog: error: ") and "Traceback" not in out.err


@pytest.mark.parametrize("err", [RuntimeError("boom"), KeyError("k"), TypeError("t"), RecursionError("deep"),
                                 AttributeError("a"), AssertionError("x")], ids=lambda e: type(e).__name__)
def test_anything_else_is_a_bug_exit_1(capsys, err):
    assert common.run_main("prog", _raise(err)) == common.EXIT_BUG == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == (f"prog: internal error ({type(err).__name__}): this is a bug in sd_jax, not a problem with "
                         "your input; please report it with the traceback above and the command you ran")


def test_interrupt_and_passthrough(capsys):
    assert common.run_main("prog", _raise(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "prog: interrupted\n"
    with pytest.raises(RuntimeError, match="mine"):
        common.run_main("prog", _raise(RuntimeError("mine")), passthrough=(RuntimeError,))
    assert common.run_main("prog", lambda: None) == 0
