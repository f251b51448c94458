"""Dreambooth learns: a tiny model fine-tuned on a synthetic subject draws it for the instance
prompt, while the class prompt keeps drawing the class images (prior preservation).

Subject: a red square in the top-left corner ("a photo of sks dog"); class images: a blue
square in the bottom-right corner ("a photo of dog"), placed in the class folder (so they are
reused, not generated). The model is tiny and random except where ``tiny.learnable`` makes it
trainable like a real checkpoint (near-deterministic VAE posterior, unit-variance latents, a
text encoder that mixes the prompt into every position).

Measured in latent space (a random VAE decoder draws nothing recognisable): 20-step DDIM
samples from 8 fixed seeds per prompt, their RMS distance to the mean latent of the subject
images ("red") and of the class images ("blue"), before and after 1000 steps.
Measured on this machine: before, every sample is ~13.7 from both (the random UNet's samples
are far from any image) and the two prompts' samples differ by 0.02 RMS; after, instance
samples are 0.67 from red and 1.23 from blue, class samples 1.03 from red and 0.79 from blue,
and the per-seed difference (instance - class) points along (red - blue) with cosine 0.96.
The bounds below keep >= 2x margins. A trainer that paired prompts with the wrong images
(or ignored the text) fails the direction and separation checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sd_jax import StableDiffusion, sampling
from sd_jax.schedulers import get_scheduler, pad_schedule, schedule_length

ROOT = Path(__file__).resolve().parents[1]
RES = 32
SEEDS = list(range(100, 108))
INSTANCE, CLASS = "a photo of sks dog", "a photo of dog"


def squares(corner: str, color: tuple[int, int, int], n: int = 4) -> np.ndarray:
    """(n, RES, RES, 3) uint8: a 14-pixel square in one corner of a grey image, jittered by a pixel."""
    rng = np.random.default_rng(0)
    out = np.full((n, RES, RES, 3), 128, np.uint8)
    for i in range(n):
        dy, dx = rng.integers(0, 2, size=2)
        y, x = (1 + dy, 1 + dx) if corner == "top-left" else (17 - dy, 17 - dx)
        out[i, y:y + 14, x:x + 14] = color
    return out


def write(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i}.png")
    return folder


def subject_and_class(tmp_path: Path) -> tuple[Path, Path, Path, np.ndarray, np.ndarray, float]:
    """The subject's and class's image folders, the tiny model made learnable on both, the mean latents
    of the subject (red) and class (blue) images, and their RMS gap."""
    from tiny import make_tiny_sd

    subject, klass = squares("top-left", (220, 30, 30)), squares("bottom-right", (30, 30, 220))
    instance_dir, class_dir = write(tmp_path / "sks", subject), write(tmp_path / "dog", klass)
    folder = make_tiny_sd(tmp_path / "model", learnable_on=np.concatenate([subject, klass]) / 255.0)
    pipe = StableDiffusion.from_pretrained(folder)
    red = np.asarray(pipe.encode_image(subject / 255.0)).mean(axis=0)
    blue = np.asarray(pipe.encode_image(klass / 255.0)).mean(axis=0)
    gap = float(np.sqrt(((red - blue) ** 2).mean()))
    assert gap > 0.8, f"subject and class latents must differ to test anything (RMS {gap:.3f})"
    return Path(folder), instance_dir, class_dir, red, blue, gap


def train_cli(model: Path, out: Path, instance_dir: Path, instance_prompt: str, steps: int, lr: float,
              *extra: str, class_dir: Path | None = None) -> None:
    """train_dreambooth.py on RES² images, seed 3, no flips, no checkpoints: in a one-device process
    (a batch of 2 on 8 host devices is mostly padding). ``class_dir``: prior preservation with CLASS."""
    prior = ["--class-prompt", CLASS, "--class-dir", str(class_dir), "--num-class-images", "4"] if class_dir else []
    res = subprocess.run(
        [sys.executable, str(ROOT / "train_dreambooth.py"), "--model", str(model), "--instance-dir",
         str(instance_dir), "--instance-prompt", instance_prompt, *prior, "--output-dir", str(out),
         "--resolution", str(RES), "--seed", "3", "--max-train-steps", str(steps), "--learning-rate", str(lr),
         "--checkpoint-every", "100000", "--no-progress", "--set", "data.random_flip=false", *extra],
        capture_output=True, text=True, timeout=1800, cwd=ROOT,
        env={**os.environ, "SD_JAX_COMPILATION_CACHE": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert res.returncode == 0, res.stderr[-3000:]


def sample_latents(pipe: StableDiffusion, prompt: str) -> np.ndarray:
    """(8, h, w, 4) final latents of 20-step DDIM, no guidance, one per seed in SEEDS."""
    sched = get_scheduler("ddim")
    shape = (RES // 8, RES // 8, 4)
    state = sched.create(pipe.noise_schedule(), 20, (len(SEEDS), *shape))
    state = pad_schedule(sched, state, schedule_length(pipe.noise_schedule()))
    keys = sampling.seed_keys(SEEDS)
    cond = pipe.encode_prompt([prompt] * len(SEEDS))
    run = sampling.compiled_denoise(pipe.unet, sched, "txt2img", False, sampling.data_mesh())
    return np.asarray(run(pipe.params["unet"], state, sampling.initial_noise(keys, shape), cond, None,
                          jnp.ones((len(SEEDS),)), keys, {}))


def distances(pipe: StableDiffusion, red: np.ndarray, blue: np.ndarray) -> dict[str, object]:
    """Mean RMS distance of each prompt's samples to the subject (red) and class (blue) latents."""
    lat = {"instance": sample_latents(pipe, INSTANCE), "class": sample_latents(pipe, CLASS)}
    rms = lambda a, b: float(np.sqrt(((a - b) ** 2).mean(axis=(1, 2, 3))).mean())  # noqa: E731
    out: dict[str, object] = {f"{k}_to_{name}": rms(v, target) for k, v in lat.items()
                              for name, target in (("red", red), ("blue", blue))}
    diff = (lat["instance"] - lat["class"]).mean(axis=0).ravel()  # paired by seed
    axis = (red - blue).ravel()
    out["diff_rms"] = float(np.sqrt((diff ** 2).mean()))
    out["cosine"] = float(diff @ axis / (np.linalg.norm(diff) * np.linalg.norm(axis) + 1e-12))
    return out


