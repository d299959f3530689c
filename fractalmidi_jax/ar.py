"""An autoregressive (AR) level: causal attention over the patch tokens in scan order.

Teacher forcing is shifted: the sequence is [C condition tokens, patch scan[0], ...,
patch scan[L-2]]; the output at position C-1+i predicts patch scan[i] from the conditions and
patches before it only. The level hands down, for patch t, its own output and the outputs of
its top and left neighbours: in both scan orders those come earlier, so they have not seen t.
Right and bottom neighbours come later, would leak t, and are passed as zeros. For the same
reason a child's border column (its left neighbour's cells) is always visible.
Partly known patches (`partial_known`): the input that predicts patch scan[i] also shows the
known cells of scan[i] (level.py's `embed_known`, added to it), so a patch partly given by a
prompt is drawn knowing what is given; known cells of later patches stay unseen, as every later
patch does (continuation prompts precede in a column_major scan).
Sampling (`generate`) runs one token at a time in a `lax.fori_loop` over a preallocated KV
cache (`prefill`, then `decode`); the output for token i conditions the level below, whose
result is fed back as the next input.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fractalmidi_jax import grid as grid_lib
from fractalmidi_jax.config import Config
from fractalmidi_jax.level import HandDown, LevelTrunk, causal_mask

NUM_FRAMES = 16  # GIF frames of an AR level 0: the canvas after every 1/16 of the scan


class ARLevel(nnx.Module):
    handoff_neighbours = ("top", "left")

    def __init__(self, config: Config, level: int, rngs: nnx.Rngs):
        self.trunk = LevelTrunk(config, level, rngs)
        self.scan_order = config.scan_order

    def scan(self, num_tokens: int) -> np.ndarray:
        return self.trunk.grid(num_tokens // self.trunk.rows).scan_order(self.scan_order)

    def teacher_forced(
        self, cells_NxLxP, conds_NxCxE, border=None, col_offset_N=None, rng=None, known_NxLxP=None
    ):
        """N x L x D outputs in grid order; output t has seen only the patches before t (and with
        partial_known the known cells of t itself: `known_NxLxP`, None for none)."""
        n, num_tokens, _ = cells_NxLxP.shape
        trunk = self.trunk
        cols = num_tokens // trunk.rows
        scan_L = self.scan(num_tokens)
        inputs = trunk.embed_patches(cells_NxLxP[:, scan_L[:-1]])
        inputs = inputs + trunk.positions(jnp.asarray(scan_L[:-1]), cols, col_offset_N)
        x = jnp.concatenate([trunk.cond_tokens(conds_NxCxE, n, border), inputs], axis=1)
        if trunk.partial_known:
            shown_NxLxD = trunk.embed_known(cells_NxLxP, known_NxLxP)[:, scan_L]
            x = x.at[:, trunk.num_conds - 1 :].add(shown_NxLxD.astype(x.dtype))
        h, _ = trunk.transformer(x, mask=causal_mask(x.shape[1]), rng=rng)
        h_scan = h[:, trunk.num_conds - 1 :]
        return h_scan[:, np.argsort(scan_L)]

    def counts(self, rng, shape, num_tokens: int, config: Config, train: bool):
        """Every patch is predicted."""
        return jnp.full(shape, num_tokens, jnp.int32)

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
        h_NxLxD = self.teacher_forced(
            cells_NxLxP, conds_NxCxE, border, col_offset_N, dropout_rng, known_NxLxP
        )
        return self.trunk.hand_down_a_random_budget(
            h_NxLxD, count_N, budget, self.handoff_neighbours, num_out, order_rng, nonempty_NxL
        )

    def cache_length(self, num_tokens: int) -> int:
        return self.trunk.num_conds + num_tokens - 1

    def prefill(self, conds_NxCxE, border, num_sequences: int, num_tokens: int, shown_NxD=None):
        """Runs the condition tokens; returns (output predicting scan[0], KV caches). `shown_NxD`:
        scan[0]'s known cells (`trunk.embed_known`, partial_known)."""
        trunk = self.trunk
        length = self.cache_length(num_tokens)
        caches = trunk.transformer.empty_caches(num_sequences, length, trunk.dtype)
        mask = np.arange(trunk.num_conds)[:, None] >= np.arange(length)[None, :]
        tokens = trunk.cond_tokens(conds_NxCxE, num_sequences, border)
        if shown_NxD is not None:
            tokens = tokens.at[:, -1].add(shown_NxD.astype(tokens.dtype))
        h, caches = trunk.transformer(tokens, mask, caches, 0)
        return h[:, -1], caches

    def decode(self, caches, cells_NxP, step, grid_index, num_tokens: int, col_offset_N=None, shown_NxD=None):
        """Feeds patch scan[step-1] (at grid index `grid_index`); returns (output predicting
        scan[step], caches). `step` may be traced; `shown_NxD`: scan[step]'s known cells
        (partial_known)."""
        trunk = self.trunk
        token = trunk.embed_patches(cells_NxP[:, None])
        token = token + trunk.positions(jnp.reshape(grid_index, (1,)), num_tokens // trunk.rows, col_offset_N)
        if shown_NxD is not None:
            token = token + shown_NxD[:, None].astype(token.dtype)
        position = trunk.num_conds - 1 + step
        mask = (jnp.arange(self.cache_length(num_tokens)) <= position)[None, :]
        h, caches = trunk.transformer(token, mask, caches, position)
        return h[:, 0], caches

    def generate(self, sampler, k, grid, conds, cells, known, border, num_out, rng, col_offset_N=None):
        """Draws the tokens in scan order; `sampler.children` fills each patch with the level below."""
        n, num_tokens, _ = cells.shape
        scan_L = jnp.asarray(self.scan(num_tokens))
        neighbours = jnp.asarray(grid.neighbours())
        given = cells

        def shown(i):
            """The known cells of scan[i] (the last patch for i = L: that output is never used)."""
            if not self.trunk.partial_known:
                return None
            g = scan_L[jnp.minimum(i, num_tokens - 1)]
            return self.trunk.embed_known(given[:, g][:, None], known[:, g][:, None])[:, 0]

        h, caches = self.prefill(conds, border, n, num_tokens, shown(0))
        outputs = jnp.zeros((n, num_tokens, h.shape[-1]), h.dtype)
        visible = jnp.ones((n, num_tokens), bool)
        num_frames = min(num_tokens, NUM_FRAMES) if k == 0 else 0
        frame_after = np.full(
            num_tokens, -1, np.int32
        )  # frame f: the canvas after step ceil((f+1) L / F) - 1
        frame_after[[-(-(f + 1) * num_tokens // num_frames) - 1 for f in range(num_frames)]] = np.arange(
            num_frames
        )
        frame_after = jnp.asarray(frame_after)
        frames = jnp.zeros((num_frames,) + cells.shape, cells.dtype)

        def step(i, state):
            h, caches, cells, outputs, frames = state
            g = scan_L[i]
            outputs = outputs.at[:, g].set(h)
            child_conds = [h]
            for name in grid_lib.NEIGHBOURS[: num_out - 1]:
                nbr = neighbours[grid_lib.NEIGHBOURS.index(name), g]
                usable = (nbr >= 0) & (name in self.handoff_neighbours)
                child_conds.append(jnp.where(usable, outputs[:, jnp.maximum(nbr, 0)], 0).astype(h.dtype))
            child_conds = jnp.stack(child_conds, axis=1)[:, None]
            index = jnp.broadcast_to(g, (n, 1))
            borders = sampler.child_borders(k, cells, visible, border, grid, index)
            new = sampler.children(
                k,
                child_conds,
                cells[:, g][:, None],
                known[:, g][:, None],
                borders,
                jax.random.fold_in(rng, i),
            )
            cells = cells.at[:, g].set(new[:, 0])
            h, caches = self.decode(caches, new[:, 0], i + 1, g, num_tokens, col_offset_N, shown(i + 1))
            if k == 0:
                frames = jax.lax.cond(
                    frame_after[i] >= 0,
                    lambda f: f.at[frame_after[i]].set(cells),
                    lambda f: f,
                    frames,
                )
            return h, caches, cells, outputs, frames

        _, _, cells, _, frames = jax.lax.fori_loop(0, num_tokens, step, (h, caches, cells, outputs, frames))
        sampler.frames.extend(
            grid_lib.unpatchify(frames[j], grid.rows, grid.cols, grid.patch) for j in range(num_frames)
        )
        return cells
