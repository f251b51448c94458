"""Dreambooth end to end on a tiny model: the CLI, the output layout, resume after SIGKILL, NaN stop, learning."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from sd_jax import StableDiffusion
from sd_jax.dreambooth.config import load_config
from sd_jax.dreambooth.trainer import TrainingDiverged, train
from step_harness import FAST_COMPILE_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]
RES = 32


def _subject_images(folder: Path, n: int = 3, color=(220, 30, 30)) -> Path:
    """A distinctive synthetic subject: a coloured square on grey, a little jitter per photo."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((48, 48, 3), 128, np.uint8)
        x, y = rng.integers(4, 16, size=2)
        img[y:y + 24, x:x + 24] = color
        Image.fromarray(img).save(folder / f"subject{i}.png")
    return folder


def _config(tiny_folder, tmp_path, **over):
    instance = _subject_images(tmp_path / "instance")
    base = {
        "model.path": str(tiny_folder), "output_dir": str(tmp_path / "out"), "seed": 3,
        "concepts": [{"instance_dir": str(instance), "instance_prompt": "a photo of sks dog",
                      "class_prompt": "a photo of dog", "class_dir": str(tmp_path / "class"),
                      "num_class_images": 2}],
        "data.resolution": RES, "class_images.num_inference_steps": 2, "class_images.batch_size": 2,
        "train.max_train_steps": 4, "checkpoint.every": 2, "logging.log_every": 1,
        "logging.sample_steps": 2, "optim.learning_rate": 1e-4,
    }
    return load_config(None, {**base, **over})


