"""An autoregressive (AR) level: causal attention over the patch tokens in scan order.

Teacher forcing is shifted: the sequence is [C condition tokens, patch scan[0], ...,
patch scan[L-2]]; the output at position C-1+i predicts patch scan[i] from the conditions and
patches before it only. The level hands down, for patch t, its own output and the outputs of
its top and left neighbours: in both scan orders those come earlier, so they have not seen t.
Right and bottom neighbours come later, would leak t, and are passed as zeros.
Sampling runs one token at a time over a preallocated KV cache (`prefill`, then `decode`).
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fractalmidi_jax import masking
from fractalmidi_jax.config import Config
from fractalmidi_jax.level import LevelTrunk, causal_mask


class ARLevel(nnx.Module):
    kind = "ar"
    handoff_neighbours = ("top", "left")

    def __init__(self, config: Config, level: int, rngs: nnx.Rngs):
        self.trunk = LevelTrunk(config, level, rngs)
        self.scan_order = config.scan_order

    def scan(self, num_tokens: int) -> np.ndarray:
        return self.trunk.grid(num_tokens // self.trunk.rows).scan_order(self.scan_order)

    def teacher_forced(self, cells_NxLxP, conds_NxCxE, col_offset_N=None, rng=None):
        """N x L x D outputs in grid order; output t has seen only the patches before t."""
        n, num_tokens, _ = cells_NxLxP.shape
        trunk = self.trunk
        cols = num_tokens // trunk.rows
        scan_L = self.scan(num_tokens)
        inputs = trunk.embed_patches(cells_NxLxP[:, scan_L[:-1]])
        inputs = inputs + trunk.positions(jnp.asarray(scan_L[:-1]), cols, col_offset_N)
        x = jnp.concatenate([trunk.cond_tokens(conds_NxCxE, n), inputs], axis=1)
        h, _ = trunk.transformer(x, mask=causal_mask(x.shape[1]), rng=rng)
        h_scan = h[:, trunk.num_conds - 1 :]
        return h_scan[:, np.argsort(scan_L)]

    def train(self, cells_NxLxP, conds_NxCxE, count_N, budget, num_out, col_offset_N, order_rng, dropout_rng):
        """Every patch is predicted (count_N = L); a random budget of them hands down."""
        n, num_tokens, _ = cells_NxLxP.shape
        h_NxLxD = self.teacher_forced(cells_NxLxP, conds_NxCxE, col_offset_N, dropout_rng)
        index_NxK = masking.random_orders(order_rng, n, num_tokens)[:, :budget]
        grid = self.trunk.grid(num_tokens // self.trunk.rows)
        conds = self.trunk.handoff(h_NxLxD, index_NxK, grid, self.handoff_neighbours, num_out)
        return index_NxK, masking.budget_weights(count_N, budget), conds

    def cache_length(self, num_tokens: int) -> int:
        return self.trunk.num_conds + num_tokens - 1

    def prefill(self, conds_NxCxE, num_sequences: int, num_tokens: int):
        """Runs the condition tokens; returns (output predicting scan[0], KV caches)."""
        trunk = self.trunk
        length = self.cache_length(num_tokens)
        caches = trunk.transformer.empty_caches(num_sequences, length, trunk.dtype)
        mask = np.arange(trunk.num_conds)[:, None] >= np.arange(length)[None, :]
        h, caches = trunk.transformer(trunk.cond_tokens(conds_NxCxE, num_sequences), mask, caches, 0)
        return h[:, -1], caches

    def decode(self, caches, cells_NxP, step, grid_index, num_tokens: int):
        """Feeds patch scan[step-1] (at grid index `grid_index`); returns (output predicting
        scan[step], caches). `step` may be traced."""
        trunk = self.trunk
        token = trunk.embed_patches(cells_NxP[:, None])
        token = token + trunk.positions(jnp.reshape(grid_index, (1,)), num_tokens // trunk.rows)
        position = trunk.num_conds - 1 + step
        mask = (jnp.arange(self.cache_length(num_tokens)) <= position)[None, :]
        h, caches = trunk.transformer(token, mask, caches, position)
        return h[:, 0], caches
