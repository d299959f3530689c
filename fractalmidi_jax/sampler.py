"""The one jitted sampler: every level, every MAR round and every AR step in one XLA program per
(batch, width, rounds per level).

A level receives N sequences (their condition vectors from the level above, and with
`border_context` their border columns), a canvas of known cells and a mask of which cells are
known, and returns the canvas filled. How is the level kind's own business (`generate` in
mar.py, ar.py and column.py); this module recurses: a level asks `children` for the patches it
draws, and the last level is the head, which draws one token per cell under a `head.Sampling`
(temperature, min-p).
Level 0 samples at the time offset training covered best (level.sampling_offsets).
Known cells (continuation prompts, inpainting surroundings) are copied through, so they come
back bit-identical, and the rest is conditioned on them: a level sees a wholly known patch from
its first round, and with `partial_known` the known cells of a partly known one too (level.py).

Per-bar conditions (conditions.py) add their vectors to level 0's columns; a model trained with
them and given none samples with the null vectors (unconditional). Classifier-free guidance at
scale S (`guided`) draws every cell from (1 - S) uncond + S cond logits: the whole recursion runs
twice under `vmap`, once with the asked conditions and once with none, on one canvas (both runs
draw with the same keys from the same logits, so they write the same cells). Guiding at the
head is the exact CFG of the cell distribution; it costs twice the sampling compute.

With `skip_empty` (sparse.py), a level first draws which of the patches it hands down are empty
(guided like the cells); only the others reach the level below, packed into fixed slots.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fractalmidi_jax import conditions as conditions_lib
from fractalmidi_jax import grid as grid_lib
from fractalmidi_jax import masking, sparse
from fractalmidi_jax.config import NUM_PITCHES, Config
from fractalmidi_jax.fractal import FractalModel, build_model, padded_width
from fractalmidi_jax.head import draw
from fractalmidi_jax.level import NUM_HANDOFF_CONDS, ConditionedColumns, gather_borders, sampling_offsets

GUIDANCE_AXIS = "guidance"  # the vmap axis of guided sampling: 0 = with the conditions, 1 = without


class _Sampler:
    """Holds the static choices of one sampling program."""

    def __init__(self, model: FractalModel, config: Config, num_iter_list, sampling, bar_vectors, cfg):
        self.model, self.config = model, config
        self.num_iter_list, self.sampling = num_iter_list, sampling  # sampling: a head.Sampling
        self.bar_vectors = bar_vectors  # N x Bars x D condition vectors of level 0's columns, or None
        self.cfg = cfg  # the guidance scale under vmap over GUIDANCE_AXIS, or None (no guidance)
        self.frames = []  # level-0 canvases, one per round (MAR) or per 1/16 of the scan (AR)

    def level(self, k, conds, cells_NxHxW, known_NxHxW, border, rng):
        num_out = 1 if k == self.config.num_levels - 1 else NUM_HANDOFF_CONDS
        level = self.model.levels[k]
        p = level.trunk.patch
        n, height, width = cells_NxHxW.shape
        grid = level.trunk.grid(width // p)
        cells = grid_lib.patchify(cells_NxHxW, p)
        known = grid_lib.patchify(known_NxHxW, p)
        col_offset = sampling_offsets(n, grid.cols, level.trunk.max_cols) if k == 0 else None
        if k == 0 and self.bar_vectors is not None:
            col_offset = ConditionedColumns(col_offset, self.bar_vectors)
        with jax.named_scope(f"level_{k}"):  # bench --profile times each level
            cells = level.generate(self, k, grid, conds, cells, known, border, num_out, rng, col_offset)
        return grid_lib.unpatchify(cells, grid.rows, grid.cols, p)

    def child_borders(self, k, cells_NxLxP, visible_NxL, border, grid, index_NxK, known_NxLxP=None):
        """The border columns of the patches `index_NxK` that level k is about to hand down, or
        None when the level below takes none; `known_NxLxP`: the known cells a hidden left
        neighbour shows (partial_known)."""
        if not self.config.border_context or k == self.config.num_levels - 1:
            return None
        trunk = self.model.levels[k].trunk
        borders = trunk.child_borders(cells_NxLxP, visible_NxL, border, grid, known_NxLxP)
        return gather_borders(borders, index_NxK)

    def guide(self, logits_NxV):
        """Classifier-free guidance across the two vmapped runs; the logits as they are without."""
        if self.cfg is None:
            return logits_NxV
        cond, uncond = jax.lax.all_gather(logits_NxV, GUIDANCE_AXIS)
        return (1.0 - self.cfg) * uncond + self.cfg * cond

    def children(
        self, k, conds_NxKxOxD, cells_NxKxP, known_NxKxP, borders, rng, valid_K=None, sized_for=None
    ):
        """Fills the given patches with level k + 1 (or the head); with skip_empty, only those
        drawn non-empty (`skip_empty`). A scanned MAR round pads its K patches: `valid_K` says
        which are real (the others come back unused), and a skipping level sizes its slots for
        `sized_for` patches per sequence (None: K)."""
        n, count = cells_NxKxP.shape[:2]
        flat = lambda x: x.reshape((n * count,) + x.shape[2:])
        if k == self.config.num_levels - 1:
            with jax.named_scope("head"):
                drawn = self.model.head.sample(flat(conds_NxKxOxD)[:, 0], rng, self.sampling, self.guide)
            out = jnp.where(flat(known_NxKxP)[:, 0], flat(cells_NxKxP)[:, 0], drawn)
            return out.reshape(n, count, -1)
        side = self.config.img_size_list[k + 1]

        def fill(inputs, key):
            conds, cells, known, borders = inputs
            square = lambda x: x.reshape(-1, side, side)
            out = self.level(k + 1, conds, square(cells), square(known), borders, key)
            return out.reshape(conds.shape[0], -1)

        inputs = (flat(conds_NxKxOxD), flat(cells_NxKxP), flat(known_NxKxP), borders)
        if not self.model.levels[k].trunk.skips_empty:
            return fill(inputs, rng).reshape(n, count, -1)
        valid_M = None if valid_K is None else flat(jnp.broadcast_to(valid_K, (n, count)))
        slots = masking.share(n * (sized_for or count), self.config.skip_empty_capacity)
        return self.skip_empty(k, fill, inputs, rng, valid_M, slots).reshape(n, count, -1)

    def skip_empty(self, k, fill, inputs, rng, valid_M, slots: int):
        """Draws the emptiness of M patches (level k's empty head, guided and drawn as cells are;
        a patch with a known sounding cell is not empty, except with partial_known, where
        emptiness is of the unknown cells; padding, where `valid_M` is False, is empty) and fills
        only the non-empty ones, in passes of `slots` (sparse.fill_nonempty); an empty patch is
        its known cells and silence."""
        conds_MxOxD, cells_MxP, known_MxP, _ = inputs
        empty_rng, fill_rng = jax.random.split(rng)
        logit_M = self.model.levels[k].trunk.empty_head(conds_MxOxD[:, 0])
        empty_M = (
            draw(self.guide(jnp.stack([jnp.zeros_like(logit_M), logit_M], -1)), empty_rng, self.sampling) == 1
        )
        given_MxP = jnp.where(known_MxP, cells_MxP, 0)  # the known cells, silence elsewhere
        if not self.config.partial_known:  # its emptiness is the whole patch's, known cells too
            empty_M &= sparse.is_empty(given_MxP)
        if valid_M is not None:
            empty_M |= ~valid_M
        return sparse.fill_nonempty(fill, ~empty_M, inputs, slots, given_MxP, fill_rng)


def sample(
    model: FractalModel,
    config: Config,
    known_cells_BxHxW,
    known_mask_BxHxW,
    rng,
    num_iter_list,
    sampling,
    conditions=None,
    cfg=None,
):
    """Returns (rolls B x 128 x W int32, frames F x B x 128 x W: the canvas after each level-0
    round, or every 1/16 of an AR level 0). `conditions` is (features {name: B x Bars x size},
    given B x K) for a model trained with conditions (None: none given); `cfg` a guidance scale
    (None: no guidance); `sampling` a head.Sampling. Not jitted; see `make_sampler`."""
    batch, height, width = known_cells_BxHxW.shape
    full_width = padded_width(config, width)
    pad = ((0, 0), (0, 0), (0, full_width - width))
    cells = jnp.pad(known_cells_BxHxW.astype(jnp.int32), pad)
    known = jnp.pad(known_mask_BxHxW.astype(bool), pad)
    if config.conditions and conditions is None:
        conditions = conditions_lib.nothing_given(
            config.conditions, batch, full_width // config.img_size_list[1]
        )

    def one_run(given_BxK):
        bar_vectors = model.conditions(conditions[0], given_BxK) if config.conditions else None
        sampler = _Sampler(model, config, tuple(num_iter_list), sampling, bar_vectors, cfg)
        rolls = sampler.level(0, None, cells, known, None, rng)[:, :, :width]
        frames = jnp.stack([f[:, :, :width] for f in sampler.frames]) if sampler.frames else rolls[None]
        return rolls, frames

    if cfg is None:
        return one_run(conditions[1] if config.conditions else None)
    given_2xBxK = jnp.stack([jnp.asarray(conditions[1]), jnp.zeros_like(conditions[1])])
    rolls, frames = jax.vmap(one_run, axis_name=GUIDANCE_AXIS)(given_2xBxK)
    return rolls[0], frames[0]


@functools.lru_cache(maxsize=16)
def make_sampler(config: Config, num_iter_list: tuple[int, ...]):
    """The jitted program: (params, known_cells, known_mask, rng, sampling[, conditions[, cfg]])
    -> (rolls, frames), `sample`'s arguments. One compile per (batch, width, guided or not); a
    second call with the same shapes reuses it. Level 0's blocks run under `lax.scan` whatever the
    training config says (same weights): unrolled blocks would compile 1.5x longer for no faster
    sampling. A MAR level 0 compiles its rounds in shape buckets (mar.py): `skip_empty_round_buckets`
    when it skips empty bars, one per round otherwise (where padding would cost the levels below)."""
    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(config.replace(scan_layers=True))))[0]

    @jax.jit
    def run(params, known_cells_BxHxW, known_mask_BxHxW, rng, sampling, conditions=None, cfg=None):
        model = nnx.merge(graphdef, params)
        return sample(
            model,
            config,
            known_cells_BxHxW,
            known_mask_BxHxW,
            rng,
            num_iter_list,
            sampling,
            conditions,
            cfg,
        )

    return run


def unconditional_inputs(batch: int, width: int):
    """Nothing known: an empty canvas."""
    return np.zeros((batch, NUM_PITCHES, width), np.uint8), np.zeros((batch, NUM_PITCHES, width), bool)
