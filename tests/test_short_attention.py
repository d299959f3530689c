"""The fused short-sequence attention (Pallas, run here in interpret mode) against its jnp
reference and autodiff of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from fractalmidi_jax import short_attention as sa
from fractalmidi_jax.column import column_mask
from fractalmidi_jax.sharding import DATA_AXIS


def _qkv(n, t, d, dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, t, 3 * d)).astype(dtype)


MASKS = {
    "column": column_mask(6, 4, 4),  # a column level's 22 tokens
    "full": np.ones((21, 21), bool),  # a short MAR level
}


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_kernel_matches_the_reference_forward_and_backward(name, rate):
    mask = MASKS[name]
    t = mask.shape[0]
    qkv = _qkv(13, t, 32)  # 13 sequences: the last block is part-full
    seed = jnp.uint32(7)
    cotangent = jax.random.normal(jax.random.key(1), (13, t, 32))
    fused = lambda x: sa.fused_attention(x, 2, mask, rate, seed, interpret=True)
    reference = lambda x: sa.reference(x, 2, mask, rate, seed)
    y, vjp = jax.vjp(fused, qkv)
    want, want_vjp = jax.vjp(reference, qkv)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(vjp(cotangent)[0], want_vjp(cotangent)[0], rtol=2e-4, atol=2e-5)


def test_reference_without_dropout_is_masked_softmax_attention():
    mask = MASKS["column"]
    qkv = _qkv(3, 22, 16)
    q, k, v = (x.reshape(3, 22, 2, 8) for x in jnp.split(qkv, 3, axis=-1))
    logits = jnp.einsum("nthk,nshk->nhts", q, k) / np.sqrt(8)
    weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    want = jnp.einsum("nhts,nshk->nthk", weights, v).reshape(3, 22, 16)
    np.testing.assert_allclose(sa.reference(qkv, 2, mask, 0.0, 0), want, rtol=1e-5, atol=1e-6)


def test_dropout_keeps_its_share_independently_per_seed_and_head():
    rows, keys = jnp.arange(4096)[:, None], jnp.arange(22)[None, :]
    keep = sa.keep_mask(jnp.uint32(3), rows, keys, 0, 22, 2, 0.25)
    assert abs(float(keep.mean()) - 0.75) < 0.005
    other_seed = sa.keep_mask(jnp.uint32(4), rows, keys, 0, 22, 2, 0.25)
    other_head = sa.keep_mask(jnp.uint32(3), rows, keys, 1, 22, 2, 0.25)
    for other in (other_seed, other_head):
        agree = float(jnp.mean(keep == other))
        assert abs(agree - (0.75**2 + 0.25**2)) < 0.01, agree  # independent draws


def test_blocks_hold_whole_sequences():
    mask = sa.block_mask(MASKS["column"], 22, 128)
    assert sa.sequences_per_block(22, 128) == 5 and sa.sequences_per_block(22, 64) == 2
    assert mask[:110, :110].sum() == 5 * MASKS["column"].sum() and not mask[110:].any()
    assert not mask[0, 22:].any()  # a token never sees another sequence
    assert sa.supported(22, 64) and not sa.supported(257, 64) and not sa.supported(22, 8)


def test_on_a_mesh_each_device_runs_its_own_sequences_with_the_same_dropout():
    """Under a mesh with a data axis of 8 devices the kernels run under shard_map (XLA cannot split
    them by the batch), with 13 sequences padded to 16, and give one device's outputs and
    gradients, dropout masks included."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), (DATA_AXIS,))
    assert mesh.devices.size == 8
    mask, rate, seed = MASKS["column"], 0.25, jnp.uint32(5)
    qkv = _qkv(13, 22, 32)
    cotangent = jax.random.normal(jax.random.key(2), (13, 22, 32))

    def run(x):
        y, vjp = jax.vjp(lambda x: sa.fused_attention(x, 2, mask, rate, seed, interpret=True), x)
        return y, vjp(cotangent)[0]

    want = jax.jit(run)(qkv)
    sharded = jax.jit(run, in_shardings=NamedSharding(mesh, PartitionSpec()))

    def under_mesh(x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return sharded(x)

    assert "shard_map" in str(jax.make_jaxpr(under_mesh)(qkv))
    for got, expected in zip(under_mesh(qkv), want):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
