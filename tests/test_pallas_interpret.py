"""The Pallas TPU flash-attention path, run on the CPU in TPU interpret mode, against the naive kernel.

``jax.experimental.pallas.tpu.force_tpu_interpret_mode`` makes every ``pallas_call`` traced
under it run the kernel's TPU program on the CPU (simulated VMEM, DMAs and grid), so the
code a TPU runs is executed here: forward and the kernel's own backward (``jax.grad``
goes through its custom VJP). Shapes are SD v1's self-attention levels, 8 heads:
4096 tokens x 40, 1024 x 80, 256 x 160, 64 x 160, and the 77-token cross-attention
(keys padded to 128 and masked by segment ids). Interpret mode costs ~5 ms per grid
step, so the 4096- and 1024-token cases are in the slow run.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from sd_jax.models import attention as attn


def _qkv(b, lq, lk, h, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s, dtype=np.float32))
                 for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))


def _pallas(q, k, v):
    return attn.attention(q, k, v, implementation="pallas")


def _naive(q, k, v):
    return attn._naive(q, k, v, causal=False, upcast=False)


def _value_and_grads(fn, q, k, v, w):
    """sum(fn(q, k, v) * w) and its gradient with respect to q, k, v, jitted."""
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _check(b, lq, lk, h, d, dtype=jnp.float32):
    q, k, v = (x.astype(dtype) for x in _qkv(b, lq, lk, h, d))
    w = _qkv(b, lq, 1, h, d, seed=1)[0]
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(_pallas)(q, k, v)
        _, grads = _value_and_grads(_pallas, q, k, v, w)
    # The reference: the exact (float32) attention of the same, possibly bf16-rounded, inputs.
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    ref = _naive(q32, k32, v32)
    _, ref_grads = _value_and_grads(_naive, q32, k32, v32, w)
    assert out.shape == (b, lq, h, d) and out.dtype == dtype
    # float32: both kernels sum D*L float32 products in different orders; relative 1e-5 of the
    # largest value is ~100 ulps, far below any masking or scaling error (those are O(1)).
    # bfloat16 (8 significant bits): the kernel rounds its output and the p.v operands to bf16,
    # relative 2^-8 each; 3 * 2^-8 of the largest value bounds them.
    tol = 1e-5 if dtype == jnp.float32 else 3 * 2**-8
    scale = float(jnp.abs(ref).max())
    err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
    assert err <= tol * scale, ("out", err, scale)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype, name
        scale = float(jnp.abs(r).max())
        err = float(jnp.abs(g.astype(jnp.float32) - r).max())
        assert err <= (tol if dtype == jnp.float32 else 4 * 2**-8) * scale, (name, err, scale)


@pytest.mark.parametrize("lq,lk,h,d", [
    (256, 256, 8, 160),  # 16x16 latents (512^2 image): self-attention, no padding
    (64, 64, 8, 160),    # 8x8 latents (mid block): lengths padded 64 -> 128 (queries and keys)
    (200, 77, 2, 40),    # cross-attention to 77 text tokens; ragged queries
])
def test_pallas_interpret_matches_naive(lq, lk, h, d):
    _check(1, lq, lk, h, d)


def test_pallas_interpret_bf16():
    _check(1, 256, 256, 2, 80, dtype=jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("lq,h,d", [(4096, 8, 40), (1024, 8, 80)])
def test_pallas_interpret_sd_shapes(lq, h, d):
    # 64x64 and 32x32 latents (512^2 image). 4096 tokens: ~1 min forward + backward here.
    _check(1, lq, lq, h, d)


def _shapes_in(hlo: str) -> list[tuple[int, ...]]:
    """Every array shape named in an HLO/StableHLO text."""
    shapes = re.findall(r"tensor<([\dx]+)x(?:f32|bf16|f16|i32|i1)>", hlo)
    return [tuple(int(n) for n in s.split("x")) for s in shapes]


def test_padding_builds_no_bias_matrix():
    # 300 queries, 600 keys: padded to 384 and 640. The mask must come from segment ids
    # ((B, L) vectors), not a (B, H, Lq', Lk') bias. The old code broadcast a float32 bias of
    # (2, 2, 384, 640) here, which this test catches. (The kernel's own backward keeps its
    # row statistics lane-replicated, (B, H, Lq', 128): O(Lq), whatever Lk.)
    q, k, v = _qkv(2, 300, 600, 2, 40)
    with pltpu.force_tpu_interpret_mode():
        hlo = jax.jit(jax.grad(lambda q, k, v: jnp.sum(_pallas(q, k, v)), argnums=(0, 1, 2))) \
            .lower(q, k, v).as_text()
    shapes = _shapes_in(hlo)
    assert (2, 2, 384, 128) in shapes  # the padded queries: the check sees the kernel's operands
    biggest = max(math.prod(s) for s in shapes)
    assert biggest < 2 * 2 * 384 * 640, (biggest, [s for s in shapes if math.prod(s) == biggest])


def test_auto_picks_pallas_on_tpu_only():
    choose = attn.choose_implementation
    assert choose("tpu", jnp.bfloat16, 4096, 4096, 40) == "pallas"
    assert choose("tpu", jnp.float32, 1024, 1024, 80) == "pallas"
    assert choose("tpu", jnp.bfloat16, 4096, 77, 40) == "naive"  # cross-attention: small scores
    assert choose("tpu", jnp.bfloat16, 4096, 4096, 40, causal=True) == "blocked"
    assert choose("cpu", jnp.bfloat16, 4096, 4096, 40) == "blocked"
