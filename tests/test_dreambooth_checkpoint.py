"""Orbax checkpoints (sd_jax.dreambooth.checkpoint): round trips, keep-K, resharding on restore,
typed PRNG keys, donation after an async save, and atomicity under SIGKILL mid-save."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sd_jax.dreambooth.checkpoint import (CHECKSUMS, SET_ASIDE, TRASH, CheckpointDamaged, Checkpointer, data_to_keys,
                                          keys_to_data, set_aside)

REPO = Path(__file__).resolve().parents[1]


@flax.struct.dataclass
class State:
    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any
    rng: jax.Array


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip(f"needs 8 devices; the {jax.default_backend()} backend has {jax.device_count()}")
    return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))


def _params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"conv": {"kernel": jax.random.normal(k1, (64, 32), jnp.float32),
                     "bias": jax.random.normal(k2, (32,), jnp.float32)}}


def _state(params, tx, seed=0, ema=False, typed_key=True):
    key = jax.random.key(seed)
    return State(step=jnp.int32(7), params=params, opt_state=tx.init(params),
                 ema=jax.tree.map(jnp.copy, params) if ema else None,
                 rng=key if typed_key else jax.random.key_data(key))


def _abstract(tree, sharding_fn):
    """ShapeDtypeStructs with the sharding ``sharding_fn(shape)`` gives each leaf."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x.shape)),
                        jax.eval_shape(lambda: tree))


def _assert_equal(a, b):
    a, b = keys_to_data(a), keys_to_data(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_dataclass_state_and_meta(tmp_path):
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-4, 5, 50)))
    params = _params()
    state = _state(params, tx)
    state = state.replace(opt_state=tx.update(params, state.opt_state, params)[1])  # non-zero moments, count 1
    meta = {"data_position": {"epoch": 2, "index": 17}, "config": {"lr": 5e-6, "prompts": ["a", "b"]}}
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with Checkpointer(tmp_path, keep=3) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        assert ckpt.save(10, state, meta) is True
        ckpt.wait()
        assert ckpt.latest_step() == 10
        # named items on disk; the empty EMA is not written
        assert ckpt.items(10) == ["meta", "opt_state", "params", "rng", "step"]
        restored, got_meta = ckpt.restore(None, _abstract(state, lambda _: single))
        assert got_meta == meta and ckpt.read_meta(10) == meta
        assert isinstance(restored, State) and restored.ema is None
        assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
        _assert_equal(restored, state)
        assert int(restored.opt_state[1][0].count) == 1
        # the restored key draws the same numbers
        np.testing.assert_array_equal(jax.random.normal(restored.rng, (4,)), jax.random.normal(state.rng, (4,)))
        # a subset: only the weights, into a plain dict
        only, _ = ckpt.restore(10, {"params": _abstract(params, lambda _: single)})
        _assert_equal(only["params"], params)


def test_raw_key_data_and_single_item_state(tmp_path):
    """A state holding uint32 key data round-trips as is; a tuple state is one item ``state``."""
    key = jax.random.key(3)
    tree = (jnp.arange(6.0), {"rng": jax.random.key_data(key)})
    with Checkpointer(tmp_path, keep=1, async_save=False) as ckpt:
        ckpt.save(1, tree)
        assert ckpt.items(1) == ["meta", "state"]
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restored, meta = ckpt.restore(1, _abstract(tree, lambda _: single))
        assert meta == {}
        _assert_equal(restored, tree)
        # key helpers: data <-> typed key
        typed = data_to_keys(restored[1]["rng"], key)
        assert jax.random.key_data(typed).tolist() == jax.random.key_data(key).tolist()
        assert keys_to_data({"k": key})["k"].dtype == jnp.uint32


@pytest.mark.parametrize("async_save", [True, False])
def test_keep_k_and_all_steps(tmp_path, async_save):
    x = {"w": jnp.zeros((16,), jnp.float32)}
    with Checkpointer(tmp_path, keep=2, async_save=async_save) as ckpt:
        for step in (1, 2, 3, np.int64(4), jnp.int32(5)):     # NumPy/JAX integer steps too
            assert ckpt.save(step, {"w": x["w"] + int(step)}, {"step": int(step)})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
        assert ckpt.save(3, x) is False          # not newer than the latest: skipped
        assert ckpt.save(5, x) is False
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert [e for e in entries if e.isdigit()] == ["4", "5"]
    assert not any("orbax-checkpoint-tmp" in e for e in entries)
    assert not list((tmp_path / TRASH).iterdir())   # old steps really removed
    reopened = Checkpointer(tmp_path, keep=2)
    assert reopened.all_steps() == [4, 5] and reopened.latest_step() == 5
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored, meta = reopened.restore(4, _abstract(x, lambda _: single))
    assert meta == {"step": 4} and float(restored["w"][0]) == 4.0
    restored, _ = reopened.restore(None, x)              # an array is a valid target leaf too
    assert float(restored["w"][0]) == 5.0
    reopened.close()


