"""Pure functions of masking: how many tokens a level hides, in which order, and how a fixed
token budget keeps the loss unbiased.

Why budgets: XLA compiles one program per shape, but a MAR level hides a random number n of
its L tokens. Each sequence therefore passes down a fixed number K of tokens: the first
min(n, K) hidden tokens of its random order (a uniform random subset of the hidden ones),
each weighted n / min(n, K) (a Horvitz-Thompson weight), and K - min(n, K) empty slots of
weight 0. The weighted sum of per-cell losses is then an unbiased estimate of the sum over all
cells the original model reaches, with one compiled shape for the whole run.

Known regions (`partial_known`): users give a prompt that may end inside a bar, or a region to
inpaint inside pitch bounds, so in training a share of the samples is given a region of that
kind to write and is told every cell outside it (`train_known_cells`).
"""

import math

import jax
import jax.numpy as jnp

from fractalmidi_jax.config import mean_mask_ratio

KNOWN_REGION_SHARE = 0.5  # training samples (partial_known) that are given a known region


def train_mask_counts(rng, shape, num_tokens: int, loc: float, scale: float):
    """Hidden tokens per sequence: ceil(L * r), r ~ normal(loc, scale) cut to [loc - 4 scale, loc];
    at least one token, so every sequence trains something."""
    ratio = loc + scale * jax.random.truncated_normal(rng, -4.0, 0.0, shape)
    return jnp.clip(jnp.ceil(num_tokens * ratio), 1, num_tokens).astype(jnp.int32)


def eval_mask_counts(rng, shape, num_tokens: int):
    """Uniform 1..L hidden tokens: the NLL estimator of the original's validation."""
    return jax.random.randint(rng, shape, 1, num_tokens + 1, dtype=jnp.int32)


def train_known_cells(rng, batch: int, height: int, width: int):
    """B x H x W bool, the cells a training sample is given: for KNOWN_REGION_SHARE of the samples
    everything outside a region to write, [start, end) x [low, high], with start uniform over the
    steps, end the roll's end (a continuation) or uniform after start (an inpainting span) with
    equal chances, and the region all pitches or a random pitch band with equal chances; the
    other samples are given nothing."""
    rng_given, rng_start, rng_open, rng_end, rng_full, rng_band = jax.random.split(rng, 6)
    given_B = jax.random.bernoulli(rng_given, KNOWN_REGION_SHARE, (batch,))
    start_B = jax.random.randint(rng_start, (batch,), 0, width)
    span_end_B = jax.random.randint(rng_end, (batch,), start_B + 1, width + 1)
    end_B = jnp.where(jax.random.bernoulli(rng_open, 0.5, (batch,)), width, span_end_B)
    band_Bx2 = jnp.sort(jax.random.randint(rng_band, (batch, 2), 0, height), axis=-1)
    all_pitches_B = jax.random.bernoulli(rng_full, 0.5, (batch,))
    low_B = jnp.where(all_pitches_B, 0, band_Bx2[:, 0])
    high_B = jnp.where(all_pitches_B, height - 1, band_Bx2[:, 1])
    step_W, pitch_H = jnp.arange(width), jnp.arange(height)
    in_span_BxW = (step_W >= start_B[:, None]) & (step_W < end_B[:, None])
    in_band_BxH = (pitch_H >= low_B[:, None]) & (pitch_H <= high_B[:, None])
    to_write_BxHxW = in_band_BxH[:, :, None] & in_span_BxW[:, None, :]
    return given_B[:, None, None] & ~to_write_BxHxW


def random_orders(rng, num_sequences: int, num_tokens: int):
    """order[n, j] = the token of rank j; the first `count` ranks are the hidden tokens."""
    return jnp.argsort(jax.random.uniform(rng, (num_sequences, num_tokens)), axis=-1).astype(jnp.int32)


def share(num_tokens: int, fraction: float) -> int:
    """ceil(fraction x L) slots: at least one, at most L."""
    return max(1, min(num_tokens, math.ceil(fraction * num_tokens)))


def token_budget(num_tokens: int, fraction: float, loc: float, scale: float) -> int:
    """Tokens passed down per sequence: `fraction` of L, or the mean mask ratio when 0."""
    return share(num_tokens, fraction or min(1.0, mean_mask_ratio(loc, scale)))


def budget_weights(count_N, budget: int):
    """Horvitz-Thompson weights of the K budget slots: count / min(count, K) where the slot
    holds a hidden token, 0 where it is empty (every slot, when count is 0)."""
    slots_K = jnp.arange(budget)
    kept_N = jnp.maximum(jnp.minimum(count_N, budget), 1)
    valid_NxK = slots_K[None, :] < count_N[:, None]
    return jnp.where(valid_NxK, (count_N / kept_N)[:, None], 0.0).astype(jnp.float32)


def cosine_schedule(num_tokens: int, num_iter: int) -> tuple[int, ...]:
    """Tokens generated in each MAR round (static): after round r, floor(L cos(pi/2 (r+1)/R))
    stay hidden (at least one until the last round), as in MAR/fractalgen."""
    num_iter = max(1, min(num_iter, num_tokens))
    remaining, counts = num_tokens, []
    for step in range(num_iter):
        if step == num_iter - 1:
            keep_hidden = 0
        else:
            keep_hidden = math.floor(num_tokens * math.cos(math.pi / 2 * (step + 1) / num_iter))
            keep_hidden = max(1, min(remaining - 1, keep_hidden))
        counts.append(remaining - keep_hidden)
        remaining = keep_hidden
    return tuple(c for c in counts if c > 0)
