"""The MLP half of a block for narrow levels (widths 64-256: levels 1 and 2 and the head) in
Pallas (Triton) kernels, forward and backward:

    y = x + dropout(fc2(dropout(gelu(fc1(layer_norm(x))))))

Levels 1 and 2 run hundreds of thousands of rows through products only 128-256 wide, so XLA's
MLP is memory-bound: it writes the rows x 4D hidden activation, its GELU, its dropout mask and
their gradients, and reads each back for the next fusion, the bias and layer-norm gradients
each a further pass (BENCHMARKS.md: level 2's MLP hidden alone took 4.4 ms of a 47 ms step).
Here the hidden activation never leaves on-chip memory:

- forward: a program takes a block of ROWS rows, normalises them, and walks the hidden columns
  in chunks (fc1, GELU, dropout, fc2 accumulated), then adds fc2's bias, drops out and adds the
  residual;
- input gradients: the same walk backwards per row block gives the input's gradient and the
  block's partial sums of the bias and layer-norm gradients;
- weight gradients: a program takes one hidden chunk and every WEIGHT_GRAD_PROGRAMS'th row
  block, recomputing the chunk's activations, and sums fc1's and fc2's kernel gradients for its
  rows on chip.

The partial sums are added up by XLA (small arrays). The backward pass recomputes fc1 twice,
cheap at these widths. Dropout draws from short_attention's counter hash of (row, column) and
a seed per dropout, so the backward kernels redraw the forward's masks; `reference` is the
computation in jnp, the tests' oracle. GELU is the exact one, erf from Abramowitz and Stegun
7.1.26 (absolute error below 1.5e-7; Triton has no erf). On a mesh each device runs the
kernels on its own sequences (short_attention.split_over_devices).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fractalmidi_jax.short_attention import kept_scale, seeded_bits, split_over_devices

ROWS = 64  # rows per program
WARPS = 4
STAGES = 1
WEIGHT_GRAD_PROGRAMS = 64  # row groups of the weight-gradient kernel (times the hidden chunks)
ACCUMULATOR = 16384  # float32 elements of one width x chunk weight-gradient tile
EPSILON = 1e-6  # layers.layer_norm's


def supported(dim: int, hidden: int) -> bool:
    """The widths whose tiles suit the kernels (the levels below 0 of the shipped sizes)."""
    return dim in (64, 128, 256) and hidden == 4 * dim


def _chunk(dim: int, hidden: int) -> int:
    """Hidden columns per step: two width x chunk float32 tiles fit a program's registers."""
    return min(hidden, ACCUMULATOR // dim)


def _gelu_and_slope(h):
    """Exact GELU h Phi(h) and its derivative Phi(h) + h phi(h), float32."""
    z = jnp.abs(h) * np.float32(math.sqrt(0.5))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    gauss = jnp.exp(-z * z)  # exp(-h^2 / 2)
    erf_abs = 1.0 - poly * gauss
    cdf = 0.5 + 0.5 * jnp.where(h >= 0, erf_abs, -erf_abs)
    return h * cdf, cdf + h * gauss * np.float32(1 / math.sqrt(2 * math.pi))


def _keep(seed, rows, columns, width: int, rate: float):
    """Which elements of a rows x `width` activation dropout keeps: 8 bits of the counter hash of
    (global row, column), kept where they reach round(rate x 256), as layers.dropout does."""
    as_uint = lambda x: jnp.asarray(x).astype(jnp.uint32)
    bits = seeded_bits(seed, as_uint(rows) * np.uint32(width) + as_uint(columns))
    return (bits >> 24) >= round(rate * 256)


def _dropped(value, keep, rate):
    return value if keep is None else jnp.where(keep, value * kept_scale(rate), 0.0)


def _layer_norm(x, scale, bias):
    """float32 rows: normalised rows before the affine map, 1 / std, and the layer norm."""
    mean = jnp.sum(x, axis=1, keepdims=True) / x.shape[1]
    centred = x - mean
    inv_std = jax.lax.rsqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / x.shape[1] + EPSILON)
    normed = centred * inv_std
    return normed, inv_std, normed * scale + bias


