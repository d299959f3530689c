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
Sampling (`generate`): step c runs the level on the canvas (columns >= c cannot reach column
c's outputs), hands column c down and writes what comes back. Each step recomputes the whole
sequence: at the levels a column level is made for (16 tokens) that is cheaper than the KV
cache updates it would save.
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

    def generate(self, sampler, k, grid, conds, cells, known, border, num_out, rng, col_offset_N=None):
        """Draws the canvas column by column; `sampler.children` fills each column's patches."""
        n, num_tokens, _ = cells.shape
        trunk = self.trunk
        column_index = jnp.asarray(np.arange(grid.rows)[None, :] * grid.cols + np.arange(grid.cols)[:, None])
        visible = jnp.ones((n, num_tokens), bool)  # a column's left neighbours are drawn before it

        def step(c, cells):
            h_NxTxD = self.predict(cells, conds, border, col_offset_N, known_NxLxP=known)
            index_NxR = jnp.broadcast_to(column_index[c], (n, grid.rows))
            child_conds = trunk.handoff(
                h_NxTxD, index_NxR, grid, self.handoff_neighbours, num_out, offset=trunk.num_conds
            )
            borders = sampler.child_borders(k, cells, visible, border, grid, index_NxR)
            new = sampler.children(
                k,
                child_conds,
                grid_lib.gather_tokens(cells, index_NxR),
                grid_lib.gather_tokens(known, index_NxR),
                borders,
                jax.random.fold_in(rng, c),
            )
            return grid_lib.put_tokens(cells, index_NxR, new)

        if k == 0:  # unrolled: a frame per column for the GIF
            for c in range(grid.cols):
                cells = step(c, cells)
                sampler.frames.append(grid_lib.unpatchify(cells, grid.rows, grid.cols, grid.patch))
            return cells
        return jax.lax.fori_loop(0, grid.cols, step, cells)
