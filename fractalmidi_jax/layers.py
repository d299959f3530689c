"""Transformer pieces shared by every level: attention (with an optional KV cache), MLP, block.

Shapes: N sequences, T tokens, S cached positions, D width, H heads, K = D / H.
Weights are float32; `dtype` is the compute dtype (bf16/fp16 under mixed precision).
Softmax and layer-norm statistics are computed in float32.
Dropout takes an explicit key (None = off), so a loss is a pure function of its key.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fractalmidi_jax import long_attention, short_attention

xavier_uniform = nnx.initializers.xavier_uniform()
embedding_init = nnx.initializers.normal(stddev=0.02)
NEG_INF = -1e30


def dense(in_dim: int, out_dim: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_dim, out_dim, kernel_init=xavier_uniform, dtype=dtype, rngs=rngs)


def layer_norm(dim: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)


def dropout(x, rate: float, rng):
    """Inverted dropout with 8-bit draws, four per 32-bit word of a counter hash
    (short_attention.seeded_bits) keyed by a seed from `rng`. The rate is rounded to a multiple of
    1/256; the scale matches it. The words are one array (optimization_barrier): fused into
    their consumers XLA would hash once per element and on both passes, which measured slower
    than jax.random.bits' threefry words; as an array they cost less than threefry's (BENCHMARKS.md)."""
    if rng is None or rate == 0.0:
        return x
    threshold = round(rate * 256)
    last = x.shape[-1]
    words_shape = x.shape[:-1] + (-(-last // 4),)
    counter = sum(  # each word's flat index, wrapping past 2**32 words (17 G elements)
        jax.lax.broadcasted_iota(jnp.uint32, words_shape, axis)
        * np.uint32(math.prod(words_shape[axis + 1 :]) % 2**32)
        for axis in range(len(words_shape))
    )
    seed = jax.random.bits(rng, (), jnp.uint32)
    words = jax.lax.optimization_barrier(short_attention.seeded_bits(seed, counter))
    draws = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(x.shape[:-1] + (-1,))[..., :last]
    return jnp.where(draws >= threshold, x * (256 / (256 - threshold)), 0).astype(x.dtype)


def split_key(rng, num: int):
    """Splits a key that may be None (dropout off)."""
    return [None] * num if rng is None else list(jax.random.split(rng, num))


@jax.custom_vjp
def project_qkv(x_NxTxD, kernel_Dx3D, bias_3D):
    """q, k and v (N x T x D each) of one product with the joined weights. Its backward pass
    joins their gradients into one N x T x 3D array for one product per weight and input
    (autodiff of a split activation pads and sums three activation-sized gradients; of split
    weights, runs six products instead of two)."""
    return tuple(jnp.split(x_NxTxD @ kernel_Dx3D + bias_3D, 3, axis=-1))


def _project_qkv_fwd(x_NxTxD, kernel_Dx3D, bias_3D):
    return project_qkv(x_NxTxD, kernel_Dx3D, bias_3D), (x_NxTxD, kernel_Dx3D)


def _project_qkv_bwd(residuals, grads):
    x_NxTxD, kernel_Dx3D = residuals
    g_NxTx3D = jnp.concatenate([g.astype(x_NxTxD.dtype) for g in grads], axis=-1)
    rows_Mx3D = g_NxTx3D.reshape(-1, g_NxTx3D.shape[-1])
    kernel_grad = x_NxTxD.reshape(-1, x_NxTxD.shape[-1]).T @ rows_Mx3D
    bias_grad = jnp.sum(rows_Mx3D, axis=0, dtype=jnp.float32)
    return g_NxTx3D @ kernel_Dx3D.T, kernel_grad, bias_grad.astype(kernel_Dx3D.dtype)


project_qkv.defvjp(_project_qkv_fwd, _project_qkv_bwd)


class Attention(nnx.Module):
    def __init__(
        self, dim: int, num_heads: int, attn_dropout: float, dtype, rngs: nnx.Rngs, fused: bool = False
    ):
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.fused = fused  # attention without a cache through short_ or long_attention's kernels
        self.qkv = dense(dim, 3 * dim, dtype, rngs)
        self.proj = dense(dim, dim, dtype, rngs)

    def __call__(self, x_NxTxD, mask_TxS=None, cache=None, cache_index=None, rng=None):
        """Self-attention; with `cache` ({'k','v'}: N x S x H x K) the T new tokens are written at
        `cache_index` and attend to the whole cache under `mask_TxS`. Returns (y, cache).
        A lone token without a cache attends to itself only (weight 1): y = its value."""
        n, t, d = x_NxTxD.shape
        heads = self.num_heads
        dtype = self.qkv.dtype
        x_NxTxD = x_NxTxD.astype(dtype)
        kernel, bias = self.qkv.kernel[...].astype(dtype), self.qkv.bias[...].astype(dtype)
        if t == 1 and cache is None:
            v_NxTxD = x_NxTxD @ kernel[:, 2 * d :] + bias[2 * d :]
            return self.proj(v_NxTxD), cache
        kernels = next(
            (m for m in (short_attention, long_attention) if self.fused and m.supported(t, d // heads)), None
        )
        if kernels is not None and cache is None:
            mask = np.ones((t, t), bool) if mask_TxS is None else np.asarray(mask_TxS, bool)
            use_dropout = rng is not None and self.attn_dropout > 0
            seed = jax.random.bits(rng, (), jnp.uint32) if use_dropout else jnp.uint32(0)
            y_NxTxD = kernels.fused_attention(
                x_NxTxD @ kernel + bias,
                heads,
                mask,
                self.attn_dropout if use_dropout else 0.0,
                seed,
                interpret=jax.default_backend() != "gpu",
            )
            return self.proj(y_NxTxD), cache
        q_NxTxHxK, k_NxTxHxK, v_NxTxHxK = (
            y.reshape(n, t, heads, d // heads) for y in project_qkv(x_NxTxD, kernel, bias)
        )
        if cache is not None:
            k_NxTxHxK = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_NxTxHxK, cache_index, axis=1)
            v_NxTxHxK = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_NxTxHxK, cache_index, axis=1)
            cache = {"k": k_NxTxHxK, "v": v_NxTxHxK}
        # Logits in the compute dtype (as PyTorch autocast has them), softmax in float32. With
        # float32 logits autodiff multiplied their float32 cotangent by bf16 q and k, which XLA
        # runs as float32 products, the longest kernels of the backward pass (BENCHMARKS.md).
        scale = (d // heads) ** -0.5
        logits_NxHxTxS = jnp.einsum("nthk,nshk->nhts", q_NxTxHxK * scale, k_NxTxHxK).astype(jnp.float32)
        if mask_TxS is not None:
            logits_NxHxTxS = jnp.where(mask_TxS, logits_NxHxTxS, NEG_INF)
        weights = jax.nn.softmax(logits_NxHxTxS, axis=-1).astype(v_NxTxHxK.dtype)
        weights = dropout(weights, self.attn_dropout, rng)
        y_NxTxHxK = jnp.einsum("nhts,nshk->nthk", weights, v_NxTxHxK)
        return self.proj(y_NxTxHxK.reshape(n, t, d)), cache


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, dtype, rngs: nnx.Rngs):
        self.fc1 = dense(dim, hidden, dtype, rngs)
        self.fc2 = dense(hidden, dim, dtype, rngs)

    def __call__(self, x, rng=None, rate: float = 0.0):
        return self.fc2(dropout(jax.nn.gelu(self.fc1(x), approximate=False), rate, rng))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(
        self, dim, num_heads, attn_dropout, proj_dropout, dtype, rngs, mlp_ratio=4.0, fused_attention=False
    ):
        self.proj_dropout = proj_dropout
        self.norm1 = layer_norm(dim, dtype, rngs)
        self.attn = Attention(dim, num_heads, attn_dropout, dtype, rngs, fused_attention)
        self.norm2 = layer_norm(dim, dtype, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype, rngs)

    def __call__(self, x, mask=None, cache=None, cache_index=None, rng=None):
        attn_rng, drop1, mlp_rng, drop2 = split_key(rng, 4)
        y, cache = self.attn(self.norm1(x), mask, cache, cache_index, attn_rng)
        x = x + dropout(y, self.proj_dropout, drop1)
        y = self.mlp(self.norm2(x), mlp_rng, self.proj_dropout)
        return x + dropout(y, self.proj_dropout, drop2), cache


class Transformer(nnx.Module):
    """LayerNorm -> blocks -> LayerNorm. The blocks' weights are stacked on a leading layer
    axis (a few large arrays: few optimizer kernels). With `scan`, the blocks run under
    `lax.scan` (one traced block: fast compiles, but a device loop that stacks every layer's
    activations for the backward pass); without, they are unrolled, so XLA fuses across
    blocks and keeps no stacked copies. KV caches are stacked with `scan` and a tuple of
    per-layer caches without."""

    def __init__(
        self,
        dim,
        depth,
        num_heads,
        attn_dropout,
        proj_dropout,
        dtype,
        rngs,
        remat=False,
        scan=False,
        fused_attention=False,
    ):
        self.remat = remat
        self.scan = scan
        self.depth = depth
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm_in = layer_norm(dim, dtype, rngs)

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(
                dim, num_heads, attn_dropout, proj_dropout, dtype, rngs, fused_attention=fused_attention
            )

        self.blocks = make_blocks(rngs)
        self.norm_out = layer_norm(dim, dtype, rngs)

    def __call__(self, x, mask=None, caches=None, cache_index=None, rng=None):
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x, per_layer):
            params, cache, key = per_layer
            return nnx.merge(graphdef, params)(x, mask, cache, cache_index, key)

        if self.remat:
            layer = jax.checkpoint(layer)
        x = self.norm_in(x)
        if self.scan:
            keys = None if rng is None else jax.random.split(rng, self.depth)
            x, caches = jax.lax.scan(layer, x, (stacked, caches, keys))
        else:
            # Split (not index) the stacked weights: the gradient of a split is one concatenate.
            leaves, treedef = jax.tree.flatten(stacked)
            pieces = [jnp.split(w, self.depth) for w in leaves]
            new_caches = []
            for i, key in enumerate(split_key(rng, self.depth)):
                params = treedef.unflatten([w[i][0] for w in pieces])
                x, cache = layer(x, (params, None if caches is None else caches[i], key))
                new_caches.append(cache)
            caches = None if caches is None else tuple(new_caches)
        return self.norm_out(x), caches

    def empty_caches(self, n: int, length: int, dtype):
        """Zeroed KV caches (N x S x H x K per layer) for `n` sequences of `length` positions."""
        shape = (n, length, self.num_heads, self.head_dim)
        if self.scan:
            shape = (self.depth,) + shape
            return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(self.depth))
