"""The attention kernels agree with each other and with PyTorch SDPA; auto-selection is as documented."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sd_jax.models import attention as attn


def _qkv(b=2, lq=300, lk=700, h=3, d=16, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s, dtype=np.float32).astype(dtype))
                 for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))


def _torch_sdpa(q, k, v, causal=False):
    to = lambda x: torch.from_numpy(np.asarray(x, np.float32)).permute(0, 2, 1, 3)
    out = torch.nn.functional.scaled_dot_product_attention(to(q), to(k), to(v), is_causal=causal)
    return out.permute(0, 2, 1, 3).numpy()


@pytest.mark.parametrize("lq,lk", [(300, 700), (256, 512), (1, 77), (77, 77), (1000, 5)])
@pytest.mark.parametrize("impl", ["naive", "blocked", "xla"])
def test_matches_torch(impl, lq, lk, monkeypatch):
    # Small blocks so that several query and key blocks, and ragged last blocks, are exercised.
    monkeypatch.setattr(attn, "QUERY_BLOCK", 64)
    monkeypatch.setattr(attn, "KEY_BLOCK", 128)
    q, k, v = _qkv(lq=lq, lk=lk)
    fn = jax.jit(lambda q, k, v: attn._blocked(q, k, v, upcast=False, q_block=64, k_block=128)
                 if impl == "blocked" else attn.attention(q, k, v, implementation=impl))
    out = np.asarray(fn(q, k, v))
    ref = _torch_sdpa(q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-6 * max(1.0, np.abs(ref).max()), rtol=0)


def test_causal_matches_torch():
    q, k, v = _qkv(lq=77, lk=77)
    for impl in ("naive", "xla", "blocked"):  # blocked falls back to naive for causal masks
        out = np.asarray(attn.attention(q, k, v, causal=True, implementation=impl))
        np.testing.assert_allclose(out, _torch_sdpa(q, k, v, causal=True), atol=2e-6, rtol=0)


def test_blocked_bf16_close_to_fp32():
    q, k, v = _qkv(lq=600, lk=600)
    ref = np.asarray(attn.attention(q, k, v, implementation="naive"))
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = np.asarray(attn._blocked(q16, k16, v16, upcast=True, q_block=128, k_block=256), np.float32)
    # bf16 inputs carry 8 mantissa bits (relative rounding 2^-9 ~ 2e-3); outputs are
    # convex combinations of v, so an absolute error of a few 1e-2 at |v| ~ 3 is bf16 rounding.
    assert np.abs(out - ref).max() < 3e-2


def test_blocked_never_materialises_full_scores():
    q, k, v = _qkv(b=1, lq=4096, lk=4096, h=1, d=8)
    hlo = jax.jit(lambda q, k, v: attn.attention(q, k, v, implementation="blocked")).lower(q, k, v).as_text()
    assert "4096x4096" not in hlo


def _grads(fn, q, k, v, w):
    """Gradient of the random scalar sum(fn(q, k, v) * w) with respect to q, k, v."""
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _naive_fn(upcast=False):
    return lambda q, k, v: attn._naive(q, k, v, causal=False, upcast=upcast)


@pytest.mark.parametrize("upcast", [False, True])
@pytest.mark.parametrize("lq,lk", [(300, 700), (256, 512), (300, 77), (1, 77), (1000, 5)])
def test_blocked_grad_matches_naive(lq, lk, upcast, monkeypatch):
    # Small blocks: several query and key blocks, ragged last blocks (padded rows and keys).
    monkeypatch.setattr(attn, "QUERY_BLOCK", 64)
    monkeypatch.setattr(attn, "KEY_BLOCK", 128)
    q, k, v = _qkv(lq=lq, lk=lk, d=40)
    w = _qkv(lq=lq, lk=1, d=40, seed=1)[0]
    blocked = lambda q, k, v: attn.attention(q, k, v, implementation="blocked", upcast=upcast)
    got, ref = _grads(blocked, q, k, v, w), _grads(_naive_fn(upcast), q, k, v, w)
    for name, g, r in zip("qkv", got, ref):
        assert g.dtype == jnp.float32, name
        err = float(jnp.abs(g - r).max())
        assert err <= 1e-5 * float(jnp.abs(r).max()), (name, err)


@pytest.mark.parametrize("upcast", [False, True])
def test_blocked_grad_bf16(upcast):
    q, k, v = _qkv(lq=300, lk=700, d=40, dtype=jnp.bfloat16)
    w = _qkv(lq=300, lk=1, d=40, seed=1)[0]
    blocked = lambda q, k, v: attn._blocked(q, k, v, upcast=upcast, q_block=64, k_block=128)
    got = _grads(blocked, q, k, v, w)
    naive16 = _grads(_naive_fn(upcast), q, k, v, w)
    # The exact gradient of the same (bf16-valued) inputs.
    ref = _grads(_naive_fn(), *(x.astype(jnp.float32) for x in (q, k, v)), w)
    # bf16 keeps 8 significant bits (relative rounding <= 2^-9 = 2^-8 / 2). Rounded here: the
    # returned gradient itself, the cotangent dO (w cast to the bf16 output), the saved output O
    # in D = rowsum(dO * O) and, without upcast, q / sqrt(40). dS = P * (dP - D) subtracts two
    # such quantities, so a few 2^-8 relative to the gradient's scale is bf16 rounding;
    # measured ~1.5 * 2^-8, the same as autodiff of the bf16 naive kernel.
    for name, g, n, r in zip("qkv", got, naive16, ref):
        assert g.dtype == jnp.bfloat16, name
        scale = float(jnp.abs(r).max())
        err = float(jnp.abs(g.astype(jnp.float32) - r).max()) / scale
        naive_err = float(jnp.abs(n.astype(jnp.float32) - r).max()) / scale
        assert err <= 4 * 2**-8, (name, err)
        assert err <= 2 * naive_err + 2**-9, (name, err, naive_err)


def test_blocked_forward_unchanged_and_lse():
    q, k, v = _qkv(lq=300, lk=700)
    out = attn._blocked(q, k, v, upcast=False, q_block=64, k_block=128)
    plain, lse = attn._blocked_forward(q, k, v, upcast=False, q_block=64, k_block=128)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))  # the custom VJP's primal
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    assert lse.shape == (2, 3, 300) and lse.dtype == jnp.float32  # (B, H, Lq)
    np.testing.assert_allclose(lse, jax.nn.logsumexp(scores, axis=-1), atol=1e-5, rtol=0)


def test_blocked_grad_under_remat():
    q, k, v = _qkv(lq=300, lk=700)
    w = _qkv(lq=300, lk=1, seed=1)[0]
    blocked = lambda q, k, v: attn._blocked(q, k, v, upcast=False, q_block=64, k_block=128)
    for g, r in zip(_grads(jax.checkpoint(blocked), q, k, v, w), _grads(blocked, q, k, v, w)):
        np.testing.assert_allclose(g, r, atol=1e-6, rtol=0)


def _grad_memory(fn, q, k, v):
    """(elements of the largest array, temp bytes) of the compiled gradient of sum(fn(q, k, v))."""
    compiled = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2))) \
        .lower(q, k, v).compile()
    dims = re.findall(r"\b(?:pred|bf16|[fsu]\d+)\[([\d,]*)\]", compiled.as_text())  # f32[1,1,256,512]
    largest = max(math.prod(int(d) for d in shape.split(",") if d) for shape in dims)
    return largest, compiled.memory_analysis().temp_size_in_bytes


def test_blocked_grad_never_materialises_full_scores():
    lq = lk = 4096
    q, k, v = _qkv(b=1, lq=lq, lk=lk, h=1, d=8)
    full = lq * lk  # one score matrix per (batch, head): 64 MiB in float32
    blocked = lambda q, k, v: attn.attention(q, k, v, implementation="blocked")
    largest, temp = _grad_memory(blocked, q, k, v)
    assert largest < full // 16 and temp < 4 * full // 16, (largest, temp)  # O(block): 256 x 512
    # The check can fail: it does for materialised scores and for plain autodiff of the
    # blocked forward, which stacks every probability block for the backward.
    autodiff = lambda q, k, v: attn._blocked_forward(q, k, v, upcast=False, q_block=256,
                                                     k_block=512)[0]
    for fn in (_naive_fn(), autodiff):
        largest, temp = _grad_memory(fn, q, k, v)
        assert largest >= full and temp >= 4 * full, (largest, temp)


def test_choose_implementation():
    choose = attn.choose_implementation
    assert choose("cpu", jnp.float32, 4096, 4096, 40) == "blocked"
    assert choose("cpu", jnp.float32, 4096, 77, 40) == "naive"
    assert choose("gpu", jnp.bfloat16, 4096, 4096, 40) == "cudnn"
    assert choose("gpu", jnp.float16, 1024, 1024, 80) == "cudnn"
    assert choose("gpu", jnp.bfloat16, 1024, 1024, 160) == "cudnn"           # Hopper: head size <= 256
    assert choose("gpu", jnp.bfloat16, 1024, 1024, 160, hopper=False) == "xla"  # A100: <= 128
    assert choose("gpu", jnp.bfloat16, 4096, 4096, 512) == "xla"             # the VAE's single 512 head
    # float32 has no cuDNN flash kernel: XLA's materialised attention while the scores fit
    # 2 GiB (batch 2 x 8 heads x 4096^2 x 4 B = 1 GiB), the blocked loop beyond.
    assert choose("gpu", jnp.float32, 4096, 4096, 40, batch_heads=16) == "xla"
    assert choose("gpu", jnp.float32, 4096, 4096, 40, batch_heads=64) == "blocked"
    assert choose("gpu", jnp.float16, 4096, 4096, 320) == "xla"              # head size > 256
    assert choose("gpu", jnp.float16, 4096, 4096, 36) == "xla"               # not a multiple of 8
    assert choose("rocm", jnp.bfloat16, 4096, 4096, 40) == "xla"             # cuDNN is NVIDIA only
    assert choose("gpu", jnp.bfloat16, 4096, 77, 40) == "naive"              # cross-attention
    assert choose("tpu", jnp.bfloat16, 4096, 4096, 40) == "pallas"
    assert choose("tpu", jnp.bfloat16, 4096, 4096, 40, causal=True) == "blocked"


def test_cudnn_conditions_checked_before_the_call():
    assert attn.cudnn_unsupported(jnp.bfloat16, 40) is None
    assert attn.cudnn_unsupported(jnp.float16, 256) is None
    assert "bfloat16 or float16" in attn.cudnn_unsupported(jnp.float32, 40)
    assert "<= 128" in attn.cudnn_unsupported(jnp.bfloat16, 160, hopper=False)
    assert "multiple of 8" in attn.cudnn_unsupported(jnp.bfloat16, 36)
    q, k, v = _qkv(lq=8, lk=8, d=40)  # float32: cuDNN has no kernel; a clear error, not XLA's
    with pytest.raises(ValueError, match="'cudnn'.*bfloat16 or float16.*float32"):
        attn.attention(q, k, v, implementation="cudnn")
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(lq=8, lk=8, d=264))
    with pytest.raises(ValueError, match="'cudnn'.*multiple of 8 and <= 256.*264"):
        attn.attention(q, k, v, implementation="cudnn")


def test_bad_implementation_name():
    q, k, v = _qkv(lq=4, lk=4)
    with pytest.raises(ValueError, match="'flash'.*not one of"):
        attn.attention(q, k, v, implementation="flash")
