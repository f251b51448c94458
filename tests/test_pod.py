"""A pod on localhost: train_dreambooth.py and generate.py as 2 processes x 4 CPU devices (through
``python -m sd_jax.launch``) against 1 process x 8 devices, on the tiny model.

The trainer must run the same computation whatever the process count: same final weights (the two runs'
updates from the starting weights agree per tensor to 1e-3 of the update and 1e-5 of the weights' scale,
give or take one float32 step of the stored weights),
class images made once, outputs written once by process 0, a NaN stop reached by every process at the
same step. The sampler splits prompts across processes and writes each image once, as one process would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from PIL import Image
from step_harness import FAST_COMPILE_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]
RES = 32
TIMEOUT_S = 1500  # the machine may be shared: generous, the runs themselves are small
# Adam divides by sqrt(v) + eps: with eps = 1e-8, a weight whose gradients nearly cancel over the steps moves
# by a noisy fraction of lr, so float32 reduction-order noise (the cross-process all-reduce adds in another
# order than the in-process one) shows up at ~1e-3 of some tensors' updates (measured: 1.1e-3 on one attention
# weight after 2 steps). eps = 1e-4 bounds that amplification, as tests/step_harness.py does; a wrong batch
# layout moves every tensor's update by ~100 % whatever eps is.
ADAM_EPS = 1e-4
T = TypeVar("T")


def _subject_images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((48, 48, 3), 128, np.uint8)
        x, y = rng.integers(4, 16, size=2)
        img[y:y + 24, x:x + 24] = (220, 30, 30)
        Image.fromarray(img).save(folder / f"subject{i}.png")
    return folder


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without the caller's JAX/XLA/TPU settings, the compilation cache off, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "TPU_"))}
    env.update(SD_JAX_COMPILATION_CACHE="0", **extra)
    return env


@contextlib.contextmanager
def two_processes(args: list[str], log_dir: Path, **extra_env: str) -> Iterator[list[subprocess.Popen]]:
    """``python ARGS`` as 2 processes x 2 CPU devices of one JAX job, started directly (no launcher: as on a
    pod, where nothing stops the others when one dies), writing ``log_dir/p0.log`` and ``p1.log``.
    On leaving, a process still running is killed; both are reaped and their logs closed."""
    from sd_jax.launch import child_env, free_port

    port, base = free_port(), _clean_env(**extra_env)
    logs = [open(log_dir / f"p{i}.log", "w") for i in range(2)]
    procs: list[subprocess.Popen] = []
    try:
        for i in range(2):
            procs.append(subprocess.Popen([sys.executable, *args], env=child_env(base, i, 2, port, 2), cwd=ROOT,
                                          stdout=logs[i], stderr=subprocess.STDOUT))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()


def wait_while_running(procs: list[subprocess.Popen], found: Callable[[], T | None], poll_s: float) -> T | None:
    """Poll ``found()`` every ``poll_s`` seconds while every process runs (at most TIMEOUT_S); its first
    non-None value, or None when a process ended or time ran out first."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if (value := found()) is not None:
            return value
        time.sleep(poll_s)
    return None


