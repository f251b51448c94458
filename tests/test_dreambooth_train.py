"""Dreambooth end to end on a tiny model: the CLI, the output layout, resume after SIGKILL, NaN stop, learning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_jax import StableDiffusion
from sd_jax.dreambooth.config import load_config
from sd_jax.dreambooth.trainer import TrainingDiverged, train

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
                    "--set", "logging.log_every=1"])
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
                         env={**os.environ, "SD_JAX_COMPILATION_CACHE": "0"})
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
    config = _config(tiny_folder, tmp_path, **{"optim.learning_rate": 1e30, "optim.max_grad_norm": None,
                                               "train.max_train_steps": 6, "checkpoint.every": 1})
    with pytest.raises(TrainingDiverged, match=r"the loss became .* at step \d+.*last good checkpoint"):
        train(config, progress=False)
    steps = sorted(int(p.name) for p in (Path(config.output_dir) / "checkpoints").iterdir() if p.name.isdigit())
    assert steps, "the good steps before the divergence were checkpointed"
    assert not (Path(config.output_dir) / "final").exists()


def test_output_dir_of_another_run_is_refused(tiny_folder, tmp_path):
    config = _config(tiny_folder, tmp_path, **{"train.max_train_steps": 1, "checkpoint.every": 1})
    train(config, progress=False)
    other = _config(tiny_folder, tmp_path, **{"train.max_train_steps": 1, "optim.learning_rate": 3e-4})
    with pytest.raises(ValueError, match="different configuration"):
        train(other, progress=False)
