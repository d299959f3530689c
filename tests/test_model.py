"""Tests of the model (fractalmidi_jax.fractal and its levels): the loss at initialisation, padding, AR
causality, MAR masking, the unbiasedness of the budgeted loss, positions for wide rolls, mixed
precision, rematerialisation and the size of the shipped model."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny import TINY, empty_bias, tiny

from fractalmidi_jax import masking, sparse
from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax import sampler as sampler_lib
from fractalmidi_jax.ar import ARLevel
from fractalmidi_jax.config import Config, ConfigError
from fractalmidi_jax.fractal import budgets, build_model, count_params, fractal_loss, tokens_per_level
from fractalmidi_jax.head import Sampling, draw
from fractalmidi_jax.mar import MARLevel

NUM_CLASSES = roll_lib.num_classes(TINY.roll)
LOG_CLASSES = math.log(NUM_CLASSES)


def random_roll(seed, batch, width, density=0.05):
    """uint8 rolls with about `density` of the cells sounding at random velocities."""
    rs = np.random.default_rng(seed)
    velocity = rs.integers(1, 128, (batch, 128, width))
    return np.where(rs.random((batch, 128, width)) < density, velocity, 0).astype(np.uint8)


def keys(count, seed=0):
    return jax.random.split(jax.random.key(seed), count)


@functools.lru_cache
def losses_fn(graphdef, config, train=True):
    """Jitted (params, roll, keys) -> (loss, reached cells) for each key; cached, so tests of one model
    and shape share a compile."""

    @jax.jit
    def losses(params, roll, keys_K):
        model = nnx.merge(graphdef, params)
        loss, stats = jax.vmap(lambda key: fractal_loss(model, config, {"roll": roll}, key, train))(keys_K)
        return loss, stats["reached_cells"]

    return losses


# --- the loss at initialisation and padding ---


@pytest.mark.parametrize(
    "types, scan_order, width",
    [
        (("mar", "mar", "mar"), "row_major", 20),
        (("mar", "mar", "mar"), "row_major", 32),
        (("ar", "ar", "ar"), "row_major", 32),
        (("ar", "ar", "ar"), "column_major", 20),
        (("mar", "ar", "ar"), "column_major", 32),
        (("ar", "mar", "mar"), "row_major", 16),
        (("mar", "column", "column"), "row_major", 20),
        (("column", "column", "ar"), "row_major", 32),
    ],
)
def test_loss_at_init_is_log_classes_per_reached_cell(types, scan_order, width):
    """At initialisation every cell costs about log(number of cell classes) nats, so a correctly weighted and normalised loss
    (a finite float32 scalar per key) averages to log(128) over keys for every generator type, scan
    order and width, including a width that is not a multiple of the level-0 patch. The budget is
    the uniform mean-ratio one, whose spread over 64 keys the tolerance allows for (the default
    stratified budget is checked against the exact loss in test_stratified_budget_keeps_the_loss_unbiased)."""
    config = tiny(generator_types=types, scan_order=scan_order, token_budget=0.0, empty_budget=0.0)
    graphdef, params = nnx.split(build_model(config))
    losses, _ = losses_fn(graphdef, config)(params, random_roll(0, 2, width), keys(64))
    assert losses.shape == (64,) and losses.dtype == jnp.float32
    losses = np.asarray(losses)
    assert np.isfinite(losses).all()
    assert abs(losses.mean() - LOG_CLASSES) < 0.15, losses.mean()


def test_padding_is_not_scored():
    """A roll 20 steps wide is padded to 32 inside the loss; the padded cells are neither scored nor
    counted. With a head whose loss depends on the target only (log(V - 1) for a note, 30 + log(V - 1)
    for silence, V classes), an all-note 20-step roll costs log(V - 1) per cell, while the same notes followed by 12
    silent steps cost far more; and the reached count is the 32-wide one scaled by 20 / 32."""
    config = tiny()
    model = build_model(config)
    model.head.codebook[...] = jnp.zeros_like(model.head.codebook[...])
    model.head.bias[...] = jnp.zeros((NUM_CLASSES,)).at[0].set(-30.0)
    graphdef, params = nnx.split(model)
    losses = losses_fn(graphdef, config)
    notes20 = np.full((2, 128, 20), 100, np.uint8)
    silent_tail = np.concatenate([notes20, np.zeros((2, 128, 12), np.uint8)], axis=2)
    loss20, reached20 = losses(params, notes20, keys(64))
    loss32, reached32 = losses(params, silent_tail, keys(64))
    note_cost, silence_cost = math.log(NUM_CLASSES - 1), 30 + math.log(NUM_CLASSES - 1)
    assert abs(np.mean(loss20) - note_cost) < 0.15, np.mean(loss20)
    assert abs(np.mean(loss32) - (20 * note_cost + 12 * silence_cost) / 32) < 1.0, np.mean(loss32)
    np.testing.assert_allclose(reached20, reached32 * 20 / 32, rtol=1e-6)


# --- AR causality ---

AR_WIDTH = 48  # level 0: 8 pitch bands x 3 bars, so the two scan orders differ


@functools.lru_cache
def ar_case(scan_order, level):
    """(graphdef, params, cells, conds, scan) of an AR level with random inputs."""
    config = tiny(generator_types=("ar", "ar", "ar"), scan_order=scan_order, border_context=False)
    ar = ARLevel(config, level, nnx.Rngs(params=level))
    rs = np.random.default_rng(level)
    if level == 0:
        num_tokens, cells_per_token, conds = 8 * AR_WIDTH // 16, 256, None
    else:
        num_tokens, cells_per_token = 16, 16
        conds = jnp.asarray(rs.normal(size=(2, 5, config.embed_dim_list[level - 1])), jnp.float32)
    cells = rs.integers(0, 128, (2, num_tokens, cells_per_token)).astype(np.int32)
    graphdef, params = nnx.split(ar)
    return graphdef, params, cells, conds, ar.scan(num_tokens)


@functools.partial(jax.jit, static_argnums=0)
def ar_outputs_and_handoff(graphdef, params, cells, conds):
    level = nnx.merge(graphdef, params)
    h = level.teacher_forced(cells, conds)
    n, num_tokens = cells.shape[:2]
    index = jnp.broadcast_to(jnp.arange(num_tokens), (n, num_tokens))
    grid = level.trunk.grid(num_tokens // level.trunk.rows)
    return h, level.trunk.handoff(h, index, grid, level.handoff_neighbours, 5)


@functools.lru_cache
def ar_perturbations(scan_order, level):
    """changed[j, i] for outputs and for handed-down conditions: does changing the patch at scan position
    j change anything of the token at scan position i?"""
    graphdef, params, cells, conds, scan = ar_case(scan_order, level)
    num_tokens = len(scan)
    rs = np.random.default_rng(7)
    variants = np.repeat(cells[None], num_tokens + 1, axis=0)  # variant 0 is the original
    for j, t in enumerate(scan):
        variants[j + 1, :, t] = (cells[:, t] + rs.integers(1, 128, cells[:, t].shape)) % 128
    outputs = jax.vmap(ar_outputs_and_handoff, in_axes=(None, None, 0, None))
    h, handoff = jax.device_get(outputs(graphdef, params, jnp.asarray(variants), conds))

    def changed(x):
        x = x[:, :, scan]  # variants x N x scan position x ...
        return (x[1:] != x[:1]).reshape(num_tokens, x.shape[1], num_tokens, -1).any(axis=(1, 3))

    return changed(h), changed(handoff)


AR_CASES = [(order, level) for order in ("row_major", "column_major") for level in (0, 1)]


@pytest.mark.parametrize("scan_order, level", AR_CASES)
def test_ar_output_sees_only_earlier_patches(scan_order, level):
    """Teacher forcing is shifted: changing patch j leaves the outputs of tokens at or before j in scan
    order bit-identical and changes every later one."""
    changed_h, _ = ar_perturbations(scan_order, level)
    later = np.triu(np.ones_like(changed_h), k=1)  # [j, i]: i after j
    np.testing.assert_array_equal(changed_h, later)


@pytest.mark.parametrize("scan_order, level", AR_CASES)
def test_ar_handoff_sees_only_earlier_patches(scan_order, level):
    """The conditions an AR level hands down for token i (its output, top and left neighbours; right and
    bottom are zeros) never depend on patches at or after i in scan order."""
    _, changed_conds = ar_perturbations(scan_order, level)
    later = np.triu(np.ones_like(changed_conds), k=1)
    np.testing.assert_array_equal(changed_conds, later)


@pytest.mark.parametrize("scan_order, level", AR_CASES)
def test_ar_gradient_is_causal(scan_order, level):
    """d(output i) / d(cells of patch j) is exactly zero for j at or after i in scan order, and nonzero
    for every j before i."""
    graphdef, params, cells, conds, scan = ar_case(scan_order, level)
    direction = jax.random.normal(jax.random.key(1), (TINY.embed_dim_list[level],))

    @jax.jit
    def dependence(cells):
        # a random direction: the final LayerNorm makes the plain sum over features constant
        out = lambda c: nnx.merge(graphdef, params).teacher_forced(c, conds) @ direction
        jacobian = jax.jacrev(lambda c: out(c).sum(axis=0))(cells)  # out token x N x in token x cells
        return jnp.any(jacobian != 0, axis=(1, 3))

    depends = np.asarray(dependence(jnp.asarray(cells, jnp.float32)))[np.ix_(scan, scan)]
    np.testing.assert_array_equal(depends, np.tril(np.ones_like(depends), k=-1))


@pytest.mark.parametrize("scan_order", ["row_major", "column_major"])
def test_all_ar_loss_sees_context_before_its_targets_only(scan_order):
    """End to end through fractal_loss (all-AR model, small budget): a level-0 patch that is not handed
    down changes the loss exactly when it precedes, in scan order, a patch that is. Which patches are
    handed down is found with a head that ignores its input (the loss then depends on targets only)."""
    config = tiny(generator_types=("ar", "ar", "ar"), scan_order=scan_order, token_budget=0.25)
    model = build_model(config)
    blind = nnx.clone(model)
    model.head.codebook[...] = model.head.codebook[...] * 10
    blind.head.codebook[...] = jnp.zeros_like(blind.head.codebook[...])
    blind.head.bias[...] = jax.random.normal(jax.random.key(2), (NUM_CLASSES,)) * 3
    graphdef, params = nnx.split(model)
    _, blind_params = nnx.split(blind)

    roll = random_roll(3, 1, 32, density=0.2)[0]
    num_tokens = 16  # 8 bands x 2 bars
    rs = np.random.default_rng(4)
    variants = np.repeat(roll[None], num_tokens + 1, axis=0)
    for t in range(num_tokens):
        band, bar = divmod(t, 2)
        patch = variants[t + 1, band * 16 : (band + 1) * 16, bar * 16 : (bar + 1) * 16]
        patch[...] = (patch.astype(int) + rs.integers(1, 128, patch.shape)) % 128

    @jax.jit
    def losses(params, key):
        model = nnx.merge(graphdef, params)
        loss = lambda batch: fractal_loss(model, config, batch, key, True)[0]
        return jax.vmap(loss)({"roll": variants[:, None]})

    position = np.argsort(model.levels[0].scan(num_tokens))  # grid index -> scan position
    before_a_target, after_all_targets = 0, 0
    for key in keys(4):
        blind_losses = np.asarray(losses(blind_params, key))
        seen = np.asarray(losses(params, key))
        targets = blind_losses[1:] != blind_losses[0]
        assert 0 < targets.sum() < num_tokens
        last_target = position[targets].max()
        for t in np.flatnonzero(~targets):
            context = position[t] < last_target
            assert (seen[t + 1] != seen[0]) == context, (t, position[t], last_target)
            before_a_target += context
            after_all_targets += not context
    assert before_a_target and after_all_targets


# --- MAR masking ---


def perturbed_parts(cells, known, rs):
    """Variants of cells N x L x P: the original, then for each token t its known cells changed, then
    its other cells changed (variant 1 + 2 t + part)."""
    num_tokens = cells.shape[1]
    variants = np.repeat(cells[None], 2 * num_tokens + 1, axis=0)
    for t in range(num_tokens):
        for part, where in enumerate((known[:, t], ~known[:, t])):
            changed = (cells[:, t] + rs.integers(1, 128, cells[:, t].shape)) % 128
            variants[1 + 2 * t + part, :, t] = np.where(where, changed, cells[:, t])
    return variants


def changed_by_part(outputs, num_tokens):
    """[token, part]: did changing that part of that token change any output?"""
    outputs = np.asarray(outputs)
    return (outputs[1:] != outputs[:1]).reshape(num_tokens, 2, -1).any(axis=2)


@pytest.mark.parametrize("partial_known", [False, True])
@pytest.mark.parametrize("level", [0, 1])
def test_mar_hidden_cells_do_not_leak(level, partial_known):
    """MARLevel.predict replaces hidden tokens by the mask token: changing a visible token's cells
    changes the outputs; changing a hidden token's cells that are not known leaves every output
    bit-identical. A hidden token's known cells (half of each token's here) change the outputs with
    partial_known, and nothing without it (a partly known patch is then unseen until generated)."""
    config = tiny(border_context=False, partial_known=partial_known)
    mar = MARLevel(config, level, nnx.Rngs(params=level))
    rs = np.random.default_rng(level)
    num_tokens, cells_per_token = (16, 256) if level == 0 else (16, 16)
    conds = None if level == 0 else jnp.asarray(rs.normal(size=(1, 5, 32)), jnp.float32)
    cells = rs.integers(0, 128, (1, num_tokens, cells_per_token)).astype(np.int32)
    known = rs.random(cells.shape) < 0.5
    hidden = np.arange(num_tokens) % 3 == 0
    graphdef, params = nnx.split(mar)

    @jax.jit
    def outputs(variants):
        level = nnx.merge(graphdef, params)
        predict = lambda c: level.predict(c, jnp.asarray(hidden)[None], conds, known_NxLxP=jnp.asarray(known))
        return jax.vmap(predict)(variants)

    changed = changed_by_part(outputs(jnp.asarray(perturbed_parts(cells, known, rs))), num_tokens)
    np.testing.assert_array_equal(changed[:, 0], ~hidden | partial_known)
    np.testing.assert_array_equal(changed[:, 1], ~hidden)


@pytest.mark.parametrize("scan_order", ["row_major", "column_major"])
def test_ar_output_sees_the_known_cells_of_its_own_patch(scan_order):
    """With partial_known, the output predicting patch i also sees the known cells of patch i (and
    still nothing else of it, nor any later patch's): changing patch j's known cells changes the
    outputs at scan positions j and later, its other cells only the later ones."""
    config = tiny(
        generator_types=("ar", "ar", "ar"), scan_order=scan_order, border_context=False, partial_known=True
    )
    ar = ARLevel(config, 1, nnx.Rngs(params=1))
    rs = np.random.default_rng(1)
    conds = jnp.asarray(rs.normal(size=(2, 5, 32)), jnp.float32)
    cells = rs.integers(0, 128, (2, 16, 16)).astype(np.int32)
    known = rs.random(cells.shape) < 0.5
    graphdef, params = nnx.split(ar)
    scan = ar.scan(16)

    @jax.jit
    def outputs(variants):
        level = nnx.merge(graphdef, params)
        forced = lambda c: level.teacher_forced(c, conds, known_NxLxP=jnp.asarray(known))[:, scan]
        return jax.vmap(forced)(variants)

    h = np.asarray(outputs(jnp.asarray(perturbed_parts(cells, known, rs))))
    changed = (h[1:] != h[:1]).reshape(16, 2, 2, 16, -1).any(axis=(2, 4))[scan]  # [j, part, i] in scan order
    np.testing.assert_array_equal(changed[:, 0], np.triu(np.ones((16, 16), bool)))
    np.testing.assert_array_equal(changed[:, 1], np.triu(np.ones((16, 16), bool), k=1))


@pytest.mark.parametrize("partial_known", [False, True])
def test_partial_masks_do_not_score_known_cells(monkeypatch, partial_known):
    """With partial_known, training gives some samples the cells outside a region to write (here fixed:
    steps 10.. x pitches 60..84, a prompt that ends inside a bar and pitch bounds); known cells are
    inputs, not targets. With a head whose loss depends on the target only, changing every known cell
    leaves the loss bit-identical, and changing the cells to write changes it; without the flag every
    cell is a target."""
    to_write = np.zeros((1, 128, 32), bool)
    to_write[:, 60:85, 10:] = True
    monkeypatch.setattr(masking, "train_known_cells", lambda rng, b, h, w: jnp.asarray(~to_write))
    config = tiny(generator_types=("mar", "mar", "ar"), partial_known=partial_known)
    model = build_model(config)
    model.head.codebook[...] = jnp.zeros_like(model.head.codebook[...])
    model.head.bias[...] = jax.random.normal(jax.random.key(2), (NUM_CLASSES,)) * 3
    graphdef, params = nnx.split(model)
    roll = random_roll(6, 1, 32, density=0.3)
    changed = (roll.astype(int) + np.random.default_rng(7).integers(1, 128, roll.shape)) % 128
    rolls = np.stack([roll, np.where(to_write, roll, changed), np.where(to_write, changed, roll)])

    @jax.jit
    def losses(params, key):
        model = nnx.merge(graphdef, params)
        loss = lambda batch: fractal_loss(model, config, batch, key, True)[0]
        return jax.vmap(loss)({"roll": jnp.asarray(rolls)})

    for key in keys(3):
        loss, known_changed, to_write_changed = np.asarray(losses(params, key))
        assert (known_changed == loss) == partial_known
        assert to_write_changed != loss


# --- unbiasedness of the budgeted loss ---

UNBIASED_DRAWS = 2000  # fractal_loss keys
EXACT_DRAWS = 500  # exact computations (they vary far less than the budgeted estimate)


def sensitive_model(config):
    """A tiny model whose per-cell losses vary a lot, across cells (scaled codebook, random bias) and
    with how many tokens are hidden (uniform attention, amplified attention output and mask token)."""
    model = build_model(config)
    for level in model.levels:
        attn = level.trunk.transformer.blocks.attn
        width = attn.proj.kernel.shape[-1]
        attn.qkv.kernel[...] = attn.qkv.kernel[...].at[..., : 2 * width].set(0.0)
        attn.proj.kernel[...] = attn.proj.kernel[...] * 30
        if isinstance(level, MARLevel):
            level.mask_token[...] = level.mask_token[...] * 30
    model.head.codebook[...] = model.head.codebook[...] * 30
    bias = np.random.default_rng(0).normal(0.0, 2.0, roll_lib.num_classes(config.roll))
    bias[0] += 4.0
    model.head.bias[...] = jnp.asarray(bias, jnp.float32)
    return model


def split_patches(x, p):
    """[..., H, W] -> [..., tokens in grid order, p * p cells row-major], written out plainly."""
    rows, cols = x.shape[-2] // p, x.shape[-1] // p
    tokens = [x[..., r * p : (r + 1) * p, c * p : (c + 1) * p] for r in range(rows) for c in range(cols)]
    return np.stack([t.reshape(x.shape[:-2] + (p * p,)) for t in tokens], axis=-2)


def cut_normal(rs, shape):
    """Standard normal draws cut to [-4, 0], by rejection."""
    z = rs.normal(size=shape)
    while (bad := (z < -4) | (z > 0)).any():
        z[bad] = rs.normal(size=bad.sum())
    return z


def exact_cell_losses(graphdef, config, roll):
    """Jitted (params, hidden masks per level) -> cross-entropy of every cell, computed without budgets:
    every level runs on every token of every sequence, so each hidden token recurses with its true patch
    and its own conditions. Outputs of tokens that are not hidden are computed but never used, so this
    equals the variable-length recursion over hidden tokens only."""
    sizes = config.img_size_list
    cells = split_patches(roll, sizes[1])  # B x L0 x P0
    per_level = [cells]
    for k in range(1, config.num_levels):
        side = sizes[k]
        cells = split_patches(cells.reshape(-1, side, side), sizes[k + 1])
        per_level.append(cells)
    targets = jnp.asarray(per_level[-1].reshape(-1), jnp.int32)

    @jax.jit
    def cell_losses(params, hidden):
        model = nnx.merge(graphdef, params)

        def one_draw(hidden):
            conds = None
            for k, level in enumerate(model.levels):
                x = jnp.asarray(per_level[k], jnp.int32)
                n, num_tokens = x.shape[:2]
                if isinstance(level, MARLevel):
                    h, offset = (
                        level.predict(x, hidden[k].reshape(n, num_tokens), conds),
                        level.trunk.num_conds,
                    )
                else:
                    h, offset = level.teacher_forced(x, conds), 0
                index = jnp.broadcast_to(jnp.arange(num_tokens), (n, num_tokens))
                grid = level.trunk.grid(num_tokens // level.trunk.rows)
                num_out = 1 if k == config.num_levels - 1 else 5
                conds = level.trunk.handoff(h, index, grid, level.handoff_neighbours, num_out, offset)
                conds = conds.reshape((-1,) + conds.shape[2:])
            return optax.softmax_cross_entropy_with_integer_labels(model.head.logits(conds[:, 0]), targets)

        return jax.vmap(one_draw)(hidden)

    return cell_losses


def draw_masks(rs, config, num_draws, batch, width):
    """For every sequence of the full tree (indexed by its ancestors' tokens): the hidden tokens (MAR:
    count = clip(ceil(L * ratio), 1, L) with ratio = 1 + 0.5 * Z, Z ~ N(0, 1) cut to [-4, 0]; AR: all)
    and the budget a loss with a fixed budget hands down (the first min(count, K) of the order), with
    their Horvitz-Thompson weights."""
    num_tokens, level_budgets = tokens_per_level(config, width), budgets(config, width)
    hidden, passed, weight = [], [], []
    shape = (num_draws, batch)
    for kind, length, budget in zip(config.generator_types, num_tokens, level_budgets):
        if kind == "mar":
            count = np.clip(np.ceil(length * (1.0 + 0.5 * cut_normal(rs, shape))), 1, length)
        else:
            count = np.full(shape, length)
        rank = np.argsort(np.argsort(rs.random(shape + (length,)), axis=-1), axis=-1)
        hidden.append(rank < count[..., None])
        passed.append(rank < np.minimum(count, budget)[..., None])
        weight.append(np.where(passed[-1], (count / np.minimum(count, budget))[..., None], 0.0))
        shape += (length,)

    def per_cell(masks, combine):
        out = masks[0]
        for m in masks[1:]:
            out = combine(out[..., None], m)
        return out.reshape(num_draws, -1)

    return (
        hidden,
        per_cell(hidden, np.logical_and),
        per_cell(passed, np.logical_and),
        per_cell(weight, np.multiply),
    )


def mean_and_se(x):
    return float(np.mean(x)), float(np.std(x) / math.sqrt(len(x)))


def test_budgeted_loss_is_unbiased():
    """The mean of fractal_loss over many keys equals the mean of the exact loss (all cells reached
    through hidden tokens, no budget: sum of their cross-entropies over their number) within 4 standard
    errors, while wrong estimators computed from the same budgets (unweighted mean over handed-down
    cells; weighted sum over handed-down cells; unweighted sum over reached cells) are rejected."""
    width = 16
    config = tiny(crop_length=width, max_crop_length=width, border_context=False)
    graphdef, params = nnx.split(sensitive_model(config))
    roll = np.zeros((1, 128, width), np.uint8)
    roll[0, 60:64, 0:6] = 90
    roll[0, 67, 4:16] = 40
    roll[0, 72:75, 8:12] = 110
    roll[0, 20:23, 2] = 70

    losses = losses_fn(graphdef, config)
    all_keys = keys(UNBIASED_DRAWS, seed=1)
    budgeted = np.concatenate(
        [losses(params, roll, all_keys[i : i + 250])[0] for i in range(0, UNBIASED_DRAWS, 250)]
    )

    cell_losses = exact_cell_losses(graphdef, config, roll)
    rs = np.random.default_rng(1)
    estimates = {
        name: [] for name in ("exact", "handed-down mean", "weighted / handed-down", "unweighted / reached")
    }
    for _ in range(EXACT_DRAWS // 100):
        hidden, reached, passed, weight = draw_masks(rs, config, 100, 1, width)
        ce = np.asarray(cell_losses(params, [jnp.asarray(h) for h in hidden]))
        estimates["exact"].append((ce * reached).sum(1) / reached.sum(1))
        estimates["handed-down mean"].append((ce * passed).sum(1) / passed.sum(1))
        estimates["weighted / handed-down"].append((ce * weight).sum(1) / passed.sum(1))
        estimates["unweighted / reached"].append((ce * passed).sum(1) / reached.sum(1))
    estimates = {name: mean_and_se(np.concatenate(x)) for name, x in estimates.items()}

    mean, se = mean_and_se(budgeted)
    report = f"fractal_loss {mean:.4f} +- {se:.4f}; " + "; ".join(
        f"{name} {m:.4f} +- {s:.4f}" for name, (m, s) in estimates.items()
    )
    print(report)
    exact_mean, exact_se = estimates.pop("exact")
    assert abs(mean - exact_mean) < 4 * math.hypot(se, exact_se), report
    for wrong_mean, wrong_se in estimates.values():
        assert abs(mean - wrong_mean) > 4 * math.hypot(se, wrong_se), report


# --- skip_empty: the sparse hand-off (sparse.py) ---


SKIP_DRAWS = 400  # fractal_loss keys per estimate: the unweighted one is about 12 standard errors off


def mean_loss_over_keys(graphdef, config, params, roll, draws):
    """(mean, standard error) of fractal_loss over the keys `draws`, 200 per call."""
    losses = losses_fn(graphdef, config)
    return mean_and_se(
        np.concatenate([losses(params, roll, draws[i : i + 200])[0] for i in range(0, len(draws), 200)])
    )


def mean_loss_with(monkeypatch, module, name, replacement, mean_loss, config):
    """`mean_loss(config)` with `module.name` replaced: the cached compiled losses are dropped
    before (so the replacement is traced) and after (so no other test reuses them)."""
    monkeypatch.setattr(module, name, replacement)
    losses_fn.cache_clear()
    result = mean_loss(config)
    losses_fn.cache_clear()
    return result


def busy_roll(width=16):
    """Five of the eight 16 x 16 patches sound, so a budget of 3 non-empty slots drops some."""
    roll = np.zeros((1, 128, width), np.uint8)
    for low, high, start, velocity in (
        (20, 23, 2, 70),
        (60, 64, 0, 90),
        (67, 68, 4, 40),
        (85, 88, 9, 100),
        (100, 103, 5, 60),
    ):
        roll[0, low:high, start : start + 5] = velocity
    return roll


def test_skip_empty_budget_keeps_the_loss_unbiased(monkeypatch):
    """With skip_empty, the mean of fractal_loss with a budget of 3 non-empty level-0 patches (of
    5) equals its mean when every non-empty patch goes down, within 4 standard errors; the same
    budget without its Horvitz-Thompson weights is rejected."""
    width = 16
    common = dict(crop_length=width, max_crop_length=width, border_context=False, skip_empty=2)
    config, full = tiny(**common, skip_empty_budget=0.35), tiny(**common, skip_empty_budget=1.0)
    assert budgets(config, width)[:2] == [3, 6] and budgets(full, width)[:2] == [8, 16]
    graphdef, params = nnx.split(sensitive_model(config))
    roll, draws = busy_roll(width), keys(SKIP_DRAWS, seed=2)

    mean_loss = lambda cfg: mean_loss_over_keys(graphdef, cfg, params, roll, draws)
    (budgeted, se), (exact, exact_se) = mean_loss(config), mean_loss(full)
    report = f"budgeted {budgeted:.4f} +- {se:.4f}, every non-empty patch {exact:.4f} +- {exact_se:.4f}"
    assert abs(budgeted - exact) < 4 * math.hypot(se, exact_se), report
    valid_slots = lambda count_N, budget: (jnp.arange(budget)[None, :] < count_N[:, None]).astype(jnp.float32)
    unweighted, unweighted_se = mean_loss_with(
        monkeypatch, masking, "budget_weights", valid_slots, mean_loss, config
    )
    report += f", unweighted {unweighted:.4f} +- {unweighted_se:.4f}"
    print(report)
    assert abs(unweighted - exact) > 4 * math.hypot(unweighted_se, exact_se), report


def test_stratified_budget_keeps_the_loss_unbiased(monkeypatch):
    """With empty_budget, every level (a MAR level 0 and two column levels, none skipping) hands
    down 2 of its 8 or 4 of its 16 tokens in strata of non-empty and empty patches (cells, at
    the last level); the mean of fractal_loss equals its mean when every predicted token goes
    down (token_budget 1), within 4 standard errors, and the same slots with one weight for both
    strata are rejected."""
    width = 16
    common = dict(
        crop_length=width,
        max_crop_length=width,
        border_context=False,
        generator_types=("mar", "column", "column"),
    )
    config, full = tiny(**common, token_budget=0.25, empty_budget=0.5), tiny(**common, token_budget=1.0)
    assert budgets(config, width) == [2, 4, 4] and budgets(full, width) == [8, 16, 16]
    graphdef, params = nnx.split(sensitive_model(config))
    graphdefs = {config: graphdef, full: nnx.split(build_model(full))[0]}  # the same parameters
    roll, draws = busy_roll(width), keys(SKIP_DRAWS, seed=3)

    mean_loss = lambda cfg: mean_loss_over_keys(graphdefs[cfg], cfg, params, roll, draws)
    (stratified, se), (exact, exact_se) = mean_loss(config), mean_loss(full)
    report = f"stratified {stratified:.4f} +- {se:.4f}, every token {exact:.4f} +- {exact_se:.4f}"
    assert abs(stratified - exact) < 4 * math.hypot(se, exact_se), report
    strata = sparse.stratified_budget

    def one_weight(*args):  # the slots' total weight shared evenly: the strata's own odds ignored
        index_NxK, weight_NxK = strata(*args)
        kept_NxK = weight_NxK > 0
        shared = weight_NxK.sum(1, keepdims=True) / jnp.maximum(kept_NxK.sum(1, keepdims=True), 1)
        return index_NxK, jnp.where(kept_NxK, shared, 0.0)

    pooled, pooled_se = mean_loss_with(
        monkeypatch, sparse, "stratified_budget", one_weight, mean_loss, config
    )
    report += f", one weight {pooled:.4f} +- {pooled_se:.4f}"
    print(report)
    assert abs(pooled - exact) > 4 * math.hypot(pooled_se, exact_se), report


@pytest.mark.parametrize("train", [True, False])
def test_skip_empty_scores_every_predicted_patch_emptiness_exactly(train):
    """A silent roll costs exactly -log p(empty) per level-0 token the level predicts and nothing
    else (no cell goes down), in training and in the NLL (eval) alike; a sounding bar adds the
    lower levels' terms."""
    config = tiny(skip_empty=2)
    logit = 1.5
    model = empty_bias(build_model(config), logit)
    graphdef, params = nnx.split(model)
    silent = np.zeros((2, 128, config.crop_length), np.uint8)

    @jax.jit
    def loss_and_stats(params, roll, key):
        return fractal_loss(nnx.merge(graphdef, params), config, {"roll": roll}, key, train)

    for key in keys(5, seed=3):
        loss, stats = loss_and_stats(params, silent, key)
        hidden_tokens = float(stats["level_0/tokens_per_sample"]) * len(silent)
        expected = hidden_tokens * float(jax.nn.softplus(-logit))
        np.testing.assert_allclose(float(loss) * float(stats["reached_cells"]), expected, rtol=1e-5)
        np.testing.assert_allclose(float(stats["level_0/empty_loss"]), float(loss), rtol=1e-6)
    sounding = silent.copy()
    sounding[:, :, 0:16] = 100  # every level-0 patch of the first bar sounds
    loss, stats = loss_and_stats(params, sounding, keys(1, seed=4)[0])
    assert float(stats["level_1/empty_loss"]) > 0 and float(loss) > float(stats["level_0/empty_loss"])


def test_skip_empty_with_partial_known_scores_the_emptiness_of_the_unknown_cells(monkeypatch):
    """With partial_known, a patch whose sounding cells are all given is empty: what it leaves
    to write is silence. Notes only in the given first half of the first bar cost exactly
    -log p(empty) per predicted level-0 token, as a silent roll does."""
    config = tiny(skip_empty=1, partial_known=True)
    given = np.zeros((2, 128, config.crop_length), bool)
    given[:, :, 0:8] = True
    monkeypatch.setattr(masking, "train_known_cells", lambda rng, *shape: jnp.asarray(given))
    logit = 1.5
    model = empty_bias(build_model(config), logit)
    roll = np.zeros(given.shape, np.uint8)
    roll[:, 30:90:7, 0:8] = 100
    graphdef, params = nnx.split(model)
    loss_and_stats = jax.jit(
        lambda p, r, k: fractal_loss(nnx.merge(graphdef, p), config, {"roll": r}, k, True)
    )
    loss, stats = loss_and_stats(params, roll, keys(1, seed=5)[0])
    hidden_tokens = float(stats["level_0/tokens_per_sample"]) * len(roll)
    expected = hidden_tokens * float(jax.nn.softplus(-logit))
    np.testing.assert_allclose(float(loss) * float(stats["reached_cells"]), expected, rtol=1e-5)


# --- positions and wide rolls ---


def test_min_p_draws_only_tokens_at_least_min_p_times_the_likeliest():
    """After the temperature, min-p keeps the tokens at least min_p times as likely as the likeliest,
    at their relative odds, and never draws the rest; min_p 0 draws from the whole softmax."""
    probs = np.array([0.5, 0.3, 0.15, 0.04, 0.01])
    logits = jnp.log(jnp.asarray(np.tile(probs, (20_000, 1)), jnp.float32))

    def frequencies(temperature, min_p):
        drawn = draw(logits, jax.random.key(0), Sampling(jnp.float32(temperature), jnp.float32(min_p)))
        return np.bincount(np.asarray(drawn), minlength=len(probs)) / len(logits)

    np.testing.assert_allclose(frequencies(1.0, 0.0), probs, atol=0.01)
    kept = frequencies(1.0, 0.1)  # below 0.05: tokens 3 and 4
    assert kept[3] == kept[4] == 0
    np.testing.assert_allclose(kept[:3], probs[:3] / probs[:3].sum(), atol=0.015)
    sharp = frequencies(0.5, 0.05)  # odds squared: 0.25, 0.09, 0.0225 kept; 0.0016, 0.0001 not
    assert sharp[2] > 0 and sharp[3] == sharp[4] == 0


def test_one_model_covers_widths_up_to_max_crop_length():
    """With max_crop_length 512 the level-0 column table has 32 entries, and the same parameters give a
    finite loss and a full sample at W = 128 and W = 512."""
    config = TINY  # max_crop_length 512
    graphdef, params = nnx.split(build_model(config))
    assert nnx.merge(graphdef, params).levels[0].trunk.col_pos.shape == (512 // 16, 32)
    run = sampler_lib.make_sampler(config, (1, 1, 1, 1))
    for width, train in ((128, True), (512, False)):
        loss, _ = losses_fn(graphdef, config, train)(params, random_roll(0, 1, width), keys(1))
        assert np.isfinite(loss).all() and abs(float(loss[0]) - LOG_CLASSES) < 1.0
        cells, known = sampler_lib.unconditional_inputs(1, width)
        rolls, _ = run(params, cells, known, jax.random.key(0), Sampling.of(config, 1.0, 0.0))
        rolls = np.asarray(rolls)
        assert rolls.shape == (1, 128, width) and rolls.min() >= 0 and rolls.max() < NUM_CLASSES
        assert (rolls > 0).mean() > 0.95  # drawn cells: nearly uniform velocities at initialisation


def test_max_crop_length_below_crop_length_is_refused():
    """A model cannot train on crops wider than its column table."""
    with pytest.raises(ConfigError, match="crop_length=512 exceeds max_crop_length=256"):
        TINY.replace(crop_length=512, max_crop_length=256).validate()


GRAD_WIDTH = 64


@functools.lru_cache
def loss_and_grads(**changes):
    """Loss and parameter gradients of one training batch (W = 64 of a 512-step column table)."""
    config = tiny(crop_length=GRAD_WIDTH, **changes)
    graphdef, params = nnx.split(build_model(config))
    roll = random_roll(5, 4, GRAD_WIDTH, density=0.1)
    loss = lambda p: fractal_loss(nnx.merge(graphdef, p), config, {"roll": roll}, jax.random.key(3), True)[0]
    return jax.device_get(jax.jit(jax.value_and_grad(loss))(params))


def test_training_offsets_reach_the_whole_column_table():
    """Training crops start at a random level-0 column, so a 64-step batch trains column embeddings
    beyond its first 4 columns (the ones a wide sample uses)."""
    _, grads = loss_and_grads()
    trained = np.flatnonzero(np.abs(grads["levels"][0]["trunk"]["col_pos"][...]).sum(axis=1) > 0)
    assert len(trained) > GRAD_WIDTH // 16 and trained.max() >= GRAD_WIDTH // 16, trained


def test_grad_checkpoint_gives_the_same_loss_and_gradients():
    """Rematerialising the transformer blocks changes memory, not results."""
    loss, grads = loss_and_grads()
    loss_remat, grads_remat = loss_and_grads(grad_checkpoint=True)
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
    for g, g_remat in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(g_remat, g, rtol=1e-5, atol=1e-7)


def test_scanned_and_unrolled_blocks_give_the_same_loss_and_gradients():
    """`scan_layers` changes how level 0's blocks compile, not what they compute (dropout too)."""
    deep = dict(num_blocks_list=(3, 2, 1, 1), attn_dropout=0.1, proj_dropout=0.1)
    loss, grads = loss_and_grads(**deep)
    loss_scan, grads_scan = loss_and_grads(scan_layers=True, **deep)
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss_scan, loss, rtol=1e-6)
    for g, g_scan in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_scan)):
        np.testing.assert_allclose(g_scan, g, rtol=1e-5, atol=1e-7)


