"""Mesh, partition rules and multi-host start: sharding is declared here once and derived everywhere.

The mesh has two axes:

- ``data``: data parallelism. Parameters are replicated along it.
- ``fsdp``: fully sharded data parallelism (ZeRO-3). Big parameters, their optimizer
  moments and EMA copies are split along it; XLA gathers each one where it is used.

The **batch** is split over both axes, ``("data", "fsdp")``: every device holds
different examples (an fsdp group is data parallel too; only the parameters are
split). The global batch (rows) must therefore be a multiple of ``mesh.size``.

One rule table (:data:`RULES`) maps a leaf's path and shape to a ``PartitionSpec``;
``tree_shardings`` applies it to any pytree of arrays or
``jax.ShapeDtypeStruct`` (parameters, a whole train state from ``jax.eval_shape``),
so initialisation and checkpoint restore land straight in their shardings.

Multi-host: call :func:`initialize_distributed` first thing (before any other JAX
call); each process then feeds its own rows through :func:`host_local_batch_to_global`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("sd_jax")

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every device
FSDP_MIN_SIZE = 2**18  # leaves with fewer elements stay replicated (norms, biases, small kernels)


# --------------------------------------------------------------------------------------- mesh

def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over ``devices`` (default: all devices of all processes).

    One axis may be -1: it takes the remaining devices. The product must equal
    the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, value in (("data", data), ("fsdp", fsdp)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (value == -1 or value >= 1):
            raise ValueError(f"mesh axis {name}={value!r} must be a positive integer or -1 (the remaining devices)")
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data and fsdp may be -1")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if n % known:
            raise ValueError(f"mesh data={data}, fsdp={fsdp}: {n} devices are not divisible by {known}")
        data, fsdp = (n // known, fsdp) if data == -1 else (data, n // known)
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are {n} "
                         f"({devices[0].platform}); make the product {n} or set one axis to -1")
    try:  # topology-aware order on TPU/GPU; a plain reshape elsewhere
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((data, fsdp), devices)
    except Exception:  # noqa: BLE001 - e.g. a device subset the topology helper cannot place
        grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, AXES)


def sampling_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """The sampler's mesh: ``devices`` (default: this process's) all on ``data``; images are split over
    them (:func:`batch_sharding`), parameters replicated."""
    return make_mesh(data=-1, fsdp=1, devices=jax.local_devices() if devices is None else list(devices))


# -------------------------------------------------------------------------------- rule table

def _fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    """Shard the largest dimension divisible by ``fsdp`` (ties: the later one) of a big array."""
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    best = None
    for axis, size in enumerate(shape):
        if size % fsdp == 0 and (best is None or size >= shape[best]):
            best = axis
    if best is None:
        return P()
    return P(*([None] * best + ["fsdp"]))


# (regex on the leaf's path, rule). First match wins. Paths are "/"-joined keys, e.g.
# "params/unet/down_blocks_0/resnets_0/conv1/kernel" or "opt_state/1/inner_states/unet/..".
RULES: tuple[tuple[str, str], ...] = (
    (r"(^|/)(step|rng|count)$", "replicate"),  # counters and PRNG key data
    (r".*", "fsdp"),                           # everything else by shape: see _fsdp_spec
)


def path_string(path: Sequence[Any]) -> str:
    """A ``jax.tree_util`` key path -> ``"a/b/0/c"``."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def partition_spec(path: str, shape: Sequence[int], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """The rule table applied to one leaf: its PartitionSpec on a mesh with ``fsdp`` shards."""
    shape = tuple(int(s) for s in shape)
    for pattern, rule in RULES:
        if re.search(pattern, path):
            if rule == "replicate" or not shape:
                return P()
            return _fsdp_spec(shape, fsdp, min_size)
    return P()


def tree_specs(tree: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
    """PartitionSpec of every leaf (arrays or ShapeDtypeStructs) of any pytree."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: partition_spec(path_string(path), np.shape(x), fsdp, min_size), tree)


