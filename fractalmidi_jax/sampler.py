"""The one jitted sampler: every level, every MAR round and every AR step in one XLA program per
(batch, width, rounds per level).

A level receives N sequences (their condition vectors from the level above), a canvas of known
cells and a mask of which cells are known, and returns the canvas filled:
- MAR: a random order of the tokens; round r predicts every token from the visible ones and
  generates the next `cosine_schedule[r]` tokens of the order with the level below, then writes
  them into the canvas. Counts are static, so rounds unroll in Python.
- AR: tokens in scan order in a `lax.fori_loop` over a preallocated KV cache; the output for
  token i conditions the level below, whose result is fed back as the next input.
- Head: a velocity per cell, drawn at `temperature`.
Known cells (continuation prompts, inpainting surroundings) are visible from the first round
and copied through, so they come back bit-identical and the rest is conditioned on them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fractalmidi_jax import grid as grid_lib
from fractalmidi_jax import masking
from fractalmidi_jax.config import NUM_PITCHES, Config
from fractalmidi_jax.fractal import FractalModel, build_model, padded_width
from fractalmidi_jax.level import NUM_HANDOFF_CONDS

NUM_AR_FRAMES = 16


def _put_tokens(x_NxLx___, index_NxK, values_NxKx___):
    n = x_NxLx___.shape[0]
    return x_NxLx___.at[jnp.arange(n)[:, None], index_NxK].set(values_NxKx___)


class _Sampler:
    """Holds the static choices of one sampling program."""

    def __init__(self, model: FractalModel, config: Config, num_iter_list, temperature):
        self.model, self.config = model, config
        self.num_iter_list, self.temperature = num_iter_list, temperature
        self.frames = []  # level-0 canvases, one per round (MAR) or per 1/16 of the scan (AR)

    def level(self, k, conds, cells_NxHxW, known_NxHxW, rng):
        num_out = 1 if k == self.config.num_levels - 1 else NUM_HANDOFF_CONDS
        level = self.model.levels[k]
        p = level.trunk.patch
        n, height, width = cells_NxHxW.shape
        grid = level.trunk.grid(width // p)
        cells = grid_lib.patchify(cells_NxHxW, p)
        known = grid_lib.patchify(known_NxHxW, p)
        run = self._mar if level.kind == "mar" else self._ar
        cells = run(k, level, grid, conds, cells, known, num_out, rng)
        return grid_lib.unpatchify(cells, grid.rows, grid.cols, p)

    def children(self, k, conds_NxKxOxD, cells_NxKxP, known_NxKxP, rng):
        """Fills the given patches with level k + 1 (or the head)."""
        n, count = cells_NxKxP.shape[:2]
        flat = lambda x: x.reshape((n * count,) + x.shape[2:])
        if k == self.config.num_levels - 1:
            drawn = self.model.head.sample(flat(conds_NxKxOxD)[:, 0], rng, self.temperature)
            out = jnp.where(flat(known_NxKxP)[:, 0], flat(cells_NxKxP)[:, 0], drawn)
        else:
            side = self.config.img_size_list[k + 1]
            out = self.level(
                k + 1,
                flat(conds_NxKxOxD),
                flat(cells_NxKxP).reshape(-1, side, side),
                flat(known_NxKxP).reshape(-1, side, side),
                rng,
            )
        return out.reshape(n, count, -1)

    def _mar(self, k, level, grid, conds, cells, known, num_out, rng):
        n, num_tokens, _ = cells.shape
        order_rng, rng = jax.random.split(rng)
        order_NxL = masking.random_orders(order_rng, n, num_tokens)
        hidden_NxL = ~jnp.all(known, axis=-1)
        counts = masking.cosine_schedule(num_tokens, self.num_iter_list[k])
        round_keys = jax.random.split(rng, len(counts))

        def one_round(cells, hidden_NxL, index_NxC, valid_C, key):
            h_NxTxD = level.predict(cells, hidden_NxL, conds)
            child_conds = level.trunk.handoff(
                h_NxTxD, index_NxC, grid, level.handoff_neighbours, num_out, offset=level.trunk.num_conds
            )
            old = grid_lib.gather_tokens(cells, index_NxC)
            new = self.children(k, child_conds, old, grid_lib.gather_tokens(known, index_NxC), key)
            new = jnp.where(valid_C[None, :, None], new, old)
            shown = grid_lib.gather_tokens(hidden_NxL, index_NxC) & ~valid_C[None, :]
            return _put_tokens(cells, index_NxC, new), _put_tokens(hidden_NxL, index_NxC, shown)

        if k == 0:  # unrolled: exact round sizes, and a frame per round for the GIF
            start = 0
            for count, key in zip(counts, round_keys):
                index = order_NxL[:, start : start + count]
                cells, hidden_NxL = one_round(cells, hidden_NxL, index, jnp.ones((count,), bool), key)
                self.frames.append(grid_lib.unpatchify(cells, grid.rows, grid.cols, grid.patch))
                start += count
            return cells

        # lower levels: one traced round under lax.scan; each round takes `widest` slots of the
        # order and fills the first `count` of them (the rest write back what is there)
        widest = max(counts)
        padded_order = jnp.concatenate([order_NxL, order_NxL[:, :widest]], axis=1)
        starts = np.cumsum((0,) + counts[:-1]).astype(np.int32)

        def scan_round(carry, round_inputs):
            start, count, key = round_inputs
            index = jax.lax.dynamic_slice_in_dim(padded_order, start, widest, axis=1)
            return one_round(*carry, index, jnp.arange(widest) < count, key), None

        rounds = (jnp.asarray(starts), jnp.asarray(counts, jnp.int32), round_keys)
        (cells, _), _ = jax.lax.scan(scan_round, (cells, hidden_NxL), rounds)
        return cells

    def _ar(self, k, level, grid, conds, cells, known, num_out, rng):
        n, num_tokens, _ = cells.shape
        scan_L = jnp.asarray(level.scan(num_tokens))
        neighbours = jnp.asarray(grid.neighbours())
        h, caches = level.prefill(conds, n, num_tokens)
        outputs = jnp.zeros((n, num_tokens, h.shape[-1]), h.dtype)
        num_frames = min(num_tokens, NUM_AR_FRAMES) if k == 0 else 0
        frame_after = np.full(
            num_tokens, -1, np.int32
        )  # frame f is the canvas after step ceil((f+1) L / F) - 1
        frame_after[[-(-(f + 1) * num_tokens // num_frames) - 1 for f in range(num_frames)]] = np.arange(
            num_frames
        )
        frame_after = jnp.asarray(frame_after)
        frames = jnp.zeros((num_frames,) + cells.shape, cells.dtype)

        def step(i, state):
            h, caches, cells, outputs, frames = state
            g = scan_L[i]
            outputs = outputs.at[:, g].set(h)
            child_conds = [h]
            for name in grid_lib.NEIGHBOURS[: num_out - 1]:
                nbr = neighbours[grid_lib.NEIGHBOURS.index(name), g]
                usable = (nbr >= 0) & (name in level.handoff_neighbours)
                child_conds.append(jnp.where(usable, outputs[:, jnp.maximum(nbr, 0)], 0).astype(h.dtype))
            child_conds = jnp.stack(child_conds, axis=1)[:, None]
            new = self.children(
                k, child_conds, cells[:, g][:, None], known[:, g][:, None], jax.random.fold_in(rng, i)
            )
            cells = cells.at[:, g].set(new[:, 0])
            h, caches = level.decode(caches, new[:, 0], i + 1, g, num_tokens)
            if k == 0:
                frames = jax.lax.cond(
                    frame_after[i] >= 0,
                    lambda f: f.at[frame_after[i]].set(cells),
                    lambda f: f,
                    frames,
                )
            return h, caches, cells, outputs, frames

        _, _, cells, _, frames = jax.lax.fori_loop(0, num_tokens, step, (h, caches, cells, outputs, frames))
        if k == 0:
            self.frames.extend(
                grid_lib.unpatchify(frames[j], grid.rows, grid.cols, grid.patch)
                for j in range(frames.shape[0])
            )
        return cells


def sample(
    model: FractalModel, config: Config, known_cells_BxHxW, known_mask_BxHxW, rng, num_iter_list, temperature
):
    """Returns (rolls B x 128 x W int32, frames F x B x 128 x W: the canvas after each level-0
    round, or every 1/16 of an AR level 0). Not jitted; see `make_sampler`."""
    batch, height, width = known_cells_BxHxW.shape
    full_width = padded_width(config, width)
    pad = ((0, 0), (0, 0), (0, full_width - width))
    cells = jnp.pad(known_cells_BxHxW.astype(jnp.int32), pad)
    known = jnp.pad(known_mask_BxHxW.astype(bool), pad)
    sampler = _Sampler(model, config, tuple(num_iter_list), temperature)
    rolls = sampler.level(0, None, cells, known, rng)[:, :, :width]
    frames = jnp.stack([f[:, :, :width] for f in sampler.frames]) if sampler.frames else rolls[None]
    return rolls, frames


@functools.lru_cache(maxsize=16)
def make_sampler(config: Config, num_iter_list: tuple[int, ...]):
    """The jitted program: (params, known_cells, known_mask, rng, temperature) -> (rolls, frames).
    One compile per (batch, width); a second call with the same shapes reuses it. Level 0's
    blocks run under `lax.scan` whatever the training config says (same weights): its rounds
    are unrolled, and unrolled blocks in each would compile 1.5x longer for no faster sampling."""
    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(config.replace(scan_layers=True))))[0]

    @jax.jit
    def run(params, known_cells_BxHxW, known_mask_BxHxW, rng, temperature):
        model = nnx.merge(graphdef, params)
        return sample(model, config, known_cells_BxHxW, known_mask_BxHxW, rng, num_iter_list, temperature)

    return run


def unconditional_inputs(batch: int, width: int):
    """Nothing known: an empty canvas."""
    return np.zeros((batch, NUM_PITCHES, width), np.uint8), np.zeros((batch, NUM_PITCHES, width), bool)
