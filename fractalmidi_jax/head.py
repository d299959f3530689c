"""The velocity head: the last level, one cell. From its parent's "middle" output it gives
logits over the 128 MIDI velocities 0..127 (0 = silence).

It is a transformer over a single token (the original runs a causal transformer whose
prediction position sees only itself), so attention reduces to its value/output projections;
logits are tied to a learned velocity codebook, computed in float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from fractalmidi_jax.config import Config
from fractalmidi_jax.layers import Transformer, dense, embedding_init

NUM_VELOCITIES = 128


class VelocityHead(nnx.Module):
    kind = "head"

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
        self.codebook = nnx.Param(embedding_init(rngs.params(), (NUM_VELOCITIES, width)))
        self.bias = nnx.Param(jnp.zeros((NUM_VELOCITIES,)))

    def logits(self, cond_NxE):
        """N x 128 float32 logits."""
        x, _ = self.transformer(self.cond_proj(cond_NxE)[:, None, :])
        return jnp.dot(x[:, 0].astype(jnp.float32), self.codebook[...].T) + self.bias[...]

    def sample(self, cond_NxE, rng, temperature: float):
        logits = self.logits(cond_NxE)
        return jax.random.categorical(rng, logits / jnp.maximum(temperature, 1e-6)).astype(jnp.int32)