def test_fused_attention_gives_the_same_loss_and_gradients():
    """`fused_attention` changes how short sequences' attention runs (short_attention.py's
    kernels, interpreted off the GPU), not what it computes."""
    levels = dict(generator_types=("mar", "column", "column"), embed_dim_list=(32, 32, 32, 16))
    loss, grads = loss_and_grads(**levels)
    loss_fused, grads_fused = loss_and_grads(fused_attention="always", **levels)
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss_fused, loss, rtol=1e-5)
    for g, g_fused in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_fused)):
        np.testing.assert_allclose(g_fused, g, rtol=1e-4, atol=1e-6)


# --- precision and size ---


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_half_precision_loss_is_close_to_float32(precision):
    """bf16 and float16 compute keep float32 parameters and give finite losses within 1% of float32 with
    the same parameters and keys (the head's codebook is scaled so that cell losses vary widely)."""
    model = build_model(TINY)
    model.head.codebook[...] = model.head.codebook[...] * 100
    graphdef32, params = nnx.split(model)
    config = tiny(precision=precision)
    graphdef, half_params = nnx.split(build_model(config))
    assert {x.dtype for x in jax.tree.leaves(half_params)} == {jnp.dtype(jnp.float32)}
    roll = random_roll(0, 2, 32)
    loss32, _ = losses_fn(graphdef32, TINY)(params, roll, keys(64))
    loss, _ = losses_fn(graphdef, config)(params, roll, keys(64))
    assert np.isfinite(loss).all() and abs(np.mean(loss32) - LOG_CLASSES) > 1.0
    np.testing.assert_allclose(loss, loss32, rtol=0.01)


def test_default_model_size():
    """The shipped default config has about 41.0 M parameters, fewer than the original's 43.6 M."""
    count = count_params(nnx.eval_shape(lambda: build_model(Config())))
    print(f"default model: {count:,} parameters")
    assert 40.5e6 < count < 41.5e6 and count < 43.6e6
