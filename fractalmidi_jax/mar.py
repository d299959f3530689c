"""A masked-autoregressive (MAR) level: bidirectional attention over all patch tokens, hidden
tokens replaced by a learned mask token (with `partial_known`, plus their known cells: level.py).

Training (`train`): draw a random order; the first `count` tokens of it are hidden; the level
runs once; the first K tokens of the order (the budget) hand their conditions down with their
true patches, weighted as `masking.budget_weights` says. Visible tokens are what the children's
border columns may show.
Sampling (`generate`): a random order of the tokens; round r predicts every token from the
visible ones and generates the next `cosine_schedule[r]` tokens of the order with the level
below, then writes them into the canvas. Rounds differ in size and shapes are static, so
rounds run under `lax.scan` in shape buckets, padded to the bucket's widest round (`generate`).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fractalmidi_jax import grid as grid_lib
from fractalmidi_jax import masking
from fractalmidi_jax.config import Config
from fractalmidi_jax.grid import NEIGHBOURS
from fractalmidi_jax.layers import embedding_init
from fractalmidi_jax.level import HandDown, LevelTrunk


class MARLevel(nnx.Module):
    handoff_neighbours = NEIGHBOURS

    def __init__(self, config: Config, level: int, rngs: nnx.Rngs):
        self.trunk = LevelTrunk(config, level, rngs)
        self.mask_token = nnx.Param(embedding_init(rngs.params(), (config.embed_dim_list[level],)))

    def predict(
        self, cells_NxLxP, hidden_NxL, conds_NxCxE, border=None, col_offset_N=None, rng=None, known_NxLxP=None
    ):
        """N x (C + L) x D outputs, given the visible tokens (and with partial_known the known
        cells of hidden ones; None: none known): the C condition tokens' first, then every patch
        token's (the hand-off gathers from it at offset C, so the backward pass never pads a
        sliced copy)."""
        n, num_tokens, _ = cells_NxLxP.shape
        trunk = self.trunk
        cols = num_tokens // trunk.rows
        tokens = trunk.embed_patches(cells_NxLxP)
        hidden_tokens = self.mask_token[...].astype(tokens.dtype)
        if trunk.partial_known:
            hidden_tokens = hidden_tokens + trunk.embed_known(cells_NxLxP, known_NxLxP)
        tokens = jnp.where(hidden_NxL[..., None], hidden_tokens, tokens)
        tokens = tokens + trunk.positions(jnp.arange(num_tokens), cols, col_offset_N)
        x = jnp.concatenate([trunk.cond_tokens(conds_NxCxE, n, border), tokens], axis=1)
        return trunk.transformer(x, rng=rng)[0]

    def counts(self, rng, shape, num_tokens: int, config: Config, train: bool):
        """Hidden tokens per sequence: the training ratios, or the NLL estimator's uniform counts."""
        if train:
            return masking.train_mask_counts(
                rng, shape, num_tokens, config.mask_ratio_loc, config.mask_ratio_scale
            )
        return masking.eval_mask_counts(rng, shape, num_tokens)

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
        """The hidden tokens are the first count_N of a random order, and hand down; the visible
        ones are what their children may see. Hidden tokens are drawn as without known cells (so
        the budget weights hold); a hidden token shows its known cells (partial_known)."""
        n, num_tokens, _ = cells_NxLxP.shape
        order_NxL = masking.random_orders(order_rng, n, num_tokens)
        rank_NxL = jnp.argsort(order_NxL, axis=-1)
        hidden_NxL = rank_NxL < count_N[:, None]
        h_NxTxD = self.predict(
            cells_NxLxP, hidden_NxL, conds_NxCxE, border, col_offset_N, dropout_rng, known_NxLxP
        )
        return self.trunk.hand_down(
            h_NxTxD,
            order_NxL,
            count_N,
            hidden_NxL,
            ~hidden_NxL,
            budget,
            self.handoff_neighbours,
            num_out,
            nonempty_NxL,
            self.trunk.num_conds,
        )

    def generate(self, sampler, k, grid, conds, cells, known, border, num_out, rng, col_offset_N=None):
        """Fills the hidden tokens of `cells` (N x L x P) round by round; `sampler.children`
        draws each round's patches with the level below."""
        n, num_tokens, _ = cells.shape
        trunk = self.trunk
        order_rng, rng = jax.random.split(rng)
        order_NxL = masking.random_orders(order_rng, n, num_tokens)
        hidden_NxL = ~jnp.all(known, axis=-1)
        counts = masking.cosine_schedule(num_tokens, sampler.num_iter_list[k])
        round_keys = jax.random.split(rng, len(counts))

        def one_round(cells, hidden_NxL, index_NxC, valid_C, key, sized_for):
            h_NxTxD = self.predict(cells, hidden_NxL, conds, border, col_offset_N, known_NxLxP=known)
            child_conds = trunk.handoff(
                h_NxTxD, index_NxC, grid, self.handoff_neighbours, num_out, offset=trunk.num_conds
            )
            borders = sampler.child_borders(k, cells, ~hidden_NxL, border, grid, index_NxC, known)
            old = grid_lib.gather_tokens(cells, index_NxC)
            known_NxCxP = grid_lib.gather_tokens(known, index_NxC)
            new = sampler.children(k, child_conds, old, known_NxCxP, borders, key, valid_C, sized_for)
            new = jnp.where(valid_C[None, :, None], new, old)
            shown = grid_lib.gather_tokens(hidden_NxL, index_NxC) & ~valid_C[None, :]
            return grid_lib.put_tokens(cells, index_NxC, new), grid_lib.put_tokens(
                hidden_NxL, index_NxC, shown
            )

        # Rounds run under lax.scan in shape buckets of consecutive rounds, each compiled once:
        # a round takes its bucket's widest count of tokens of the order and fills the first
        # `count` (the rest write back what is there). A level that skips empty patches counts
        # that padding as empty and sizes its slots for its bucket's mean round, so padding costs
        # the levels below nothing: a skipping level 0 compiles `skip_empty_round_buckets`
        # rounds. A level 0 that does not skip keeps exact sizes (a bucket per round); lower
        # levels compile one round.
        if k > 0:
            buckets = 1
        elif trunk.skips_empty:
            buckets = min(sampler.config.skip_empty_round_buckets, len(counts))
        else:
            buckets = len(counts)
        padded_order = jnp.concatenate([order_NxL, order_NxL[:, : max(counts)]], axis=1)
        counts_R = np.asarray(counts, np.int32)
        starts_R = np.cumsum(counts_R, dtype=np.int32) - counts_R
        carry = (cells, hidden_NxL)
        for rounds in np.array_split(np.arange(len(counts)), buckets):
            sizes = counts_R[rounds]
            widest, mean_round = int(sizes.max()), -(-int(sizes.sum()) // len(rounds))

            def scan_round(carry, round_inputs, widest=widest, mean_round=mean_round):
                start, count, key = round_inputs
                index = jax.lax.dynamic_slice_in_dim(padded_order, start, widest, axis=1)
                carry = one_round(*carry, index, jnp.arange(widest) < count, key, mean_round)
                frame = grid_lib.unpatchify(carry[0], grid.rows, grid.cols, grid.patch) if k == 0 else None
                return carry, frame

            inputs = (jnp.asarray(starts_R[rounds]), jnp.asarray(sizes), round_keys[rounds])
            carry, frames = jax.lax.scan(scan_round, carry, inputs)
            if k == 0:
                sampler.frames.extend(frames[i] for i in range(len(rounds)))
        return carry[0]
