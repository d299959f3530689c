"""Fused attention for long sequences (level 0: 257 tokens), flash-style Pallas (Triton) kernels
on the packed q, k, v of one product: the same computation as short_attention's (its
`reference`, its dropout hash), tiled for sequences longer than a block.

XLA runs level 0's attention as batched products with q, k and v transposed to N x H x T x K,
the logits padded to 264 x 264, and the float32 mask, softmax and dropout each a pass over
N x H x T x T (BENCHMARKS.md). Here a program takes one sequence, one head and a block of query
rows, and walks the key blocks with a running softmax, so the logits never leave on-chip
memory; it writes the N T x D output and each row's log-sum-exp. The backward pass recomputes
the weights from them: one kernel per key block for the k and v gradients, one per query block
for the q gradient, written as the N T x 3D gradient the q, k, v product's backward pass takes.

Dropout keeps a weight where short_attention.keep_mask does (a hash of query row, key position,
head and seed), so the backward kernels redraw the forward's masks and both kernels agree with
`short_attention.reference` on any number of devices (short_attention.split_over_devices).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fractalmidi_jax import short_attention
from fractalmidi_jax.short_attention import NEG_INF, keep_mask, kept_scale, split_over_devices

BLOCK = 64  # query rows and keys per tile
WARPS = 4


def supported(seq_len: int, head_dim: int) -> bool:
    """The sequences short_attention's blocks cannot hold whole."""
    return head_dim in (16, 32, 64, 128) and not short_attention.supported(seq_len, head_dim)


def _num_blocks(seq_len: int) -> int:
    return -(-seq_len // BLOCK)


def _tile(ref, seq_start, first, column, width, seq_len):
    """Rows `first` .. `first` + BLOCK of one sequence (zeros past its end), `width` columns from
    `column`; with their positions in the sequence."""
    positions = first + jnp.arange(BLOCK)
    valid = positions < seq_len
    rows = ref.at[pl.ds(seq_start + first, BLOCK), pl.ds(column, width)]
    return plgpu.load(rows, mask=valid[:, None], other=0.0), positions


def _allowed(mask_ref, q_first, k_first, k_positions, seq_len, masked):
    """BLOCK x BLOCK: which query rows may see which keys (keys inside the sequence and, with a
    level mask, where it allows)."""
    allowed = jnp.broadcast_to((k_positions < seq_len)[None, :], (BLOCK, BLOCK))
    if masked:
        allowed &= plgpu.load(mask_ref.at[pl.ds(q_first, BLOCK), pl.ds(k_first, BLOCK)]) != 0
    return allowed


def _keep(seed_ref, first_row_ref, seq_start, q_positions, k_positions, head, seq_len, heads, rate):
    rows = first_row_ref[...] + (seq_start + q_positions)[:, None]
    return keep_mask(seed_ref[...], rows, k_positions[None, :], head, seq_len, heads, rate)


def _forward_kernel(
    qkv_ref, mask_ref, seed_ref, first_row_ref, out_ref, lse_ref, *, heads, head_dim, seq_len, rate, masked
):
    seq, head, q_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    d, scale, seq_start, q_first = heads * head_dim, head_dim**-0.5, seq * seq_len, q_block * BLOCK
    q, q_positions = _tile(qkv_ref, seq_start, q_first, head * head_dim, head_dim, seq_len)
    running_max = jnp.full((BLOCK,), NEG_INF, jnp.float32)
    total = jnp.zeros((BLOCK,), jnp.float32)
    acc = jnp.zeros((BLOCK, head_dim), jnp.float32)
    for k_block in range(_num_blocks(seq_len)):
        k_first = k_block * BLOCK
        k, k_positions = _tile(qkv_ref, seq_start, k_first, d + head * head_dim, head_dim, seq_len)
        v, _ = _tile(qkv_ref, seq_start, k_first, 2 * d + head * head_dim, head_dim, seq_len)
        allowed = _allowed(mask_ref, q_first, k_first, k_positions, seq_len, masked)
        logits = jnp.where(allowed, plgpu.dot(q, k, trans_b=True) * scale, NEG_INF)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=1))
        correction = jnp.exp(running_max - new_max)
        # A masked weight is exp(NEG_INF - max) = 0; in a row's blocks before its first key
        # (max still NEG_INF) it is 1, and the correction zeroes it at that first key.
        weights = jnp.exp(logits - new_max[:, None])
        total = total * correction + jnp.sum(weights, axis=1)
        if rate > 0:
            keep = _keep(
                seed_ref, first_row_ref, seq_start, q_positions, k_positions, head, seq_len, heads, rate
            )
            weights = jnp.where(keep, weights * kept_scale(rate), 0.0)
        acc = acc * correction[:, None] + plgpu.dot(weights.astype(v.dtype), v)
        running_max = new_max
    rows = out_ref.at[pl.ds(seq_start + q_first, BLOCK), pl.ds(head * head_dim, head_dim)]
    plgpu.store(rows, (acc / total[:, None]).astype(out_ref.dtype), mask=(q_positions < seq_len)[:, None])
    plgpu.store(lse_ref.at[seq * heads + head, pl.ds(q_first, BLOCK)], running_max + jnp.log(total))