@pytest.mark.slow  # ~75 s: a quality check; the trainer's behaviour is covered by test_dreambooth_train
def test_dreambooth_learns_the_subject_and_keeps_the_class(tmp_path):
    folder, instance_dir, class_dir, red, blue, gap = subject_and_class(tmp_path)
    before = distances(StableDiffusion.from_pretrained(folder), red, blue)

    out = tmp_path / "run"
    train_cli(folder, out, instance_dir, INSTANCE, 1000, 1e-3, "--set", "logging.sample_every=0",
              "--set", "logging.log_every=100", class_dir=class_dir)
    after = distances(StableDiffusion.from_pretrained(out / "final"), red, blue)
    report = f"before {before}\nafter {after}"

    # Before: the prompts barely matter (their samples differ by ~1% of their size, in no
    # particular direction) and every sample is far from both kinds of image.
    assert before["diff_rms"] < 0.05 * before["instance_to_red"] and abs(before["cosine"]) < 0.5, report
    assert min(before["instance_to_red"], before["class_to_red"]) > 2 * gap, report
    # After: instance samples moved to the subject (nearer it than to the class images) ...
    assert after["instance_to_red"] < 0.25 * before["instance_to_red"], report
    assert after["instance_to_blue"] - after["instance_to_red"] > 0.25, report
    # ... while class samples did not move the same way: they stay nearer the class images,
    # farther from the subject than the instance samples are.
    assert after["class_to_red"] - after["instance_to_red"] > 0.15, report
    assert after["class_to_red"] - after["class_to_blue"] > 0.1, report
    # Per seed, what the instance prompt changes points from the class images to the subject.
    assert after["cosine"] > 0.6 and after["diff_rms"] > 0.25 * gap, report
