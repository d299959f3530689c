"""Skipping silence (sparse.py): the training selection of non-empty patches, the sampler's packing
into fixed slots with its overflow passes, and the sampler with skip_empty end to end (CPU, tiny
models). The budget's unbiasedness and the exact emptiness terms are in test_model.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import empty_bias, tiny

from fractalmidi_jax import sampler as sampler_lib
from fractalmidi_jax import sparse
from fractalmidi_jax.config import ConfigError
from fractalmidi_jax.fractal import build_model
from fractalmidi_jax.head import Sampling

pytestmark = pytest.mark.usefixtures("compilation_cache")


def test_nonempty_first_takes_the_first_eligible_tokens_of_the_order():
    order = jnp.asarray([[3, 0, 4, 1, 2], [4, 3, 2, 1, 0]])
    eligible = jnp.asarray([[1, 1, 0, 1, 0], [0, 0, 0, 0, 1]], bool)
    index, count = sparse.nonempty_first(order, eligible, 2)
    np.testing.assert_array_equal(index, [[3, 0], [4, 3]])
    np.testing.assert_array_equal(count, [3, 1])


def test_stratified_budget_gives_each_stratum_its_own_weight():
    """Row 0: 3 non-empty and 2 empty predicted tokens, 3 slots, 1 kept for empties: the first two
    non-empty tokens of the order (weight 3/2) and the first empty one (weight 2). Row 1: one
    non-empty token only, so it takes one slot (weight 1) and the empties the rest (weight 4/2).
    Row 2: nothing predicted but token 1, non-empty: the other slots are left over at weight 0."""
    order = jnp.asarray([[4, 2, 0, 1, 3, 5], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    predicted = jnp.asarray([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]], bool)
    nonempty = jnp.asarray([[1, 0, 1, 0, 1, 1], [0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0]], bool)
    index, weight = sparse.stratified_budget(order, predicted, nonempty, budget=3, reserved=1)
    np.testing.assert_array_equal(index[0], [4, 2, 1])
    np.testing.assert_allclose(weight[0], [1.5, 1.5, 2.0])
    np.testing.assert_array_equal(index[1, :1], [3])
    assert set(np.asarray(index[1, 1:])) <= {0, 1, 2, 4}
    np.testing.assert_allclose(weight[1], [1.0, 2.0, 2.0])
    assert index[2, 0] == 1
    np.testing.assert_allclose(weight[2], [1.0, 0.0, 0.0])
    assert [
        sparse.empty_slots(k, share) for k, share in ((4, 0.5), (4, 0.1), (4, 0.99), (1, 0.5), (4, 0))
    ] == [
        2,
        1,
        3,
        0,
        0,
    ]


def test_is_empty_means_every_cell_silent():
    cells = jnp.asarray([[[0, 0, 0], [0, 128, 0], [5, 0, 0]]])
    np.testing.assert_array_equal(sparse.is_empty(cells), [[True, False, False]])


@pytest.mark.parametrize("slots, passes", [(2, 4), (7, 1), (10, 1)])
def test_fill_nonempty_fills_every_nonempty_patch_once_in_passes_of_its_slots(slots, passes):
    """7 non-empty patches of 10: each gets its own fill (its id + 1, from its own inputs), the
    empty ones keep their value, and ceil(7 / slots) passes run (the overflow path when slots < 7)."""
    nonempty = jnp.asarray([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], bool)
    ids = jnp.arange(10, dtype=jnp.int32)
    calls = []

    def fill(picked, key):
        jax.debug.callback(lambda: calls.append(1))
        return (picked["id"] + 1)[:, None] * jnp.ones((1, 3), jnp.int32)

    empty = jnp.full((10, 3), -1, jnp.int32)
    out = jax.jit(
        lambda: sparse.fill_nonempty(fill, nonempty, {"id": ids}, slots, empty, jax.random.key(0))
    )()
    expected = np.where(np.asarray(nonempty)[:, None], np.arange(1, 11)[:, None], -1) * np.ones((1, 3), int)
    np.testing.assert_array_equal(out, expected)
    assert len(calls) == passes


def test_fill_nonempty_runs_no_pass_when_every_patch_is_empty():
    calls = []

    def fill(picked, key):
        jax.debug.callback(lambda: calls.append(1))
        return picked

    out = sparse.fill_nonempty(
        fill, jnp.zeros(4, bool), jnp.ones((4, 2)), 2, jnp.zeros((4, 2)), jax.random.key(0)
    )
    np.testing.assert_array_equal(out, np.zeros((4, 2)))
    assert not calls


def test_skip_empty_takes_levels_above_the_last_and_fractions():
    with pytest.raises(ConfigError, match="skip_empty=3 must be in 0..2"):
        tiny(skip_empty=3)
    with pytest.raises(ConfigError, match="skip_empty_capacity"):
        tiny(skip_empty=2, skip_empty_capacity=0.0)
    with pytest.raises(ConfigError, match="skip_empty_budget"):
        tiny(skip_empty_budget=1.5)
    with pytest.raises(ConfigError, match="skip_empty_round_buckets=0 must be at least 1"):
        tiny(skip_empty=1, skip_empty_round_buckets=0)


@pytest.mark.parametrize("partial_known", [False, True])
def test_sampler_skips_empty_patches_and_fills_the_others_through_overflow_passes(partial_known):
    """The default level kinds (MAR, then column levels) at a capacity of one slot (every call
    overflows): patches said empty come back silent, except one holding a known sounding cell,
    which is filled and keeps its known cells (with partial_known, where emptiness is of the
    unknown cells, it is empty too: its known cell and silence); patches said non-empty are all
    filled by the head (an untrained head sounds almost every cell)."""
    config = tiny(
        skip_empty=2,
        skip_empty_capacity=1e-6,
        generator_types=("mar", "column", "column"),
        partial_known=partial_known,
    )
    cells, known = sampler_lib.unconditional_inputs(2, config.crop_length)
    cells[:, 40, 3], known[:, 40, 3] = 90, True
    run = sampler_lib.make_sampler(config, (2, 2, 2, 1))
    sampling = Sampling.of(config, 1.0)
    for logit, sounding in ((-30.0, 0.9), (30.0, 0.0))[partial_known:]:
        params = nnx.state(empty_bias(build_model(config), logit))
        rolls = np.asarray(run(params, cells, known, jax.random.key(0), sampling)[0])
        assert rolls[:, 40, 3].tolist() == [90, 90]
        other = np.ones(rolls.shape, bool)
        other[:, 40:44, 0:4] = False  # the 4 x 4 of the known cell
        if sounding:
            assert (rolls[other] > 0).mean() > sounding
        elif partial_known:
            assert np.count_nonzero(rolls) == 2
        else:
            assert not rolls[other].any() and (rolls[:, 40:44, 0:4] > 0).mean() > 0.5
