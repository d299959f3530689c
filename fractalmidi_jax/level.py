"""What every generator level shares: token embeddings, positions, the transformer, and the
hand-off of condition vectors to the level below.

Shapes: N sequences, L patch tokens, C condition tokens (1 at level 0: one learned start
vector; 5 below: the parent's middle, top, right, bottom, left outputs), P = p * p cells per
patch, D this level's width, E the parent's width.

Positions: a learned table per pitch-band row plus one per time column (factorised, so no
parameter is spent on a position no level can reach) and one per condition token. Level 0's
column table covers `max_crop_length`; during training its columns start at a random offset,
so every entry is trained and a model trained on short crops can sample wide rolls.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fractalmidi_jax import grid as grid_lib
from fractalmidi_jax.config import Config
from fractalmidi_jax.layers import Transformer, dense, embedding_init

NUM_HANDOFF_CONDS = 5  # middle + the four neighbours


class LevelTrunk(nnx.Module):
    def __init__(self, config: Config, level: int, rngs: nnx.Rngs):
        sizes = config.img_size_list
        width = config.embed_dim_list[level]
        self.level = level
        self.patch = sizes[level + 1]
        self.rows = sizes[level] // self.patch
        self.max_cols = (config.max_crop_length if level == 0 else sizes[level]) // self.patch
        self.num_conds = 1 if level == 0 else NUM_HANDOFF_CONDS
        self.dtype = config.compute_dtype()
        if level == 0:
            self.start_token = nnx.Param(embedding_init(rngs.params(), (1, width)))
        else:
            self.cond_embed = dense(config.embed_dim_list[level - 1], width, self.dtype, rngs)
        self.patch_embed = dense(self.patch * self.patch, width, self.dtype, rngs)
        self.cond_pos = nnx.Param(embedding_init(rngs.params(), (self.num_conds, width)))
        self.row_pos = nnx.Param(embedding_init(rngs.params(), (self.rows, width)))
        self.col_pos = nnx.Param(embedding_init(rngs.params(), (self.max_cols, width)))
        self.transformer = Transformer(
            width,
            config.num_blocks_list[level],
            config.num_heads_list[level],
            config.attn_dropout,
            config.proj_dropout,
            self.dtype,
            rngs,
            remat=config.grad_checkpoint,
            scan=config.scan_layers and level == 0,
        )

    def grid(self, cols: int | None = None) -> grid_lib.Grid:
        return grid_lib.Grid(self.rows, cols or self.max_cols, self.patch)

    def cond_tokens(self, conds_NxCxE, num_sequences: int):
        """N x C x D condition tokens with their positions."""
        if self.level == 0:
            tokens = jnp.broadcast_to(self.start_token[...], (num_sequences,) + self.start_token.shape)
        else:
            tokens = self.cond_embed(conds_NxCxE)
        return (tokens + self.cond_pos[...]).astype(self.dtype)

    def embed_patches(self, cells_NxLxP):
        """Cells are integer velocities; the network sees velocity / 127."""
        return self.patch_embed((cells_NxLxP / 127.0).astype(self.dtype))

    def positions(self, grid_index_L, cols: int, col_offset_N=None):
        """Position embeddings of tokens at the given grid indices: L x D, or N x L x D when
        each sequence starts at its own column (level 0 in training)."""
        rows_L, cols_L = grid_index_L // cols, grid_index_L % cols
        if col_offset_N is None:
            return (self.row_pos[...][rows_L] + self.col_pos[...][cols_L]).astype(self.dtype)
        col_NxLxD = self.col_pos[...][cols_L[None, :] + col_offset_N[:, None]]
        return (self.row_pos[...][rows_L][None] + col_NxLxD).astype(self.dtype)

    def handoff(
        self, h_NxTxD, index_NxK, grid: grid_lib.Grid, neighbours: tuple[str, ...], num_out: int, offset=0
    ):
        """N x K x num_out x D conditions for the selected tokens: the token's own output, then
        the outputs of its neighbours in `neighbours` (zeros for others and at the border).
        Token t's output is h[:, offset + t]. One gather for all of them (one scatter back)."""
        table = grid.neighbours()
        sources = [np.arange(grid.num_tokens)]
        for name in grid_lib.NEIGHBOURS[: num_out - 1]:
            usable = name in neighbours
            sources.append(table[grid_lib.NEIGHBOURS.index(name)] if usable else np.full(grid.num_tokens, -1))
        source_NxKxO = jnp.asarray(np.stack(sources, axis=1).astype(np.int32))[index_NxK]
        n, k, o = source_NxKxO.shape
        flat_index = jnp.maximum(source_NxKxO, 0).reshape(n, k * o) + offset
        conds = grid_lib.gather_tokens(h_NxTxD, flat_index).reshape(n, k, o, -1)
        return jnp.where((source_NxKxO >= 0)[..., None], conds, 0).astype(conds.dtype)


def time_offsets(rng, num_sequences: int, cols: int, max_cols: int):
    """Random first column per sequence in [0, max_cols - cols] (level 0, training); None
    (start at column 0) otherwise."""
    if rng is None or cols >= max_cols:
        return None
    return jax.random.randint(rng, (num_sequences,), 0, max_cols - cols + 1, dtype=jnp.int32)


def causal_mask(num_tokens: int) -> np.ndarray:
    return np.tril(np.ones((num_tokens, num_tokens), dtype=bool))
