"""A very small train-step setup shared by the step, sharding and multi-process tests.

A one-block UNet (cross-attention down, mid and up blocks; random weights drawn with
numpy, so building it compiles nothing), cached VAE posteriors and text embeddings
(the VAE and text encoder paths are covered by the PyTorch parity test), 4 instance
+ 4 class rows per update. ``reference_run`` (cached per process) is the single-device
result the sharded and two-process runs must equal.

Run as a script it is one process of the two-process test::

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \\
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/step_harness.py OUT.npz
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import numpy as np

ROWS = 8          # 4 instance + 4 class rows per update
LATENT = (4, 4, 4)
TEXT = (8, 32)    # (tokens, width): the UNet attends to any length
STEPS = 3
FSDP_MIN_SIZE = 256  # small, so the tiny UNet's kernels really are split over fsdp
# Adam divides by sqrt(v) + eps: with eps = 1e-8 a gradient component near zero moves its weight
# by about ±lr whatever its size, so float32 reduction-order noise (~1e-7 of the gradient scale,
# different on every mesh) becomes ~lr differences. eps = 1e-4 bounds that amplification to
# lr * noise / eps, so comparing meshes tests the sharding rather than Adam's conditioning.
ADAM_EPS = 1e-4
# The steps here are compiled with XLA's backend (LLVM) optimisation level 0: the same HLO program, optimised
# by the same XLA passes, in half the compile time (measured on 2 CPU cores: 17 s instead of 41 s for the
# float32 step). Every test compares such steps with each other (accumulated against one batch, sharded against
# one device, bf16 against float32), so what they check is the program, not how LLVM tuned its loops.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
# The same, for a subprocess's XLA_FLAGS: the CLI and notebook end-to-end tests check what the programs write,
# not their last bits. (test_pod's 2-process runs too: there a norm weight near 1 with a ~4e-5 update can differ
# by one float32 spacing between the runs, 3e-3 of the update, which its comparison allows as storage rounding.)
FAST_COMPILE_XLA_FLAGS = " ".join(f"--{k}={v}" for k, v in COMPILER_OPTIONS.items())


def unet_config():
    from sd_jax.models.unet import UNetConfig

    return UNetConfig(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                      up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, num_attention_heads=4,
                      cross_attention_dim=TEXT[1], norm_num_groups=8, sample_size=LATENT[0])


def train_config(**sections):
    from sd_jax.dreambooth.config import TrainConfig

    base = {"data": {"cache_latents": True, "cache_text_embeddings": True},
            "optim": {"learning_rate": 1e-3, "ema_decay": 0.9, "weight_decay": 0.01, "adam_epsilon": ADAM_EPS},
            "mesh": {"fsdp_min_size": FSDP_MIN_SIZE}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return TrainConfig.from_dict(base)


def models(dtype: str = "float32"):
    """StepModels around the one-block UNet (no VAE or text encoder: everything is cached)."""
    import jax.numpy as jnp

    from sd_jax.dreambooth.step import StepModels
    from sd_jax.models.unet import UNet2DConditionModel
    from sd_jax.schedulers import NoiseScheduleConfig, alphas_cumprod

    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    unet = UNet2DConditionModel(unet_config(), dtype=compute, param_dtype=jnp.float32)
    return StepModels(unet=unet, text_encoder=None, vae=None,
                      alphas_cumprod=alphas_cumprod(NoiseScheduleConfig.sd_v1()), prediction_type="epsilon",
                      scaling_factor=0.18215)


@functools.cache
def _params_np() -> dict:
    """Random UNet weights (numpy): norms near 1, the rest N(0, 0.05^2)."""
    import jax
    import jax.numpy as jnp

    m = models()
    shapes = jax.eval_shape(lambda: m.unet.init(jax.random.key(0), jnp.zeros((1, *LATENT)),
                                                jnp.zeros((1,), jnp.int32), jnp.zeros((1, *TEXT))))["params"]
    rng = np.random.default_rng(0)
    paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
    leaves = []
    for path, s in paths:
        noise = rng.standard_normal(s.shape).astype(np.float32) * 0.05
        leaves.append(noise + 1.0 if str(path[-1]).find("scale") >= 0 else noise)
    return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


def params() -> dict:
    """A fresh copy of the trainable tree {"unet": ...} (numpy)."""
    import jax

    return {"unet": jax.tree.map(np.copy, _params_np())}


def batch(step: int) -> dict[str, np.ndarray]:
    """Global batch of update ``step``: rows 0-3 instance, 4-7 class."""
    rng = np.random.default_rng(100 + step)
    return {
        "latent_mean": rng.standard_normal((ROWS, *LATENT)).astype(np.float32),
        "latent_logvar": rng.uniform(-3, -1, (ROWS, *LATENT)).astype(np.float32),
        "text_embeddings": rng.standard_normal((ROWS, *TEXT)).astype(np.float32),
        "prior_mask": np.array([0, 0, 0, 0, 1, 1, 1, 1], np.float32),
    }


class CompiledOnFirstCall:
    """A jitted function, lowered and compiled with ``COMPILER_OPTIONS`` on its first call; later calls (same
    shapes and shardings) reuse that executable, donation included."""

    def __init__(self, jitted):
        self.jitted, self.compiled = jitted, None

    def __call__(self, *args):
        if self.compiled is None:
            self.compiled = self.jitted.lower(*args).compile(compiler_options=COMPILER_OPTIONS)
        return self.compiled(*args)


@functools.cache
def _step_fn(config, mesh, dtype: str, remat: bool):
    """The jitted step for (config, mesh, dtype, remat), compiled once per process."""

    from sd_jax.dreambooth.optim import make_optimizer
    from sd_jax.dreambooth.step import abstract_train_state, make_train_step

    m = models(dtype)
    if remat:
        m = dataclasses.replace(m, unet=m.unet.clone(remat=True))
    optimizer = make_optimizer(config, params())
    abstract = abstract_train_state(params(), optimizer, mesh, config)
    return optimizer, CompiledOnFirstCall(make_train_step(m, config, optimizer, mesh, abstract, {}))


def setup(config, mesh, dtype: str = "float32", remat: bool = False):
    """(fresh state, step_fn) for a mesh; the step function is cached (the state is donated to it)."""
    from sd_jax.dreambooth.step import init_train_state

    optimizer, step_fn = _step_fn(config, mesh, dtype, remat)
    return init_train_state(params(), optimizer, mesh, config), step_fn


def run(mesh, config=None, steps: int = STEPS, batch_of=batch) -> tuple[dict, list[dict]]:
    """``steps`` updates on ``mesh`` with this process's rows ``batch_of(step)``; returns
    ({"params", "ema"} gathered to host numpy, per-step metrics)."""
    import jax
    from jax.experimental import multihost_utils

    from sd_jax.sharding import host_local_batch_to_global

    config = config or train_config()
    state, step_fn = setup(config, mesh)
    accum = config.optim.grad_accum_steps > 1
    metrics = []
    for s in range(steps):
        state, m = step_fn(state, {}, host_local_batch_to_global(batch_of(s), mesh, accum))
        metrics.append({k: float(v) for k, v in m.items()})
    gathered = multihost_utils.process_allgather({"params": state.params, "ema": state.ema}, tiled=True)
    return jax.tree.map(np.asarray, gathered), metrics


@functools.cache
def reference_run() -> tuple[dict, list[dict]]:
    """The single-device result (computed once per process)."""
    import jax

    from sd_jax.sharding import make_mesh

    return run(make_mesh(devices=jax.devices()[:1]))


def main(out_path: str) -> None:
    """One process of the two-process test: 2 x 2 devices, mesh data=2 x fsdp=2."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from sd_jax.sharding import initialize_distributed, make_mesh

    assert initialize_distributed(), "the environment should have asked for jax.distributed"
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
    mesh = make_mesh(data=2, fsdp=2)
    pid = jax.process_index()
    share = ROWS // jax.process_count()
    result, metrics = run(mesh, batch_of=lambda s: {k: v[pid * share:(pid + 1) * share] for k, v in batch(s).items()})
    if pid == 0:
        from sd_jax.convert.core import flatten_tree

        flat = {"/".join(("params",) + k): v for k, v in flatten_tree(result["params"]).items()}
        flat.update({"/".join(("ema",) + k): v for k, v in flatten_tree(result["ema"]).items()})
        flat["loss"] = np.array([m["loss"] for m in metrics])
        np.savez(out_path, **flat)
    print(f"process {pid}: done, losses {[round(m['loss'], 6) for m in metrics]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