def tree_shardings(tree: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
    """NamedSharding of every leaf of any pytree (parameters, optimizer state, a train state)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree_specs(tree, mesh, min_size),
                        is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, accum: bool = False) -> NamedSharding:
    """Rows of the batch over every device (``("data", "fsdp")``).

    ``accum=True``: arrays carry a leading micro-batch axis (gradient
    accumulation), which is not split: ``P(None, ("data", "fsdp"))``.
    """
    return NamedSharding(mesh, P(None, BATCH_AXES) if accum else P(BATCH_AXES))


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings (what ``jax.jit(out_shardings=)`` and Orbax restore take)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Place host (numpy) or single-device arrays into their shardings, on every process.

    Each process must hold the same full values (e.g. every host loaded the same
    model); each device receives only its shard.
    """
    def put(x, sharding):
        if isinstance(x, jax.Array) and x.is_fully_addressable and getattr(x, "sharding", None) == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


# ------------------------------------------------------------------------------------ batches

def host_local_batch_to_global(batch: Mapping[str, Any], mesh: Mesh, accum: bool = False) -> dict[str, jax.Array]:
    """This process's rows of every batch array -> global arrays sharded by :func:`batch_sharding`.

    Each process passes ``global_rows / process_count`` rows (in the order of its
    devices in the mesh); with ``accum=True`` arrays are (micro, rows, ...) and
    only the row axis is split. A single process passes the whole batch.
    """
    sharding = batch_sharding(mesh, accum)
    axis = 1 if accum else 0
    nproc = jax.process_count()
    out = {}
    for name, value in batch.items():
        local = np.asarray(value)
        if local.ndim <= axis:
            raise ValueError(f"batch[{name!r}] has shape {local.shape}; expected a row axis at dimension {axis}")
        shape = list(local.shape)
        shape[axis] *= nproc
        out[name] = jax.make_array_from_process_local_data(sharding, local, tuple(shape))
    return out


def local_batch_rows(global_rows: int) -> int:
    """Rows each process feeds for a global batch of ``global_rows`` (must divide evenly)."""
    nproc = jax.process_count()
    if global_rows % nproc:
        raise ValueError(f"a global batch of {global_rows} rows cannot be split over {nproc} processes")
    return global_rows // nproc


# ------------------------------------------------------------------------------ multi-host

def _distributed_requested(env: Mapping[str, str]) -> bool:
    """Whether the environment describes a multi-process run (see initialize_distributed)."""
    flag = env.get("SD_JAX_DISTRIBUTED", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU slice (v4-16 and up, pods)
        return True
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1  # an Open MPI job of several ranks


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Start ``jax.distributed`` when the environment asks for a multi-process run; True if started.

    Call it before anything else touches JAX. It runs when:

    - ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) is set, with
      ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (else JAX's cluster detection fills them);
    - a multi-host TPU slice (``TPU_WORKER_HOSTNAMES`` lists several hosts), a SLURM job
      with more than one task or an Open MPI job with more than one rank: JAX detects
      coordinator, process count and id itself;
    - ``SD_JAX_DISTRIBUTED=1`` forces it (JAX's auto-detection), ``SD_JAX_DISTRIBUTED=0`` forbids it.

    ``SD_JAX_HEARTBEAT_TIMEOUT_S`` (JAX's default 100) bounds how long the others run on after a
    process dies (they are then ended with JAX's "another task died" message);
    ``SD_JAX_SHUTDOWN_TIMEOUT_S`` (default 300) how long a finishing process waits for the rest.

    A single-host TPU VM, one GPU machine or a CPU run needs nothing. On CPU the
    cross-process collectives use gloo (``jax_cpu_collectives_implementation``).
    """
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return True
    if not _distributed_requested(env):
        return False
    kwargs: dict[str, Any] = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if env.get(var):
            try:
                kwargs[arg] = int(env[var])
            except ValueError:
                raise ValueError(f"{var}={env[var]!r} must be an integer") from None
    # How long a dead process goes unnoticed (missed heartbeats) and how long exit waits for the others.
    for var, arg in (("SD_JAX_HEARTBEAT_TIMEOUT_S", "heartbeat_timeout_seconds"),
                     ("SD_JAX_SHUTDOWN_TIMEOUT_S", "shutdown_timeout_seconds")):
        if env.get(var):
            if not env[var].isdigit() or not 1 <= int(env[var]) <= 86400:
                raise ValueError(f"{var}={env[var][:20]!r} must be a whole number of seconds in [1, 86400]")
            kwargs[arg] = int(env[var])
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
