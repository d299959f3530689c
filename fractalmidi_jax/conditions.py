"""Per-bar conditions of level 0 (`Config.conditions`): what they are, how they are computed from
a roll, embedded, dropped in training, and read from what a user asks for.

A bar is 16 steps, the width of a level-0 patch column (4/4 at sixteenth notes; other meters
are not bars here). Every condition is computed from the roll itself, so any unlabelled MIDI
corpus trains it:
- chords: the chroma of the bar, sounding cells per pitch class, scaled to unit length (zero for
  an empty bar). Asked for by chord names, one per bar: "C G Am F" (a root A-G with an optional
  # or b, then nothing for major, or m, 7, maj7, m7, dim, aug, sus2, sus4).
- density: the notes starting in the bar (onsets), seen as log(1 + notes). Asked for as one
  number for every bar ("8") or one per bar ("4 8 12 8").
A list shorter than the piece repeats to fill it.

The embedding: each kind's features go through its own linear layer to level 0's width; a kind
that is not given is its own learned null vector instead; the sum is added to every level-0
token of that bar's column (level.ConditionedColumns). In training each sample loses its whole
condition set with probability `condition_dropout` (what classifier-free guidance needs, and
what unconditional sampling of such a model is), and each kind on its own with the same
probability (so a user may give chords without a density).

To add a per-bar condition: write its `from_roll` and `parse` here and register it in
CONDITIONS; generate.py's flag (`--<name>`), the API's keyword and the config's
`--conditions` name follow from the registry. Then test it (tests/test_conditions.py) and
list it in the README: three files.
"""

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax.layers import dense, embedding_init

BAR_STEPS = 16  # steps of a bar: one level-0 patch column


class ConditionError(ValueError):
    """A condition a user asked for that cannot be read or that the model cannot follow."""


@dataclasses.dataclass(frozen=True)
class Condition:
    size: int  # features per bar
    from_roll: Callable  # (cells_BxPxW int tokens, roll kind) -> B x Bars x size float32
    parse: Callable[[str], np.ndarray]  # user text -> K x size features of K bars (repeated to fill)
    help: str  # generate.py's --<name> help


