"""Tests of fractalmidi_jax.sampler: the AR KV cache, filling every cell, reproducibility without
recompiles, and generation conditioned on known cells (continuation and inpainting)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import TINY, empty_bias, tiny

from fractalmidi_jax import masking
from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax import sampler as sampler_lib
from fractalmidi_jax.ar import ARLevel
from fractalmidi_jax.fractal import build_model, fractal_loss
from fractalmidi_jax.head import Sampling

NUM_ITER = (2, 2, 2, 1)
BATCH, WIDTH = 2, 32
ONE = Sampling(jnp.float32(1.0), jnp.float32(0.0))  # temperature 1, no min-p
NUM_CLASSES = roll_lib.num_classes(TINY.roll)


@functools.lru_cache
def sampler_for(config, num_iter=NUM_ITER):
    """(run, params) of a tiny model, one jitted sampler per config shared by the tests. Attention
    outputs and the head's codebook are amplified, so that what a level sees visibly changes the
    velocities drawn (at initialisation a changed prompt alters only a few cells in ten thousand)."""
    model = build_model(config)
    for level in model.levels:
        attn = level.trunk.transformer.blocks.attn
        attn.proj.kernel[...] = attn.proj.kernel[...] * 10
    model.head.codebook[...] = model.head.codebook[...] * 30
    return sampler_lib.make_sampler(config, num_iter), nnx.split(model)[1]


def with_empty_bias(params, config, logit):
    """The same parameters with every skipping level saying `logit` for every patch (> 0: empty)."""
    model = nnx.merge(nnx.graphdef(build_model(config)), jax.tree.map(lambda x: x, params))
    return nnx.state(empty_bias(model, logit))


def with_head_bias(params, bias):
    """The same parameters with the head's bias replaced."""
    params = jax.tree.map(lambda x: x, params)
    params["head"]["bias"] = nnx.Param(jnp.asarray(bias, jnp.float32))
    return params


def prompt_inputs(seed, steps=16):
    """Known cells: a random prompt in the first `steps` steps (silent cells included), nothing after."""
    rs = np.random.default_rng(seed)
    cells = np.zeros((BATCH, 128, WIDTH), np.uint8)
    prompt = np.where(rs.random((BATCH, 128, steps)) < 0.1, rs.integers(1, 128, (BATCH, 128, steps)), 0)
    cells[:, :, :steps] = prompt
    known = np.zeros((BATCH, 128, WIDTH), bool)
    known[:, :, :steps] = True
    return cells, known


# --- the AR KV cache ---


@pytest.mark.parametrize(
    "scan_order, level, partial_known",
    [(o, k, False) for o in ("row_major", "column_major") for k in (0, 1)] + [("row_major", 1, True)],
)
def test_ar_cached_decoding_matches_teacher_forcing(scan_order, level, partial_known):
    """Prefill, then decode one patch at a time (feeding the true patches in scan order) over the KV
    cache gives the outputs of teacher forcing on the whole sequence; with partial_known also when
    each step shows the known cells of the patch it predicts."""
    config = tiny(
        generator_types=("ar", "ar", "ar"),
        scan_order=scan_order,
        border_context=False,
        partial_known=partial_known,
    )
    ar = ARLevel(config, level, nnx.Rngs(params=level))
    rs = np.random.default_rng(level)
    if level == 0:
        num_tokens, cells_per_token, conds = 24, 256, None  # 8 pitch bands x 3 bars
    else:
        num_tokens, cells_per_token = 16, 16
        conds = jnp.asarray(rs.normal(size=(2, 5, 32)), jnp.float32)
    cells = jnp.asarray(rs.integers(0, 128, (2, num_tokens, cells_per_token)), jnp.int32)
    known = jnp.asarray(rs.random(cells.shape) < 0.5)
    graphdef, params = nnx.split(ar)
    scan = ar.scan(num_tokens)
    scan_j = jnp.asarray(scan)

    def shown(level, i):
        """The known cells of scan[i], as the step predicting it shows them (partial_known)."""
        if not partial_known:
            return None
        return level.trunk.embed_known(cells[:, scan_j[i]][:, None], known[:, scan_j[i]][:, None])[:, 0]

    @jax.jit
    def forced(params):
        return nnx.merge(graphdef, params).teacher_forced(cells, conds, known_NxLxP=known)

    @jax.jit
    def prefill(params):
        level = nnx.merge(graphdef, params)
        return level.prefill(conds, None, 2, num_tokens, shown(level, 0))

    @jax.jit
    def decode(params, caches, i):
        level = nnx.merge(graphdef, params)
        fed = scan_j[i - 1]
        return level.decode(caches, cells[:, fed], i, fed, num_tokens, shown_NxD=shown(level, i))

    h, caches = prefill(params)
    cached = [None] * num_tokens
    cached[scan[0]] = h
    for i in range(1, num_tokens):
        h, caches = decode(params, caches, i)
        cached[scan[i]] = h
    np.testing.assert_allclose(np.stack(cached, axis=1), forced(params), rtol=1e-4, atol=1e-5)


