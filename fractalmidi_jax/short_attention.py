"""Fused attention for short sequences (levels below 0: 6-22 tokens), one Pallas (Triton) kernel
forward and one backward, on the packed q, k, v of one product.

XLA runs such attention as batched products of 22 x 64 tiles with q, k and v transposed to
N x H x T x K and back, the float32 logits, the mask, the softmax and the dropout each a pass
over N x H x T x T (BENCHMARKS.md: 12 ms of a 62 ms batch-64 step at levels 1 and 2). Here a
program takes a block of whole sequences (`per_block` x T rows of the N T x 3D array q, k and v
come in) and one head: it reads its q, k and v columns, forms the block's logits with a block
mask (same sequence and the level's T x T mask), takes the softmax, drops out and writes the
N T x D output, all in on-chip memory; the backward pass recomputes the block and writes the
N T x 3D gradient that the q, k, v product's backward pass takes as it is.

Dropout on the attention weights draws from a counter hash of (query row, key position, head)
and a seed, so the backward pass redraws the forward pass's masks without storing them.
`reference` is the same computation in jnp, the tests' oracle; off the GPU the kernels run
interpreted.

XLA cannot split a kernel by the batch: on a mesh with a `data` axis of several devices (the
training steps set it while tracing, `steps.py`) each device runs the kernels on its own
sequences under `shard_map`, counting rows from its first global row, so dropout draws the same
masks on any number of devices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec

from fractalmidi_jax.sharding import DATA_AXIS

# Rows (and keys) per program, whole sequences padded, and warps per program: the fastest of
# blocks 64-256 x 2-8 warps forward and 32-128 x 2-8 backward at levels 1 and 2's 22 tokens on
# an H200 (BENCHMARKS.md). Small programs win: the backward pass keeps four block x block
# float32 tiles live, and larger blocks waste most of their logits on other sequences.
FORWARD_BLOCK, BACKWARD_BLOCK = 64, 32
FORWARD_WARPS, BACKWARD_WARPS = 4, 2
NEG_INF = -1e30


def sequences_per_block(seq_len: int, block: int) -> int:
    return block // seq_len


def supported(seq_len: int, head_dim: int) -> bool:
    """Whether the blocks hold whole sequences (two or more forward) and the head width suits the
    kernels' products."""
    return 2 * seq_len <= FORWARD_BLOCK and seq_len <= BACKWARD_BLOCK and head_dim in (16, 32, 64, 128)