def _weights_and_grads(q, k, v, grad, lse, delta, allowed, keep, rate, scale):
    """One tile's weights after dropout and the logits' gradient (scaled), from the forward's
    log-sum-exp and delta = rowsum(grad * y)."""
    logits = plgpu.dot(q, k, trans_b=True) * scale
    weights = jnp.where(allowed, jnp.exp(logits - lse[:, None]), 0.0)
    grad_weights = plgpu.dot(grad, v, trans_b=True)
    kept = weights
    if keep is not None:
        kept = jnp.where(keep, weights * kept_scale(rate), 0.0)
        grad_weights = jnp.where(keep, grad_weights * kept_scale(rate), 0.0)
    grad_logits = weights * (grad_weights - delta[:, None]) * scale
    return kept, grad_logits


def _row_stats(lse_ref, delta_ref, seq, heads, head, q_first):
    row = seq * heads + head
    return lse_ref[row, pl.ds(q_first, BLOCK)], delta_ref[row, pl.ds(q_first, BLOCK)]


def _key_grads_kernel(
    qkv_ref, mask_ref, seed_ref, first_row_ref, grad_ref, lse_ref, delta_ref, dkv_ref, **sizes
):
    heads, head_dim, seq_len, rate = (sizes[k] for k in ("heads", "head_dim", "seq_len", "rate"))
    seq, head, k_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    d, scale, seq_start, k_first = heads * head_dim, head_dim**-0.5, seq * seq_len, k_block * BLOCK
    k, k_positions = _tile(qkv_ref, seq_start, k_first, d + head * head_dim, head_dim, seq_len)
    v, _ = _tile(qkv_ref, seq_start, k_first, 2 * d + head * head_dim, head_dim, seq_len)
    grad_k = jnp.zeros((BLOCK, head_dim), jnp.float32)
    grad_v = jnp.zeros((BLOCK, head_dim), jnp.float32)
    for q_block in range(_num_blocks(seq_len)):
        q_first = q_block * BLOCK
        q, q_positions = _tile(qkv_ref, seq_start, q_first, head * head_dim, head_dim, seq_len)
        grad, _ = _tile(grad_ref, seq_start, q_first, head * head_dim, head_dim, seq_len)
        lse, delta = _row_stats(lse_ref, delta_ref, seq, heads, head, q_first)
        allowed = _allowed(mask_ref, q_first, k_first, k_positions, seq_len, sizes["masked"])
        keep = None
        if rate > 0:
            keep = _keep(
                seed_ref, first_row_ref, seq_start, q_positions, k_positions, head, seq_len, heads, rate
            )
        kept, grad_logits = _weights_and_grads(q, k, v, grad, lse, delta, allowed, keep, rate, scale)
        grad_v += plgpu.dot(kept.astype(grad.dtype), grad, trans_a=True)
        grad_k += plgpu.dot(grad_logits.astype(q.dtype), q, trans_a=True)
    valid = (k_positions < seq_len)[:, None]
    for column, value in ((head * head_dim, grad_k), (d + head * head_dim, grad_v)):
        rows = dkv_ref.at[pl.ds(seq_start + k_first, BLOCK), pl.ds(column, head_dim)]
        plgpu.store(rows, value.astype(dkv_ref.dtype), mask=valid)


def _query_grads_kernel(
    qkv_ref, mask_ref, seed_ref, first_row_ref, grad_ref, lse_ref, delta_ref, dq_ref, **sizes
):
    heads, head_dim, seq_len, rate = (sizes[k] for k in ("heads", "head_dim", "seq_len", "rate"))
    seq, head, q_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    d, scale, seq_start, q_first = heads * head_dim, head_dim**-0.5, seq * seq_len, q_block * BLOCK
    q, q_positions = _tile(qkv_ref, seq_start, q_first, head * head_dim, head_dim, seq_len)
    grad, _ = _tile(grad_ref, seq_start, q_first, head * head_dim, head_dim, seq_len)
    lse, delta = _row_stats(lse_ref, delta_ref, seq, heads, head, q_first)
    grad_q = jnp.zeros((BLOCK, head_dim), jnp.float32)
    for k_block in range(_num_blocks(seq_len)):
        k_first = k_block * BLOCK
        k, k_positions = _tile(qkv_ref, seq_start, k_first, d + head * head_dim, head_dim, seq_len)
        v, _ = _tile(qkv_ref, seq_start, k_first, 2 * d + head * head_dim, head_dim, seq_len)
        allowed = _allowed(mask_ref, q_first, k_first, k_positions, seq_len, sizes["masked"])
        keep = None
        if rate > 0:
            keep = _keep(
                seed_ref, first_row_ref, seq_start, q_positions, k_positions, head, seq_len, heads, rate
            )
        _, grad_logits = _weights_and_grads(q, k, v, grad, lse, delta, allowed, keep, rate, scale)
        grad_q += plgpu.dot(grad_logits.astype(k.dtype), k)
    rows = dq_ref.at[pl.ds(seq_start + q_first, BLOCK), pl.ds(head * head_dim, head_dim)]
    plgpu.store(rows, grad_q.astype(dq_ref.dtype), mask=(q_positions < seq_len)[:, None])


