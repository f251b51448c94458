"""Two processes on localhost form one mesh (2 x 2 CPU devices, gloo collectives, data=2 x
fsdp=2), each feeding its own half of every batch, and end with the single-process result."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
import numpy as np
import step_harness as H

from sd_jax.convert.core import flatten_tree

TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(port: int, process_id: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "TPU_", "SLURM_", "OMPI_"))}
    env.update({
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(process_id), "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "SD_JAX_COMPILATION_CACHE": "0",
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")]),
    })
    return env


def _run_two(out: Path, logs: list) -> list[subprocess.Popen]:
    """Start both processes; wait for both, killing the other at the first failure or the deadline."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(TESTS / "step_harness.py"), str(out)], env=_env(port, i),
                              stdout=logs[i], stderr=subprocess.STDOUT, cwd=TESTS.parent) for i in range(2)]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return procs


@pytest.mark.slow  # ~40 s; the whole trainer's 2x4 == 1x8 (tests/test_pod.py) covers the step
def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "result.npz"
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(tmp_path / f"process{i}.log", "w+")) for i in range(2)]
        procs = _run_two(out, logs)
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read()[-3000:])
    report = "\n".join(f"--- process {i} (rc {p.returncode}):\n{t}" for i, (p, t) in enumerate(zip(procs, texts)))
    assert all(p.returncode == 0 for p in procs), f"a process failed or ran past {TIMEOUT_S} s\n{report}"

    got = dict(np.load(out))
    want, want_metrics = H.reference_run()
    np.testing.assert_allclose(got.pop("loss"), [m["loss"] for m in want_metrics], rtol=1e-5)
    flat_want = {"/".join((group,) + k): v for group in ("params", "ema")
                 for k, v in flatten_tree(want[group]).items()}
    assert set(got) == set(flat_want)
    for name, w in flat_want.items():
        err = np.abs(got[name] - w).max() / np.abs(w).max()
        assert err <= 1e-5, f"{name}: max |diff| = {err:.2e} of its scale\n{report}"
    assert jax.process_count() == 1  # the test process itself stayed single-process


# ------------------------------------------------------------------------- the launcher

