"""What every generator level shares: token embeddings, positions, the transformer, and the
hand-off of condition vectors and border cells to the level below.

Shapes: N sequences, L patch tokens, C condition tokens (1 at level 0: one learned start
vector; 5 below: the parent's middle, top, right, bottom, left outputs, plus the border token
with `border_context`), P = p * p cells per patch, D this level's width, E the parent's width,
H this level's canvas height.

Border context: a patch's left neighbour may hold the start of a note that goes on inside it
(27% of POP909's same-note neighbour pairs cross a 4 x 4 or bar border). With
`border_context`, every patch below level 0 gets the column of cells just left of it, where
that column is visible (already drawn, or known), as one more condition token; a level passes
its children their own border columns, cut from its canvas or from its own border.

Partly known patches (`partial_known`): a prompt that ends inside a bar, or a region to
inpaint inside pitch bounds, leaves patches of which only some cells are known. A level hides
such a patch as a whole until it is generated; with `partial_known` the hidden patch still
shows its known cells (their features, zeros elsewhere, and the known mask: `embed_known`),
and a child's border column shows the known cells of a hidden left neighbour, so every known
cell conditions every level from the first round. A cell that is not known never reaches the
network through them.

Positions: a learned table per pitch-band row plus one per time column (factorised, so no
parameter is spent on a position no level can reach) and one per condition token. Level 0's
column table covers `max_crop_length`; during training its columns start at a random offset,
so every entry is trained and a model trained on short crops can sample wide rolls.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fractalmidi_jax import grid as grid_lib
from fractalmidi_jax import masking, sparse
from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax.config import Config
from fractalmidi_jax.layers import Transformer, dense, embedding_init

NUM_HANDOFF_CONDS = 5  # middle + the four neighbours


class Border(NamedTuple):
    """The column of cells left of a canvas: cells N x H (int, 0 where unknown) and known N x H."""

    cells: jax.Array
    known: jax.Array


class HandDown(NamedTuple):
    """What a level's `train` returns: the K tokens each sequence hands down, with their
    Horvitz-Thompson weights and conditions; the tokens their children may see; and with
    skip_empty (sparse.py) the emptiness logits of every token (None without) and which tokens
    the level predicts (its hidden ones for MAR, all for AR and column), whose logits are scored."""

    index_NxK: jax.Array
    weight_NxK: jax.Array
    conds_NxKxOxD: jax.Array
    visible_NxL: jax.Array
    empty_logits_NxL: jax.Array | None
    predicted_NxL: jax.Array


class ConditionedColumns(NamedTuple):
    """Level 0's columns with per-bar conditions (conditions.py): the first column of the position
    table per sequence (N ints, or None for column 0) and the vector every token of a column adds
    (N x cols x D). A level passes it where it takes col_offset_N; only `positions` reads it."""

    offset_N: jax.Array | None
    vectors_NxColsxD: jax.Array


def num_conds(config: Config, level: int) -> int:
    """Condition tokens of a level: the start token at level 0; below, the parent's hand-off and
    the border token (with border_context)."""
    return 1 if level == 0 else NUM_HANDOFF_CONDS + int(config.border_context)


class LevelTrunk(nnx.Module):
    def __init__(self, config: Config, level: int, rngs: nnx.Rngs):
        sizes = config.img_size_list
        width = config.embed_dim_list[level]
        self.level = level
        self.patch = sizes[level + 1]
        self.rows = sizes[level] // self.patch
        self.max_cols = (config.max_crop_length if level == 0 else sizes[level]) // self.patch
        self.num_conds = num_conds(config, level)
        self.dtype = config.compute_dtype()
        self.roll = config.roll
        channels = roll_lib.num_channels(config.roll)
        self.has_border = config.border_context and level > 0
        if level == 0:
            self.start_token = nnx.Param(embedding_init(rngs.params(), (1, width)))
        else:
            self.cond_embed = dense(config.embed_dim_list[level - 1], width, self.dtype, rngs)
        if self.has_border:
            self.border_embed = dense(sizes[level] * (channels + 1), width, self.dtype, rngs)
        self.patch_embed = dense(self.patch * self.patch * channels, width, self.dtype, rngs)
        self.partial_known = config.partial_known
        if self.partial_known:
            self.known_embed = dense(self.patch * self.patch * (channels + 1), width, self.dtype, rngs)
        self.skips_empty = level < config.skip_empty
        self.empty_budget = 0.0 if self.skips_empty else config.empty_budget
        if self.skips_empty:
            self.empty_head = sparse.EmptyHead(width, rngs)
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
            fused_attention=config.attention_kernels(),
        )

    def grid(self, cols: int | None = None) -> grid_lib.Grid:
        return grid_lib.Grid(self.rows, cols or self.max_cols, self.patch)

    def cond_tokens(self, conds_NxCxE, num_sequences: int, border: Border | None = None):
        """N x C x D condition tokens with their positions."""
        if self.level == 0:
            tokens = jnp.broadcast_to(self.start_token[...], (num_sequences,) + self.start_token.shape)
        else:
            tokens = self.cond_embed(conds_NxCxE)
        if self.has_border:
            column = self.known_features(border.cells, border.known).reshape(num_sequences, 1, -1)
            tokens = jnp.concatenate([tokens.astype(self.dtype), self.border_embed(column)], axis=1)
        return (tokens + self.cond_pos[...]).astype(self.dtype)

    def embed_patches(self, cells_NxLxP):
        """Cells are integer tokens (roll.py); the network sees their features."""
        features = roll_lib.cell_features(cells_NxLxP, self.roll, self.dtype)
        return self.patch_embed(features.reshape(cells_NxLxP.shape[:-1] + (-1,)))

    def known_features(self, cells, known):
        """[..., C + 1] inputs of cells of which only some are known: the features of the known
        ones (zeros elsewhere, whatever the cell holds) and the known mask."""
        features = roll_lib.cell_features(jnp.where(known, cells, 0), self.roll, self.dtype)
        return jnp.concatenate([features, known[..., None].astype(self.dtype)], axis=-1)

    def embed_known(self, cells_NxLxP, known_NxLxP=None):
        """N x L x D: what a hidden patch shows of itself (partial_known), its known cells (None:
        none known)."""
        known_NxLxP = jnp.zeros(cells_NxLxP.shape, bool) if known_NxLxP is None else known_NxLxP
        features = self.known_features(cells_NxLxP, known_NxLxP)
        return self.known_embed(features.reshape(cells_NxLxP.shape[:-1] + (-1,)))

    def positions(self, grid_index_L, cols: int, col_offset_N=None):
        """Position embeddings of tokens at the given grid indices: L x D, or N x L x D when
        each sequence starts at its own column (level 0 in training); plus the columns' condition
        vectors when `col_offset_N` is ConditionedColumns."""
        rows_L, cols_L = grid_index_L // cols, grid_index_L % cols
        if isinstance(col_offset_N, ConditionedColumns):
            plain = self.positions(grid_index_L, cols, col_offset_N.offset_N)
            return (plain + col_offset_N.vectors_NxColsxD[:, cols_L]).astype(self.dtype)
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

    def hand_down(
        self,
        h_NxTxD,
        order_NxL,
        count_N,
        predicted_NxL,
        visible_NxL,
        budget,
        neighbours,
        num_out,
        nonempty_NxL,
        offset,
    ) -> HandDown:
        """`train`'s results: the first `budget` tokens of the random order hand down (a level puts
        the count_N tokens it predicts first), weighted as masking.budget_weights says; with
        skip_empty only the non-empty predicted tokens (`nonempty_NxL`: the true patches'), as
        sparse.nonempty_first says; with empty_budget in strata of non-empty and empty predicted
        tokens (sparse.stratified_budget). Token t's output is h[:, offset + t]."""
        num_tokens = order_NxL.shape[1]
        empty_logits = None
        reserved = sparse.empty_slots(budget, self.empty_budget)
        if self.skips_empty:
            order_NxL, count_N = sparse.nonempty_first(order_NxL, predicted_NxL & nonempty_NxL, budget)
            empty_logits = self.empty_head(h_NxTxD[:, offset : offset + num_tokens])
        if reserved:
            index_NxK, weights = sparse.stratified_budget(
                order_NxL, predicted_NxL, nonempty_NxL, budget, reserved
            )
        else:
            index_NxK, weights = order_NxL[:, :budget], masking.budget_weights(count_N, budget)
        conds = self.handoff(
            h_NxTxD, index_NxK, self.grid(num_tokens // self.rows), neighbours, num_out, offset
        )
        return HandDown(index_NxK, weights, conds, visible_NxL, empty_logits, predicted_NxL)

    def hand_down_a_random_budget(
        self, h_NxTxD, count_N, budget, neighbours, num_out, order_rng, nonempty_NxL=None, offset=0
    ) -> HandDown:
        """`train`'s results for a level that predicts every patch (AR, column): a random budget
        of the patches hands down, and every patch is visible to its children."""
        n, num_tokens = count_N.shape[0], h_NxTxD.shape[1] - offset
        order_NxL = masking.random_orders(order_rng, n, num_tokens)
        every = jnp.ones((n, num_tokens), bool)
        return self.hand_down(
            h_NxTxD, order_NxL, count_N, every, every, budget, neighbours, num_out, nonempty_NxL, offset
        )

    def child_borders(
        self, cells_NxLxP, visible_NxL, border: Border | None, grid: grid_lib.Grid, known_NxLxP=None
    ) -> Border:
        """Every token's border column (N x L x p each): the last cell column of its left
        neighbour patch where that patch is visible (with partial_known, also its known cells:
        `known_NxLxP`, None for none), or this canvas's own border at column 0 (known silence at
        level 0: a roll starts with nothing before it)."""
        n, num_tokens, _ = cells_NxLxP.shape
        p = grid.patch
        left_L = grid.neighbours()[grid_lib.NEIGHBOURS.index("left")]
        has_left = jnp.asarray(left_L >= 0)[None, :, None]
        source_L = np.maximum(left_L, 0)
        last_column = cells_NxLxP[:, source_L][:, :, p - 1 :: p]
        left_visible = jnp.broadcast_to(visible_NxL[:, source_L][..., None], last_column.shape)
        if self.partial_known and known_NxLxP is not None:
            left_visible = left_visible | known_NxLxP[:, source_L][:, :, p - 1 :: p]
        band_L = np.arange(num_tokens) // grid.cols
        if border is None:
            edge_cells, edge_known = jnp.zeros_like(last_column), jnp.ones(last_column.shape, bool)
        else:
            edge_cells = border.cells.reshape(n, grid.rows, p)[:, band_L]
            edge_known = border.known.reshape(n, grid.rows, p)[:, band_L]
        known = jnp.where(has_left, left_visible, edge_known)
        cells = jnp.where(has_left, last_column, edge_cells)
        return Border(jnp.where(known, cells, 0), known)


def gather_borders(borders: Border, index_NxK) -> Border:
    """The border columns of the selected tokens, one sequence each: (N K) x p."""
    pick = lambda x: grid_lib.gather_tokens(x, index_NxK).reshape(-1, x.shape[-1])
    return Border(pick(borders.cells), pick(borders.known))


def time_offsets(rng, num_sequences: int, cols: int, max_cols: int):
    """Random first column per sequence in [0, max_cols - cols] (level 0, training); None
    (start at column 0) otherwise."""
    if rng is None or cols >= max_cols:
        return None
    return jax.random.randint(rng, (num_sequences,), 0, max_cols - cols + 1, dtype=jnp.int32)


def sampling_offsets(num_sequences: int, cols: int, max_cols: int):
    """Level 0's first column when sampling: the middle of the offsets training draws, whose
    columns are trained most (column 0 is trained only by offset 0); None at full width."""
    if cols >= max_cols:
        return None
    return jnp.full((num_sequences,), (max_cols - cols) // 2, jnp.int32)


def causal_mask(num_tokens: int) -> np.ndarray:
    return np.tril(np.ones((num_tokens, num_tokens), dtype=bool))
