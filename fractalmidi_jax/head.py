"""The cell head: the last level, one cell. From its parent's "middle" output it gives logits
over the cell's tokens (roll.py): 129 for a note roll (silence, the 127 onset velocities,
sustain), 128 for a velocity roll (the MIDI velocities 0..127, 0 = silence).

It is a transformer over a single token (the original runs a causal transformer whose
prediction position sees only itself), so attention reduces to its value/output projections;
logits are tied to a learned token codebook, computed in float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax.config import Config
from fractalmidi_jax.layers import Transformer, dense, embedding_init


class CellHead(nnx.Module):
    def __init__(self, config: Config, rngs: nnx.Rngs):
        width = config.embed_dim_list[-1]
        self.dtype = config.compute_dtype()
        self.cond_proj = dense(config.embed_dim_list[-2], width, self.dtype, rngs)
        self.transformer = Transformer(
            width,
            config.num_blocks_list[-1],
            config.num_heads_list[-1],
            0.0,
            0.0,
            self.dtype,
            rngs,
        )
        num_classes = roll_lib.num_classes(config.roll)
        self.codebook = nnx.Param(embedding_init(rngs.params(), (num_classes, width)))
        self.bias = nnx.Param(jnp.zeros((num_classes,)))

    def logits(self, cond_NxE):
        """N x V float32 logits over the cell tokens."""
        x, _ = self.transformer(self.cond_proj(cond_NxE)[:, None, :])
        return jnp.dot(x[:, 0].astype(jnp.float32), self.codebook[...].T) + self.bias[...]

    def sample(self, cond_NxE, rng, temperature: float, guide=None):
        """One token per cell; `guide` (the sampler's classifier-free guidance) maps the logits first."""
        logits = self.logits(cond_NxE) if guide is None else guide(self.logits(cond_NxE))
        return jax.random.categorical(rng, logits / jnp.maximum(temperature, 1e-6)).astype(jnp.int32)
