"""A column level: autoregressive over time, one column of patches per step.

A note runs along time, so what a patch needs in order to continue a note is the patch to its
left; the patches above and below it hold other pitches and may be drawn with it. A column
level draws a time column of patches (every pitch band at once) per step, each seeing every
column before it whole: a 4 x 4 level takes 4 steps where a token-by-token AR level takes 16,
and every patch's left neighbour (and so its border column) is drawn before it.

Teacher forcing: the token at grid (r, c) carries the patch at (r, c - 1) (a learned start
embedding at c = 0) at the position of (r, c); it attends to the condition tokens and to every
token of columns <= c, so its output has seen columns < c only and predicts patch (r, c).
The hand-off passes a patch its own output and its top, bottom and left neighbours' (same or
earlier column: none has seen it); the right neighbour has, and is passed as zeros.
Partly known patches (`partial_known`): token (r, c) also shows the known cells of patch
(r, c) itself (level.py's `embed_known`), so the output predicting a column has seen what is
given in that column (every band of it) and nothing else of it.
Sampling (`generate`): the condition tokens go into a KV cache first (`prefill`); step c then
runs column c's tokens alone against it (`decode`: their inputs, the patches of column c - 1,
are drawn by then, and what they attend to never changes after), hands column c down, and
writes what comes back. Recomputing the whole sequence per step did 4 times the work; below
level 0 that work was half the sampler's time (BENCHMARKS.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fractalmidi_jax import grid as grid_lib
from fractalmidi_jax.ar import ARLevel
from fractalmidi_jax.config import Config
from fractalmidi_jax.layers import embedding_init
from fractalmidi_jax.level import HandDown, LevelTrunk


def column_mask(num_conds: int, rows: int, cols: int) -> np.ndarray:
    """(C + L) x (C + L): condition tokens see each other; a patch token sees the conditions
    and the tokens of its own and earlier columns (grid order t = r * cols + c)."""
    col_L = np.arange(rows * cols) % cols
    patches = np.concatenate(
        [np.ones((rows * cols, num_conds), bool), col_L[None, :] <= col_L[:, None]], axis=1
    )
    conds = np.concatenate(
        [np.ones((num_conds, num_conds), bool), np.zeros((num_conds, rows * cols), bool)], 1
    )
    return np.concatenate([conds, patches], axis=0)


def column_tokens(rows: int, cols: int, c):
    """Grid indices r * cols + c of column c's tokens (R ints; `c` may be traced)."""
    return jnp.arange(rows) * cols + c