def launch(processes: int, devices: int, command: list[str], log_dir: Path,
           timeout: float = TIMEOUT_S, **extra_env: str) -> subprocess.CompletedProcess:
    """``python -m sd_jax.launch`` with a clean JAX environment (plus ``extra_env``); process 0's output is
    captured."""
    env = {**_clean_env(**extra_env), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "sd_jax.launch", "--processes", str(processes), "--devices-per-process",
            str(devices), "--log-dir", str(log_dir), "--grace", "60", "--", *command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _report(res: subprocess.CompletedProcess, log_dir: Path) -> str:
    others = "".join(f"\n--- {p.name}:\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(log_dir.glob("*.log")))
    return f"status {res.returncode}\n--- process 0:\n{res.stdout[-2500:]}\n{res.stderr[-2500:]}{others}"


def _read_unet(folder: Path) -> dict[str, np.ndarray]:
    from sd_jax.convert.files import read_state_dict

    weights = read_state_dict(folder / "unet" / "diffusion_pytorch_model.safetensors")
    return {k: np.asarray(v) for k, v in weights.items()}


def assert_same_training(start: dict, a: dict, b: dict, update_tol: float = 1e-3, scale_tol: float = 1e-5,
                         float32_steps: int = 0) -> None:
    """Per tensor: |update_a - update_b| <= update_tol * |update| and <= scale_tol * |weights| (max norms),
    each plus ``float32_steps`` float32 spacings of the tensor's largest weight: the weights are stored in
    float32, so two runs whose updates agree to far below that can still land one representable value apart
    (a norm weight near 1.0 updated by 4e-5: one spacing, 1.2e-7, is 3e-3 of its update)."""
    assert a.keys() == b.keys() == start.keys()
    moved = 0
    for name in start:
        w0 = start[name].astype(np.float64)
        ua, ub = a[name] - w0, b[name] - w0
        size = max(np.abs(ua).max(), np.abs(ub).max())
        diff = np.abs(ua - ub).max()
        rounding = float32_steps * float(np.spacing(np.float32(max(np.abs(a[name]).max(), np.abs(b[name]).max()))))
        moved += size > 0
        assert diff <= update_tol * size + rounding, \
            f"{name}: updates differ by {diff / max(size, 1e-30):.2e} of their size"
        assert diff <= scale_tol * max(np.abs(w0).max(), 1e-30) + rounding, f"{name}: updates differ by {diff:.2e}"
    assert moved == len(start), f"only {moved} of {len(start)} tensors were trained"


def _train_args(model: Path, instance: Path, out: Path, *extra: str) -> list[str]:
    return ["train_dreambooth.py", "--model", str(model), "--instance-dir", str(instance),
            "--instance-prompt", "a photo of sks dog", "--output-dir", str(out), "--resolution", str(RES),
            "--no-progress", "--set", "logging.log_every=1", *extra]


def test_two_processes_train_as_one(tiny_folder, tmp_path):
    """2 x 4 devices and 1 x 8 on one recipe (UNet, prior preservation, class images made by the first run):
    same weights; class images, checkpoints, logs, samples, final/ and model.safetensors each written once."""
    instance = _subject_images(tmp_path / "dog")
    class_dir = tmp_path / "class"
    recipe = ["--class-prompt", "a photo of dog", "--class-dir", str(class_dir), "--num-class-images", "3",
              "--train-batch-size", "2", "--max-train-steps", "4", "--checkpoint-every", "2", "--sample-every", "4",
              "--learning-rate", "1e-4", "--save-single-file", "--set", "class_images.num_inference_steps=2",
              "--set", f"optim.adam_epsilon={ADAM_EPS}",
              "--set", "class_images.batch_size=2", "--set", "logging.sample_steps=2"]
    runs = {}
    for name, processes, devices in (("pod", 2, 4), ("one", 1, 8)):
        out, logs = tmp_path / name, tmp_path / f"{name}-logs"
        # XLA's backend at -O0 (step_harness.COMPILER_OPTIONS) in both runs: the same programs, compiled faster
        res = launch(processes, devices, _train_args(tiny_folder, instance, out, *recipe), logs,
                     XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)
        assert res.returncode == 0, _report(res, logs)
        runs[name] = out

    # Class images: made during the first run, once, whole (the second run found them all).
    made = sorted(p.name for p in class_dir.iterdir())
    seeds = [int(m.group(2)) for name in made if (m := re.match(r"^class-(\d{5})-(\d+)\.png$", name))]
    assert len(made) == len(seeds) == 3 and seeds == list(range(seeds[0], seeds[0] + 3)), made
    for p in class_dir.iterdir():
        with Image.open(p) as img:
            img.load()
            assert img.size == (RES, RES) and img.text["prompt"] == "a photo of dog"

    assert_same_training(_read_unet(tiny_folder), _read_unet(runs["pod"] / "final"), _read_unet(runs["one"] / "final"),
                         float32_steps=1)

    pod = runs["pod"]
    steps = [json.loads(line)["step"] for line in (pod / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps
    assert len(list((pod / "logs").rglob("events.out.tfevents.*"))) == 1
    samples = [sorted(p.name for p in (runs[name] / "samples").iterdir()) for name in ("pod", "one")]
    assert samples[0] == samples[1] and samples[0], samples
    assert sorted(int(p.name) for p in (pod / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert not [p for p in pod.rglob("*") if re.search(r"\.tmp|tmp-|orbax-checkpoint-tmp", p.name)]
    from sd_jax import StableDiffusion
    from sd_jax.convert.files import read_state_dict

    StableDiffusion.from_pretrained(pod / "final")
    single = read_state_dict(pod / "model.safetensors")
    assert any(k.startswith("model.diffusion_model.") for k in single)


@pytest.mark.slow  # ~55 s; the one-process NaN stop stays in the default run
def test_nan_stop_reaches_every_process_at_the_same_step(tiny_folder, tmp_path):
    instance = _subject_images(tmp_path / "dog")
    logs = tmp_path / "logs"
    res = launch(2, 2, _train_args(tiny_folder, instance, tmp_path / "out", "--max-train-steps", "4",
                                   "--checkpoint-every", "1", "--learning-rate", "1e30",
                                   "--set", "optim.max_grad_norm=null"), logs)
    report = _report(res, logs)
    assert res.returncode != 0, report
    pattern = r"the loss became \S+ at step (\d+)"
    own = re.sub(r"--- process \d+, last lines:.*?\n---", "", res.stderr + res.stdout, flags=re.S)  # not the echo
    steps = [re.findall(pattern, text) for text in (own, (logs / "process-1.log").read_text())]
    assert len(steps[0]) == 1 and steps[0] == steps[1], report
    assert not (tmp_path / "out" / "final").exists()


def test_two_processes_sample_as_one(tiny_folder, tmp_path):
    """generate.py --from-file --grid on 2 processes x 2 devices: each image written once, with the names,
    seeds, pixels and metadata of a 1 x 4 run (batch_size in the metadata is the per-process batch), and one
    grid of all five images, drawn by process 0 from both processes' images."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red dog\na blue cat\n# a comment\na green bird\na tree\na house\n")
    args = ["generate.py", "--model", str(tiny_folder), "--from-file", str(prompts), "--steps", "2", "--height",
            "32", "--width", "32", "--batch-size", "3", "--seed", "7", "--no-safety-checker", "--no-progress", "--grid"]
    outs = {}
    for name, processes, devices in (("pod", 2, 2), ("one", 1, 4)):
        outs[name], logs = tmp_path / name, tmp_path / f"{name}-logs"
        outs[name].mkdir()
        Image.new("RGB", (8, 8)).save(outs[name] / "00004-1.png")  # an earlier file: numbering continues after it
        res = launch(processes, devices, args + ["--outdir", str(outs[name])], logs)
        assert res.returncode == 0, _report(res, logs)
    names = sorted(p.name for p in outs["one"].iterdir())
    assert names == ["00004-1.png", "00005-7.png", "00006-8.png", "00007-9.png", "00008-10.png", "00009-11.png",
                     "grid-00000.png"]
    assert sorted(p.name for p in outs["pod"].iterdir()) == names
    for name in names[1:]:
        with Image.open(outs["pod"] / name) as a, Image.open(outs["one"] / name) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
            ta, tb = dict(a.text), dict(b.text)
            assert ta.pop("batch_size") == "2" and tb.pop("batch_size") == "3"
            assert {k: v for k, v in ta.items() if k != "parameters"} == \
                {k: v for k, v in tb.items() if k != "parameters"}, name


@pytest.mark.slow  # ~3 runs of the tiny model on 2 processes
def test_unet_and_text_encoder_train_as_one(tiny_folder, tmp_path):
    instance = _subject_images(tmp_path / "dog")
    recipe = ["--train-text-encoder", "--train-batch-size", "2", "--max-train-steps", "2", "--learning-rate", "1e-4",
              "--set", f"optim.adam_epsilon={ADAM_EPS}"]
    finals = []
    for name, processes, devices in (("pod", 2, 4), ("one", 1, 8)):
        logs = tmp_path / f"{name}-logs"
        res = launch(processes, devices, _train_args(tiny_folder, instance, tmp_path / name, *recipe), logs)
        assert res.returncode == 0, _report(res, logs)
        finals.append(tmp_path / name / "final")
    assert_same_training(_read_unet(tiny_folder), _read_unet(finals[0]), _read_unet(finals[1]))
    from sd_jax.convert.files import read_state_dict

    text = [{k.removeprefix("text_model."): np.asarray(v)  # transformers' files may carry the prefix or not
             for k, v in read_state_dict(f / "text_encoder" / "model.safetensors").items()}
            for f in (tiny_folder, *finals)]
    trained = {k for k in text[0] if not np.array_equal(text[0][k], text[1][k])}
    assert trained, "the text encoder did not train"
    assert_same_training(*({k: t[k] for k in trained} for t in text))


@pytest.mark.slow
def test_one_process_dying_stops_the_other_then_the_run_resumes(tiny_folder, tmp_path):
    """SIGKILL process 1 mid-run (no launcher: as on a pod): process 0 ends by itself, with JAX's message,
    within the heartbeat/shutdown bounds; the same command then resumes from the last checkpoint."""
    instance = _subject_images(tmp_path / "dog")
    out = tmp_path / "out"
    args = _train_args(tiny_folder, instance, out, "--max-train-steps", "12", "--checkpoint-every", "1",
                       "--learning-rate", "1e-4")
    ckpts = out / "checkpoints"

    def checkpoint_2_written():
        return ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= 2 for p in ckpts.iterdir()) or None

    with two_processes(args, tmp_path, SD_JAX_HEARTBEAT_TIMEOUT_S="15", SD_JAX_SHUTDOWN_TIMEOUT_S="15") as procs:
        wait_while_running(procs, checkpoint_2_written, poll_s=0.1)
        assert all(p.poll() is None for p in procs), "the run ended before a process could be killed"
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        status = procs[0].wait(timeout=240)
        waited = time.monotonic() - killed_at
    text = (tmp_path / "p0.log").read_text(errors="replace")
    assert status != 0, text[-3000:]
    assert waited < 120, f"process 0 needed {waited:.0f} s to stop after process 1 died"
    assert re.search(r"another task died|heartbeat|Connection closed|unhealthy", text), text[-3000:]
    assert not (out / "final").exists()

    res = launch(2, 2, args, tmp_path / "resume-logs")
    assert res.returncode == 0, _report(res, tmp_path / "resume-logs")
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)), steps
    assert (out / "final" / "model_index.json").is_file()


@pytest.mark.slow  # ~3 two-process runs (13 min on a loaded 2-core machine)
def test_every_process_killed_during_a_save_then_the_run_resumes_as_if_uninterrupted(tiny_folder, tmp_path):
    """SIGKILL both processes while a checkpoint is being written (its Orbax temporary folder exists); the
    same command then resumes from the last complete checkpoint and ends with the weights of a run that was
    never interrupted."""
    instance = _subject_images(tmp_path / "dog")
    recipe = ["--max-train-steps", "8", "--checkpoint-every", "1", "--learning-rate", "1e-4",
              "--set", f"optim.adam_epsilon={ADAM_EPS}"]
    out = tmp_path / "out"
    args = _train_args(tiny_folder, instance, out, *recipe)
    ckpts = out / "checkpoints"

    def save_in_progress():
        """The step of an Orbax temporary folder of step >= 2, if one exists now."""
        steps = [int(m.group(1)) for p in (ckpts.iterdir() if ckpts.is_dir() else ())
                 if (m := re.match(r"^(\d+)\.orbax-checkpoint-tmp", p.name))]
        return max(steps) if steps and max(steps) >= 2 else None

    with two_processes(args, tmp_path) as procs:
        caught = wait_while_running(procs, save_in_progress, poll_s=0.002)
        for p in procs:
            p.send_signal(signal.SIGKILL)
    assert caught is not None, "no save was caught in progress: " + (tmp_path / "p0.log").read_text()[-3000:]
    assert not (out / "final").exists()

    res = launch(2, 2, args, tmp_path / "resume-logs")
    assert res.returncode == 0, _report(res, tmp_path / "resume-logs")
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)), steps
    assert not [p for p in out.rglob("*") if re.search(r"orbax-checkpoint-tmp", p.name)]

    clean = tmp_path / "clean"
    res = launch(2, 2, _train_args(tiny_folder, instance, clean, *recipe), tmp_path / "clean-logs")
    assert res.returncode == 0, _report(res, tmp_path / "clean-logs")
    assert_same_training(_read_unet(tiny_folder), _read_unet(out / "final"), _read_unet(clean / "final"),
                         update_tol=1e-6, scale_tol=1e-9)