def test_restore_errors_are_clear(tmp_path):
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ValueError, match="keep=0"):
        Checkpointer(tmp_path / "x", keep=0)
    ckpt = Checkpointer(tmp_path, keep=2)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.restore(None, {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=single)})
    with pytest.raises(ValueError, match="not JSON"):
        ckpt.save(1, {"w": jnp.ones(4)}, {"pos": np.int64(3)})
    with pytest.raises(ValueError, match="step=1.5"):
        ckpt.save(1.5, {"w": jnp.ones(4)})
    with pytest.raises(ValueError, match="item name"):
        ckpt.save(1, {"meta": jnp.ones(4)})
    assert ckpt.all_steps() == []                  # nothing was started
    ckpt.save(1, {"w": jnp.ones(4), "step": jnp.int32(1)})
    with pytest.raises(FileNotFoundError, match="step 2"):
        ckpt.restore(2, {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=single)})
    with pytest.raises(ValueError, match="no item 'ema'"):
        ckpt.restore(1, {"ema": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=single)})
    with pytest.raises(ValueError, match=r"shape"):
        ckpt.restore(1, {"w": jax.ShapeDtypeStruct((5,), jnp.float32, sharding=single)})
    with pytest.raises(ValueError, match=r"sharding.*w"):
        ckpt.restore(1, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    ckpt.close()


@pytest.mark.parametrize("direction", ["replicated_to_fsdp", "fsdp_to_replicated"])
def test_restore_into_other_sharding(tmp_path, mesh, direction):
    replicated = NamedSharding(mesh, P())
    fsdp = lambda shape: NamedSharding(mesh, P("fsdp", None) if len(shape) == 2 else P())
    rep = lambda shape: replicated
    save_sh, load_sh = (rep, fsdp) if direction == "replicated_to_fsdp" else (fsdp, rep)
    tx = optax.adamw(1e-3)
    params = {"big": jax.random.normal(jax.random.key(1), (256, 64)), "small": jnp.arange(8.0)}
    state = _state(params, tx, ema=True)
    state = jax.tree.map(lambda x: jax.device_put(x, save_sh(x.shape)), state)
    assert state.params["big"].sharding == save_sh((256, 64))
    with Checkpointer(tmp_path, keep=1) as ckpt:
        ckpt.save(3, state, {"mesh": [2, 4]})
        target = _abstract(state, load_sh)
        restored, _ = ckpt.restore(3, target)
    _assert_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding == want.sharding, (got.sharding, want.sharding)
    big = restored.opt_state[0].mu["big"]
    shard_shape = (64, 64) if direction == "replicated_to_fsdp" else (256, 64)
    assert {s.data.shape for s in big.addressable_shards} == {shard_shape}


def test_state_may_be_donated_after_save_returns(tmp_path):
    """save() copies the arrays off the devices before returning: the train step may donate them."""
    state = {"w": jnp.full((1024, 256), 3.0), "b": jnp.arange(256.0)}
    want = jax.tree.map(np.asarray, state)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x * 2 + 1, s), donate_argnums=0)
    with Checkpointer(tmp_path, keep=2) as ckpt:
        ckpt.save(1, state)
        state = bump(state)                       # reuses (overwrites) the saved buffers
        state = bump(state)
        ckpt.wait()
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        restored, _ = ckpt.restore(1, _abstract(want, lambda _: single))
    _assert_equal(restored, want)


def test_stale_tmp_and_trash_are_ignored_then_removed(tmp_path):
    """A half-written step directory is never listed, and opening the directory removes it."""
    x = {"w": jnp.ones((8,))}
    with Checkpointer(tmp_path, keep=3) as ckpt:
        ckpt.save(1, x)
    # what a kill leaves: a copied-but-unfinished step 2 and a half-emptied trash entry
    shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp")
    (tmp_path / "2.orbax-checkpoint-tmp" / "commit_success.txt").unlink()
    shutil.copytree(tmp_path / "1", tmp_path / TRASH / "0")
    ckpt = Checkpointer(tmp_path, keep=3)
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    assert not (tmp_path / "2.orbax-checkpoint-tmp").exists()
    assert not list((tmp_path / TRASH).iterdir())
    assert ckpt.save(2, {"w": x["w"] * 2})
    ckpt.close()
    assert Checkpointer(tmp_path, keep=3).all_steps() == [1, 2]


# ------------------------------------------------------------------------ SIGKILL mid-save