# --- the sampler's conditionals are the loss's ---


class ScoringSampler(sampler_lib._Sampler):
    """A sampler whose head scores the known cell it is handed instead of drawing one: run on a
    canvas that is all known, it adds up log p(cell | what the sampler showed the model)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.log_likelihood = []

    def children(self, k, conds_NxKxOxD, cells_NxKxP, known_NxKxP, borders, rng):
        if k < self.config.num_levels - 1:
            return super().children(k, conds_NxKxOxD, cells_NxKxP, known_NxKxP, borders, rng)
        logits = self.model.head.logits(conds_NxKxOxD.reshape((-1,) + conds_NxKxOxD.shape[2:])[:, 0])
        cells_N = cells_NxKxP.reshape(-1)
        scores = jnp.take_along_axis(jax.nn.log_softmax(logits), cells_N[:, None], axis=1)
        jax.debug.callback(lambda total: self.log_likelihood.append(float(total)), jnp.sum(scores))
        return cells_NxKxP


@pytest.mark.parametrize(
    "types", [("column", "column", "ar"), ("ar", "column", "column"), ("ar", "ar", "ar")], ids="/".join
)
def test_sampler_conditionals_equal_the_loss(types):
    """For levels that see their past whole (AR and column), the sampler's conditionals are the
    loss's: the log-likelihood of a roll summed through the sampler (every cell known, scored by the
    head where it would be drawn, border columns included) equals minus the loss times the cells
    reached, with every token handed down. A border, position or hand-off that differed between
    training and sampling would move it."""
    config = tiny(generator_types=types, token_budget=1.0, max_crop_length=WIDTH)
    model = build_model(config)
    model.head.codebook[...] = model.head.codebook[...] * 30  # conditions then move the scores
    rs = np.random.default_rng(0)
    tokens = rs.integers(1, NUM_CLASSES, (BATCH, 128, WIDTH))
    rolls = jnp.asarray(np.where(rs.random(tokens.shape) < 0.2, tokens, 0), jnp.int32)
    scoring = ScoringSampler(model, config, NUM_ITER, ONE, None, None)
    scoring.level(0, None, rolls, jnp.ones(rolls.shape, bool), None, jax.random.key(0))
    loss, stats = fractal_loss(model, config, {"roll": rolls}, jax.random.key(1), train=False)
    np.testing.assert_allclose(sum(scoring.log_likelihood), -loss * stats["reached_cells"], rtol=1e-5)


# --- unconditional sampling ---


def test_every_cell_gets_the_head_velocity():
    """With a head that can only say velocity 77, every cell of the output is 77: every cell was
    generated, none was left at the empty canvas."""
    run, params = sampler_for(TINY)
    bias = np.full(NUM_CLASSES, -1e4)
    bias[77] = 0.0
    cells, known = sampler_lib.unconditional_inputs(BATCH, WIDTH)
    rolls, _ = run(with_head_bias(params, bias), cells, known, jax.random.key(0), ONE)
    assert (np.asarray(rolls) == 77).all()


@pytest.mark.parametrize(
    "skip_empty, rounds, buckets",
    [(0, 2, 1), (1, 2, 1), (1, 4, 3)],
    ids=["exact_rounds", "one_scanned_shape", "three_shapes_of_four_rounds"],
)
def test_level0_rounds_fill_their_tokens_once(skip_empty, rounds, buckets):
    """Frames are the canvas after each level-0 round: one per round of the cosine schedule; round r
    fills exactly its scheduled number of 16 x 16 patches (the first frame has fewer filled cells than
    the last), and a cell once filled keeps its velocity to the end. The head never draws silence here.
    Skipping empty bars (none is said empty here), level 0 scans its rounds in shape buckets padded
    to their widest round (2 rounds of 5 and 11 bars in one; 4 rounds of 2, 3, 5, 6 in three: 2 + 1
    + 1): the padding is filled by no round, whatever the slots and their overflow passes (a
    capacity of 0.3, of the bucket's mean round)."""
    config = tiny(skip_empty=skip_empty, skip_empty_capacity=0.3, skip_empty_round_buckets=buckets)
    num_iter = (rounds,) + NUM_ITER[1:]
    run, params = sampler_for(config, num_iter)
    if skip_empty:
        params = with_empty_bias(params, config, -30.0)
    bias = np.zeros(NUM_CLASSES)
    bias[0] = -1e4
    cells, known = sampler_lib.unconditional_inputs(BATCH, WIDTH)
    rolls, frames = run(with_head_bias(params, bias), cells, known, jax.random.key(1), ONE)
    rolls, frames = np.asarray(rolls), np.asarray(frames)
    schedule = masking.cosine_schedule(8 * WIDTH // 16, rounds)
    assert frames.shape == (len(schedule), BATCH, 128, WIDTH)
    filled = (frames > 0).sum(axis=(2, 3))  # rounds x batch
    np.testing.assert_array_equal(filled, np.repeat(np.cumsum(schedule)[:, None] * 256, BATCH, axis=1))
    assert (filled[0] < filled[-1]).all()
    np.testing.assert_array_equal(frames[-1], rolls)
    for frame in frames:
        np.testing.assert_array_equal(frame[frame > 0], rolls[frame > 0])


@pytest.mark.parametrize("width", [16, 48])
def test_ar_level0_frames_end_on_the_final_canvas(width):
    """An AR level 0 gives min(L0, 16) frames spread over its scan, filling more and more, the last
    equal to the result (also when L0 is not a multiple of 16: 8 and 24 tokens here)."""
    config = tiny(generator_types=("ar", "mar", "mar"), crop_length=width)
    run, params = sampler_for(config)
    bias = np.zeros(NUM_CLASSES)
    bias[0] = -1e4
    cells, known = sampler_lib.unconditional_inputs(1, width)
    rolls, frames = run(with_head_bias(params, bias), cells, known, jax.random.key(2), ONE)
    rolls, frames = np.asarray(rolls), np.asarray(frames)
    num_tokens = 8 * width // 16
    assert frames.shape[0] == min(num_tokens, 16)
    filled = (frames > 0).sum(axis=(1, 2, 3))
    assert (np.diff(filled) > 0).all()
    np.testing.assert_array_equal(frames[-1], rolls)


def test_sampling_is_reproducible_without_recompiling():
    """The same key gives identical rolls, another key other rolls, and calls with the same shapes reuse
    one compiled program."""
    run, params = sampler_for(TINY)
    cells, known = sampler_lib.unconditional_inputs(BATCH, WIDTH)
    first, _ = run(params, cells, known, jax.random.key(2), ONE)
    compiled = run._cache_size()
    again, _ = run(params, cells, known, jax.random.key(2), ONE)
    other, _ = run(params, cells, known, jax.random.key(3), Sampling(jnp.float32(0.5), jnp.float32(0.0)))
    np.testing.assert_array_equal(first, again)
    assert (np.asarray(first) != np.asarray(other)).mean() > 0.5
    assert run._cache_size() == compiled


# --- conditioning ---


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        TINY.replace(generator_types=("ar", "mar", "ar"), scan_order="column_major"),
        TINY.replace(generator_types=("mar", "column", "column")),
        TINY.replace(generator_types=("mar", "column", "column"), skip_empty=1),
    ],
    ids=["mar_level0", "ar_column_major_level0", "column_levels", "default_skipping_bars"],
)
def test_continuation_keeps_the_prompt_and_depends_on_it(config):
    """The first 16 steps (known) come back bit-identical, silent cells included; with the same key, two
    different prompts give different continuations, so the model reads the prompt rather than pasting
    it over an unconditional sample."""
    run, params = sampler_for(config.validate())
    key = jax.random.key(4)
    cells_a, known = prompt_inputs(5)
    cells_b, _ = prompt_inputs(6)
    rolls_a, _ = run(params, cells_a, known, key, ONE)
    rolls_b, _ = run(params, cells_b, known, key, ONE)
    rolls_a, rolls_b = np.asarray(rolls_a), np.asarray(rolls_b)
    np.testing.assert_array_equal(rolls_a[:, :, :16], cells_a[:, :, :16])
    np.testing.assert_array_equal(rolls_b[:, :, :16], cells_b[:, :, :16])
    assert (rolls_a[:, :, 16:] != rolls_b[:, :, 16:]).any(axis=(1, 2)).all()