class ColumnLevel(nnx.Module):
    handoff_neighbours = ("top", "bottom", "left")
    counts = ARLevel.counts  # every patch is predicted

    def __init__(self, config: Config, level: int, rngs: nnx.Rngs):
        self.trunk = LevelTrunk(config, level, rngs)
        self.start_token = nnx.Param(embedding_init(rngs.params(), (config.embed_dim_list[level],)))

    def predict(self, cells_NxLxP, conds_NxCxE, border=None, col_offset_N=None, rng=None, known_NxLxP=None):
        """N x (C + L) x D outputs; patch token t's output (at C + t) has seen the columns
        before t's only (and with partial_known the known cells of t's column: `known_NxLxP`,
        None for none)."""
        n, num_tokens, p2 = cells_NxLxP.shape
        trunk = self.trunk
        cols = num_tokens // trunk.rows
        left_NxRxCxP = cells_NxLxP.reshape(n, trunk.rows, cols, p2)[:, :, :-1]
        tokens = trunk.embed_patches(left_NxRxCxP).astype(trunk.dtype)
        start = jnp.broadcast_to(
            self.start_token[...].astype(trunk.dtype), (n, trunk.rows, 1, tokens.shape[-1])
        )
        tokens = jnp.concatenate([start, tokens], axis=2).reshape(n, num_tokens, -1)
        tokens = tokens + trunk.positions(jnp.arange(num_tokens), cols, col_offset_N)
        if trunk.partial_known:
            tokens = tokens + trunk.embed_known(cells_NxLxP, known_NxLxP).astype(tokens.dtype)
        x = jnp.concatenate([trunk.cond_tokens(conds_NxCxE, n, border), tokens], axis=1)
        mask = column_mask(trunk.num_conds, trunk.rows, cols)
        return trunk.transformer(x, mask=mask, rng=rng)[0]

    def train(
        self,
        cells_NxLxP,
        conds_NxCxE,
        border,
        count_N,
        budget,
        num_out,
        col_offset_N,
        order_rng,
        dropout_rng,
        known_NxLxP=None,
        nonempty_NxL=None,
    ) -> HandDown:
        """A random budget of the patches hands down; every patch is visible to its children."""
        h_NxTxD = self.predict(cells_NxLxP, conds_NxCxE, border, col_offset_N, dropout_rng, known_NxLxP)
        return self.trunk.hand_down_a_random_budget(
            h_NxTxD,
            count_N,
            budget,
            self.handoff_neighbours,
            num_out,
            order_rng,
            nonempty_NxL,
            self.trunk.num_conds,
        )

    def prefill(self, conds_NxCxE, border, num_sequences: int, num_tokens: int):
        """KV caches of C + L positions (the conditions, then the patch tokens column by column)
        holding the condition tokens."""
        trunk = self.trunk
        length = trunk.num_conds + num_tokens
        caches = trunk.transformer.empty_caches(num_sequences, length, trunk.dtype)
        mask = (np.arange(length) < trunk.num_conds)[None, :]
        tokens = trunk.cond_tokens(conds_NxCxE, num_sequences, border)
        return trunk.transformer(tokens, mask, caches, 0)[1]

    def decode(self, caches, cells_NxLxP, c, col_offset_N=None, known_NxLxP=None):
        """(N x R x D outputs of column c's tokens, the caches with them): `predict`'s outputs at
        grid indices r * cols + c, from caches holding the conditions and the columns before c.
        `c` may be traced."""
        n, num_tokens, _ = cells_NxLxP.shape
        trunk = self.trunk
        rows, cols = trunk.rows, num_tokens // trunk.rows
        index_R = column_tokens(rows, cols, c)
        left_NxRxD = trunk.embed_patches(cells_NxLxP[:, jnp.maximum(index_R - 1, 0)]).astype(trunk.dtype)
        tokens = jnp.where(c == 0, self.start_token[...].astype(trunk.dtype), left_NxRxD)
        tokens = tokens + trunk.positions(index_R, cols, col_offset_N)
        if trunk.partial_known:
            known_NxRxP = None if known_NxLxP is None else known_NxLxP[:, index_R]
            tokens = tokens + trunk.embed_known(cells_NxLxP[:, index_R], known_NxRxP).astype(tokens.dtype)
        first = trunk.num_conds + c * rows
        mask = (jnp.arange(trunk.num_conds + num_tokens) < first + rows)[None, :]
        return trunk.transformer(tokens, mask, caches, first)

    def generate(self, sampler, k, grid, conds, cells, known, border, num_out, rng, col_offset_N=None):
        """Draws the canvas column by column over KV caches; `sampler.children` fills each
        column's patches."""
        n, num_tokens, _ = cells.shape
        trunk = self.trunk
        visible = jnp.ones((n, num_tokens), bool)  # a column's left neighbours are drawn before it
        caches = self.prefill(conds, border, n, num_tokens)
        outputs = jnp.zeros((n, num_tokens, trunk.row_pos.shape[-1]), trunk.dtype)

        def step(c, state):
            cells, outputs, caches = state
            h_NxRxD, caches = self.decode(caches, cells, c, col_offset_N, known)
            index_NxR = jnp.broadcast_to(column_tokens(grid.rows, grid.cols, c), (n, grid.rows))
            outputs = grid_lib.put_tokens(outputs, index_NxR, h_NxRxD)
            child_conds = trunk.handoff(outputs, index_NxR, grid, self.handoff_neighbours, num_out)
            borders = sampler.child_borders(k, cells, visible, border, grid, index_NxR)
            new = sampler.children(
                k,
                child_conds,
                grid_lib.gather_tokens(cells, index_NxR),
                grid_lib.gather_tokens(known, index_NxR),
                borders,
                jax.random.fold_in(rng, c),
            )
            return grid_lib.put_tokens(cells, index_NxR, new), outputs, caches

        state = (cells, outputs, caches)
        if k == 0:  # unrolled: a frame per column for the GIF
            for c in range(grid.cols):
                state = step(c, state)
                sampler.frames.append(grid_lib.unpatchify(state[0], grid.rows, grid.cols, grid.patch))
            return state[0]
        return jax.lax.fori_loop(0, grid.cols, step, state)[0]
