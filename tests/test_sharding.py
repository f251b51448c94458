"""sd_jax.sharding: the mesh, the rule table, batch placement, the multi-host switch, and the
sharded train step on 8 host devices equal to the single-device step (with and without fsdp)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import step_harness as H
from jax.sharding import PartitionSpec as P

from sd_jax import sharding as shd

pytestmark = pytest.mark.needs_8_devices  # make_mesh() spans the default backend's devices

# ------------------------------------------------------------------------------------ mesh

def test_make_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    m = shd.make_mesh()
    assert m.axis_names == ("data", "fsdp") and dict(m.shape) == {"data": 8, "fsdp": 1}
    assert dict(shd.make_mesh(4, 2).shape) == {"data": 4, "fsdp": 2}
    assert dict(shd.make_mesh(data=2, fsdp=-1).shape) == {"data": 2, "fsdp": 4}
    assert dict(shd.make_mesh(devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match=r"data=3 x fsdp=2 = 6 devices, but there are 8"):
        shd.make_mesh(3, 2)
    with pytest.raises(ValueError, match="not divisible by 3"):
        shd.make_mesh(-1, 3)
    with pytest.raises(ValueError, match="at most one"):
        shd.make_mesh(-1, -1)
    with pytest.raises(ValueError, match=r"fsdp=0 must be a positive integer or -1"):
        shd.make_mesh(8, 0)


def test_sampling_mesh_is_the_sharding_mesh_over_local_devices():
    from sd_jax import sampling

    mesh = shd.sampling_mesh()
    assert dict(mesh.shape) == {"data": jax.local_device_count(), "fsdp": 1}
    assert shd.sampling_mesh(jax.devices()[:2]).size == 2
    assert sampling.data_mesh() == mesh  # one mesh: the sampler's cache key is the same object value
    assert shd.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert not hasattr(shd, "param_shardings")  # removed: tree_shardings is the one way


# ------------------------------------------------------------------------------ rule table

def test_rule_table():
    big = 2**18
    # The largest dimension divisible by the fsdp size, ties to the later axis.
    assert shd.partition_spec("params/unet/x/kernel", (3, 3, 320, 640), 8) == P(None, None, None, "fsdp")
    assert shd.partition_spec("params/unet/x/kernel", (3, 3, 640, 640), 4) == P(None, None, None, "fsdp")
    assert shd.partition_spec("params/te/token_embedding/embedding", (49408, 768), 8) == P("fsdp")
    assert shd.partition_spec("params/x/kernel", (1280, 1001), 2) == P("fsdp")          # 1001 is odd
    assert shd.partition_spec("params/x/kernel", (999, 1001), 2) == P()                  # nothing divides
    assert shd.partition_spec("params/x/bias", (1280,), 8) == P()                        # small
    assert shd.partition_spec("params/x/kernel", (512, 512), 1) == P()                   # no fsdp axis
    assert shd.partition_spec("params/x/kernel", (big // 64, 64), 8, min_size=big) == P("fsdp")
    assert shd.partition_spec("params/x/kernel", (big // 64 - 1, 64), 8, min_size=big) == P()
    # Counters and PRNG data are replicated whatever their size.
    assert shd.partition_spec("opt_state/0/count", (), 8) == P()
    assert shd.partition_spec("rng", (2,), 8, min_size=1) == P()


def test_train_state_shardings_follow_params():
    """Adam moments and EMA copies get their parameter's spec; counters and the key are replicated."""
    from sd_jax.dreambooth.optim import make_optimizer
    from sd_jax.dreambooth.step import train_state_shapes, train_state_shardings

    cfg = H.train_config()
    trainable = H.params()
    shapes = train_state_shapes(trainable, make_optimizer(cfg, trainable), cfg)
    mesh = shd.make_mesh(4, 2)
    sh = train_state_shardings(shapes, mesh, cfg)
    kernel = ("unet", "down_blocks_0", "resnets_0", "conv1", "kernel")

    def get(tree, path):
        for k in path:
            tree = tree[k]
        return tree

    spec = get(sh.params, kernel).spec
    assert spec == P(None, None, None, "fsdp")
    assert get(sh.ema, kernel).spec == spec
    flat = jax.tree_util.tree_flatten_with_path(sh.opt_state)[0]
    moment_specs = {shd.path_string(p): s.spec for p, s in flat if shd.path_string(p).endswith("/".join(kernel))}
    assert len(moment_specs) == 2 and set(moment_specs.values()) == {spec}, moment_specs  # mu and nu
    assert all(s.spec == P() for p, s in flat if shd.path_string(p).endswith("count"))
    assert sh.rng.spec == P() and sh.step.spec == P()