def reference(x_NxTxD, weights, seeds, rate: float):
    """The kernels' computation in jnp: N x T x D. `weights`: layer-norm scale and bias, fc1's
    kernel and bias, fc2's kernel and bias; `seeds`: two uint32 (hidden and output dropout)."""
    scale, bias, w1, b1, w2, b2 = weights
    n, t, d = x_NxTxD.shape
    dtype = x_NxTxD.dtype
    x = x_NxTxD.reshape(n * t, d).astype(jnp.float32)
    _, _, normalised = _layer_norm(x, scale, bias)
    h = jnp.dot(normalised.astype(dtype), w1.astype(dtype), preferred_element_type=jnp.float32) + b1
    a = _gelu_and_slope(h)[0]
    rows = jnp.arange(n * t)[:, None]
    if rate > 0:
        a = _dropped(a, _keep(seeds[0], rows, jnp.arange(w1.shape[1]), w1.shape[1], rate), rate)
    z = jnp.dot(a.astype(dtype), w2.astype(dtype), preferred_element_type=jnp.float32) + b2
    if rate > 0:
        z = _dropped(z, _keep(seeds[1], rows, jnp.arange(d), d, rate), rate)
    return (x + z).astype(dtype).reshape(n, t, d)


class _Rows:
    """A program's block of rows: their local and global indices and which exist."""

    def __init__(self, start, total_rows, first_row_ref):
        self.start = start
        local = start + jnp.arange(ROWS)
        self.valid = local < total_rows
        self.global_index = (first_row_ref[...] + local[:, None].astype(jnp.uint32)).astype(jnp.uint32)

    def load(self, ref):
        block = ref.at[pl.ds(self.start, ROWS), pl.ds(0, ref.shape[1])]
        return plgpu.load(block, mask=self.valid[:, None], other=0.0).astype(jnp.float32)

    def store(self, ref, value):
        block = ref.at[pl.ds(self.start, ROWS), pl.ds(0, ref.shape[1])]
        plgpu.store(block, value.astype(ref.dtype), mask=self.valid[:, None])


def _recompute(rows, x_ref, grad_ref, scale_ref, bias_ref, out_seed_ref, rate):
    """What every backward program needs of its rows (float32): the normalised rows before the
    affine map, 1 / std, the layer norm, the output's gradient and fc2's (before its dropout)."""
    normed, inv_std, normalised = _layer_norm(rows.load(x_ref), scale_ref[...], bias_ref[...])
    grad = rows.load(grad_ref)
    d = grad.shape[1]
    keep = _keep(out_seed_ref[...], rows.global_index, jnp.arange(d)[None, :], d, rate) if rate > 0 else None
    return normed, inv_std, normalised, grad, _dropped(grad, keep, rate)


def _chunk_weights(w1_ref, w2_ref, first, chunk):
    d = w1_ref.shape[0]
    w1_chunk = plgpu.load(w1_ref.at[pl.ds(0, d), pl.ds(first, chunk)])
    return w1_chunk, plgpu.load(w2_ref.at[pl.ds(first, chunk), pl.ds(0, d)])


def _hidden_chunk(rows, normalised, grad_z, w1_chunk, w2_chunk, b1_ref, hidden_seed_ref, first, rate):
    """Hidden columns first .. first + chunk of a row block (float32): the activation after GELU
    and dropout, and with `grad_z` (fc2's output gradient, compute dtype) the pre-activation's
    gradient."""
    chunk = w1_chunk.shape[1]
    hidden = b1_ref.shape[1]
    h = plgpu.dot(normalised, w1_chunk) + plgpu.load(b1_ref.at[pl.ds(0, 1), pl.ds(first, chunk)])
    activation, slope = _gelu_and_slope(h)
    keep = None
    if rate > 0:
        columns = first + jnp.arange(chunk)[None, :]
        keep = _keep(hidden_seed_ref[...], rows.global_index, columns, hidden, rate)
    if grad_z is None:
        return _dropped(activation, keep, rate), None
    grad_a = _dropped(plgpu.dot(grad_z, w2_chunk, trans_b=True), keep, rate)
    return _dropped(activation, keep, rate), grad_a * slope


