"""Skipping silence (`skip_empty`): most patches of a piano roll are empty (59% of POP909's
16 x 16 patches, 82% of its 4 x 4s), and the levels below level 0 cost most of a step. With
`skip_empty` S, each of the first S levels also says, from each patch token's output, whether
that patch is empty (one logit, `EmptyHead`), and only non-empty patches go down: 1 skips empty
bars (16 x 16, the default), 2 empty 4 x 4s as well (the last generator level cannot skip: its
patches are cells). Skipping 4 x 4s costs music (README, Configs and sizes): the level that draws
a patch known to be non-empty draws the cells of a time column in parallel, each pushed towards
a note, so it writes extra short notes; skipping bars only does not.
With `partial_known`, a patch's emptiness is that of its unknown cells (its known cells are
given, not predicted), so a partly known patch is empty when all it leaves to write is silence.

Likelihood: an empty patch costs -log p(empty); a non-empty one -log p(not empty) plus what the
levels below score for its cells. The emptiness terms are exact (one logit per token the level
predicts, all of them scored). The levels below spend a little probability on an all-silent
patch, which the emptiness bit has ruled out, so the NLL is a bound from above, never below.

Training (`nonempty_first`): a level's budget holds non-empty patches only, K =
ceil(skip_empty_budget x L) slots: the first K non-empty tokens of the level's random order
among those it predicts (a uniform random subset of them), each weighted n / min(n, K) for n
such tokens (masking.budget_weights), so the loss stays an unbiased estimate.

Sampling (`fill_nonempty`): a level draws its patches' emptiness as the head draws cells (the
same guidance, temperature and min-p; a patch with a known sounding cell is not empty); the
non-empty patches of the whole call, across its sequences, are packed into ceil(skip_empty_capacity
x patches) slots (a MAR round under `lax.scan`, padded to the widest round of its shape bucket,
counts its padding as empty and sizes the slots for the bucket's mean round), filled by the level
below and put back; empty patches are silence. Overflow: while patches are left (more non-empty
than slots), another pass of the same shape fills the next ones, so every non-empty patch is
filled exactly once whatever the capacity; a capacity above the usual share of non-empty patches
keeps it to one pass.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from fractalmidi_jax.layers import dense


class EmptyHead(nnx.Module):
    """One logit per patch token: > 0 says the patch is empty (every cell silent)."""

    def __init__(self, width: int, rngs: nnx.Rngs):
        self.proj = dense(width, 1, jnp.float32, rngs)

    def __call__(self, h_NxLxD):
        return self.proj(h_NxLxD.astype(jnp.float32))[..., 0]


def is_empty(cells_NxLxP):
    """N x L: the patches whose cells are all silence (token 0 in both rolls)."""
    return ~jnp.any(cells_NxLxP > 0, axis=-1)


def nonempty_first(order_NxL, eligible_NxL, budget: int):
    """(index_NxK, count_N): the first `budget` eligible tokens in `order` (a random order), then
    the others in order (slots of weight 0), and how many tokens are eligible."""
    eligible_in_order = jnp.take_along_axis(eligible_NxL, order_NxL, axis=1)
    rank_NxL = jnp.argsort(~eligible_in_order, axis=1, stable=True)[:, :budget]
    count_N = jnp.sum(eligible_NxL, axis=1).astype(jnp.int32)
    return jnp.take_along_axis(order_NxL, rank_NxL, axis=1), count_N


def fill_nonempty(fill, nonempty_M, inputs, slots: int, empty_MxP, rng):
    """M patches, of which `nonempty_M` go to `fill(picked inputs, key) -> slots x P` (every
    leaf of `inputs` has M rows); the others keep `empty_MxP`. Passes of `slots` patches run
    while any non-empty patch is left (the overflow path), each with its own key."""

    def one_pass(state):
        out_MxP, todo_M, index = state
        slot_S = jnp.argsort(~todo_M, stable=True)[:slots]
        filled_S = todo_M[slot_S]
        new_SxP = fill(jax.tree.map(lambda x: x[slot_S], inputs), jax.random.fold_in(rng, index))
        out_MxP = out_MxP.at[slot_S].set(jnp.where(filled_S[:, None], new_SxP, out_MxP[slot_S]))
        return out_MxP, todo_M.at[slot_S].set(False), index + 1

    state = (empty_MxP, nonempty_M, jnp.int32(0))
    return jax.lax.while_loop(lambda state: jnp.any(state[1]), one_pass, state)[0]
