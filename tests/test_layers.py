"""The transformer pieces: hand-written backward passes against autodiff, the dtypes the
products run in, and dropout's draws."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fractalmidi_jax.layers import Attention, dropout, project_qkv


def _inputs(dtype, *shapes):
    keys = jax.random.split(jax.random.key(0), len(shapes))
    return [jax.random.normal(key, shape).astype(dtype) for key, shape in zip(keys, shapes)]


def _dot_operand_dtypes(fn, *args):
    """The operand dtypes of every matrix product in `fn`'s jaxpr."""
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None:
                    visit(getattr(inner, "jaxpr", inner))

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_project_qkv_gradients_match_autodiff_of_the_split_product():
    x, kernel, bias = _inputs(jnp.float32, (2, 5, 8), (8, 24), (24,))
    cotangents = _inputs(jnp.float32, (2, 5, 8), (2, 5, 8), (2, 5, 8))

    def loss(project, *args):
        return sum(jnp.sum(y * g) for y, g in zip(project(*args), cotangents))

    reference = lambda x, w, b: jnp.split(x @ w + b, 3, axis=-1)
    for got, want in zip(
        jax.grad(lambda *a: loss(project_qkv, *a), argnums=(0, 1, 2))(x, kernel, bias),
        jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(x, kernel, bias),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(project_qkv(x, kernel, bias), reference(x, kernel, bias)):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_attention_multiplies_in_the_compute_dtype_forward_and_backward():
    """Float32 logits made XLA run the attention backward pass as float32 products (SGEMM)."""
    attention = Attention(16, 2, 0.0, jnp.bfloat16, nnx.Rngs(params=0))
    graphdef, params = nnx.split(attention)
    (x,) = _inputs(jnp.bfloat16, (2, 5, 16))
    mask = np.tril(np.ones((5, 5), bool))

    def loss(params, x):
        y = nnx.merge(graphdef, params)(x, mask)[0]
        return jnp.sum(y.astype(jnp.float32) ** 2)

    products = _dot_operand_dtypes(jax.grad(loss, argnums=(0, 1)), params, x)
    assert len(products) >= 12 and set(products) == {("bfloat16", "bfloat16")}, products
    grads = jax.grad(loss, argnums=(0, 1))(params, x)
    reference = jax.grad(loss, argnums=(0, 1))(
        jax.tree.map(lambda w: w.astype(jnp.float32), params), x.astype(jnp.float32)
    )
    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(grads[1].astype(jnp.float32), reference[1], rtol=0.1, atol=0.1)


def test_dropout_drops_the_rounded_rate_independently_and_keeps_the_mean():
    """Each element is dropped with probability round(rate x 256) / 256, independently of its
    neighbours and of other keys' draws; kept ones are scaled so the mean holds, the same key
    draws the same mask, and the gradient passes where the value did."""
    x = jnp.ones((64, 33, 50))  # a last axis that is not a multiple of 4 bytes per word
    rate = 0.25
    y = dropout(x, rate, jax.random.key(0))
    dropped = np.asarray(y == 0)
    assert abs(dropped.mean() - 64 / 256) < 0.005
    assert abs(float(y.mean()) - 1.0) < 0.01
    np.testing.assert_array_equal(y, dropout(x, rate, jax.random.key(0)))
    other = np.asarray(dropout(x, rate, jax.random.key(1)) == 0)
    assert abs((dropped & other).mean() - 0.25**2) < 0.005
    for axis in range(3):  # neighbours along every axis are uncorrelated
        a, b = np.moveaxis(dropped, axis, 0)[:-1], np.moveaxis(dropped, axis, 0)[1:]
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02
    weights = jnp.arange(50.0)
    grad = jax.grad(lambda x: (dropout(x, rate, jax.random.key(0)) * weights).sum())(x)
    np.testing.assert_allclose(grad, np.where(dropped, 0.0, weights / (1 - rate)), rtol=1e-6)
    assert dropout(x, rate, None) is x and dropout(x, 0.0, jax.random.key(0)) is x
