"""The flash-style long-sequence attention (Pallas, run here in interpret mode) against
short_attention's jnp reference and autodiff of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from fractalmidi_jax import layers
from fractalmidi_jax import long_attention as la
from fractalmidi_jax import short_attention as sa
from fractalmidi_jax.sharding import DATA_AXIS

T = 70  # two whole blocks of 32 and a part-full one


def _late_keys_mask():
    """Random, each row seeing at least one key; the first row sees only the last key, so its
    running softmax starts on blocks it cannot see."""
    mask = np.random.default_rng(0).random((T, T)) < 0.3
    mask[np.arange(T), np.random.default_rng(1).integers(0, T, T)] = True
    mask[0] = False
    mask[0, T - 1] = True
    return mask


MASKS = {"full": np.ones((T, T), bool), "causal": np.tril(np.ones((T, T), bool)), "late": _late_keys_mask()}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(la, "BLOCK", 32)


def _qkv(n, d, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, T, 3 * d))


def _attention_and_grad(fn, qkv, cotangent):
    y, vjp = jax.vjp(fn, qkv)
    return y, vjp(cotangent)[0]


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_kernels_match_the_reference_forward_and_backward(name, rate):
    mask, seed = MASKS[name], jnp.uint32(7)
    qkv, cotangent = _qkv(3, 32), jax.random.normal(jax.random.key(1), (3, T, 32))
    got = _attention_and_grad(
        lambda x: la.fused_attention(x, 2, mask, rate, seed, interpret=True), qkv, cotangent
    )
    want = _attention_and_grad(lambda x: sa.reference(x, 2, mask, rate, seed), qkv, cotangent)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=2e-4, atol=2e-5)


def test_every_length_goes_to_exactly_one_kernel():
    for t in range(2, 600):
        assert sa.supported(t, 64) != la.supported(t, 64), t
    assert la.supported(33, 64) and la.supported(257, 64)
    assert not la.supported(257, 8)


def test_attention_layer_with_kernels_computes_what_xla_does():
    """layers.Attention(fused=True) on 70 tokens takes the long kernels, with the same outputs and
    gradients as its XLA path."""
    attention = layers.Attention(32, 2, 0.0, jnp.float32, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, T, 32))
    mask = MASKS["causal"]

    loss = lambda x: jnp.sum(jnp.sin(attention(x, mask)[0]))
    want, want_grad = loss(x), jax.grad(loss)(x)
    attention.fused = True
    assert "pallas_call" in str(jax.make_jaxpr(loss)(x))
    np.testing.assert_allclose(loss(x), want, rtol=1e-5)
    np.testing.assert_allclose(jax.grad(loss)(x), want_grad, rtol=1e-4, atol=1e-5)


def test_on_a_mesh_each_device_runs_its_own_sequences_with_the_same_dropout():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), (DATA_AXIS,))
    assert mesh.devices.size == 8
    mask, seed = MASKS["full"], jnp.uint32(5)
    qkv, cotangent = _qkv(9, 16), jax.random.normal(jax.random.key(2), (9, T, 16))
    run = lambda x: _attention_and_grad(
        lambda x: la.fused_attention(x, 2, mask, 0.25, seed, interpret=True), x, cotangent
    )
    want = jax.jit(run)(qkv)
    sharded = jax.jit(run, in_shardings=NamedSharding(mesh, PartitionSpec()))

    def under_mesh(x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return sharded(x)

    assert "shard_map" in str(jax.make_jaxpr(under_mesh)(qkv))
    for got, expected in zip(under_mesh(qkv), want):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
