"""Tests of fractalmidi_jax.masking: the laws of the mask counts, random orders, the budget weights
and the cosine schedule of the MAR rounds."""

import math

import jax
import numpy as np
import pytest

from fractalmidi_jax import masking
from fractalmidi_jax.config import mean_mask_ratio

LOC, SCALE = 1.0, 0.5
DRAWS = 200_000


def ratio_cdf(r):
    """P(ratio <= r) for ratio = LOC + SCALE * Z, Z ~ N(0, 1) cut to [-4, 0]."""
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    z = min(max((r - LOC) / SCALE, -4.0), 0.0)
    return (phi(z) - phi(-4.0)) / (phi(0.0) - phi(-4.0))


def train_count_pmf(num_tokens):
    """Exact law of clip(ceil(L * ratio), 1, L): pmf[k - 1] = P(count = k)."""
    edges = [ratio_cdf(k / num_tokens) for k in range(1, num_tokens)]
    cdf = np.array(edges + [1.0])
    return np.diff(cdf, prepend=0.0)


def assert_frequencies(counts, pmf):
    """Every value's frequency lies within 5 standard errors of its probability."""
    n = counts.size
    freq = np.bincount(counts.reshape(-1) - 1, minlength=len(pmf)) / n
    se = np.sqrt(pmf * (1 - pmf) / n) + 1e-12
    assert np.all(np.abs(freq - pmf) <= 5 * se + 1e-9), np.abs(freq - pmf) / se


@pytest.mark.parametrize("num_tokens", [8, 256])
def test_train_mask_counts_follow_the_truncated_normal_law(num_tokens):
    """Counts lie in [1, L] and are distributed as clip(ceil(L * r), 1, L), r ~ N(1, 0.5) cut to [-1, 1]."""
    counts = np.asarray(masking.train_mask_counts(jax.random.key(0), (DRAWS,), num_tokens, LOC, SCALE))
    assert counts.min() >= 1 and counts.max() <= num_tokens
    pmf = train_count_pmf(num_tokens)
    assert_frequencies(counts, pmf)
    mean = np.dot(np.arange(1, num_tokens + 1), pmf)
    sd = math.sqrt(np.dot((np.arange(1, num_tokens + 1) - mean) ** 2, pmf))
    assert abs(counts.mean() - mean) < 4 * sd / math.sqrt(DRAWS)


def test_mean_hidden_fraction_is_the_mean_mask_ratio():
    """mean_mask_ratio(1, 0.5) is the mean of the cut normal (about 0.60), and the hidden fraction of a
    long sequence matches it, up to the one-token floor for ratios <= 0 (4.5% of draws, +0.008)."""
    grid = np.linspace(-4.0, 0.0, 400_001)[:-1] + 0.5e-5  # midpoints
    density = np.exp(-0.5 * grid**2)
    ratios = LOC + SCALE * grid
    assert mean_mask_ratio(LOC, SCALE) == pytest.approx(np.sum(ratios * density) / np.sum(density), abs=1e-6)
    assert mean_mask_ratio(LOC, SCALE) == pytest.approx(0.6012, abs=1e-4)
    floor = np.sum(np.maximum(-ratios, 0.0) * density) / np.sum(density)
    num_tokens = 4096
    counts = np.asarray(masking.train_mask_counts(jax.random.key(1), (DRAWS,), num_tokens, LOC, SCALE))
    fraction = counts / num_tokens
    expected = mean_mask_ratio(LOC, SCALE) + floor + 0.5 / num_tokens
    assert abs(fraction.mean() - expected) < 4 * fraction.std() / math.sqrt(DRAWS)
    assert abs(fraction.mean() - 0.60) < 0.015


def test_eval_mask_counts_are_uniform():
    """The NLL estimator hides 1..L tokens, each count equally likely (mean (L + 1) / 2)."""
    num_tokens = 16
    counts = np.asarray(masking.eval_mask_counts(jax.random.key(2), (DRAWS,), num_tokens))
    assert counts.min() == 1 and counts.max() == num_tokens
    assert_frequencies(counts, np.full(num_tokens, 1 / num_tokens))
    sd = math.sqrt((num_tokens**2 - 1) / 12)
    assert abs(counts.mean() - (num_tokens + 1) / 2) < 4 * sd / math.sqrt(DRAWS)