_CHILD = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from sd_jax.dreambooth.checkpoint import Checkpointer

    directory, n = sys.argv[1], int(sys.argv[2])
    ckpt = Checkpointer(directory, keep=2)
    start = (ckpt.latest_step() or 0) + 1
    print("ready", start, flush=True)
    for s in range(start, start + 100000):
        state = {"params": {"a": jnp.full((n,), s, jnp.float32), "b": jnp.full((n // 1024, 1024), s, jnp.float32)},
                 "opt_state": {"mu": jnp.full((n,), -s, jnp.float32), "nu": jnp.full((n,), 0.5 * s, jnp.float32)},
                 "step": jnp.int32(s), "rng": jax.random.key(s)}
        ckpt.save(s, state, {"step": s, "data_position": 3 * s})
        print("saved", s, flush=True)
""")


def _expected(s: int, n: int) -> dict:
    return {"params": {"a": np.full((n,), s, np.float32), "b": np.full((n // 1024, 1024), s, np.float32)},
            "opt_state": {"mu": np.full((n,), -s, np.float32), "nu": np.full((n,), 0.5 * s, np.float32)},
            "step": np.int32(s), "rng": jax.random.key(s)}


def test_sigkill_during_saves_never_exposes_a_partial_checkpoint(tmp_path):
    """A child saves a 64 MB state over and over and is SIGKILLed at random moments; every
    time, each listed checkpoint restores completely with exactly the values of its step,
    and no save that had finished is lost."""
    n = 4 * 2**20                                  # 4 arrays of 16 MB
    directory = tmp_path / "ckpt"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    rng = random.Random(0)
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = _abstract(_expected(0, n), lambda _: single)
    latest, killed_mid_write, saves = 0, 0, 0
    for trial in range(5):
        child = subprocess.Popen([sys.executable, str(script), str(directory), str(n)], env=env, cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        ready = child.stdout.readline().split()
        assert ready[:1] == ["ready"], f"child failed to start: {ready}"
        assert int(ready[1]) == latest + 1
        lines = []
        if trial > 0:  # kill at a random moment of the steady save loop (trial 0: during the first save)
            lines.append(child.stdout.readline())
            assert lines[0].startswith("saved"), lines
        time.sleep(rng.uniform(0.0, 0.5) if trial > 0 else rng.uniform(0.02, 1.0))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        lines += child.stdout.read().splitlines()
        reported = [int(line.split()[1]) for line in lines if line.startswith("saved")]
        child.stdout.close()
        saves += len(reported)
        killed_mid_write += any("orbax-checkpoint-tmp" in p.name for p in directory.iterdir())

        ckpt = Checkpointer(directory, keep=2)
        steps = ckpt.all_steps()
        assert (steps[-1] if steps else 0) >= latest, (trial, steps, latest)   # nothing finished is lost
        if reported:  # save(s) returned => save(s - 1) had been committed
            assert (steps[-1] if steps else 0) >= reported[-1] - 1, (trial, steps, reported)
        for step in steps:
            state, meta = ckpt.restore(step, abstract)
            assert meta == {"step": step, "data_position": 3 * step}
            _assert_equal(state, _expected(step, n))
        assert not any("orbax-checkpoint-tmp" in p.name for p in directory.iterdir())  # cleaned on open
        ckpt.close()
        latest = steps[-1] if steps else 0
    assert saves > 0 and killed_mid_write >= 1, (saves, killed_mid_write)


# ------------------------------------------------------------------------ checksums

def _data_file(step_dir: Path) -> Path:
    """The largest array data file of checkpoint item ``w``."""
    return max((p for p in (step_dir / "w").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_checkpoint_is_named_with_the_previous_good_step(tmp_path, damage):
    """A flipped bit restored silently into other weights and a truncated file gave a 151-line Orbax traceback;
    both are now one CheckpointDamaged line naming the step and offering the previous good one."""
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"w": jax.ShapeDtypeStruct((4096,), jnp.float32, sharding=single)}
    with Checkpointer(tmp_path, keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"w": jnp.arange(4096.0) + step})
    assert (tmp_path / "3" / CHECKSUMS).is_file()
    path = _data_file(tmp_path / "3")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))
    ckpt = Checkpointer(tmp_path, keep=3)
    with pytest.raises(CheckpointDamaged) as info:
        ckpt.restore(None, target)
    message = str(info.value)
    assert info.value.step == 3 and "\n" not in message and len(message) < 400
    assert "step 3" in message and path.name in message and "--resume-step 2" in message
    assert ckpt.verify(2) is True
    restored, _ = ckpt.restore(2, target)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4096.0) + 2)
    ckpt.close()
    set_aside(tmp_path, [3])
    reopened = Checkpointer(tmp_path, keep=3)
    assert reopened.all_steps() == [1, 2]
    assert reopened.save(3, {"w": jnp.zeros(4096)})          # the step can be written again
    reopened.close()
    assert len(list((tmp_path / SET_ASIDE).iterdir())) == 1  # the damaged step is kept, not deleted


def test_unreadable_checkpoint_without_checksums_is_one_line(tmp_path):
    """A checkpoint with no checksums (older sd_jax) restores unverified; Orbax's read error is one line."""
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"w": jax.ShapeDtypeStruct((4096,), jnp.float32, sharding=single)}
    with Checkpointer(tmp_path, keep=3) as ckpt:
        ckpt.save(1, {"w": jnp.arange(4096.0)})
    (tmp_path / "1" / CHECKSUMS).unlink()
    ckpt = Checkpointer(tmp_path, keep=3)
    assert ckpt.verify(1) is False
    path = _data_file(tmp_path / "1")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointDamaged, match=r"^checkpoint step 1 .* damaged: Orbax cannot read it") as info:
        ckpt.restore(1, target)
    assert "\n" not in str(info.value) and len(str(info.value)) < 500
    ckpt.close()
