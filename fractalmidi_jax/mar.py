"""A masked-autoregressive (MAR) level: bidirectional attention over all patch tokens, hidden
tokens replaced by a learned mask token.

Training (`train`): draw a random order; the first `count` tokens of it are hidden; the level
runs once; the first K tokens of the order (the budget) hand their conditions down with their
true patches, weighted as `masking.budget_weights` says.
Sampling (`predict`): the sampler calls it once per round with the canvas and the tokens
still hidden; see sampler.py.
"""

import jax.numpy as jnp
from flax import nnx

from fractalmidi_jax import masking
from fractalmidi_jax.config import Config
from fractalmidi_jax.grid import NEIGHBOURS
from fractalmidi_jax.layers import embedding_init
from fractalmidi_jax.level import LevelTrunk


class MARLevel(nnx.Module):
    kind = "mar"
    handoff_neighbours = NEIGHBOURS

    def __init__(self, config: Config, level: int, rngs: nnx.Rngs):
        self.trunk = LevelTrunk(config, level, rngs)
        self.mask_token = nnx.Param(embedding_init(rngs.params(), (config.embed_dim_list[level],)))

    def predict(self, cells_NxLxP, hidden_NxL, conds_NxCxE, col_offset_N=None, rng=None):
        """N x (C + L) x D outputs, given the visible tokens: the C condition tokens' first, then
        every patch token's (the hand-off gathers from it at offset C, so the backward pass
        never pads a sliced copy)."""
        n, num_tokens, _ = cells_NxLxP.shape
        trunk = self.trunk
        cols = num_tokens // trunk.rows
        tokens = trunk.embed_patches(cells_NxLxP)
        tokens = jnp.where(hidden_NxL[..., None], self.mask_token[...].astype(tokens.dtype), tokens)
        tokens = tokens + trunk.positions(jnp.arange(num_tokens), cols, col_offset_N)
        x = jnp.concatenate([trunk.cond_tokens(conds_NxCxE, n), tokens], axis=1)
        return trunk.transformer(x, rng=rng)[0]

    def train(self, cells_NxLxP, conds_NxCxE, count_N, budget, num_out, col_offset_N, order_rng, dropout_rng):
        """Returns (index_NxK, weight_NxK, conds_NxKxOxD) of the tokens handed down."""
        n, num_tokens, _ = cells_NxLxP.shape
        order_NxL = masking.random_orders(order_rng, n, num_tokens)
        rank_NxL = jnp.argsort(order_NxL, axis=-1)
        hidden_NxL = rank_NxL < count_N[:, None]
        h_NxTxD = self.predict(cells_NxLxP, hidden_NxL, conds_NxCxE, col_offset_N, dropout_rng)
        index_NxK = order_NxL[:, :budget]
        grid = self.trunk.grid(num_tokens // self.trunk.rows)
        conds = self.trunk.handoff(
            h_NxTxD, index_NxK, grid, self.handoff_neighbours, num_out, offset=self.trunk.num_conds
        )
        return index_NxK, masking.budget_weights(count_N, budget), conds