def test_batch_sharding_and_local_batches():
    mesh = shd.make_mesh(4, 2)
    assert shd.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert shd.batch_sharding(mesh, accum=True).spec == P(None, ("data", "fsdp"))
    rows = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "m": np.arange(16, dtype=np.float32)}
    glob = shd.host_local_batch_to_global(rows, mesh)
    assert glob["x"].shape == (16, 3) and glob["x"].sharding.spec == P(("data", "fsdp"))
    assert len({s.device for s in glob["x"].addressable_shards}) == 8
    np.testing.assert_array_equal(np.asarray(glob["x"]), rows["x"])
    acc = shd.host_local_batch_to_global({"x": rows["x"].reshape(2, 8, 3)}, mesh, accum=True)
    assert acc["x"].addressable_shards[0].data.shape == (2, 1, 3)
    assert shd.local_batch_rows(16) == 16


def test_pad_batch_marks_padding_invalid():
    from sd_jax.dreambooth.step import concat_prior_batch, pad_batch

    inst = {"latents": np.ones((3, 2, 2, 4), np.float32), "text_embeddings": np.ones((3, 5, 8), np.float32)}
    b = concat_prior_batch(inst, {k: 2 * v for k, v in inst.items()})
    np.testing.assert_array_equal(b["prior_mask"], [0, 0, 0, 1, 1, 1])
    padded = pad_batch(b, 8)
    assert padded["latents"].shape[0] == 8
    np.testing.assert_array_equal(padded["valid"], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(padded["latents"][6], b["latents"][0])
    acc = pad_batch({k: np.stack([v, v]) for k, v in b.items()}, 4, accum=True)
    assert acc["valid"].shape == (2, 8)


def test_initialize_distributed_only_when_asked():
    req = shd._distributed_requested
    assert not req({})
    assert not req({"TPU_WORKER_HOSTNAMES": "localhost"})            # a single-host TPU VM
    assert req({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})        # a multi-host slice
    assert req({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"})
    assert req({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) and not req({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})
    assert req({"OMPI_COMM_WORLD_SIZE": "2"})
    assert req({"SD_JAX_DISTRIBUTED": "1"})
    assert not req({"SD_JAX_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"})
    assert shd.initialize_distributed({}) is False  # and nothing was started
    assert not jax.distributed.is_initialized()


# ------------------------------------------------------------------- sharded train step

@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2)])
def test_sharded_step_equals_single_device(data, fsdp):
    """3 updates (AdamW, clipping, EMA) on 8 host devices equal the single-device updates."""
    want, want_metrics = H.reference_run()
    mesh = shd.make_mesh(data, fsdp)
    got, metrics = H.run(mesh)
    for g, w in zip(metrics, want_metrics):
        for k in ("loss", "instance_loss", "prior_loss", "grad_norm"):
            assert g[k] == pytest.approx(w[k], rel=1e-5), k
    flat_got, flat_want = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)
    for (path, g), w in zip(flat_got, flat_want):
        err = np.abs(g - w).max() / np.abs(w).max()
        assert err <= 1e-5, f"{jax.tree_util.keystr(path)}: max |diff| = {err:.2e} of its scale"
    if fsdp > 1:  # the big kernels really were split
        state, _ = H.setup(H.train_config(), mesh)
        kernel = state.params["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
        assert kernel.sharding.spec == P(None, None, None, "fsdp")
        assert kernel.addressable_shards[0].data.shape == (3, 3, 32, 16)
