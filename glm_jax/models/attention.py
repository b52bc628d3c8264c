"""Grouped-query attention core: a dense reference, a blockwise (flash-style) JAX version and
wrappers around `jax.nn.dot_product_attention` (XLA / cuDNN).

Shapes: q `[batch, q_len, heads, head_dim]`, k / v `[batch, kv_len, kv_heads, head_dim]`; query
head j uses kv head j // (heads // kv_heads). Causality is by slot: query i sees key slot s iff
s <= q_slots[i] (so the same code serves training, prefill and a KV cache), restricted to the real
slots of kv_mask and, for packed rows, to the query's own segment. A query that sees no key at all
(left padding) gets the uniform average of all kv_len values, like a softmax over a finite floor.
"""

from functools import partial

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "xla", "cudnn")
# Masked scores get this finite floor rather than -inf: a fully-masked row then becomes a
# uniform average instead of NaN, and the online-softmax arithmetic below stays finite.
_FLOOR = float(jnp.finfo(jnp.float32).min)


def _mask(q_slots, kv_mask, kv_slots, q_seg=None, kv_seg=None) -> jax.Array:
    """`[batch, q_len, n]` bool: which of the keys at kv_slots `[n]` each query may see."""
    mask = kv_mask[:, None, :] & (kv_slots[None, None, :] <= q_slots[None, :, None])
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
    return mask


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_slots: jax.Array,
                    kv_mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Reference: materializes the float32 `[batch, kv_heads, groups, q_len, kv_len]` scores."""
    mask = _mask(q_slots, kv_mask, jnp.arange(k.shape[1]), segment_ids, segment_ids)
    b, t, h, d = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * d**-0.5
    scores = jnp.where(mask[:, None, None], scores, _FLOOR)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_slot: jax.Array,
                     kv_mask: jax.Array) -> jax.Array:
    """One query per row against a KV cache: keys `[batch, kv_heads, head_dim, kv_len]`,
    values `[batch, kv_heads, kv_len, head_dim]` (`KVCache`).

    q: `[batch, 1, heads, head_dim]`; q_slot: int scalar, the query's slot (it sees the real
    slots <= q_slot of kv_mask `[batch, kv_len]`). Each dot reads its cache operand in place:
    the kv heads are batch dims ahead of the contracted axis, which comes before the output
    axis (head_dim for the scores, the slots for the values), so neither is copied per step.
    """
    b, _, h, d = q.shape
    kvh = k.shape[1]
    mask = _mask(q_slot[None], kv_mask, jnp.arange(k.shape[3]))  # [b, 1, s]
    qg = q.reshape(b, kvh, h // kvh, d)
    scores = jnp.einsum("bkgd,bkds->bkgs", qg, k, preferred_element_type=jnp.float32) * d**-0.5
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, _FLOOR), axis=-1).astype(v.dtype)
    return jnp.einsum("bkgs,bksd->bkgd", probs, v).reshape(b, 1, h, d)


def _blocks(k, v, kv_mask, segment_ids, block_size):
    """Pads the key axis to a multiple of the block and moves blocks to a leading scan axis."""
    s = k.shape[1]
    n = -(-s // block_size)
    pad = n * block_size - s

    def split(x):  # [batch, s, ...] -> [n, batch, block, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], n, block_size, *x.shape[2:]), 1, 0)

    kv_seg = None if segment_ids is None else split(segment_ids)
    return split(k), split(v), split(kv_mask), kv_seg, jnp.arange(n) * block_size


def _block_scores(qg, xs, q_slots, q_seg, kv_len):
    """One key block's float32 scores `[b, kvh, g, t, block]` (masked ones floored), its mask
    and `[block]` in_range, False on the keys that only pad kv_len to a multiple of the block."""
    kblk, _, mblk, segblk, start = xs
    slots = start + jnp.arange(kblk.shape[1])
    mask = _mask(q_slots, mblk, slots, q_seg, segblk)[:, None, None]
    s = jnp.einsum("btkgd,bskd->bkgts", qg, kblk, preferred_element_type=jnp.float32)
    return jnp.where(mask, s * qg.shape[-1] ** -0.5, _FLOOR), mask, slots < kv_len


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_slots, kv_mask, segment_ids, block_size):
    return _flash_fwd(q, k, v, q_slots, kv_mask, segment_ids, block_size)[0]


def _flash_fwd(q, k, v, q_slots, kv_mask, segment_ids, block_size):
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    kb, vb, mb, segb, starts = _blocks(k, v, kv_mask, segment_ids, block_size)

    def step(carry, xs):
        m, total, acc = carry
        s, _, in_range = _block_scores(qg, xs, q_slots, segment_ids, k.shape[1])
        m_new = jnp.maximum(m, s.max(-1))
        # s >= _FLOOR and m_new >= s, so the differences are in [_FLOOR, 0]: no overflow; a row
        # whose scores are all floored keeps m == _FLOOR and sums exp(0) = 1 per real key.
        p = jnp.where(in_range, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        total = total * corr + p.sum(-1)
        pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), xs[1],
                        preferred_element_type=jnp.float32)
        return (m_new, total, acc * corr[..., None] + pv), None

    stats = jnp.full((b, kvh, h // kvh, t), _FLOOR, jnp.float32)
    init = (stats, jnp.zeros_like(stats), jnp.zeros((b, kvh, h // kvh, t, d), jnp.float32))
    (m, total, acc), _ = jax.lax.scan(step, init, (kb, vb, mb, segb, starts))
    out = jnp.moveaxis(acc / total[..., None], 3, 1).reshape(b, t, h, d).astype(v.dtype)
    # The logsumexp is kept as (max, log sum): folded into one number, log(kv_len) would vanish
    # next to _FLOOR for fully-masked rows and the backward pass would lose their 1 / kv_len.
    return out, (q, k, v, q_slots, kv_mask, segment_ids, out, m, jnp.log(total))


def _flash_bwd(block_size, res, dout):
    q, k, v, q_slots, kv_mask, segment_ids, out, m, log_l = res
    b, t, h, d = q.shape
    s_len, kvh = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    do = dout.reshape(b, t, kvh, h // kvh, d)
    # D = rowsum(dO * O): the softmax Jacobian's row term, without the [t, s] probabilities.
    delta = jnp.einsum("btkgd,btkgd->bkgt", do.astype(jnp.float32), out.reshape(do.shape)
                       .astype(jnp.float32))
    kb, vb, mb, segb, starts = _blocks(k, v, kv_mask, segment_ids, block_size)

    def step(dq, xs):
        kblk, vblk = xs[:2]
        s, mask, in_range = _block_scores(qg, xs, q_slots, segment_ids, s_len)
        p = jnp.where(in_range, jnp.exp((s - m[..., None]) - log_l[..., None]), 0.0)
        dv = jnp.einsum("bkgts,btkgd->bskd", p.astype(dout.dtype), do,
                        preferred_element_type=jnp.float32)
        dp = jnp.einsum("btkgd,bskd->bkgts", do, vblk, preferred_element_type=jnp.float32)
        # Masked scores are constants (the floor) in the reference: no gradient flows to them.
        ds = jnp.where(mask, p * (dp - delta[..., None]), 0.0) * d**-0.5
        ds = ds.astype(q.dtype)
        dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, kblk, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkgts,btkgd->bskd", ds, qg, preferred_element_type=jnp.float32)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(qg.shape, jnp.float32),
                                (kb, vb, mb, segb, starts))

    def unblock(x, dtype):  # [n, b, block, kvh, d] -> [b, kv_len, kvh, d]
        return jnp.moveaxis(x, 0, 1).reshape(b, -1, kvh, d)[:, :s_len].astype(dtype)

    return (dq.reshape(q.shape).astype(q.dtype), unblock(dk, k.dtype), unblock(dv, v.dtype),
            None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_slots: jax.Array,
                        kv_mask: jax.Array, segment_ids: jax.Array | None = None,
                        block_size: int = 512) -> jax.Array:
    """Flash-style attention: a scan over key blocks with an online softmax, custom backward.

    Peak scores are `[batch, kv_heads, groups, q_len, block_size]` float32 (linear in length).
    """
    block_size = max(1, min(block_size, k.shape[1]))
    return _flash(q, k, v, jnp.asarray(q_slots, jnp.int32), kv_mask.astype(bool), segment_ids,
                  block_size)


def _library_attention(q, k, v, q_slots, kv_mask, segment_ids, implementation):
    """`jax.nn.dot_product_attention` with the mask `[batch, 1, q_len, kv_len]`."""
    mask = _mask(q_slots, kv_mask.astype(bool), jnp.arange(k.shape[1]), segment_ids, segment_ids)
    # A row that sees no key attends to every slot, which is exactly the reference's uniform
    # average (and keeps cuDNN away from an all-masked row).
    mask = mask | ~mask.any(-1, keepdims=True)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                        implementation=implementation).astype(v.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_slots: jax.Array,
              kv_mask: jax.Array, segment_ids: jax.Array | None = None,
              implementation: str = "auto", block_size: int = 512) -> jax.Array:
    """Grouped-query attention, `[batch, q_len, heads, head_dim]` in v.dtype.

    q: `[batch, q_len, heads, head_dim]` (rotary already applied); k, v:
    `[batch, kv_len, kv_heads, head_dim]`. q_slots: `[q_len]` int, the slot of each query (query
    i sees key slot s iff s <= q_slots[i]). kv_mask: `[batch, kv_len]` bool, the real key slots.
    segment_ids: optional `[batch, q_len]` int (q_len == kv_len): attention stays in a segment.
    implementation: "dense" (reference), "blockwise" (flash-style, linear memory), "xla" /
    "cudnn" (`jax.nn.dot_product_attention`) or "auto": cuDNN for 16-bit inputs on GPU, else
    dense up to block_size keys (small models keep the reference program) and blockwise beyond.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"valid: {', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            implementation = "cudnn"
        else:
            implementation = "dense" if k.shape[1] <= block_size else "blockwise"
    if implementation == "dense":
        return dense_attention(q, k, v, q_slots=q_slots, kv_mask=kv_mask,
                               segment_ids=segment_ids)
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, q_slots=q_slots, kv_mask=kv_mask,
                                   segment_ids=segment_ids, block_size=block_size)
    return _library_attention(q, k, v, q_slots, kv_mask, segment_ids, implementation)