def test_random_orders_are_uniform_permutations():
    """Each row is a permutation of 0..L-1, and every token is equally likely to come first or last."""
    num_sequences, num_tokens = 40_000, 8
    orders = np.asarray(masking.random_orders(jax.random.key(3), num_sequences, num_tokens))
    assert orders.shape == (num_sequences, num_tokens)
    assert (np.sort(orders, axis=1) == np.arange(num_tokens)).all()
    uniform = np.full(num_tokens, 1 / num_tokens)
    assert_frequencies(orders[:, 0] + 1, uniform)
    assert_frequencies(orders[:, -1] + 1, uniform)


def test_budget_weights():
    """A slot holding a hidden token weighs count / min(count, K); empty slots weigh 0."""
    counts = np.array([1, 3, 4, 5, 16])
    weights = np.asarray(masking.budget_weights(counts, 4))
    expected = np.array(
        [
            [1, 0, 0, 0],
            [1, 1, 1, 0],
            [1, 1, 1, 1],
            [5 / 4] * 4,
            [16 / 4] * 4,
        ],
        np.float32,
    )
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


@pytest.mark.parametrize("num_tokens, num_iter", [(256, 12), (16, 8), (16, 4), (8, 2)])
def test_cosine_schedule(num_tokens, num_iter):
    """R positive rounds summing to L; after round r, floor(L cos(pi/2 (r+1)/R)) tokens stay hidden,
    so early rounds generate fewer tokens than late ones."""
    counts = masking.cosine_schedule(num_tokens, num_iter)
    assert len(counts) == num_iter and sum(counts) == num_tokens
    assert all(c > 0 for c in counts)
    assert counts[0] < counts[-1]
    hidden = num_tokens - np.cumsum(counts)
    for r in range(num_iter - 1):
        assert hidden[r] == math.floor(num_tokens * math.cos(math.pi / 2 * (r + 1) / num_iter))


@pytest.mark.parametrize("num_tokens, num_iter", [(4, 12), (16, 100), (1, 3)])
def test_cosine_schedule_with_more_rounds_than_tokens(num_tokens, num_iter):
    """More rounds than tokens: one token per round, L rounds, nothing lost or duplicated."""
    assert masking.cosine_schedule(num_tokens, num_iter) == (1,) * num_tokens


def test_train_known_cells_are_prompts_and_inpainting_surroundings():
    """About half the samples are given nothing; every other one is given all but one rectangle of
    steps x pitches, as continuation and inpainting give: a region to the roll's end about half the
    time, all pitches about half the time, regions starting at every step."""
    batch, height, width = 4000, 128, 32
    known = np.asarray(masking.train_known_cells(jax.random.key(0), batch, height, width))
    given = known.any(axis=(1, 2))
    assert abs(given.mean() - masking.KNOWN_REGION_SHARE) < 0.03
    to_write = ~known[given]
    steps, pitches = to_write.any(axis=1), to_write.any(axis=2)  # samples x W, samples x H
    rectangle = pitches[:, :, None] & steps[:, None, :]
    np.testing.assert_array_equal(to_write, rectangle)
    for spans in (steps, pitches):  # one run of steps, one band of pitches
        assert (np.diff(spans.astype(np.int8), axis=1) == 1).sum(axis=1).max() <= 1
        assert (np.diff(spans.astype(np.int8), axis=1) == -1).sum(axis=1).max() <= 1
    to_the_end = 0.5 + 0.5 * np.mean(1 / (width - np.arange(width)))  # a span may end there too
    assert abs(steps[:, -1].mean() - to_the_end) < 0.04
    assert abs(pitches.all(axis=1).mean() - 0.5) < 0.04
    assert set(np.argmax(steps, axis=1)) == set(range(width))