def _call(kernel, out_shapes, qkv_NxTx3D, heads, mask, rate, seed, first_row, *extra, interpret):
    """`kernel` on a grid of (sequence, head, block); N T-row arrays go in flat."""
    n, t, three_d = qkv_NxTx3D.shape
    padded = _num_blocks(t) * BLOCK
    mask_array = np.zeros((padded, padded), np.int8)
    mask_array[:t, :t] = np.array(mask, bool)
    sizes = dict(
        heads=heads, head_dim=three_d // 3 // heads, seq_len=t, rate=rate, masked=not mask_array[:t, :t].all()
    )
    return pl.pallas_call(
        functools.partial(kernel, **sizes),
        out_shape=out_shapes,
        grid=(n, heads, _num_blocks(t)),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=1),
    )(
        qkv_NxTx3D.reshape(n * t, three_d),
        jnp.asarray(mask_array),
        jnp.reshape(seed, (1, 1)),
        jnp.reshape(first_row, (1, 1)).astype(jnp.uint32),
        *extra,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 6))
def _fused(qkv_NxTx3D, heads, mask, rate, seed, first_row, interpret):
    return _forward(qkv_NxTx3D, heads, mask, rate, seed, first_row, interpret)[0]


def _forward(qkv_NxTx3D, heads, mask, rate, seed, first_row, interpret):
    n, t, three_d = qkv_NxTx3D.shape
    out_shapes = (
        jax.ShapeDtypeStruct((n * t, three_d // 3), qkv_NxTx3D.dtype),
        jax.ShapeDtypeStruct((n * heads, _num_blocks(t) * BLOCK), jnp.float32),
    )
    args = (qkv_NxTx3D, heads, mask, rate, seed, first_row)
    y, lse = _call(_forward_kernel, out_shapes, *args, interpret=interpret)
    y = y.reshape(n, t, three_d // 3)
    return y, (qkv_NxTx3D, y, lse, seed, first_row)


def _backward(heads, mask, rate, interpret, residuals, grad_NxTxD):
    qkv_NxTx3D, y, lse, seed, first_row = residuals
    n, t, three_d = qkv_NxTx3D.shape
    grad_NxTxD = grad_NxTxD.astype(qkv_NxTx3D.dtype)
    products = grad_NxTxD.astype(jnp.float32) * y.astype(jnp.float32)
    delta = products.reshape(n, t, heads, -1).sum(-1).transpose(0, 2, 1).reshape(n * heads, t)
    delta = jnp.pad(delta, ((0, 0), (0, lse.shape[1] - t)))
    args = (qkv_NxTx3D, heads, mask, rate, seed, first_row, grad_NxTxD.reshape(n * t, -1), lse, delta)
    rows = lambda width: jax.ShapeDtypeStruct((n * t, width), qkv_NxTx3D.dtype)
    dq = _call(_query_grads_kernel, rows(three_d // 3), *args, interpret=interpret)
    dkv = _call(_key_grads_kernel, rows(2 * three_d // 3), *args, interpret=interpret)
    dqkv = jnp.concatenate([dq, dkv], axis=-1).reshape(n, t, three_d)
    no_gradient = lambda x: np.zeros(np.shape(x), jax.dtypes.float0)
    return dqkv, no_gradient(seed), no_gradient(first_row)


_fused.defvjp(_forward, _backward)


def fused_attention(qkv_NxTx3D, heads: int, mask_TxT: np.ndarray, rate: float, seed, interpret: bool = False):
    """N x T x D attention outputs from the packed N x T x 3D q, k, v (short_attention.reference's
    result). `mask_TxT`: a static boolean array; `seed`: uint32 (traced)."""
    mask = tuple(map(tuple, np.asarray(mask_TxT, bool).tolist()))
    run = lambda qkv, seed, first_row: _fused(qkv, heads, mask, rate, seed, first_row, interpret)
    return split_over_devices(run, qkv_NxTx3D, jnp.asarray(seed, jnp.uint32))
