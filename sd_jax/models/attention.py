"""One attention function for every model, choosing its kernel by backend.

All inputs are laid out (B, L, H, D): batch, tokens, heads, head size. The
softmax is always computed in float32, whatever the compute dtype.

Kernels:
- ``"blocked"``: online-softmax attention over query and key blocks; never
  materialises the (Lq x Lk) matrix. The CPU default for long sequences.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, flash
  attention on NVIDIA GPUs; needs bf16/fp16 and head size <= 256.
- ``"pallas"``: the Pallas TPU flash-attention kernel (sequence lengths padded).
- ``"xla"``: ``jax.nn.dot_product_attention`` as XLA lowers it.
- ``"naive"``: einsum, float32 softmax, einsum. Short sequences and the reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "blocked", "cudnn", "pallas", "xla", "naive")

# Below this many (query x key) scores per head the plain kernel is cheapest.
_SMALL_SCORES = 512 * 512
# Cross-attention to a 77-token prompt: the score matrix is small whatever the query length.
_SHORT_KEYS = 128
QUERY_BLOCK = 256
KEY_BLOCK = 512


def choose_implementation(backend: str, dtype, q_len: int, k_len: int, head_dim: int,
                          causal: bool = False) -> str:
    """Pick the attention kernel for a backend, dtype and shape ("auto" resolution)."""
    if q_len * k_len <= _SMALL_SCORES or k_len <= _SHORT_KEYS:
        return "naive"
    dtype = jnp.dtype(dtype)
    if backend == "gpu" or backend == "cuda":
        if dtype in (jnp.bfloat16, jnp.float16) and head_dim <= 256 and head_dim % 8 == 0:
            return "cudnn"
        return "blocked"
    if backend == "tpu" and not causal:
        return "pallas"
    return "blocked"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
              implementation: str = "auto", upcast: bool = False) -> jax.Array:
    """Scaled dot-product attention, (B, Lq, H, D) x (B, Lk, H, D) -> (B, Lq, H, D).

    ``upcast`` also computes the query-key products in float32 (diffusers'
    ``upcast_attention``); the softmax is float32 regardless.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    _, q_len, _, head_dim = q.shape
    k_len = k.shape[1]
    if implementation == "auto":
        implementation = choose_implementation(jax.default_backend(), q.dtype, q_len, k_len,
                                               head_dim, causal)
    if upcast and implementation in ("cudnn", "pallas"):
        implementation = "blocked"
    if causal and implementation in ("blocked", "pallas"):
        implementation = "naive"
    if implementation == "naive":
        return _naive(q, k, v, causal=causal, upcast=upcast)
    if implementation == "blocked":
        return _blocked(q, k, v, upcast=upcast)
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    return _pallas_tpu(q, k, v)


def _naive(q, k, v, *, causal: bool, upcast: bool) -> jax.Array:
    """Materialised attention with a float32 softmax."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k,
                        preferred_element_type=jnp.float32)  # (B, H, Lq, Lk)
    if causal:
        q_len, k_len = scores.shape[-2:]
        keep = jnp.tril(jnp.ones((q_len, k_len), dtype=bool))
        scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pad ``axis`` of ``x`` up to a multiple of ``multiple``."""
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _blocked(q, k, v, *, upcast: bool, q_block: int | None = None,
             k_block: int | None = None) -> jax.Array:
    """Online-softmax attention (Milakov & Gimelshein 2018; FlashAttention's recurrence).

    Query blocks are processed one after another (``lax.map``); within a block
    a ``lax.scan`` over key blocks keeps the running max ``m``, normaliser ``l``
    and float32 accumulator, so only (q_block x k_block) scores exist at once.
    """
    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    q_block = min(q_block or QUERY_BLOCK, q_len)  # module constants read at call time
    k_block = min(k_block or KEY_BLOCK, k_len)
    scale = 1.0 / math.sqrt(head_dim)
    compute = jnp.float32 if upcast else q.dtype
    q = (q.astype(compute) * jnp.asarray(scale, compute))
    k = k.astype(compute)

    qp = _pad_to(q, 1, q_block)
    kp, vp = _pad_to(k, 1, k_block), _pad_to(v, 1, k_block)
    n_q, n_k = qp.shape[1] // q_block, kp.shape[1] // k_block
    q_blocks = qp.reshape(batch, n_q, q_block, heads, head_dim).swapaxes(0, 1)  # (nQ, B, bq, H, D)
    k_blocks = kp.reshape(batch, n_k, k_block, heads, head_dim).swapaxes(0, 1)  # (nK, B, bk, H, D)
    v_blocks = vp.reshape(batch, n_k, k_block, heads, head_dim).swapaxes(0, 1)
    key_valid = (jnp.arange(n_k * k_block) < k_len).reshape(n_k, k_block)
    needs_mask = n_k * k_block != k_len

    def one_query_block(q_blk):  # (B, bq, H, D)
        def over_keys(carry, inputs):
            m, l, acc = carry
            k_blk, v_blk, valid = inputs
            s = jnp.einsum("bqhd,bkhd->bhqk", q_blk, k_blk,
                           preferred_element_type=jnp.float32)  # (B, H, bq, bk)
            if needs_mask:
                s = jnp.where(valid[None, None, None, :], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            correction = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = l * correction + p.sum(axis=-1)
            pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v_blk.dtype), v_blk,
                            preferred_element_type=jnp.float32)
            acc = acc * correction[..., None] + pv
            return (m_new, l, acc), None

        init = (jnp.full((batch, heads, q_block), -jnp.inf, jnp.float32),
                jnp.zeros((batch, heads, q_block), jnp.float32),
                jnp.zeros((batch, heads, q_block, head_dim), jnp.float32))
        if n_k == 1:
            (m, l, acc), _ = over_keys(init, (k_blocks[0], v_blocks[0], key_valid[0]))
        else:
            (m, l, acc), _ = jax.lax.scan(over_keys, init, (k_blocks, v_blocks, key_valid))
        out = acc / l[..., None]  # (B, H, bq, D)
        return out.transpose(0, 2, 1, 3).astype(v.dtype)  # (B, bq, H, D)

    if n_q == 1:
        out = one_query_block(q_blocks[0])[None]
    else:
        out = jax.lax.map(one_query_block, q_blocks)  # (nQ, B, bq, H, D)
    out = out.swapaxes(0, 1).reshape(batch, n_q * q_block, heads, head_dim)
    return out[:, :q_len]


def _pallas_tpu(q, k, v) -> jax.Array:
    """Pallas flash attention on TPU; head size and lengths padded to the kernel's tiles."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa  # TPU only

    q_len, k_len, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim)
    # (B, L, H, D) -> (B, H, L, D), padded: head size to 128, lengths to 128.
    qt, kt, vt = (_pad_to(_pad_to(x.transpose(0, 2, 1, 3), 3, 128), 2, 128) for x in (q, k, v))
    bias = None
    if kt.shape[2] != k_len:
        valid = jnp.arange(kt.shape[2]) < k_len
        bias = jnp.broadcast_to(jnp.where(valid, 0.0, -1e9).astype(jnp.float32),
                                (qt.shape[0], qt.shape[1], qt.shape[2], kt.shape[2]))
    out = fa.flash_attention(qt, kt, vt, ab=bias, sm_scale=scale)
    return out[:, :, :q_len, :head_dim].transpose(0, 2, 1, 3)
