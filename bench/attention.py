"""Attention forward + backward at the UNet's 64x64-latent self-attention shape.

B=2 (CFG), L=4096 tokens, H=8 heads, D=40, float32 and bfloat16 inputs. For each
kernel: the seconds of one jitted ``jax.grad`` of ``sum(attention(q, k, v) * w)``
with respect to q, k, v (forward + backward; median of ``--repeats`` after one
warm-up) and XLA's compiled temporary memory for that function
(``memory_analysis().temp_size_in_bytes``: buffers besides arguments and outputs).

Kernels: "blocked" (online softmax, FlashAttention-2 backward via ``jax.custom_vjp``),
"blocked, autodiff" (the same forward differentiated by JAX, which keeps every
probability block for the backward: the behaviour before the custom VJP) and
"naive" (materialised scores). Importing sd_jax sets its XLA:CPU defaults, as in
the other benches. For scale: one (B, H, L, L) float32 score matrix
is 1 GiB.

    python bench/attention.py                     # both dtypes, all kernels
    python bench/attention.py --dtypes float32 --kernels blocked naive --repeats 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax
import jax.numpy as jnp
import numpy as np
from common import machine, median, table

from sd_jax.models import attention as attn

KERNELS = {
    "blocked": lambda q, k, v: attn._blocked(q, k, v, upcast=False),
    "blocked, autodiff": lambda q, k, v: attn._blocked_forward(
        q, k, v, upcast=False, q_block=attn.QUERY_BLOCK, k_block=attn.KEY_BLOCK)[0],
    "naive": lambda q, k, v: attn._naive(q, k, v, causal=False, upcast=False),
}


def grad_fn(kernel, w):
    """Jitted gradient of sum(kernel(q, k, v) * w) with respect to q, k, v."""
    loss = lambda q, k, v: jnp.sum(kernel(q, k, v).astype(jnp.float32) * w)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(kernel, args, w, repeats: int) -> tuple[float, float]:
    """(median seconds per forward + backward, compiled temp memory in GiB)."""
    fn = grad_fn(kernel, w)
    temp = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**30
    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return median(times), temp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--length", type=int, default=4096)
    args = parser.parse_args()
    b, h, d, n = 2, 8, 40, args.length
    rng = np.random.default_rng(0)
    base = [rng.standard_normal((b, n, h, d), dtype=np.float32) for _ in range(4)]
    print(f"machine: {machine()}")
    print(f"shape: B={b} L={n} H={h} D={d}; blocks {attn.QUERY_BLOCK} queries x {attn.KEY_BLOCK} keys; "
          f"one (B, H, L, L) float32 matrix = {b * h * n * n * 4 / 2**30:.2f} GiB")
    rows = []
    for dtype in args.dtypes:
        q, k, v = (jnp.asarray(x, dtype) for x in base[:3])
        w = jnp.asarray(base[3])
        for name in args.kernels:
            seconds, temp = measure(KERNELS[name], (q, k, v), w, args.repeats)
            rows.append((dtype, name, f"{seconds:.2f}", f"{temp:.3f}"))
            print(f"  {dtype} {name}: {seconds:.2f} s, temp {temp:.3f} GiB", flush=True)
    print(table(rows, header=("dtype", "kernel", "fwd+bwd s (median)", "compiled temp GiB")))


if __name__ == "__main__":
    main()