def bar_sums(values_BxPxW):
    """B x P x Bars: the values summed over each bar's steps (W a multiple of BAR_STEPS)."""
    batch, pitches, width = values_BxPxW.shape
    return values_BxPxW.reshape(batch, pitches, width // BAR_STEPS, BAR_STEPS).sum(axis=-1)


def pitch_classes(per_pitch_BxPx):
    """B x 12 x ...: the values of the 128 pitches (axis 1) summed per pitch class (0 = C)."""
    per_pitch_BxPx = jnp.asarray(per_pitch_BxPx)
    octaves = -(-roll_lib.NUM_PITCHES // 12)
    pad = [(0, 0), (0, octaves * 12 - roll_lib.NUM_PITCHES)] + [(0, 0)] * (per_pitch_BxPx.ndim - 2)
    padded = jnp.pad(per_pitch_BxPx, pad)
    return padded.reshape((padded.shape[0], octaves, 12) + padded.shape[2:]).sum(axis=1)


def unit(vectors, axis=-1):
    """Vectors scaled to length 1 along `axis` (zero vectors stay zero)."""
    norm = jnp.linalg.norm(vectors, axis=axis, keepdims=True)
    return vectors / jnp.maximum(norm, 1e-6)


def chroma_from_roll(cells_BxPxW, kind: str):
    """B x Bars x 12 unit chroma: sounding cells per pitch class of each bar."""
    chroma_Bx12xBars = pitch_classes(bar_sums(jnp.asarray(cells_BxPxW) > 0)).astype(jnp.float32)
    return jnp.swapaxes(unit(chroma_Bx12xBars, axis=1), 1, 2)


def onsets(cells_BxPxW, kind: str):
    """B x P x W bool: cells where a note starts (a velocity roll's note starts after silence or
    at a change of velocity, as roll.roll_to_notes decodes it)."""
    cells = jnp.asarray(cells_BxPxW).astype(jnp.int32)
    if roll_lib.check_kind(kind) == "note":
        return (cells > 0) & (cells < roll_lib.SUSTAIN)
    before = jnp.pad(cells, ((0, 0), (0, 0), (1, 0)))[:, :, :-1]
    return (cells > 0) & (cells != before)


def notes_per_bar(cells_BxPxW, kind: str):
    """B x Bars: notes starting in each bar."""
    return bar_sums(onsets(cells_BxPxW, kind)).sum(axis=1)


def density_from_roll(cells_BxPxW, kind: str):
    """B x Bars x 1: log(1 + notes starting in the bar)."""
    return jnp.log1p(notes_per_bar(cells_BxPxW, kind).astype(jnp.float32))[..., None]


ROOTS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
QUALITIES = {  # semitones above the root
    "": (0, 4, 7),
    "m": (0, 3, 7),
    "7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "m7": (0, 3, 7, 10),
    "dim": (0, 3, 6),
    "aug": (0, 4, 8),
    "sus2": (0, 2, 7),
    "sus4": (0, 5, 7),
}
CHORD_NAME = re.compile(r"([A-G])([#b]?)(.*)")


def chord_chroma(name: str) -> np.ndarray:
    """The unit chroma (12) of a chord name such as C, F#m, Bb7 or Dsus4."""
    match = CHORD_NAME.fullmatch(name)
    if not match or match.group(3) not in QUALITIES:
        qualities = ", ".join(q for q in QUALITIES if q)
        raise ConditionError(
            f"unknown chord {name!r}: use a root A-G with an optional # or b, then nothing (major) or "
            f"one of {qualities} (e.g. C, F#m, Bb7)"
        )
    root = ROOTS[match.group(1)] + {"": 0, "#": 1, "b": -1}[match.group(2)]
    chroma = np.zeros(12, np.float32)
    chroma[[(root + step) % 12 for step in QUALITIES[match.group(3)]]] = 1.0
    return chroma / np.linalg.norm(chroma)


def parse_chords(text: str) -> np.ndarray:
    names = text.replace(",", " ").split()
    if not names:
        raise ConditionError('--chords is empty: give one chord name per bar, e.g. "C G Am F"')
    return np.stack([chord_chroma(name) for name in names])


def parse_density(text: str) -> np.ndarray:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ConditionError(
            f'--density {text!r}: give notes per bar as numbers, e.g. 8 or "4 8 12 8"'
        ) from None
    if not values or not all(np.isfinite(v) and v >= 0 for v in values):
        raise ConditionError(f'--density {text!r}: give notes per bar as numbers >= 0, e.g. 8 or "4 8 12 8"')
    return np.log1p(np.asarray(values, np.float32))[:, None]


CONDITIONS = {
    "chords": Condition(
        12, chroma_from_roll, parse_chords, 'one chord per bar, repeated to fill: "C G Am F"'
    ),
    "density": Condition(
        1, density_from_roll, parse_density, 'notes per bar: one number, or one per bar "4 8 12 8"'
    ),
}


def from_roll(names, cells_BxPxW, kind: str) -> dict:
    """{name: B x Bars x size} of every condition named, computed from the roll."""
    return {name: CONDITIONS[name].from_roll(cells_BxPxW, kind) for name in names}


def draw_given(rng, num_conditions: int, batch: int, dropout: float):
    """B x K bool: which conditions a training sample keeps (module docstring)."""
    whole_rng, each_rng = jax.random.split(rng)
    keeps_set = jax.random.uniform(whole_rng, (batch, 1)) >= dropout
    return keeps_set & (jax.random.uniform(each_rng, (batch, num_conditions)) >= dropout)


class ConditionEmbedding(nnx.Module):
    """Per-bar condition vectors of level 0: N x Bars x D from the features and which are given."""

    def __init__(self, names: tuple[str, ...], width: int, dtype, rngs: nnx.Rngs):
        self.names = tuple(names)
        self.embed = nnx.List([dense(CONDITIONS[name].size, width, dtype, rngs) for name in self.names])
        self.null = nnx.Param(embedding_init(rngs.params(), (len(self.names), width)))

    def __call__(self, features: dict, given_NxK):
        vectors = 0.0
        for k, (name, embed) in enumerate(zip(self.names, self.embed)):
            embedded_NxBarsxD = embed(features[name])
            null_D = self.null[...][k].astype(embedded_NxBarsxD.dtype)
            vectors = vectors + jnp.where(given_NxK[:, k, None, None], embedded_NxBarsxD, null_D)
        return vectors


def nothing_given(names, batch: int, num_bars: int) -> tuple[dict, np.ndarray]:
    """(features, given) of samples with no condition: what unconditional sampling feeds."""
    features = {name: np.zeros((batch, num_bars, CONDITIONS[name].size), np.float32) for name in names}
    return features, np.zeros((batch, len(names)), bool)


def asked(trained: tuple[str, ...], requests: dict, num_bars: int) -> tuple[dict, np.ndarray]:
    """(features {name: Bars x size}, given K) of what a user asked for ({name: text or None}),
    for a model trained with the conditions `trained`; a clear ConditionError for a condition
    the model was not trained with or cannot read."""
    requested = {name: value for name, value in requests.items() if value is not None}
    untrained = [name for name in requested if name not in trained]
    if untrained:
        flags = ", ".join(f"--{name}" for name in untrained)
        if not trained:
            raise ConditionError(
                f"this model was trained without conditions, so it cannot follow {flags}; "
                "train one with --conditions chords,density"
            )
        raise ConditionError(
            f"this model was trained with the conditions {','.join(trained)} only, so it cannot follow {flags}"
        )
    features, given = nothing_given(trained, 1, num_bars)
    for k, name in enumerate(trained):
        if name in requested:
            rows = CONDITIONS[name].parse(as_text(requested[name]))
            features[name] = np.resize(rows, (1, num_bars, rows.shape[1]))
            given[0, k] = True
    return {name: f[0] for name, f in features.items()}, given[0]


def as_text(value) -> str:
    """A condition as the command line gives it: "C G Am F" from a string, number or list."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)
