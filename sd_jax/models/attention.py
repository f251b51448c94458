"""One attention function for every model, choosing its kernel by backend.

All inputs are laid out (B, L, H, D): batch, tokens, heads, head size. The
softmax is always computed in float32, whatever the compute dtype.

Kernels:
- ``"blocked"``: online-softmax attention over query and key blocks; never
  materialises the (Lq x Lk) matrix, in the forward nor (a custom VJP that
  recomputes the scores, FlashAttention-2's) in the gradient. The CPU default
  for long sequences.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, flash
  attention on NVIDIA GPUs; needs bf16/fp16 and a head size that is a multiple
  of 8 and <= 256 (Hopper and later) or <= 128 (earlier GPUs).
- ``"pallas"``: the Pallas TPU flash-attention kernel (forward and backward);
  head size padded to 128 and lengths to 128, padded keys masked with segment
  ids (no (B, H, Lq, Lk) bias). Runs on the CPU in TPU interpret mode
  (``jax.experimental.pallas.tpu.force_tpu_interpret_mode``), as the tests do.
- ``"xla"``: ``jax.nn.dot_product_attention`` as XLA lowers it (scores
  materialised, float32 softmax).
- ``"naive"``: einsum, float32 softmax, einsum. Short sequences and the reference.

How "auto" chooses, per backend (``choose_implementation``)::

    any backend   Lq*Lk <= 512^2, or Lk <= 128 (cross-attention)  naive
    gpu           bf16/fp16, head size fits cuDNN                  cudnn
    gpu           otherwise, scores <= 2 GiB float32               xla
    gpu           otherwise                                        blocked
    tpu           not causal                                       pallas
    cpu (other)                                                    blocked
"""

from __future__ import annotations

import functools
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
# cuDNN flash attention's head-size limit (jax._src.cudnn.fused_attention_stablehlo):
# 256 from compute capability 9.0 (Hopper), 128 before. SD's heads are 40/80/160.
_CUDNN_MAX_HEAD = {True: 256, False: 128}
# float32 on a GPU: cuDNN flash attention has no float32 kernel. "blocked" is written for
# XLA:CPU: a lax.map over query blocks of a lax.scan over key blocks, i.e. 16 x 8 sequential
# small GEMMs at 4096 tokens, each a few kernel launches. XLA:GPU runs the materialised
# kernel as two large cuBLAS GEMMs and one fused softmax, memory-bound at ~4 reads/writes of
# the scores: at 4096 tokens, batch 2, 8 heads that is 1 GiB of float32 scores, ~1 ms of
# HBM traffic on an H200, below the blocked loop's launch overhead. So "xla" while the
# scores fit this budget, "blocked" (O(block) memory) beyond it. Not yet measured on a GPU:
# bench/accelerator.py times cudnn, xla, blocked and naive at 4096 tokens to check the choice.
_GPU_XLA_SCORE_BYTES = 2 * 2**30
_TPU_BLOCKS = (512, 256, 128)  # Pallas tiles: the largest that divides the padded length


def cudnn_unsupported(dtype, head_dim: int, hopper: bool = True) -> str | None:
    """Why cuDNN flash attention cannot run this dtype/head size (None when it can)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
    limit = _CUDNN_MAX_HEAD[hopper]
    if head_dim > limit or head_dim % 8:
        return (f"cuDNN flash attention needs a head size that is a multiple of 8 and <= {limit} "
                f"on this GPU, got {head_dim}")
    return None


def choose_implementation(backend: str, dtype, q_len: int, k_len: int, head_dim: int,
                          causal: bool = False, *, batch_heads: int = 1, hopper: bool = True) -> str:
    """Pick the attention kernel for a backend, dtype and shape ("auto" resolution).

    ``batch_heads`` is batch x heads (sizes the score matrix); ``hopper``: the GPU has
    compute capability >= 9.0 (cuDNN's head-size limit 256, else 128).
    """
    if q_len * k_len <= _SMALL_SCORES or k_len <= _SHORT_KEYS:
        return "naive"
    if backend in ("gpu", "cuda", "rocm"):
        if backend != "rocm" and cudnn_unsupported(dtype, head_dim, hopper) is None:
            return "cudnn"
        score_bytes = batch_heads * q_len * k_len * 4  # float32 scores
        return "xla" if score_bytes <= _GPU_XLA_SCORE_BYTES else "blocked"
    if backend == "tpu" and not causal:
        return "pallas"
    return "blocked"


def _is_hopper_or_later() -> bool:
    """Whether the first GPU has compute capability >= 9.0 (False when unknown)."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return tuple(int(x) for x in str(capability).split(".")[:2]) >= (9, 0)
    except ValueError:
        return False


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
        backend = jax.default_backend()
        implementation = choose_implementation(
            backend, q.dtype, q_len, k_len, head_dim, causal, batch_heads=q.shape[0] * q.shape[2],
            hopper=backend == "gpu" and _is_hopper_or_later())
    elif implementation == "cudnn" and not upcast:
        hopper = jax.default_backend() != "gpu" or _is_hopper_or_later()
        reason = cudnn_unsupported(q.dtype, head_dim, hopper)
        if reason:
            raise ValueError(f"attention implementation 'cudnn': {reason}; use 'xla' or 'blocked'")
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
    """Online-softmax attention whose gradient is FlashAttention-2's memory-light backward."""
    q_block = min(q_block or QUERY_BLOCK, q.shape[1])  # module constants read at call time
    k_block = min(k_block or KEY_BLOCK, k.shape[1])
    return _flash(q, k, v, upcast, q_block, k_block)


def _scaled_qk(q, k, upcast: bool):
    """The query (times 1/sqrt(D)) and key as the score product sees them."""
    compute = jnp.float32 if upcast else q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1])
    return q.astype(compute) * jnp.asarray(scale, compute), k.astype(compute)