def _forward_kernel(
    x_ref,
    scale_ref,
    bias_ref,
    w1_ref,
    b1_ref,
    w2_ref,
    b2_ref,
    hidden_seed_ref,
    out_seed_ref,
    first_row_ref,
    out_ref,
    *,
    rate,
):
    rows = _Rows(pl.program_id(0) * ROWS, x_ref.shape[0], first_row_ref)
    x = rows.load(x_ref)
    normalised = _layer_norm(x, scale_ref[...], bias_ref[...])[2].astype(w1_ref.dtype)
    d, hidden = w1_ref.shape
    chunk = _chunk(d, hidden)
    z = jnp.zeros((ROWS, d), jnp.float32)
    for first in range(0, hidden, chunk):
        w1_chunk, w2_chunk = _chunk_weights(w1_ref, w2_ref, first, chunk)
        activation, _ = _hidden_chunk(
            rows, normalised, None, w1_chunk, w2_chunk, b1_ref, hidden_seed_ref, first, rate
        )
        z += plgpu.dot(activation.astype(w2_ref.dtype), w2_chunk)
    z += b2_ref[...]
    if rate > 0:
        z = _dropped(z, _keep(out_seed_ref[...], rows.global_index, jnp.arange(d)[None, :], d, rate), rate)
    rows.store(out_ref, x + z)


def _input_grads_kernel(
    x_ref,
    scale_ref,
    bias_ref,
    w1_ref,
    b1_ref,
    w2_ref,
    b2_ref,
    hidden_seed_ref,
    out_seed_ref,
    first_row_ref,
    grad_ref,
    dx_ref,
    partial_ref,
    *,
    rate,
):
    """The input's gradient, and the block's sums of the gradients of fc1's bias, fc2's bias and
    the layer norm's scale and bias (one row of `partial_ref`: hidden + 3 x width columns)."""
    block = pl.program_id(0)
    rows = _Rows(block * ROWS, x_ref.shape[0], first_row_ref)
    normed, inv_std, normalised, grad, grad_z = _recompute(
        rows, x_ref, grad_ref, scale_ref, bias_ref, out_seed_ref, rate
    )
    normalised = normalised.astype(w1_ref.dtype)
    d, hidden = w1_ref.shape
    chunk = _chunk(d, hidden)
    grad_normalised = jnp.zeros((ROWS, d), jnp.float32)
    for first in range(0, hidden, chunk):
        w1_chunk, w2_chunk = _chunk_weights(w1_ref, w2_ref, first, chunk)
        _, grad_h = _hidden_chunk(
            rows,
            normalised,
            grad_z.astype(w2_ref.dtype),
            w1_chunk,
            w2_chunk,
            b1_ref,
            hidden_seed_ref,
            first,
            rate,
        )
        plgpu.store(partial_ref.at[block, pl.ds(first, chunk)], jnp.sum(grad_h, axis=0))
        grad_normalised += plgpu.dot(grad_h.astype(w1_ref.dtype), w1_chunk, trans_b=True)
    for i, value in enumerate((grad_z, grad_normalised * normed, grad_normalised)):
        plgpu.store(partial_ref.at[block, pl.ds(hidden + i * d, d)], jnp.sum(value, axis=0))
    g = grad_normalised * scale_ref[...]
    mean_g = jnp.sum(g, axis=1, keepdims=True) / d
    mean_g_normed = jnp.sum(g * normed, axis=1, keepdims=True) / d
    rows.store(dx_ref, grad + inv_std * (g - mean_g - normed * mean_g_normed))