def _hash(x):
    """A 32-bit integer mix (murmur3's finaliser): neighbouring counters give unrelated bits."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def seeded_bits(seed, counter):
    """32 random-looking bits per uint32 counter under a seed: dropout's draws, here and in
    layers.dropout."""
    return _hash(counter ^ (jnp.asarray(seed).astype(jnp.uint32) * jnp.uint32(0x9E3779B9)))


def keep_mask(seed, query_rows, key_positions, head, seq_len: int, heads: int, rate: float):
    """Which attention weights dropout keeps: query row (global, of the N T rows) x key position
    (in its sequence), for one head; 8 bits of a hash of the pair, the head and the seed, kept
    where they reach round(rate x 256), as layers.dropout does."""
    threshold = round(rate * 256)
    as_uint = lambda x: jnp.asarray(x).astype(jnp.uint32)
    counter = (as_uint(query_rows) * seq_len + as_uint(key_positions)) * heads + as_uint(head)
    bits = seeded_bits(seed, counter)
    return (bits >> 24) >= threshold


def kept_scale(rate: float) -> float:
    """What a kept weight is multiplied by: 1 / the share kept at the rounded rate."""
    return 1 / (1 - round(rate * 256) / 256)


def block_mask(mask_TxT: np.ndarray, seq_len: int, block: int) -> np.ndarray:
    """block x block int8: row r sees key c where both hold tokens of the same sequence of the
    block and the level's mask lets r's token see c's."""
    per_block = sequences_per_block(seq_len, block)
    index = np.arange(block)
    used = index < per_block * seq_len
    same = (index[:, None] // seq_len == index[None, :] // seq_len) & used[:, None] & used[None, :]
    pos = index % seq_len
    return (same & mask_TxT[pos[:, None], pos[None, :]]).astype(np.int8)


def reference(qkv_NxTx3D, heads: int, mask_TxT, rate: float, seed):
    """The fused kernels' computation in jnp: N x T x D outputs."""
    n, t, three_d = qkv_NxTx3D.shape
    d = three_d // 3
    q, k, v = (x.reshape(n, t, heads, d // heads) for x in jnp.split(qkv_NxTx3D, 3, axis=-1))
    scale = (d // heads) ** -0.5
    logits = jnp.einsum("nthk,nshk->nhts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask_TxT, logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1)
    if rate > 0:
        rows = (jnp.arange(n)[:, None] * t + jnp.arange(t)[None, :])[:, None, :, None]
        keep = keep_mask(seed, rows, jnp.arange(t), jnp.arange(heads)[None, :, None, None], t, heads, rate)
        weights = jnp.where(keep, weights * kept_scale(rate), 0.0)
    y = jnp.einsum("nhts,nshk->nthk", weights.astype(v.dtype), v)
    return y.reshape(n, t, d)


def _load_block(ref, start, column, width, valid):
    rows = valid.shape[0]
    return plgpu.load(ref.at[pl.ds(start, rows), pl.ds(column, width)], mask=valid[:, None], other=0.0)


def _store_block(ref, start, column, value, valid):
    rows, width = value.shape
    plgpu.store(
        ref.at[pl.ds(start, rows), pl.ds(column, width)], value.astype(ref.dtype), mask=valid[:, None]
    )


def _block(qkv_ref, mask_ref, seed_ref, first_row_ref, *, heads, head_dim, seq_len, rate, total_rows, block):
    """A program's first row, head, valid rows, q, k, v, dropout keep mask (None without
    dropout) and softmax weights (float32)."""
    used = sequences_per_block(seq_len, block) * seq_len
    start = pl.program_id(0) * used
    head = pl.program_id(1)
    index = jnp.arange(block)
    rows = start + index
    valid = (index < used) & (rows < total_rows)
    d = heads * head_dim
    q, k, v = (_load_block(qkv_ref, start, i * d + head * head_dim, head_dim, valid) for i in range(3))
    logits = plgpu.dot(q, k, trans_b=True) * (head_dim**-0.5)
    logits = jnp.where(mask_ref[...] != 0, logits, NEG_INF)
    weights = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)
    keep = None
    if rate > 0:
        global_rows = first_row_ref[...] + rows[:, None]
        keep = keep_mask(seed_ref[...], global_rows, (index % seq_len)[None, :], head, seq_len, heads, rate)
    return start, head, valid, q, k, v, keep, weights


def _forward_kernel(qkv_ref, mask_ref, seed_ref, first_row_ref, out_ref, **sizes):
    start, head, valid, _, _, v, keep, weights = _block(qkv_ref, mask_ref, seed_ref, first_row_ref, **sizes)
    if keep is not None:
        weights = jnp.where(keep, weights * kept_scale(sizes["rate"]), 0.0)
    _store_block(out_ref, start, head * sizes["head_dim"], plgpu.dot(weights.astype(v.dtype), v), valid)


def _backward_kernel(qkv_ref, mask_ref, seed_ref, first_row_ref, grad_ref, dqkv_ref, **sizes):
    start, head, valid, q, k, v, keep, weights = _block(qkv_ref, mask_ref, seed_ref, first_row_ref, **sizes)
    head_dim = sizes["head_dim"]
    grad = _load_block(grad_ref, start, head * head_dim, head_dim, valid)
    kept = weights
    grad_weights = plgpu.dot(grad, v, trans_b=True)  # of the weights after dropout
    if keep is not None:
        kept = jnp.where(keep, weights * kept_scale(sizes["rate"]), 0.0)
        grad_weights = jnp.where(keep, grad_weights * kept_scale(sizes["rate"]), 0.0)
    grad_v = plgpu.dot(kept.astype(grad.dtype), grad, trans_a=True)
    grad_logits = weights * (grad_weights - jnp.sum(weights * grad_weights, axis=1, keepdims=True))
    grad_logits = (grad_logits * (head_dim**-0.5)).astype(q.dtype)
    d = sizes["heads"] * head_dim
    for i, value in enumerate((plgpu.dot(grad_logits, k), plgpu.dot(grad_logits, q, trans_a=True), grad_v)):
        _store_block(dqkv_ref, start, i * d + head * head_dim, value, valid)


def _call(kernel, block, warps, out_width, qkv_NxTx3D, heads, mask, rate, seed, first_row, *extra, interpret):
    """`kernel` over the N T rows of `qkv_NxTx3D` (and of each of `extra`), blocks of `block`
    rows, `mask` the hashed tuple form of the level's T x T mask, `first_row` the global index of
    the first row (for dropout): N x T x `out_width`."""
    n, t, three_d = qkv_NxTx3D.shape
    rows = n * t
    sizes = dict(
        heads=heads, head_dim=three_d // 3 // heads, seq_len=t, rate=rate, total_rows=rows, block=block
    )
    flat = [x.reshape(rows, -1).astype(qkv_NxTx3D.dtype) for x in (qkv_NxTx3D,) + extra]
    y = pl.pallas_call(
        functools.partial(kernel, **sizes),
        out_shape=jax.ShapeDtypeStruct((rows, out_width), qkv_NxTx3D.dtype),
        grid=(pl.cdiv(rows, sequences_per_block(t, block) * t), heads),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
    )(
        flat[0],
        jnp.asarray(block_mask(np.array(mask, bool), t, block)),
        jnp.reshape(seed, (1, 1)),
        jnp.reshape(first_row, (1, 1)).astype(jnp.uint32),
        *flat[1:],
    )
    return y.reshape(n, t, out_width)


def fused_attention(qkv_NxTx3D, heads: int, mask_TxT: np.ndarray, rate: float, seed, interpret: bool = False):
    """N x T x D attention outputs from the packed N x T x 3D q, k, v (`reference`'s result).
    `mask_TxT`: a static boolean array (all True for full attention); `seed`: uint32 (traced)."""
    mask = tuple(map(tuple, np.asarray(mask_TxT, bool).tolist()))  # static arguments are hashed
    run = lambda qkv, seed, first_row: _fused(qkv, heads, mask, rate, seed, first_row, interpret)
    return split_over_devices(run, qkv_NxTx3D, jnp.asarray(seed, jnp.uint32))


def split_over_devices(run, qkv_NxTx3D, seed):
    """`run(qkv, seed, first_row)` on all sequences, or, on a mesh whose `data` axis has several
    devices, under `shard_map` on each device's own sequences (padded to a multiple of the
    devices), `first_row` its first global row, so dropout draws the same masks on any number."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else dict(mesh.shape).get(DATA_AXIS, 1)
    if shards == 1:
        return run(qkv_NxTx3D, seed, jnp.uint32(0))
    n, t, _ = qkv_NxTx3D.shape
    padded = jnp.pad(qkv_NxTx3D, ((0, -n % shards), (0, 0), (0, 0)))

    def on_each_device(qkv_local, seed):
        first_row = jax.lax.axis_index(DATA_AXIS).astype(jnp.uint32) * (qkv_local.shape[0] * t)
        return run(qkv_local, seed, first_row)

    rows, whole = PartitionSpec(DATA_AXIS), PartitionSpec()
    sharded = jax.shard_map(
        on_each_device, mesh=mesh, in_specs=(rows, whole), out_specs=rows, check_vma=False
    )
    return sharded(padded, seed)[:n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 6))
def _fused(qkv_NxTx3D, heads, mask, rate, seed, first_row, interpret):
    return _forward(qkv_NxTx3D, heads, mask, rate, seed, first_row, interpret)[0]


def _forward(qkv_NxTx3D, heads, mask, rate, seed, first_row, interpret):
    width = qkv_NxTx3D.shape[-1] // 3
    args = (qkv_NxTx3D, heads, mask, rate, seed, first_row)
    y = _call(_forward_kernel, FORWARD_BLOCK, FORWARD_WARPS, width, *args, interpret=interpret)
    return y, (qkv_NxTx3D, seed, first_row)


def _backward(heads, mask, rate, interpret, residuals, grad_NxTxD):
    qkv_NxTx3D, seed, first_row = residuals
    args = (qkv_NxTx3D, heads, mask, rate, seed, first_row, grad_NxTxD)
    width = qkv_NxTx3D.shape[-1]
    dqkv = _call(_backward_kernel, BACKWARD_BLOCK, BACKWARD_WARPS, width, *args, interpret=interpret)
    no_gradient = lambda x: np.zeros(np.shape(x), jax.dtypes.float0)
    return dqkv, no_gradient(seed), no_gradient(first_row)


_fused.defvjp(_forward, _backward)