def _run_cli(args, timeout=600, env_extra=None):
    env = {**os.environ, "SD_JAX_COMPILATION_CACHE": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "train_dreambooth.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def test_cli_end_to_end(tiny_folder, tmp_path):
    instance = _subject_images(tmp_path / "dog")
    out = tmp_path / "run"
    res = _run_cli(["--model", str(tiny_folder), "--instance-dir", str(instance),
                    "--instance-prompt", "a photo of sks dog", "--class-prompt", "a photo of dog",
                    "--class-dir", str(tmp_path / "class"), "--num-class-images", "2",
                    "--output-dir", str(out), "--resolution", str(RES), "--max-train-steps", "3",
                    "--checkpoint-every", "2", "--sample-every", "3", "--learning-rate", "1e-5",
                    "--train-text-encoder", "--save-single-file", "--no-progress",
                    "--set", "class_images.num_inference_steps=2", "--set", "logging.sample_steps=2",
                    "--set", "logging.log_every=1"],
                   # XLA's backend at -O0 (step_harness.COMPILER_OPTIONS): the same programs, half the compile time
                   env_extra={"XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILE_XLA_FLAGS}"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert list((out / "samples").glob("*.png"))
    assert (out / "final" / "model_index.json").is_file()
    assert (out / "model.safetensors").is_file()
    json.loads((out / "config.json").read_text())
    # The result loads in sd_jax and in diffusers, and generate.py runs on it.
    StableDiffusion.from_pretrained(out / "final")
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(out / "final")
    gen = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(out / "final"), "--prompt",
                          "a photo of sks dog", "--steps", "2", "--height", "32", "--width", "32",
                          "--outdir", str(tmp_path / "gen")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SD_JAX_COMPILATION_CACHE": "0",
                              "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAGS}"})
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert list((tmp_path / "gen").glob("*.png"))


@pytest.mark.parametrize("argv,match", [
    (["--instance-dir", "/nonexistent", "--instance-prompt", "x"], "/nonexistent"),
    (["--set", "optim.lr_schedule=sideways"], "lr_schedule"),
    (["--resolution", "30"], "resolution"),
    (["--set", "nonsense=1"], "nonsense"),
])
def test_cli_bad_values_one_line(tiny_folder, tmp_path, argv, match):
    instance = _subject_images(tmp_path / "dog")
    args = ["--model", str(tiny_folder), "--instance-dir", str(instance), "--instance-prompt", "a sks dog",
            "--output-dir", str(tmp_path / "o")] + argv
    res = _run_cli(args, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and match in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def _final_unet(out: Path) -> dict:
    from sd_jax.convert.files import read_state_dict

    return read_state_dict(out / "final" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow  # ~2 minutes: two full runs and a resumed one
def test_kill_and_resume_equals_uninterrupted(tiny_folder, tmp_path):
    """SIGKILL a run mid-way (possibly mid-save), resume it: final weights equal an uninterrupted run's."""
    common = ["--model", str(tiny_folder), "--instance-prompt", "a photo of sks dog", "--class-prompt",
              "a photo of dog", "--num-class-images", "2", "--resolution", str(RES), "--max-train-steps", "8",
              "--checkpoint-every", "1", "--learning-rate", "1e-4", "--no-progress",
              "--set", "class_images.num_inference_steps=2", "--set", "optim.ema_decay=0.9"]
    instance = _subject_images(tmp_path / "dog")
    reference = tmp_path / "ref"
    res = _run_cli(common + ["--instance-dir", str(instance), "--class-dir", str(tmp_path / "class"),
                             "--output-dir", str(reference)])
    assert res.returncode == 0, res.stderr[-3000:]

    killed = tmp_path / "killed"
    args = [sys.executable, str(ROOT / "train_dreambooth.py"), *common, "--instance-dir", str(instance),
            "--class-dir", str(tmp_path / "class"), "--output-dir", str(killed)]
    env = {**os.environ, "SD_JAX_COMPILATION_CACHE": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 400
    ckpts = killed / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        steps = [p for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
        if len(steps) >= 1 and max(int(p.name) for p in steps) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    res = _run_cli(common + ["--instance-dir", str(instance), "--class-dir", str(tmp_path / "class"),
                             "--output-dir", str(killed), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _final_unet(reference), _final_unet(killed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_folder, tmp_path):
    no_prior = [{"instance_dir": str(tmp_path / "instance"), "instance_prompt": "a photo of sks dog"}]
    config = _config(tiny_folder, tmp_path, **{"optim.learning_rate": 1e30, "optim.max_grad_norm": None,
                                               "train.max_train_steps": 6, "checkpoint.every": 1,
                                               "concepts": no_prior})  # no class images to sample: faster
    with pytest.raises(TrainingDiverged, match=r"the loss became .* at step \d+.*last good checkpoint") as info:
        train(config, progress=False)
    assert "\n" not in str(info.value)
    diverged = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    out = Path(config.output_dir)
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps, "the good steps before the divergence were checkpointed"
    assert steps[-1] < diverged and f"step {steps[-1]} in" in str(info.value)
    assert not (out / "final").exists()
    # the kept checkpoint is from before the divergence and finite (weights, EMA-free state, Adam moments)
    start = StableDiffusion.from_pretrained(tiny_folder).params
    params, _ = _restore_params(out, {"unet": start["unet"]}, steps[-1], ema=False)
    leaves = jax.tree.leaves(params)
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)


@pytest.mark.slow  # ~40 s (two trainings); tests/test_output_safety.py covers the folder rules fast
def test_output_dir_of_another_run_is_refused(tiny_folder, tmp_path):
    config = _config(tiny_folder, tmp_path, **{"train.max_train_steps": 1, "checkpoint.every": 1})
    train(config, progress=False)
    other = _config(tiny_folder, tmp_path, **{"train.max_train_steps": 1, "optim.learning_rate": 3e-4})
    with pytest.raises(ValueError, match="different configuration"):
        train(other, progress=False)


# ------------------------------------------------- original.yaml: interrupt, crash, resume, export, rerun

def _recipe_argv(tiny_folder, instance: Path, out: Path, steps: int = 4) -> list[str]:
    """The original recipe (UNet + text encoder) shrunk to a tiny model, with EMA and the single file."""
    return ["--config", str(ROOT / "configs" / "dreambooth" / "original.yaml"), "--model", str(tiny_folder),
            "--instance-dir", str(instance), "--instance-prompt", "a photo of sks dog", "--resolution", str(RES),
            "--max-train-steps", str(steps), "--checkpoint-every", "2", "--learning-rate", "1e-3", "--seed", "3",
            "--save-single-file", "--no-progress", "--set", "optim.ema_decay=0.5", "--set", "logging.log_every=1",
            "--output-dir", str(out)]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache for this module: the runs of one recipe compile the train step once
    (each train() call builds its own jit; on a busy CPU one compile of the text-encoder step takes minutes)."""
    from jax.experimental.compilation_cache import compilation_cache

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


@pytest.fixture(scope="module")
def recipe_run(tiny_folder, tmp_path_factory, compile_cache):
    """An uninterrupted 4-step run of configs/dreambooth/original.yaml through the CLI (in-process)."""
    from sd_jax.cli.train import main

    tmp = tmp_path_factory.mktemp("recipe")
    instance = _subject_images(tmp / "dog")
    old = os.umask(0o022)
    try:
        assert main(_recipe_argv(tiny_folder, instance, tmp / "ref")) == 0
    finally:
        os.umask(old)
    return instance, tmp / "ref"


def _tree_close(a, b, **tol) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **tol)
                                      for x, y in zip(la, lb))


def _restore_params(out: Path, like: dict, step: int, ema: bool = True) -> tuple[dict, dict | None]:
    """(params, ema) of checkpoint ``step``: {"unet"[, "text_encoder"]} trees shaped like ``like``."""
    from sd_jax.dreambooth.checkpoint import Checkpointer

    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32, sharding=single), like)
    with Checkpointer(out / "checkpoints", keep=2) as ckpt:
        parts, meta = ckpt.restore(step, {"params": abstract, **({"ema": abstract} if ema else {})})
    assert meta["step"] == step
    return parts["params"], parts.get("ema")


def test_original_recipe_exports_ema_and_trained_text_encoder(recipe_run, tiny_folder):
    """final/ and the single file hold the EMA weights (not the raw ones) of the UNet and of the trained text
    encoder; final/ has the mode the umask asks for (mkdtemp made it drwx------)."""
    _, out = recipe_run
    start = StableDiffusion.from_pretrained(tiny_folder).params
    like = {"unet": start["unet"], "text_encoder": start["text_encoder"]}
    params, ema = _restore_params(out, like, 4)
    final = StableDiffusion.from_pretrained(out / "final").params
    single = StableDiffusion.from_pretrained(out / "model.safetensors").params
    for part in ("unet", "text_encoder"):
        assert _tree_close(final[part], ema[part], rtol=0, atol=0), f"final/{part} is not the EMA"
        assert not _tree_close(final[part], params[part], rtol=0, atol=1e-6), f"final/{part} is the raw weights"
        assert not _tree_close(final[part], start[part], rtol=0, atol=1e-6), f"{part} did not train"
        assert _tree_close(single[part], ema[part], rtol=2e-3, atol=2e-3), f"single-file {part} is not the EMA"
    assert ((out / "final").stat().st_mode & 0o777) == 0o755
    assert json.loads((out / "config.json").read_text())["train"]["train_text_encoder"] is True


def test_interrupt_crash_and_resume_equal_an_uninterrupted_run(recipe_run, tiny_folder, tmp_path, monkeypatch,
                                                              capsys):
    """Fast kill-and-resume: Ctrl-C at step 2 stops cleanly (one line, exit 130, checkpoint 2), the resumed
    run crashes at step 4 (after logging step 3), the next resume finishes: weights bit for bit those of the
    uninterrupted run, and metrics.jsonl holds each step once."""
    from sd_jax.cli.train import main
    from sd_jax.dreambooth import trainer
    from sd_jax.dreambooth.metrics import MetricsLogger

    instance, ref = recipe_run
    out = tmp_path / "run"
    argv = _recipe_argv(tiny_folder, instance, out)
    scalars = MetricsLogger.scalars

    def interrupt_at_2(self, step, values):
        scalars(self, step, values)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(MetricsLogger, "scalars", interrupt_at_2)
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted at step 2 of 4" in err[0] and "resume" in err[0], err
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert not (out / "final").exists()
    monkeypatch.setattr(MetricsLogger, "scalars", scalars)

    update_batch = trainer.BatchBuilder.update_batch

    def crash_at_4(self, position, *args, **kwargs):
        if position == 3:
            raise RuntimeError("simulated crash")
        return update_batch(self, position, *args, **kwargs)

    monkeypatch.setattr(trainer.BatchBuilder, "update_batch", crash_at_4)
    assert main(argv) == 1                     # a bug's exit status: its traceback and a line asking for a report
    assert "simulated crash" in capsys.readouterr().err
    monkeypatch.setattr(trainer.BatchBuilder, "update_batch", update_batch)
    assert main(argv) == 0
    a, b = _final_unet(ref), _final_unet(out)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    want = [json.loads(line) for line in (ref / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in want]


def test_finished_run_is_complete_then_extends(recipe_run, tiny_folder, tmp_path, capsys):
    """Re-running a finished run says so and leaves final/ alone; a damaged checkpoint is named in one line
    with the step to go back to; --resume-step and a higher --max-train-steps extend the run from there."""
    import shutil

    from sd_jax.cli.train import main

    instance, ref = recipe_run
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    before = {p: p.stat().st_mtime_ns for p in (out / "final").rglob("*")}
    capsys.readouterr()
    assert main(_recipe_argv(tiny_folder, instance, out)) == 0
    assert "already complete (step 4 of 4)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "final").rglob("*")} == before
    # a flipped bit in the latest checkpoint: one line naming it and the previous good step, before any work
    data = max((p for p in (out / "checkpoints" / "4" / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    assert main(_recipe_argv(tiny_folder, instance, out, steps=5)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint step 4" in err[0] and "--resume-step 2" in err[0], err
    # resuming from the good step, with a higher --max-train-steps, extends the run; step 4 is kept aside
    assert main(_recipe_argv(tiny_folder, instance, out, steps=5) + ["--resume-step", "2"]) == 0
    said = capsys.readouterr().out
    assert "dreambooth: 3 instance images, 0 class images; steps 3-5 of 5; lr 0.001" in said
    assert "compiling the train step" in said and "XLA's memory estimate" in said
    assert "checkpoint step 5 saving" in said and "run summary" in said
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 5]                      # step 4 written again by the resumed run (keep=2)
    assert [p.name.split("-")[0] for p in (out / "checkpoints" / ".set_aside").iterdir()] == ["4"]
    assert json.loads((out / ".sd_jax_run.json").read_text())["final_step"] == 5
    assert not _tree_close(_final_unet(out), _final_unet(ref), rtol=0, atol=0)
    assert main(_recipe_argv(tiny_folder, instance, out, steps=3)) == 2
    assert "--max-train-steps 3 is below the step this run has reached (5)" in capsys.readouterr().err


def test_v_prediction_models_train_on_velocity(tiny_folder, tmp_path):
    """The trainer supports v-prediction: a model whose scheduler says so trains on v (diffusers'
    get_velocity), not on the noise."""
    import shutil

    import torch
    from diffusers import DDPMScheduler

    from sd_jax.dreambooth.step import StepModels
    from sd_jax.schedulers.schedule import training_target

    folder = tmp_path / "v"
    shutil.copytree(tiny_folder, folder)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text())
    sched_file.write_text(json.dumps({**sched, "prediction_type": "v_prediction"}))
    pipe = StableDiffusion.from_pretrained(folder)
    models = StepModels.from_pipeline(pipe, _config(tiny_folder, tmp_path))
    assert models.prediction_type == "v_prediction"
    ref = DDPMScheduler.from_config({**sched, "prediction_type": "v_prediction"})
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 3, 4, 4), np.float32), rng.standard_normal((2, 3, 4, 4), np.float32)
    t = np.array([10, 900])
    want = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    got = np.asarray(training_target(models.prediction_type, models.alphas_cumprod, x0, noise, t))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, noise, atol=0.1)


# XLA's own "Very slow compile?" banner (C++ logging) on a loaded machine: not sd_jax's output
_XLA_ALARM = re.compile(r"^([EWI]\d{4} [\d:.]+ +\d+ \S+\.cc:\d+\]|\*+$|\[Compiling module )")


@pytest.mark.slow  # a real process: JAX start-up, model load and compile (~1 minute on a quiet machine)
def test_ctrl_c_in_a_real_process_is_one_line_and_resumable(tiny_folder, tmp_path):
    """SIGINT to train_dreambooth.py mid-run: exit 130, one stderr line (no background-thread tracebacks at
    exit, never swallowed), and the checkpoint of the step it stopped at verifies and restores."""
    from sd_jax.dreambooth.checkpoint import Checkpointer

    instance = _subject_images(tmp_path / "dog")
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train_dreambooth.py"), "--model", str(tiny_folder), "--instance-dir",
            str(instance), "--instance-prompt", "a photo of sks dog", "--resolution", str(RES),
            "--max-train-steps", "100000", "--checkpoint-every", "100000", "--no-progress", "--output-dir", str(out),
            "--set", "logging.log_every=1"]
    env = {**os.environ, "SD_JAX_COMPILATION_CACHE": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "logs" / "metrics.jsonl"
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and log.read_text().count("\n") >= 2):
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip() and not _XLA_ALARM.match(line)]
    assert proc.returncode == 130, err[-3000:]
    assert len(lines) == 1 and "interrupted at step" in lines[0] and "Traceback" not in err, err[-3000:]
    step = int(re.search(r"interrupted at step (\d+)", lines[0]).group(1))
    assert step >= 2
    with Checkpointer(out / "checkpoints", keep=2) as ckpt:
        assert ckpt.all_steps() == [step] and ckpt.verify(step) is True
        assert ckpt.read_meta(step)["step"] == step
