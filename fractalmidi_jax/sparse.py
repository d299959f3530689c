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

Below the skipping levels (`empty_budget`, training only): a level still hands down empty
patches, which the levels below must learn to leave silent, but an empty patch's loss is small
and much like another empty patch's, so a few of them stand for the rest. `stratified_budget` splits a
budget of K slots into a stratum of non-empty and one of empty patches, each a uniform random
subset of its patches with its own Horvitz-Thompson weight (n / k for k of n): the loss stays an
unbiased estimate with fewer slots than one uniform budget needs. The same split works one
level further down, where the patches are cells and empty means silent.

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


def empty_slots(budget: int, empty_budget: float) -> int:
    """Slots of a budget kept for empty patches: `empty_budget` of them, at least one and at most
    budget - 1; 0 (no strata) for empty_budget 0 or a budget of one slot."""
    if empty_budget <= 0 or budget < 2:
        return 0
    return min(budget - 1, max(1, round(empty_budget * budget)))


def stratified_budget(order_NxL, predicted_NxL, nonempty_NxL, budget: int, reserved: int):
    """(index_NxK, weight_NxK): the K = `budget` tokens a sequence hands down and their weights.
    Of the n1 non-empty and n0 empty predicted tokens, k0 = min(n0, max(reserved, K - n1)) empty
    and k1 = min(n1, K - k0) non-empty ones: the first of each stratum in `order` (a random
    order), weighted n1 / k1 and n0 / k0 (both strata get a slot whenever they have a token:
    reserved is in 1..K-1); slots left over hold some token at weight 0."""
    nonempty_in_order = jnp.take_along_axis(predicted_NxL & nonempty_NxL, order_NxL, axis=1)
    empty_in_order = jnp.take_along_axis(predicted_NxL & ~nonempty_NxL, order_NxL, axis=1)
    stratum_in_order = jnp.where(nonempty_in_order, 0, jnp.where(empty_in_order, 1, 2))
    by_stratum_NxL = jnp.take_along_axis(
        order_NxL, jnp.argsort(stratum_in_order, axis=1, stable=True), axis=1
    )
    n1 = jnp.sum(nonempty_in_order, axis=1, keepdims=True)
    n0 = jnp.sum(empty_in_order, axis=1, keepdims=True)
    k0 = jnp.minimum(n0, jnp.maximum(reserved, budget - n1))
    k1 = jnp.minimum(n1, budget - k0)
    slot_K = jnp.arange(budget)[None, :]
    in_first, in_second = slot_K < k1, (slot_K >= k1) & (slot_K < k1 + k0)
    # The empty stratum starts at n1 in the stratum order; a slot left over takes any token.
    position_NxK = jnp.where(in_second, n1 + slot_K - k1, slot_K)
    index_NxK = jnp.take_along_axis(by_stratum_NxL, position_NxK, axis=1)
    weight_NxK = jnp.where(
        in_first, n1 / jnp.maximum(k1, 1), jnp.where(in_second, n0 / jnp.maximum(k0, 1), 0.0)
    )
    return index_NxK, weight_NxK.astype(jnp.float32)


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