def _split(x: jax.Array, block: int, axis: int = 1) -> jax.Array:
    """Cut ``axis`` into blocks, zero-padding it: (B, L, ...) -> (n, B, block, ...)."""
    x = _pad_to(x, axis, block)
    n = x.shape[axis] // block
    x = x.reshape(*x.shape[:axis], n, block, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _key_mask(k_len: int, k_block: int) -> tuple[jax.Array, bool]:
    """Which padded key positions are real, (nK, bk), and whether any are padding."""
    n_k = -(-k_len // k_block)
    valid = (jnp.arange(n_k * k_block) < k_len).reshape(n_k, k_block)
    return valid, n_k * k_block != k_len


def _blocked_forward(q, k, v, *, upcast: bool, q_block: int,
                     k_block: int) -> tuple[jax.Array, jax.Array]:
    """Online-softmax attention (Milakov & Gimelshein 2018; FlashAttention's recurrence).

    Query blocks are processed one after another (``lax.map``); within a block
    a ``lax.scan`` over key blocks keeps the running max ``m``, normaliser ``l``
    and float32 accumulator, so only (q_block x k_block) scores exist at once.
    Returns the output (B, Lq, H, D) and the row log-sum-exp ``m + log(l)``,
    float32 (B, H, Lq). Plain autodiff of this function saves every probability
    block, O(Lq x Lk) memory: ``_flash`` gives it a recomputing backward instead.
    """
    batch, q_len, heads, head_dim = q.shape
    q, k = _scaled_qk(q, k, upcast)
    q_blocks = _split(q, q_block)  # (nQ, B, bq, H, D)
    k_blocks, v_blocks = _split(k, k_block), _split(v, k_block)  # (nK, B, bk, H, D)
    n_q, n_k = q_blocks.shape[0], k_blocks.shape[0]
    key_valid, needs_mask = _key_mask(k.shape[1], k_block)

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
        return out.transpose(0, 2, 1, 3).astype(v.dtype), m + jnp.log(l)  # (B, bq, H, D), (B, H, bq)

    if n_q == 1:
        out, lse = jax.tree.map(lambda x: x[None], one_query_block(q_blocks[0]))
    else:
        out, lse = jax.lax.map(one_query_block, q_blocks)  # (nQ, B, bq, H, D), (nQ, B, H, bq)
    out = out.swapaxes(0, 1).reshape(batch, n_q * q_block, heads, head_dim)[:, :q_len]
    lse = lse.transpose(1, 2, 0, 3).reshape(batch, heads, n_q * q_block)[..., :q_len]
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash(q, k, v, upcast: bool, q_block: int, k_block: int) -> jax.Array:
    """Blocked attention; its gradient recomputes the scores block by block."""
    return _blocked_forward(q, k, v, upcast=upcast, q_block=q_block, k_block=k_block)[0]


def _flash_fwd(q, k, v, upcast, q_block, k_block):
    """The forward pass, saving only q, k, v, the output and the row log-sum-exp."""
    out, lse = _blocked_forward(q, k, v, upcast=upcast, q_block=q_block, k_block=k_block)
    return out, (q, k, v, out, lse)


def _flash_bwd(upcast, q_block, k_block, residuals, d_out):
    """FlashAttention-2's backward (Dao 2023, Algorithm 2), in float32.

    Per (query, key) block the probabilities are recomputed from the saved
    log-sum-exp, ``P = exp(S - L)``; with ``D = rowsum(dO * O)``:
    ``dV += P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - D)``, ``dQ += dS K / sqrt(d)``,
    ``dK += dS^T Q / sqrt(d)``. S is recomputed from the same (scaled, compute-dtype)
    q and k as the forward's; the products after it take float32 operands
    (bf16 inputs are cast once, O(L x D)), so the gradient rounds only at the end.

    Loops: an outer ``lax.scan`` over key blocks emits that block's dK, dV
    (accumulated in the inner carry, (B, H, bk, D)); the inner ``lax.scan`` over
    query blocks reads the running dQ block as an input and emits it updated, so
    dQ ((nQ, B, H, bq, D), float32) is the outer carry. Each score block is
    computed once. On XLA:CPU (B=2, L=4096, H=8, D=40) this ran as fast and in
    the same memory as dQ in the inner carry updated with ``dynamic_update_slice``,
    and ~20% faster than a separate dQ pass (which recomputes S and dP).
    """
    q, k, v, out, lse = residuals
    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    f32 = jnp.float32
    scale = 1.0 / math.sqrt(head_dim)
    qs, ks = _scaled_qk(q, k, upcast)
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(f32), out.astype(f32))  # (B, H, Lq)
    heads_first = lambda x: x.astype(f32).transpose(0, 2, 1, 3)  # (B, L, H, D) -> (B, H, L, D)
    # Padded query rows have q = dO = D = 0 and L = 0, hence dS = 0 and P^T dO = 0.
    q_blocks, do_blocks = (_split(heads_first(x), q_block, 2) for x in (qs, d_out))  # (nQ, B, H, bq, D)
    lse_blocks, delta_blocks = _split(lse, q_block, 2), _split(delta, q_block, 2)  # (nQ, B, H, bq)
    k_blocks, v_blocks = (_split(heads_first(x), k_block, 2) for x in (ks, v))  # (nK, B, H, bk, D)
    key_valid, needs_mask = _key_mask(k_len, k_block)

    def one_key_block(dq, inputs):
        k_blk, v_blk, valid = inputs  # (B, H, bk, D), (B, H, bk, D), (bk,)

        def over_queries(carry, inputs):
            dk, dv = carry
            q_blk, do_blk, lse_blk, delta_blk, dq_blk = inputs
            s = jnp.einsum("bhqd,bhkd->bhqk", q_blk, k_blk)  # (B, H, bq, bk)
            p = jnp.exp(s - lse_blk[..., None])
            if needs_mask:
                p = jnp.where(valid, p, 0.0)  # padded keys: zero probability
            dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p, do_blk)
            dp = jnp.einsum("bhqd,bhkd->bhqk", do_blk, v_blk)  # (B, H, bq, bk)
            ds = p * (dp - delta_blk[..., None])
            dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, q_blk)
            dq_blk = dq_blk + jnp.einsum("bhqk,bhkd->bhqd", ds, k_blk)
            return (dk, dv), dq_blk

        zeros = jnp.zeros((batch, heads, k_block, head_dim), f32)
        (dk, dv), dq = jax.lax.scan(over_queries, (zeros, zeros),
                                    (q_blocks, do_blocks, lse_blocks, delta_blocks, dq))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(one_key_block, jnp.zeros_like(q_blocks),
                                (k_blocks, v_blocks, key_valid))  # dk, dv: (nK, B, H, bk, D)

    def unblock(x, length, like):
        """(n, B, H, blk, D) -> (B, length, H, D) in ``like``'s dtype."""
        x = x.transpose(1, 0, 3, 2, 4).reshape(batch, -1, heads, head_dim)
        return x[:, :length].astype(like.dtype)

    # q and k entered the scores already scaled (qs = q * scale): d/dq = scale * d/dqs,
    # and dK is dS^T (Q * scale) already.
    return (unblock(dq * scale, q_len, q), unblock(dk, k_len, k), unblock(dv, k_len, v))


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pallas_tpu(q, k, v) -> jax.Array:
    """Pallas flash attention on TPU; head size and lengths padded to the kernel's tiles.

    Padded keys get segment id 0 and every query segment id 1, so no query attends to
    them; the kernel builds that mask per tile, never a (B, H, Lq, Lk) array. Padded
    query rows attend to the real keys (no row is empty, so no NaN reaches the
    backward) and are sliced off. Zero-padded head columns add nothing to q.k and
    give zero output columns, also sliced off; the scale is the unpadded 1/sqrt(D).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as fa  # TPU (or interpret mode)

    batch, q_len, _, head_dim = q.shape
    k_len = k.shape[1]
    scale = 1.0 / math.sqrt(head_dim)
    # (B, L, H, D) -> (B, H, L, D), padded: head size to 128, lengths to 128.
    qt, kt, vt = (_pad_to(_pad_to(x.transpose(0, 2, 1, 3), 3, 128), 2, 128) for x in (q, k, v))
    q_pad, k_pad = qt.shape[2], kt.shape[2]
    segment_ids = None
    if k_pad != k_len:
        kv_ids = (jnp.arange(k_pad) < k_len).astype(jnp.int32)  # (Lk',) 1 = real key, 0 = padding
        segment_ids = fa.SegmentIds(q=jnp.ones((batch, q_pad), jnp.int32),
                                    kv=jnp.broadcast_to(kv_ids, (batch, k_pad)))  # (B, Lq'), (B, Lk')
    bq = next(b for b in _TPU_BLOCKS if q_pad % b == 0)
    bk = next(b for b in _TPU_BLOCKS if k_pad % b == 0)
    blocks = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                           block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
                           block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
    out = fa.flash_attention(qt, kt, vt, segment_ids=segment_ids, sm_scale=scale, block_sizes=blocks)
    return out[:, :, :q_len, :head_dim].transpose(0, 2, 1, 3)  # (B, Lq, H, D)