def _launch(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    return subprocess.run([sys.executable, "-m", "sd_jax.launch", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=TESTS.parent)


def test_launcher_starts_one_job(tmp_path):
    res = _launch(tmp_path, "--processes", "2", "--devices-per-process", "3", "--log-dir", str(tmp_path / "logs"),
                  "--", str(TESTS / "launch_probe.py"), str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "probe: process 0 of 2, 3 local / 6 devices, sum 3" in res.stdout  # process 0 streams here
    assert "probe: process 1 of 2, 3 local / 6 devices, sum 3" in (tmp_path / "logs" / "process-1.log").read_text()
    assert "process 1" not in res.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("failing", [0, 1])
def test_launcher_ends_every_process_when_one_fails(tmp_path, failing):
    """The others wait in a barrier the failed process never reaches: they are stopped after --grace,
    none is left behind, and the launcher exits with the failure's status."""
    t0 = time.monotonic()
    res = _launch(tmp_path, "--processes", "2", "--devices-per-process", "1", "--grace", "1", "--log-dir",
                  str(tmp_path / "logs"), "--", str(TESTS / "launch_probe.py"), str(tmp_path), f"--fail={failing}:3",
                  "--hang")
    elapsed = time.monotonic() - t0
    assert res.returncode == 3, res.stderr[-3000:]
    assert f"process {failing} failed with status 3" in res.stderr
    if failing == 1:  # its output was in a log file: the launcher shows the end of it
        assert "probe: process 1 fails with 3" in res.stderr
    pids = [int((tmp_path / f"pid-{i}").read_text()) for i in range(2)]
    assert not any(_alive(pid) for pid in pids), pids
    assert elapsed < 120, f"the launcher took {elapsed:.0f} s to stop a hung process"


@pytest.mark.parametrize("args,match", [
    (["--processes", "0", "--", "x.py"], "--processes 0"),
    (["--processes", "2"], "no command given"),
    (["--processes", "2", "--", "missing_script.py"], "missing_script.py"),
    (["--processes", "2", "--devices-per-process", "-1", "--", "generate.py"], "--devices-per-process -1"),
])
def test_launcher_bad_flags_one_line(tmp_path, args, match):
    res = _launch(tmp_path, *args, timeout=60)
    assert res.returncode == 2 and match in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


# ------------------------------------------------------------------- the trainer's batch rows

class _Tokens:
    """Stands in for the pipeline: prompt -> a row of distinct token ids (no model needed)."""

    @staticmethod
    def tokenize(prompts):
        return np.asarray([[sum(map(ord, p)) % 1000 + i for i in range(4)] for p in prompts], np.int32)


def _builder(tmp_path, batch_size: int, prior: bool):
    from PIL import Image

    from sd_jax.dreambooth import data as dbdata
    from sd_jax.dreambooth.config import TrainConfig
    from sd_jax.dreambooth.trainer import BatchBuilder

    rng = np.random.default_rng(0)
    for kind, n in (("inst", 3), ("cls", 4)):
        (tmp_path / kind).mkdir(exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(tmp_path / kind / f"{i}.png")
    concept = {"instance_dir": str(tmp_path / "inst"), "instance_prompt": "a sks dog"}
    if prior:
        concept.update(class_prompt="a dog", class_dir=str(tmp_path / "cls"), num_class_images=4)
    config = TrainConfig.from_dict({"concepts": [concept], "data": {"resolution": 16, "cache_latents": False,
                                                                    "cache_text_embeddings": False},
                                    "train": {"train_batch_size": batch_size}})
    dataset = dbdata.DreamboothDataset([dbdata.Concept(**concept)], resolution=16, batch_size=batch_size, seed=5)
    return BatchBuilder(_Tokens(), config, dataset), dataset


@pytest.mark.parametrize("batch_size,prior", [(2, True), (3, True), (1, True), (4, False)])
def test_each_process_feeds_the_global_batch_rows_its_devices_hold(tmp_path, monkeypatch, batch_size, prior):
    """Two processes of 4 devices (simulated: jax.local_devices patched) feed, in process order, exactly the
    batch one process of 8 devices feeds; the rows, not only the examples, must match, since timesteps and
    noise are drawn per global row. (The old split, each process's instance + class rows, did not.)"""
    from sd_jax.dreambooth.step import concat_prior_batch, pad_batch
    from sd_jax.sharding import make_mesh

    builder, dataset = _builder(tmp_path, batch_size, prior)
    mesh = make_mesh()
    devices = list(mesh.devices.flat)
    for position in (0, 3):
        whole = builder.micro_batch(position, mesh)
        shares = []
        for group in (devices[:4], devices[4:]):
            monkeypatch.setattr(jax, "local_devices", lambda group=group: group)
            shares.append(builder.micro_batch(position, mesh))
        monkeypatch.undo()
        assert set(whole) == set(shares[0]) == {"pixel_values", "input_ids", "prior_mask", "valid"}
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]), whole[key], err_msg=key)
        # the one-process batch is instance rows, class rows, padding to the device count
        rows = dataset.batch(position)
        parts = [{"pixel_values": rows[f"{k}_images"], "input_ids": _Tokens.tokenize(rows[f"{k}_prompts"])}
                 for k in (("instance", "class") if prior else ("instance",))]
        want = pad_batch(concat_prior_batch(*parts), 8)
        for key in want:
            np.testing.assert_array_equal(whole[key], want[key], err_msg=key)
    if prior and batch_size == 2:  # the old split: each process's own instance rows, then its class rows
        old = [pad_batch(concat_prior_batch(*[{"pixel_values": r[f"{k}_images"]} for k in ("instance", "class")]), 4)
               for r in (dataset.batch(0, process_index=p, process_count=2) for p in range(2))]
        assert not np.array_equal(np.concatenate([o["pixel_values"] for o in old]),
                                  builder.micro_batch(0, mesh)["pixel_values"])


def test_a_dead_peer_is_one_clear_line(monkeypatch, tmp_path):
    from sd_jax.dreambooth.trainer import lost_process_error

    err = RuntimeError("INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 heartbeat "
                       "timeout. This indicates that the remote task has failed\n" + "x" * 5000)
    assert lost_process_error(err, tmp_path) is None  # one process: not a peer's death
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    lost = lost_process_error(err, tmp_path / "checkpoints")
    assert isinstance(lost, OSError) and "\n" not in str(lost) and len(str(lost)) < 500
    assert "another process of this 2-process run died" in str(lost) and str(tmp_path / "checkpoints") in str(lost)
    assert lost_process_error(RuntimeError("Gloo AllGather failed: Connection closed by peer"), tmp_path)
    assert lost_process_error(RuntimeError("dot_general shapes do not match"), tmp_path) is None
