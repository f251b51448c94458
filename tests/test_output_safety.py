"""The Dreambooth output folder never loses a user's files: run marker, --overwrite, final/ ownership, one
trainer per folder (an fcntl lock naming its holder). Cheap: no model is trained here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sd_jax.dreambooth.run_dir import LOCK, MARKER, OutputDirBusy, OutputDirError, RunDir

ROOT = Path(__file__).resolve().parents[1]


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _users_folder(tmp_path: Path) -> Path:
    """What a user might point --output-dir at by mistake: their own model, config and checkpoints."""
    out = tmp_path / "mine"
    (out / "final").mkdir(parents=True)
    (out / "final" / "notes.txt").write_text("my notes")
    (out / "checkpoints" / "3").mkdir(parents=True)
    (out / "checkpoints" / "3" / "weights.bin").write_bytes(b"\x01\x02")
    (out / "config.json").write_text('{"mine": true}')
    (out / "model.safetensors").write_bytes(b"not yours")
    return out


def test_foreign_folder_is_refused_and_left_untouched(tmp_path):
    out = _users_folder(tmp_path)
    before = _listing(out)
    with pytest.raises(OutputDirError, match=r"is not empty .* not an sd_jax run .*--overwrite") as info:
        RunDir.open(out)
    assert "\n" not in str(info.value)
    # --overwrite lets a run share the folder, but never with the names sd_jax would replace
    with pytest.raises(OutputDirError, match=r"checkpoints, final, model.safetensors, config.json.*did not write"):
        RunDir.open(out, overwrite=True)
    assert _listing(out) == before and not (out / MARKER).exists()


def test_overwrite_trains_beside_other_files(tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "photo.png").write_bytes(b"png")
    run = RunDir.open(out, overwrite=True)
    run.close()
    assert (out / MARKER).is_file() and (out / "photo.png").read_bytes() == b"png"
    RunDir.open(out).close()  # now an sd_jax run: no flag needed
    RunDir.open(tmp_path / "new").close()
    empty = tmp_path / "empty"
    empty.mkdir()
    RunDir.open(empty).close()
    assert (tmp_path / "new" / MARKER).is_file() and (empty / MARKER).is_file()


def test_final_is_replaced_only_while_it_holds_sd_jax_files(tmp_path):
    out = tmp_path / "run"
    run = RunDir.open(out)
    with run.replacing_final(step=4, single=False):
        (out / "final" / "unet").mkdir(parents=True)
        (out / "final" / "unet" / "w.safetensors").write_bytes(b"w")
    assert run.final_is_current(4) and not run.final_is_current(5)
    run.check_final()                                   # its own files: fine
    (out / "final" / "my_readme.md").write_text("mine")  # the user adds a file
    with pytest.raises(OutputDirError, match=r"final holds files sd_jax did not write \(my_readme.md\)"):
        run.check_final()
    with pytest.raises(OutputDirError, match="my_readme.md"):
        with run.replacing_final(step=5, single=False):
            raise AssertionError("the export must not start")
    (out / "final" / "my_readme.md").unlink()
    (out / "model.safetensors").write_bytes(b"someone's")
    with pytest.raises(OutputDirError, match=r"model.safetensors was not written by this run"):
        run.check_final()
    run.close()
    with pytest.raises(OutputDirError, match="model.safetensors"):  # and at the next start, before any work
        RunDir.open(out)


def test_final_gets_the_mode_the_umask_asks_for(tmp_path):
    """mkdtemp makes final/ drwx------; the export gives it what mkdir would (0755 under umask 022)."""
    old = os.umask(0o022)
    try:
        run = RunDir.open(tmp_path / "run")
        with run.replacing_final(step=1, single=False):
            final = tmp_path / "run" / "final"
            final.mkdir(mode=0o700)
            os.chmod(final, 0o700)
        assert (final.stat().st_mode & 0o777) == 0o755
        run.close()
    finally:
        os.umask(old)


_HOLDER = textwrap.dedent("""
    import sys, time
    from sd_jax.dreambooth.run_dir import RunDir
    run = RunDir.open(sys.argv[1])
    print("locked", flush=True)
    sys.stdin.readline()
