"""Tests of fractalmidi_jax.column: a column level's outputs and hand-off see only the time columns
before their own, at level 0 and below."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import tiny

from fractalmidi_jax.column import ColumnLevel
from fractalmidi_jax.level import Border

WIDTH = 48  # level 0: 8 pitch bands x 3 bars


@functools.lru_cache
def column_case(level, partial_known=False):
    """(graphdef, params, cells, conds, rows, cols) of a column level with random inputs."""
    config = tiny(generator_types=("column", "column", "column"), partial_known=partial_known)
    column = ColumnLevel(config, level, nnx.Rngs(params=level))
    rs = np.random.default_rng(level)
    if level == 0:
        rows, cols, cells_per_token, conds = 8, WIDTH // 16, 256, None
    else:
        rows, cols, cells_per_token = 4, 4, 16
        conds = jnp.asarray(rs.normal(size=(2, 5, config.embed_dim_list[level - 1])), jnp.float32)
    cells = rs.integers(0, 129, (2, rows * cols, cells_per_token)).astype(np.int32)
    graphdef, params = nnx.split(column)
    return graphdef, params, cells, conds, rows, cols


@functools.partial(jax.jit, static_argnums=0)
def outputs_and_handoff(graphdef, params, cells, conds, border):
    level = nnx.merge(graphdef, params)
    h = level.predict(cells, conds, border)
    n, num_tokens = cells.shape[:2]
    index = jnp.broadcast_to(jnp.arange(num_tokens), (n, num_tokens))
    grid = level.trunk.grid(num_tokens // level.trunk.rows)
    handoff = level.trunk.handoff(h, index, grid, level.handoff_neighbours, 5, offset=level.trunk.num_conds)
    return h[:, level.trunk.num_conds :], handoff


def random_border(level):
    """A border column below level 0 (tiny() has border context: its token must not bypass the
    mask); None at level 0."""
    if level == 0:
        return None
    rs = np.random.default_rng(3)
    return Border(jnp.asarray(rs.integers(0, 129, (2, 16)), jnp.int32), jnp.asarray(rs.random((2, 16)) < 0.5))


@pytest.mark.parametrize("level", [0, 1])
def test_outputs_and_handoff_see_only_earlier_columns(level):
    """Changing the patch at column c changes the output and the handed-down conditions of every
    token in a later column, and of none in column c or before (grid order t = r * cols + c)."""
    graphdef, params, cells, conds, rows, cols = column_case(level)
    num_tokens = rows * cols
    border = random_border(level)
    reference = outputs_and_handoff(graphdef, params, cells, conds, border)
    col_L = np.arange(num_tokens) % cols
    rs = np.random.default_rng(7)
    for t in range(num_tokens):
        changed_cells = cells.copy()
        changed_cells[:, t] = (cells[:, t] + rs.integers(1, 129, cells[:, t].shape)) % 129
        changed = outputs_and_handoff(graphdef, params, changed_cells, conds, border)
        for before, after in zip(reference, changed):
            moved = np.asarray(jnp.any(before != after, axis=tuple(range(2, before.ndim)))).all(axis=0)
            np.testing.assert_array_equal(moved, col_L > col_L[t], err_msg=f"token {t}")


def test_a_column_sees_the_known_cells_of_its_own_patches():
    """With partial_known, the outputs of column c also see the known cells of column c's patches
    (every band of it), and still nothing else of column c: changing a patch's known cells changes
    the outputs of its column and later ones, its other cells only later ones."""
    config = tiny(generator_types=("column", "column", "column"), border_context=False, partial_known=True)
    column = ColumnLevel(config, 1, nnx.Rngs(params=1))
    rs = np.random.default_rng(1)
    conds = jnp.asarray(rs.normal(size=(2, 5, 32)), jnp.float32)
    cells = rs.integers(0, 129, (2, 16, 16)).astype(np.int32)
    known = jnp.asarray(rs.random(cells.shape) < 0.5)
    graphdef, params = nnx.split(column)
    predict = jax.jit(lambda c: nnx.merge(graphdef, params).predict(c, conds, known_NxLxP=known)[:, 5:])
    reference = np.asarray(predict(cells))
    col_L = np.arange(16) % 4
    for t in range(16):
        for part, where in enumerate((np.asarray(known)[:, t], ~np.asarray(known)[:, t])):
            changed = cells.copy()
            changed[:, t] = np.where(where, (cells[:, t] + rs.integers(1, 129, (2, 16))) % 129, cells[:, t])
            moved = (np.asarray(predict(changed)) != reference).any(axis=(0, 2))
            expected = col_L >= col_L[t] if part == 0 else col_L > col_L[t]
            np.testing.assert_array_equal(moved, expected, err_msg=f"token {t} part {part}")


@pytest.mark.parametrize("level, partial_known", [(0, False), (1, False), (1, True)])
def test_decoding_column_by_column_gives_the_whole_sequence_outputs(level, partial_known):
    """Sampling's KV-cached steps (`prefill`, then `decode` of column c under a traced c) give
    `predict`'s outputs of every column's tokens, with the border token and known cells."""
    graphdef, params, cells, conds, rows, cols = column_case(level, partial_known)
    border = random_border(level)
    known = jnp.asarray(np.random.default_rng(5).random(cells.shape) < 0.5) if partial_known else None
    n, num_tokens = cells.shape[:2]

    @jax.jit
    def by_columns(cells):
        column = nnx.merge(graphdef, params)

        def step(caches, c):
            h_NxRxD, caches = column.decode(caches, cells, c, known_NxLxP=known)
            return caches, h_NxRxD

        _, h_ColsxNxRxD = jax.lax.scan(step, column.prefill(conds, border, n, num_tokens), jnp.arange(cols))
        return h_ColsxNxRxD.transpose(1, 2, 0, 3).reshape(n, num_tokens, -1)  # grid order r * cols + c

    column = nnx.merge(graphdef, params)
    whole = column.predict(cells, conds, border, known_NxLxP=known)[:, column.trunk.num_conds :]
    np.testing.assert_allclose(by_columns(cells), whole, rtol=1e-5, atol=1e-5)