def test_mar_first_round_reads_the_prompt():
    """MAR level 0: known tokens are visible from the first round, so with the same key (hence the same
    tokens generated first) the continuation cells of the first frame already differ between prompts."""
    run, params = sampler_for(TINY)
    key = jax.random.key(4)
    cells_a, known = prompt_inputs(5)
    cells_b, _ = prompt_inputs(6)
    first_a = np.asarray(run(params, cells_a, known, key, ONE)[1][0])
    first_b = np.asarray(run(params, cells_b, known, key, ONE)[1][0])
    assert (first_a[:, :, 16:] != first_b[:, :, 16:]).any(axis=(1, 2)).all()


@pytest.mark.parametrize("partial_known", [False, True])
def test_first_round_reads_a_prompt_that_ends_inside_a_bar(partial_known):
    """Mixed MAR / AR levels: an 8-step prompt leaves level 0's first bar partly known. With the same key (the same tokens
    drawn first), the second bar's patches drawn in round one differ between two prompts with
    partial_known, and are identical without it (a partly known bar is unseen until generated); the
    prompt comes back bit-identical either way."""
    run, params = sampler_for(tiny(generator_types=("mar", "ar", "ar"), partial_known=partial_known))
    key = jax.random.key(4)
    first_frames = []
    for seed in (5, 6):
        cells, known = prompt_inputs(seed, steps=8)
        rolls, frames = run(params, cells, known, key, ONE)
        np.testing.assert_array_equal(np.asarray(rolls)[:, :, :8], cells[:, :, :8])
        first_frames.append(np.asarray(frames[0]))
    second_bar_differs = (first_frames[0][:, :, 16:] != first_frames[1][:, :, 16:]).any(axis=(1, 2))
    np.testing.assert_array_equal(second_bar_differs, [partial_known] * BATCH)


