"""The attention kernels agree with each other and with PyTorch SDPA; auto-selection is as documented."""

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


def test_choose_implementation():
    choose = attn.choose_implementation
    assert choose("cpu", jnp.float32, 4096, 4096, 40) == "blocked"
    assert choose("cpu", jnp.float32, 4096, 77, 40) == "naive"
    assert choose("gpu", jnp.bfloat16, 4096, 4096, 40) == "cudnn"
    assert choose("gpu", jnp.float32, 4096, 4096, 40) == "blocked"   # cuDNN flash needs bf16/fp16
    assert choose("gpu", jnp.float16, 4096, 4096, 320) == "blocked"  # head size > 256
    assert choose("tpu", jnp.bfloat16, 4096, 4096, 40) == "pallas"
    assert choose("tpu", jnp.bfloat16, 4096, 4096, 40, causal=True) == "blocked"


def test_bad_implementation_name():
    q, k, v = _qkv(lq=4, lk=4)
    with pytest.raises(ValueError, match="'flash'.*not one of"):
        attn.attention(q, k, v, implementation="flash")