""")


def test_second_trainer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusy, match=rf"in use by another trainer \(pid {holder.pid} on "):
            RunDir.open(out)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    RunDir.open(out).close()           # released when the holder ended
    assert (out / LOCK).is_file()


def test_cli_refuses_a_foreign_folder_and_a_held_one_in_one_line(tiny_folder, tmp_path):
    instance = tmp_path / "dog"
    instance.mkdir()
    out = _users_folder(tmp_path)
    before = _listing(out)
    env = {**os.environ, "SD_JAX_COMPILATION_CACHE": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    argv = [sys.executable, str(ROOT / "train_dreambooth.py"), "--model", str(tiny_folder), "--instance-dir",
            str(instance), "--instance-prompt", "a sks dog", "--resolution", "32", "--no-progress"]
    res = subprocess.run(argv + ["--output-dir", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an sd_jax run" in lines[0] and "--overwrite" in lines[0], lines
    assert _listing(out) == before
    held = RunDir.open(tmp_path / "held")
    try:
        res = subprocess.run(argv + ["--output-dir", str(tmp_path / "held")], capture_output=True, text=True,
                             timeout=300, env=env)
    finally:
        held.close()
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and f"pid {os.getpid()}" in lines[0], res.stderr[-2000:]


@pytest.mark.parametrize("error,code,text", [
    ("diverged", 2, "the loss became nan at step 3"),
    ("interrupted", 130, "interrupted at step 2 of 4"),
])
def test_cli_turns_diverged_and_interrupted_runs_into_one_line(monkeypatch, capsys, error, code, text):
    from sd_jax.cli import train as cli
    from sd_jax.dreambooth.run_dir import TrainingDiverged, TrainingInterrupted

    def run(args):
        raise (TrainingDiverged if error == "diverged" else TrainingInterrupted)(text + "; more")

    monkeypatch.setattr(cli, "run", run)
    assert cli.main(["--no-progress"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_dreambooth.py: ") and text in err[0]


def test_help_shows_every_default(monkeypatch):
    from sd_jax.cli.train import FLAG_KEYS, build_parser

    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside a default
    parser = build_parser()
    text = " ".join(parser.format_help().split())
    for flag in ("--resolution", "--max-train-steps", "--learning-rate", "--text-encoder-lr", "--seed",
                 "--checkpoint-every", "--train-text-encoder", "--save-single-file", "--num-class-images"):
        assert flag in text
    for action in parser._actions:
        if action.dest in FLAG_KEYS:
            assert "(default: " in (action.help or ""), action.dest
    assert "(default: 512)" in text and "(default: CompVis/stable-diffusion-v1-4)" in text
    assert "float16" in text  # the single file's dtype


def test_a_run_of_an_older_sd_jax_is_adopted_only_with_overwrite(tmp_path):
    """A run written before the marker existed (train config.json, Orbax step folders) is recognised: the
    refusal says --overwrite adopts it, and --overwrite keeps its checkpoints, logs and config."""
    out = tmp_path / "old"
    (out / "checkpoints" / "2").mkdir(parents=True)
    (out / "checkpoints" / "2" / "_CHECKPOINT_METADATA").write_text("{}")
    (out / "logs").mkdir()
    (out / "config.json").write_text('{"train": {}, "optim": {}, "concepts": [], "output_dir": "old"}')
    before = _listing(out)
    with pytest.raises(OutputDirError, match="older sd_jax, pass --overwrite to adopt"):
        RunDir.open(out)
    RunDir.open(out, overwrite=True).close()
    assert (out / MARKER).is_file() and all(_listing(out)[k] == v for k, v in before.items())
    # a user's folder that merely has a checkpoints/ of other things is not taken for one
    mine = _users_folder(tmp_path)
    with pytest.raises(OutputDirError, match="choose a new or empty folder"):
        RunDir.open(mine)