@pytest.mark.parametrize("partial_known", [False, True])
def test_inpainting_changes_only_the_region_and_reads_its_surroundings(partial_known):
    """Mixed MAR / AR levels: cells outside the region (which cuts through patches at every level) come
    back bit-identical; the region is generated: with the same key, a level-0 patch that lies wholly
    inside it differs between two different surroundings (level 0 reads them rather than the sampler
    pasting them over an unconditional sample)."""
    config = tiny(generator_types=("mar", "ar", "ar"), partial_known=partial_known)
    run, params = sampler_for(config)
    region = np.zeros((BATCH, 128, WIDTH), bool)
    region[:, 41:80, 5:32] = True  # holds the level-0 patch of pitches 48..63, steps 16..31
    rs = np.random.default_rng(7)
    inner_patch = []
    for _ in range(2):
        cells = np.where(rs.random(region.shape) < 0.2, rs.integers(1, 128, region.shape), 0)
        cells = np.where(region, 0, cells).astype(np.uint8)
        rolls = np.asarray(run(params, cells, ~region, jax.random.key(8), ONE)[0])
        np.testing.assert_array_equal(rolls[~region], cells[~region])
        inner_patch.append(rolls[:, 48:64, 16:32])
    assert (inner_patch[0] != inner_patch[1]).any(axis=(1, 2)).all()
