"""The fractal: generator levels built from the config (a registry of level kinds), the cell
head, and the recursive training loss.

Loss (one static shape per run):
 1. Pad the roll's width to the level-0 patch; cut it into level-0 patches (B x L0 x P0).
 2. Draw, for the whole tree, how many tokens each sequence hides (MAR) or predicts (AR: all):
    counts[k] has shape B x L0 x ... x L(k-1), indexed by the ranks of the ancestors in their
    random orders. Only integers, so the exact number of cells the original would reach is
    known for the denominator.
 3. Level k runs on its N sequences and hands down K_k tokens each (masking.py), with their
    true patches, their conditions, their border columns (level.py) and Horvitz-Thompson
    weights; the next level sees N * K_k sequences.
 4. The head scores every cell that arrives; the loss is the weighted sum of cross-entropies
    over the number of cells reached: an unbiased estimate of the original's loss, the mean
    over reached cells.
With `conditions`, level 0's columns also carry each bar's condition vector, computed from the
roll itself and dropped at random in training (conditions.py).
With `skip_empty` (sparse.py), the first `skip_empty` levels hand down non-empty patches only,
and the loss adds, for every patch they predict, the cross-entropy of whether it is empty
(exact: no budget), with the weight of its sequence.

Partial masks (`partial_known`, training only): some samples are given the cells outside a
region to write, as a prompt or an inpainting surrounding would be (masking.train_known_cells).
The known mask travels down with the cells; hidden tokens show their known cells (level.py);
known cells are given, not generated, so they are not scored. The loss is then an unbiased
estimate of the mean over reached cells of the cross-entropy with a known cell counting 0
(the denominator stays the exact count of reached cells); validation draws no known cells, so
its figure is the original's.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fractalmidi_jax import conditions as conditions_lib
from fractalmidi_jax import grid as grid_lib
from fractalmidi_jax import masking, sparse
from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax.ar import ARLevel
from fractalmidi_jax.column import ColumnLevel
from fractalmidi_jax.config import Config
from fractalmidi_jax.head import CellHead
from fractalmidi_jax.level import (
    NUM_HANDOFF_CONDS,
    ConditionedColumns,
    gather_borders,
    num_conds,
    time_offsets,
)
from fractalmidi_jax.mar import MARLevel

# A level kind: a module with train / counts / generate (see mar.py); generator_types names them.
LEVEL_KINDS = {"mar": MARLevel, "ar": ARLevel, "column": ColumnLevel}
# The loss's key folded with these draws the known cells (partial_known) and the kept conditions.
KNOWN_STREAM, CONDITION_STREAM = 1, 7


class FractalModel(nnx.Module):
    def __init__(self, config: Config, rngs: nnx.Rngs):
        self.levels = nnx.List(
            [LEVEL_KINDS[config.generator_types[k]](config, k, rngs) for k in range(config.num_levels)]
        )
        self.head = CellHead(config, rngs)
        if config.conditions:  # created last: an unconditional model's parameters stay as they were
            self.conditions = conditions_lib.ConditionEmbedding(
                config.conditions, config.embed_dim_list[0], config.compute_dtype(), rngs
            )


def build_model(config: Config, seed: int = 0) -> FractalModel:
    return FractalModel(config.validate(), nnx.Rngs(params=seed))


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def padded_width(config: Config, width: int) -> int:
    patch = config.img_size_list[1]
    return -(-width // patch) * patch


def tokens_per_level(config: Config, width: int) -> list[int]:
    """L_k: patch tokens of one sequence at each generator level for a roll `width` wide."""
    sizes = config.img_size_list
    first = (sizes[0] // sizes[1]) * (padded_width(config, width) // sizes[1])
    return [first] + [(sizes[k] // sizes[k + 1]) ** 2 for k in range(1, config.num_levels)]


def budgets(config: Config, width: int) -> list[int]:
    """K_k: tokens a sequence of level k hands down (with skip_empty, non-empty ones: sparse.py)."""
    return [
        masking.share(n, config.skip_empty_budget)
        if k < config.skip_empty
        else masking.token_budget(n, config.token_budget, config.mask_ratio_loc, config.mask_ratio_scale)
        for k, n in enumerate(tokens_per_level(config, width))
    ]


def _draw_counts(model, config, rng, batch: int, num_tokens: list[int], train: bool):
    """counts[k]: B x L0 x ... x L(k-1) tokens hidden (MAR) or predicted (AR: all) per sequence."""
    return [
        level.counts(rng_k, (batch,) + tuple(num_tokens[:k]), num_tokens[k], config, train)
        for k, (level, rng_k) in enumerate(zip(model.levels, jax.random.split(rng, len(num_tokens))))
    ]


def _reached(counts):
    """Per sample: tokens reached at each level (B each); the last is the cells reached."""
    reach = jnp.ones(counts[0].shape, bool)
    per_level = []
    for k, count in enumerate(counts):
        per_level.append(jnp.sum(jnp.where(reach, count, 0), axis=tuple(range(1, count.ndim))))
        if k + 1 < len(counts):
            ranks = jnp.arange(counts[k + 1].shape[-1])
            reach = reach[..., None] & (ranks < count[..., None])
    return per_level


def _hand_down(x_NxLxP, index_NxK, side: int, child_patch: int):
    """The selected tokens' patches, one canvas each, cut into the next level's patches."""
    canvases = grid_lib.gather_tokens(x_NxLxP, index_NxK).reshape(-1, side, side)
    return grid_lib.patchify(canvases, child_patch)


def fractal_loss(model: FractalModel, config: Config, batch: dict, rng, train: bool):
    """Returns (loss in nats per reached cell, stats) of a batch (data.py: its `roll`, and its
    `weight`, if any, leaving padding samples out). `train` draws the training mask ratios and
    dropout; otherwise the uniform masks of the NLL estimator."""
    roll_BxHxW = batch["roll"]
    num_samples, height, width = roll_BxHxW.shape
    sizes = config.img_size_list
    full_width = padded_width(config, width)
    cells_BxHxW = jnp.pad(roll_BxHxW.astype(jnp.int32), ((0, 0), (0, 0), (0, full_width - width)))
    in_roll = jnp.broadcast_to(jnp.arange(full_width) < width, (num_samples, height, full_width))
    if train and config.partial_known:
        known = masking.train_known_cells(jax.random.fold_in(rng, KNOWN_STREAM), num_samples, height, width)
    else:
        known = jnp.zeros((num_samples, height, width), bool)
    known = jnp.pad(known, ((0, 0), (0, 0), (0, full_width - width)))
    cells, in_roll = grid_lib.patchify(cells_BxHxW, sizes[1]), grid_lib.patchify(in_roll, sizes[1])
    known = grid_lib.patchify(known, sizes[1])
    num_tokens = tokens_per_level(config, width)
    level_budgets = budgets(config, width)
    rng_counts, rng_offset, rng_levels = jax.random.split(rng, 3)
    counts = _draw_counts(model, config, rng_counts, num_samples, num_tokens, train)
    sample_weight = batch["weight"].astype(jnp.float32) if "weight" in batch else jnp.ones((num_samples,))
    weight = sample_weight
    trunk0 = model.levels[0].trunk
    col_offset = time_offsets(
        rng_offset if train else None, num_samples, full_width // sizes[1], trunk0.max_cols
    )
    if config.conditions:
        features = conditions_lib.from_roll(config.conditions, cells_BxHxW, config.roll)
        given = jnp.ones((num_samples, len(config.conditions)), bool)
        if train:
            condition_rng = jax.random.fold_in(rng, CONDITION_STREAM)
            given = conditions_lib.draw_given(
                condition_rng, len(config.conditions), num_samples, config.condition_dropout
            )
        col_offset = ConditionedColumns(col_offset, model.conditions(features, given))
    conds = border = None
    stats, empty_nats = {}, {}
    for k, (level, level_rng) in enumerate(
        zip(model.levels, jax.random.split(rng_levels, config.num_levels))
    ):
        order_rng, dropout_rng = jax.random.split(level_rng)
        index = tuple(slice(None) if i == 0 else slice(0, level_budgets[i - 1]) for i in range(k + 1))
        count_N = counts[k][index].reshape(-1)
        last = k == config.num_levels - 1
        num_out = 1 if last else NUM_HANDOFF_CONDS
        by_emptiness = k < config.skip_empty or config.empty_budget > 0  # skipping or strata
        nonempty_NxL = ~sparse.is_empty(jnp.where(known, 0, cells)) if by_emptiness else None
        with jax.named_scope(f"level_{k}"):  # bench --profile times each level
            out = level.train(
                cells,
                conds,
                border,
                count_N,
                level_budgets[k],
                num_out,
                col_offset,
                order_rng,
                dropout_rng if train else None,
                known_NxLxP=known,
                nonempty_NxL=nonempty_NxL,
            )
            handed_from_N = count_N
            if out.empty_logits_NxL is not None:  # skip_empty: every predicted patch's emptiness, exactly
                scored_NxL = out.predicted_NxL & jnp.any(in_roll, axis=-1)
                bce_NxL = optax.sigmoid_binary_cross_entropy(
                    out.empty_logits_NxL, (~nonempty_NxL).astype(jnp.float32)
                )
                empty_nats[k] = jnp.sum(weight[:, None] * jnp.where(scored_NxL, bce_NxL, 0.0))
                handed_from_N = jnp.sum(out.predicted_NxL & nonempty_NxL, axis=1)
            stats[f"level_{k}/masked_fraction"] = jnp.mean(count_N) / num_tokens[k]
            stats[f"level_{k}/budget_dropped"] = jnp.mean(
                jnp.maximum(handed_from_N - level_budgets[k], 0) / jnp.maximum(handed_from_N, 1)
            )
            weight = (weight[:, None] * out.weight_NxK).reshape(-1)
            index_NxK, visible_NxL = out.index_NxK, out.visible_NxL
            if config.border_context and not last:
                grid = level.trunk.grid(num_tokens[k] // level.trunk.rows)
                borders = level.trunk.child_borders(cells, visible_NxL, border, grid, known)
                border = gather_borders(borders, index_NxK)
            side, child_patch = sizes[k + 1], sizes[min(k + 2, len(sizes) - 1)]
            cells, in_roll, known = (
                _hand_down(x, index_NxK, side, child_patch) for x in (cells, in_roll, known)
            )
            conds = out.conds_NxKxOxD.reshape((-1,) + out.conds_NxKxOxD.shape[2:])
        col_offset = None
    target_N = cells.reshape(-1)
    with jax.named_scope("head"):
        logits = model.head.logits(conds[:, 0])
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, target_N)
    weight = weight * (in_roll & ~known).reshape(-1)
    reached_per_level = _reached(counts)
    reached = jnp.sum(reached_per_level[-1] * sample_weight) * (width / full_width)
    loss = (jnp.sum(weight * cross_entropy) + sum(empty_nats.values())) / reached
    sounding = target_N > 0
    for k, nats in empty_nats.items():
        stats[f"level_{k}/empty_loss"] = nats / reached
    stats["loss"] = loss
    stats["reached_cells"] = reached
    stats["loss_sounding_cells"] = jnp.sum(jnp.where(sounding, weight * cross_entropy, 0)) / reached
    for k, per_sample in enumerate(reached_per_level):
        stats[f"level_{k}/tokens_per_sample"] = jnp.sum(per_sample * sample_weight) / jnp.sum(sample_weight)
    return loss, stats


def train_flops_per_sample(config: Config, width: int) -> float:
    """Model FLOPs of one training sample (forward + backward = 3 x forward): matmuls and
    attention of every sequence the budgets compute. Used for model FLOP utilisation."""
    num_tokens = tokens_per_level(config, width)
    level_budgets = budgets(config, width)
    sequences, total = 1, 0.0
    channels = roll_lib.num_channels(config.roll)
    for k in range(config.num_levels):
        dim, depth = config.embed_dim_list[k], config.num_blocks_list[k]
        conds = num_conds(config, k)
        length = num_tokens[k] + conds - (1 if config.generator_types[k] == "ar" else 0)
        per_sequence = depth * (24 * length * dim * dim + 4 * length * length * dim)
        per_sequence += 2 * length * dim * channels * (config.img_size_list[k + 1] ** 2)
        if config.partial_known:  # every token's known cells are embedded too
            per_sequence += 2 * num_tokens[k] * dim * (channels + 1) * (config.img_size_list[k + 1] ** 2)
        if k > 0:
            per_sequence += 2 * NUM_HANDOFF_CONDS * config.embed_dim_list[k - 1] * dim
            if config.border_context:
                per_sequence += 2 * config.img_size_list[k] * (channels + 1) * dim
        total += sequences * per_sequence
        sequences *= level_budgets[k]
    head_dim = config.embed_dim_list[-1]
    per_cell = (
        2 * config.embed_dim_list[-2] * head_dim + config.num_blocks_list[-1] * 24 * head_dim * head_dim
    )
    per_cell += 2 * head_dim * roll_lib.num_classes(config.roll)
    total += sequences * per_cell
    return 3.0 * total