def _weight_grads_kernel(
    x_ref,
    scale_ref,
    bias_ref,
    w1_ref,
    b1_ref,
    w2_ref,
    b2_ref,
    hidden_seed_ref,
    out_seed_ref,
    first_row_ref,
    grad_ref,
    dw1_ref,
    dw2_ref,
    *,
    rate,
):
    """fc1's and fc2's kernel gradients of one hidden chunk (program_id 0) summed over one row
    group (program_id 1: every groups'th block), written at the group's place in the
    groups x width x hidden and groups x hidden x width partial sums."""
    d, hidden = w1_ref.shape
    chunk = _chunk(d, hidden)
    first, group = pl.program_id(0) * chunk, pl.program_id(1)
    groups = dw1_ref.shape[0] // d
    blocks = -(-x_ref.shape[0] // ROWS)
    steps = -(-blocks // groups)
    w1_chunk, w2_chunk = _chunk_weights(w1_ref, w2_ref, first, chunk)

    def step(i, sums):
        grad_w1, grad_w2 = sums
        rows = _Rows((group + i * groups) * ROWS, x_ref.shape[0], first_row_ref)
        _, _, normalised, _, grad_z = _recompute(
            rows, x_ref, grad_ref, scale_ref, bias_ref, out_seed_ref, rate
        )
        normalised, grad_z = normalised.astype(w1_ref.dtype), grad_z.astype(w2_ref.dtype)
        activation, grad_h = _hidden_chunk(
            rows, normalised, grad_z, w1_chunk, w2_chunk, b1_ref, hidden_seed_ref, first, rate
        )
        grad_w1 += plgpu.dot(normalised, grad_h.astype(w1_ref.dtype), trans_a=True)
        grad_w2 += plgpu.dot(activation.astype(w2_ref.dtype), grad_z, trans_a=True)
        return grad_w1, grad_w2

    zeros = (jnp.zeros((d, chunk), jnp.float32), jnp.zeros((chunk, d), jnp.float32))
    grad_w1, grad_w2 = jax.lax.fori_loop(0, steps, step, zeros)
    plgpu.store(dw1_ref.at[pl.ds(group * d, d), pl.ds(first, chunk)], grad_w1)
    plgpu.store(dw2_ref.at[pl.ds(group * hidden + first, chunk), pl.ds(0, d)], grad_w2)


def _kernel_inputs(x_NxTxD, weights):
    """The kernels' arguments: x as rows, the vectors as float32 1 x width rows, the kernels in
    the compute dtype."""
    scale, bias, w1, b1, w2, b2 = weights
    n, t, d = x_NxTxD.shape
    row = lambda v: v.astype(jnp.float32).reshape(1, -1)
    dtype = x_NxTxD.dtype
    return (
        x_NxTxD.reshape(n * t, d),
        row(scale),
        row(bias),
        w1.astype(dtype),
        row(b1),
        w2.astype(dtype),
        row(b2),
    )


def _call(kernel, out_shape, grid, rate, interpret, x_NxTxD, seeds, first_row, weights, *extra):
    inputs = _kernel_inputs(x_NxTxD, weights)
    return pl.pallas_call(
        functools.partial(kernel, rate=rate),
        out_shape=out_shape,
        grid=grid,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=STAGES),
    )(
        *inputs,
        seeds[0].reshape(1, 1),
        seeds[1].reshape(1, 1),
        jnp.reshape(first_row, (1, 1)).astype(jnp.uint32),
        *extra,
    )


def _forward_rows(rate, interpret, x_NxTxD, seeds, first_row, *weights):
    n, t, d = x_NxTxD.shape
    out = jax.ShapeDtypeStruct((n * t, d), x_NxTxD.dtype)
    grid = (pl.cdiv(n * t, ROWS),)
    y = _call(_forward_kernel, out, grid, rate, interpret, x_NxTxD, seeds, first_row, weights)
    return y.reshape(n, t, d)


def _backward_rows(rate, interpret, x_NxTxD, grad_NxTxD, seeds, first_row, *weights):
    """This device's input gradient and partial sums (bias and layer-norm rows, kernel groups)."""
    n, t, d = x_NxTxD.shape
    hidden = weights[2].shape[1]
    blocks = pl.cdiv(n * t, ROWS)
    groups = min(blocks, WEIGHT_GRAD_PROGRAMS)
    args = (rate, interpret, x_NxTxD, seeds, first_row, weights, grad_NxTxD.reshape(n * t, d))
    dx, partial = _call(
        _input_grads_kernel,
        (
            jax.ShapeDtypeStruct((n * t, d), x_NxTxD.dtype),
            jax.ShapeDtypeStruct((blocks, hidden + 3 * d), jnp.float32),
        ),
        (blocks,),
        *args,
    )
    dw1, dw2 = _call(
        _weight_grads_kernel,
        (
            jax.ShapeDtypeStruct((groups * d, hidden), jnp.float32),
            jax.ShapeDtypeStruct((groups * hidden, d), jnp.float32),
        ),
        (hidden // _chunk(d, hidden), groups),
        *args,
    )
    return dx.reshape(n, t, d), partial, dw1.reshape(groups, d, hidden), dw2.reshape(groups, hidden, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(x_NxTxD, weights, seeds, rate, interpret):
    return _forward(x_NxTxD, weights, seeds, rate, interpret)[0]


def _forward(x_NxTxD, weights, seeds, rate, interpret):
    run = functools.partial(_forward_rows, rate, interpret)
    y = split_over_devices(run, (x_NxTxD,), seeds, weights)[: x_NxTxD.shape[0]]
    return y, (x_NxTxD, weights, seeds)


def _backward(rate, interpret, residuals, grad_NxTxD):
    x_NxTxD, weights, seeds = residuals
    n, d = x_NxTxD.shape[0], x_NxTxD.shape[2]
    grad_NxTxD = grad_NxTxD.astype(x_NxTxD.dtype)
    run = functools.partial(_backward_rows, rate, interpret)
    dx, partial, dw1, dw2 = split_over_devices(run, (x_NxTxD, grad_NxTxD), seeds, weights)
    sums = jnp.sum(partial, axis=0)
    hidden = weights[2].shape[1]
    grad_b1, grad_b2, grad_scale, grad_bias = (
        sums[:hidden],
        sums[hidden : hidden + d],
        sums[hidden + d : hidden + 2 * d],
        sums[hidden + 2 * d :],
    )
    grads = (grad_scale, grad_bias, jnp.sum(dw1, axis=0), grad_b1, jnp.sum(dw2, axis=0), grad_b2)
    grads = tuple(g.astype(w.dtype).reshape(w.shape) for g, w in zip(grads, weights))
    return dx[:n], grads, np.zeros(np.shape(seeds), jax.dtypes.float0)


_fused.defvjp(_forward, _backward)


def residual_mlp(x_NxTxD, weights, rate: float, rng, interpret: bool = False):
    """x + dropout(fc2(dropout(gelu(fc1(layer_norm(x)))))), as layers.Block's second half computes
    it (`reference`; dropout's masks differ). `weights`: the layer norm's scale and bias, fc1's
    kernel and bias, fc2's kernel and bias; `rng`: None for no dropout."""
    use_dropout = rng is not None and rate > 0
    seeds = jax.random.bits(rng, (2,), jnp.uint32) if use_dropout else jnp.zeros((2,), jnp.uint32)
    return _fused(x_NxTxD, tuple(weights), seeds, rate if use_dropout else 0.0, interpret)
