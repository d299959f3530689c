"""The cell head: the last level, one cell. From its parent's "middle" output it gives logits
over the cell's tokens (roll.py): 129 for a note roll (silence, the 127 onset velocities,
sustain), 128 for a velocity roll (the MIDI velocities 0..127, 0 = silence).

It is a transformer over a single token (the original runs a causal transformer whose
prediction position sees only itself), so attention reduces to its value/output projections;
logits are tied to a learned token codebook, computed in float32.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax.config import Config
from fractalmidi_jax.layers import Transformer, dense, embedding_init


class Sampling(NamedTuple):
    """How the head draws a cell's token: the logits divided by `temperature`, then (min-p) every
    token less likely than `min_p` times the likeliest one dropped (0: none). An undertrained model
    gives each silent cell a little probability of a note; over thousands of cells some are drawn,
    stray single notes far from the music, and min-p removes them. Two traced scalars: changing
    them never recompiles the sampler."""

    temperature: jax.Array
    min_p: jax.Array

    @classmethod
    def of(cls, config: Config, temperature: float | None = None, min_p: float | None = None) -> "Sampling":
        """The model's choices (its config), overridden where given."""
        return cls(
            jnp.float32(config.temperature if temperature is None else temperature),
            jnp.float32(config.min_p if min_p is None else min_p),
        )


def draw(logits_NxV, rng, sampling: Sampling):
    """One token per row of the logits under `sampling`."""
    logits_NxV = logits_NxV / jnp.maximum(sampling.temperature, 1e-6)
    floor_Nx1 = jnp.max(logits_NxV, axis=-1, keepdims=True) + jnp.log(sampling.min_p)
    return jax.random.categorical(rng, jnp.where(logits_NxV >= floor_Nx1, logits_NxV, -jnp.inf)).astype(
        jnp.int32
    )


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

    def sample(self, cond_NxE, rng, sampling: Sampling, guide=None):
        """One token per cell; `guide` (the sampler's classifier-free guidance) maps the logits first."""
        logits = self.logits(cond_NxE) if guide is None else guide(self.logits(cond_NxE))
        return draw(logits, rng, sampling)
