"""Music statistics of sets of MIDI files, their comparison, and a copying check.

Everything here reads MIDI files only (through `midi.read_score`), so it can judge any
generator. Time is the sixteenth-note grid of read_score; bars are the file's own, from its
time signatures (`midi.bar_lines`: step 0 is a downbeat, a 3/4 bar is 12 steps, a file
without a time signature is 4/4, 16 steps a bar; a meter change starts a bar), so a
generated file counts in the meter it was written with. A window is 128 steps (one
training crop; 8 bars of 4/4). A file's bars run up to the bar that holds its last note
end: a MIDI file says nothing about silence after its last note, so trailing empty bars
are not seen.

Features (FEATURES; each value below is one sample of the feature's distribution):
- notes_per_bar: notes starting in each bar (every bar of the file, empty ones too).
- polyphony: distinct pitches sounding at each step where any sounds.
- pitch_range, pitch_mean, pitch_std: max - min, mean and (population) std of the
  pitches of the notes starting in each window that has any. Windows are the whole
  128-step windows from step 0 within the file's bars; a shorter file is one window.
- pitch_class: pitch % 12 of each note (categorical: no mean).
- velocity, note_length (end - onset, steps): one value per note.
- ioi: steps between successive distinct onset steps of the file.
- empty_bar: 1 for a bar in which no note sounds, else 0 (its mean is the fraction).
- sounding_share: sounding (pitch, step) cells / (128 x steps) of each window.

Continuity (`continuity_counts`, reported beside the features, not in the mean OA): paint
each note's velocity on its cells (a later onset paints over an earlier note); then
same_velocity_neighbours = the share of horizontally neighbouring sounding cell pairs
(one pitch, steps t and t + 1) that hold one velocity, and cells_per_run = sounding cells
per maximal run of sounding cells of one pitch (velocity ignored). Held notes that a
generator breaks into fragments of other velocities lower the first; gaps the second.

Per file we keep, for every feature, its histogram counts over fixed bins shared by
all sets, and (count, sum, sum of squares) of its values. A set's distribution and
summary (mean, std) pool the values of its files, each value weighing the same (so
the mean IOI is over all intervals: busy windows weigh more than in a mean of
per-window means). Resampling files for the bootstrap is then a weighted sum of these
per-file rows (one matrix product per feature).

Comparison (Yang & Lerch 2020 style): the overlapping area of the two distributions,
computed on the shared histograms normalised to sum 1: OA = sum_i min(p_i, q_i)
(1 = same distribution, 0 = disjoint), not on kernel density estimates. Confidence
intervals are 95% percentile bootstrap intervals: files of each set are resampled
with replacement, independently per set. Resampling adds noise to both histograms,
and noise lowers the overlap of alike distributions, so when the two sets are
near-identical (OA close to 1) the OA draws sit mostly below the point estimate and
the interval may end at it. Judge a model's OA against the OA of real-vs-real data
(the ceiling), at similar set sizes.

Following the context (pitch_class_similarity): the cosine of the pitch-class histograms
(one count per note, as the pitch_class feature) of two sets of notes, such as the notes a
generator wrote into a region and the notes given around it; 1 = the same pitch classes in the
same proportions. `python -m fractalmidi_jax.evaluate prompts` reports it.

Copying check (copying_check): a bar is its binarised sounding cells, W steps x 128
pitches, where W is the longest bar of either set and a shorter bar is padded with
silence (so bars of 4/4 and 3/4 compare cell by cell from their downbeats, and a held
note counts in every step it sounds, not only at its onset). For
each generated bar (empty bars, or bars under min_cells cells, are left out) we find
the training bar and pitch shift d in [-max_shift, max_shift] with the highest
intersection over union (IoU) of cells, the generated bar shifted by d (cells shifted
out of 0..127 dropped). The search is exact and brute force, as dense matrix
products: the 2 max_shift + 1 shifted copies of the generated bars are the rows of a
float32 matrix, the training bars (kept bit-packed, unpacked a block at a time) its
columns, so one product gives every intersection and |A u B| = |A| + |B| - |A n B|.
Two exact savings: identical training bars are searched once (POP909 repeats itself:
~20% of its bars), and only the pitches that some training bar uses are multiplied
(a generated cell elsewhere can meet nothing, but still counts in |A|). For 512 bars
against POP909 train (~54k distinct bars, 83 pitches, max_shift 12) that is ~1.5e12
multiply-adds: under a minute on two CPU cores.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fractalmidi_jax import midi
from fractalmidi_jax.roll import NUM_PITCHES, note_cells

WINDOW_STEPS = 128
CI_LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Feature:
    """A feature and its fixed binning: bin i is [edges[i], edges[i+1]), the last bin is
    [edges[-1], inf); values below edges[0] count in bin 0."""

    name: str
    description: str
    edges: tuple[float, ...]
    integer: bool = True  # integer values: bins are labelled by their integer ranges
    categorical: bool = False  # no meaningful mean (pitch class)

    def bin_of(self, values: np.ndarray) -> np.ndarray:
        """The bin index of each value."""
        index = np.searchsorted(np.asarray(self.edges), values, side="right") - 1
        return np.clip(index, 0, len(self.edges) - 1)

    def labels(self) -> list[str]:
        """Readable bin names for tables and plots."""
        edges = self.edges
        if not self.integer:
            spans = [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])]
            return spans + [f">={edges[-1]:g}"]
        spans = [str(a) if b - a == 1 else f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]
        return spans + [f"{edges[-1]}+"]


_LOG_STEPS = (1, 2, 3, 4, 5, 7, 9, 13, 17)  # 1, 2, 3, 4, 5-6, 7-8, 9-12, 13-16, >16 steps

FEATURES: tuple[Feature, ...] = (
    Feature("notes_per_bar", "notes starting per bar", tuple(range(0, 97, 4))),
    Feature("polyphony", "pitches sounding per sounding step", tuple(range(1, 17))),
    Feature("pitch_range", "max - min pitch per 128-step window, semitones", tuple(range(0, 128, 4))),
    Feature("pitch_mean", "mean pitch per 128-step window", tuple(range(0, 128, 4))),
    Feature("pitch_std", "pitch std per 128-step window, semitones", tuple(range(0, 33))),
    Feature("pitch_class", "pitch class of each note (0 = C)", tuple(range(12)), categorical=True),
    Feature("velocity", "velocity of each note", tuple(range(0, 128, 8))),
    Feature("note_length", "note length, steps", _LOG_STEPS),
    Feature("ioi", "steps between successive onset steps", _LOG_STEPS),
    Feature("empty_bar", "1 if no note sounds in the bar", (0, 1)),
    Feature(
        "sounding_share",
        "sounding cells / (128 x steps) per 128-step window",
        tuple(round(0.005 * i, 3) for i in range(21)),
        integer=False,
    ),
)
FEATURE_BY_NAME = {f.name: f for f in FEATURES}


def midi_paths(source) -> list[Path]:
    """A folder -> its *.mid / *.midi files (recursively, sorted); a .txt file -> the
    paths it lists, one per line (blank lines skipped, relative paths resolved against
    the list's folder)."""
    source = Path(source)
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in (".mid", ".midi") and p.is_file())
    if source.suffix.lower() == ".txt":
        lines = (line.strip() for line in source.read_text().splitlines())
        return [source.parent / line for line in lines if line]
    raise ValueError(f"{source}: expected a folder of MIDI files or a .txt list of paths")


def load_scores(paths: Sequence[Path], options: midi.ReadOptions = midi.ReadOptions()):
    """Read each file's notes and meter; returns ([(path, Score)], [(path, one-line reason)])."""
    loaded, skipped = [], []
    for path in paths:
        try:
            loaded.append((str(path), midi.read_score(path, options)))
        except midi.MidiError as err:
            skipped.append((str(path), str(err)))
    return loaded, skipped


def sounding_cells(notes: np.ndarray, num_steps: int) -> np.ndarray:
    """bool [num_steps, 128]: True where any note of that pitch sounds (overlapping
    notes of one pitch simply overlap; no roll encoding gaps)."""
    delta = np.zeros((num_steps + 1, NUM_PITCHES), np.int32)
    np.add.at(delta, (notes[:, 0], notes[:, 2]), 1)
    np.add.at(delta, (np.minimum(notes[:, 1], num_steps), notes[:, 2]), -1)
    return np.cumsum(delta[:-1], axis=0) > 0


def piece_bar_lines(notes: np.ndarray, time_signatures=()) -> np.ndarray:
    """int64 [bars + 1]: where each bar up to the last note end starts, then where the last one
    ends, in the piece's meter (midi.bar_lines)."""
    return midi.bar_lines(time_signatures, int(notes[:, 1].max()))


def feature_values(notes: np.ndarray, time_signatures=()) -> dict[str, np.ndarray]:
    """Every feature's values (samples) for one file's notes (int [N, 4], N >= 1), bars counted in
    its meter (Score.time_signatures; none = 4/4)."""
    onset, end, pitch, velocity = (notes[:, i].astype(np.int64) for i in range(4))
    lines = piece_bar_lines(notes, time_signatures)
    bars, steps = len(lines) - 1, int(lines[-1])
    cells = sounding_cells(notes, steps)
    per_step = cells.sum(axis=1)

    window = min(WINDOW_STEPS, steps)
    windows = steps // window
    in_window = onset < windows * window
    w = onset[in_window] // window
    p = pitch[in_window]
    count = np.bincount(w, minlength=windows)
    lowest = np.full(windows, NUM_PITCHES)
    highest = np.full(windows, -1)
    np.minimum.at(lowest, w, p)
    np.maximum.at(highest, w, p)
    used = count > 0
    mean = np.bincount(w, p, minlength=windows)[used] / count[used]
    square = np.bincount(w, p * p, minlength=windows)[used] / count[used]

    return {
        "notes_per_bar": np.bincount(np.searchsorted(lines, onset, side="right") - 1, minlength=bars),
        "polyphony": per_step[per_step > 0],
        "pitch_range": (highest - lowest)[used],
        "pitch_mean": mean,
        "pitch_std": np.sqrt(np.maximum(square - mean * mean, 0.0)),
        "pitch_class": pitch % 12,
        "velocity": velocity,
        "note_length": end - onset,
        "ioi": np.diff(np.unique(onset)),
        "empty_bar": (~np.logical_or.reduceat(cells.any(axis=1), lines[:-1])).astype(np.int64),
        "sounding_share": cells[: windows * window].reshape(windows, -1).mean(axis=1),
    }


@dataclasses.dataclass
class SetStats:
    """Per-file sufficient statistics of every feature, so that files can be resampled
    without recomputing anything."""

    files: list[str]
    meters: list[str]  # each file's first time signature, "3/4" ("4/4" where it has none)
    skipped: list[tuple[str, str]]
    counts: dict[str, np.ndarray]  # feature -> int [files, bins] histogram counts
    moments: dict[str, np.ndarray]  # feature -> float [files, 3]: number of values, sum, sum of squares
    continuity: np.ndarray  # int [files, 4]: neighbour pairs, pairs of one velocity, runs, run cells


def continuity_counts(notes: np.ndarray) -> np.ndarray:
    """int [4]: sounding neighbour pairs, those of one velocity, runs and their cells (module docstring)."""
    num_steps = int(notes[:, 1].max())
    notes = notes[np.argsort(notes[:, 0], kind="stable")]  # later onsets paint last
    onset, end, pitch, velocity = (notes[:, i].astype(np.int64) for i in range(4))
    cell_pitch, cell_step, _ = note_cells(onset, end, pitch)
    velocity_TxP = np.zeros((num_steps, NUM_PITCHES), np.int16)
    velocity_TxP[cell_step, cell_pitch] = np.repeat(velocity, end - onset)
    sounding = velocity_TxP > 0
    pairs = sounding[1:] & sounding[:-1]
    same = pairs & (velocity_TxP[1:] == velocity_TxP[:-1])
    runs = sounding.sum() - pairs.sum()
    return np.array([pairs.sum(), same.sum(), runs, sounding.sum()], np.int64)


def set_stats(named_scores: Sequence[tuple[str, midi.Score]], skipped=()) -> SetStats:
    """SetStats of (name, Score) pairs, each in its own meter; `skipped` is carried along for
    reporting."""
    counts = {f.name: np.zeros((len(named_scores), len(f.edges)), np.int64) for f in FEATURES}
    moments = {f.name: np.zeros((len(named_scores), 3)) for f in FEATURES}
    for i, (_, score) in enumerate(named_scores):
        for name, values in feature_values(score.notes, score.time_signatures).items():
            values = values.astype(np.float64)
            counts[name][i] = np.bincount(
                FEATURE_BY_NAME[name].bin_of(values), minlength=counts[name].shape[1]
            )
            moments[name][i] = (values.size, values.sum(), (values * values).sum())
    continuity = np.array([continuity_counts(s.notes) for _, s in named_scores], np.int64).reshape(-1, 4)
    meters = [
        "/".join(map(str, s.time_signatures[0][1:])) if s.time_signatures else "4/4" for _, s in named_scores
    ]
    return SetStats([name for name, _ in named_scores], meters, list(skipped), counts, moments, continuity)


def continuity(stats: SetStats) -> dict:
    """same_velocity_neighbours and cells_per_run of a whole set (module docstring)."""
    pairs, same, runs, cells = stats.continuity.sum(axis=0)
    return {
        "same_velocity_neighbours": _number(same / max(pairs, 1)),
        "cells_per_run": _number(cells / max(runs, 1)),
    }


def overlapping_area(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """OA = sum_i min(p_i, q_i) of histograms normalised to sum 1, over the last axis
    (NaN where either histogram is empty)."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = p / p.sum(axis=-1, keepdims=True)
        q = q / q.sum(axis=-1, keepdims=True)
    return np.minimum(p, q).sum(axis=-1)


def _mean_std(moments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled mean and std from summed (n, sum, sum of squares) along the last axis."""
    n, total, square = moments[..., 0], moments[..., 1], moments[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n
        return mean, np.sqrt(np.maximum(square / n - mean * mean, 0.0))


def _resample_weights(num_files: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """float [draws, files]: how often each file is picked when resampling with replacement."""
    return rng.multinomial(num_files, np.full(num_files, 1.0 / num_files), size=draws).astype(np.float64)


def _interval(draws: np.ndarray) -> list[float | None]:
    """The central CI_LEVEL percentile interval of bootstrap draws (NaN draws ignored)."""
    tail = 50.0 * (1.0 - CI_LEVEL)
    finite = draws[np.isfinite(draws)]
    if not finite.size:
        return [None, None]
    return [float(np.percentile(finite, tail)), float(np.percentile(finite, 100.0 - tail))]


def _number(x) -> float | None:
    """A JSON-friendly float (None for NaN)."""
    x = float(x)
    return x if np.isfinite(x) else None


def summarize(stats: SetStats, weights: np.ndarray) -> dict:
    """Per feature: pooled mean, std, number of values, histogram (sums to 1) and a
    bootstrap CI of the mean from `weights` [draws, files]."""
    out = {}
    for feature in FEATURES:
        counts = stats.counts[feature.name].sum(axis=0)
        moments = stats.moments[feature.name]
        mean, std = _mean_std(moments.sum(axis=0))
        boot_mean, _ = _mean_std(weights @ moments)
        has_mean = not feature.categorical
        out[feature.name] = {
            "mean": _number(mean) if has_mean else None,
            "std": _number(std) if has_mean else None,
            "mean_ci": _interval(boot_mean) if has_mean else [None, None],
            "values": int(moments[:, 0].sum()),
            "histogram": (counts / max(counts.sum(), 1)).tolist(),
        }
    return out


def compare(generated: SetStats, reference: SetStats, bootstrap: int = 500, seed: int = 0) -> dict:
    """Summaries of both sets and, per feature, the OA of their distributions with a
    bootstrap CI; also the mean OA over features (with CI from the same draws)."""
    if not generated.files or not reference.files:
        raise ValueError("both sets need at least one readable file")
    rng = np.random.default_rng(seed)
    gen_weights = _resample_weights(len(generated.files), bootstrap, rng)
    ref_weights = _resample_weights(len(reference.files), bootstrap, rng)
    oa, boot_oa = {}, []
    for feature in FEATURES:
        gen_counts, ref_counts = generated.counts[feature.name], reference.counts[feature.name]
        oa[feature.name] = float(overlapping_area(gen_counts.sum(axis=0), ref_counts.sum(axis=0)))
        boot_oa.append(overlapping_area(gen_weights @ gen_counts, ref_weights @ ref_counts))
    boot_oa = np.stack(boot_oa, axis=1)  # [draws, features]
    return {
        "oa_method": "histogram overlap: sum_i min(p_i, q_i) over shared bins, each histogram normalised to sum 1",
        "bootstrap": bootstrap,
        "seed": seed,
        "ci_level": CI_LEVEL,
        "sets": {
            "generated": _set_header(generated)
            | {"features": summarize(generated, gen_weights), "continuity": continuity(generated)},
            "reference": _set_header(reference)
            | {"features": summarize(reference, ref_weights), "continuity": continuity(reference)},
        },
        "features": {
            f.name: {
                "description": f.description,
                "bins": f.labels(),
                "oa": _number(oa[f.name]),
                "oa_ci": _interval(boot_oa[:, i]),
            }
            for i, f in enumerate(FEATURES)
        },
        "mean_oa": _number(_finite_mean(np.array(list(oa.values())))),
        "mean_oa_ci": _interval(_finite_mean(boot_oa)),
    }


def _finite_mean(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite entries (a feature without values in a
    resample has no OA); NaN where there is none."""
    finite = np.isfinite(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, x, 0.0).sum(axis=-1) / finite.sum(axis=-1)


def _set_header(stats: SetStats) -> dict:
    return {
        "files": len(stats.files),
        "meters": dict(collections.Counter(stats.meters).most_common()),
        "skipped": [list(s) for s in stats.skipped],
    }


def pitch_class_similarity(notes_a: np.ndarray, notes_b: np.ndarray) -> float | None:
    """Cosine of the pitch-class histograms of two sets of notes (module docstring); None when
    either has no note."""
    a, b = (np.bincount(notes[:, 2] % 12, minlength=12).astype(np.float64) for notes in (notes_a, notes_b))
    if not a.any() or not b.any():
        return None
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def bar_cells(notes: np.ndarray, lines: np.ndarray, width: int) -> np.ndarray:
    """bool [bars, width, 128]: the sounding cells (step-major) of each bar [lines[i], lines[i + 1]),
    from its downbeat, padded with silence to width steps."""
    cells = np.zeros((int(lines[-1]) + width, NUM_PITCHES), bool)
    cells[: lines[-1]] = sounding_cells(notes, int(lines[-1]))
    offsets = np.arange(width)
    inside = offsets < np.diff(lines)[:, None]
    return cells[lines[:-1, None] + offsets] & inside[..., None]


def _shifted(bars: np.ndarray, max_shift: int) -> np.ndarray:
    """bool [bars, 2 max_shift + 1, W, 128]: each bar moved by -max_shift..max_shift
    semitones, cells moved out of 0..127 dropped."""
    out = np.zeros((bars.shape[0], 2 * max_shift + 1) + bars.shape[1:], bool)
    for k, d in enumerate(range(-max_shift, max_shift + 1)):
        if d >= 0:
            out[:, k, :, d:] = bars[:, :, : NUM_PITCHES - d]
        else:
            out[:, k, :, :d] = bars[:, :, -d:]
    return out


def copying_check(
    generated: Sequence[tuple[str, midi.Score]],
    train: Sequence[tuple[str, midi.Score]],
    threshold: float = 0.8,
    max_shift: int = 12,
    min_cells: int = 1,
    gen_block: int = 256,
    train_block: int = 4096,
) -> dict:
    """For each generated bar with at least min_cells sounding cells, its best IoU with
    any non-empty training bar under pitch shifts -max_shift..max_shift (see the module
    docstring), and the fraction of those bars with IoU >= threshold (near copies).
    Inputs are (name, Score) pairs, bars in each piece's meter; bars are reported as (name, bar
    index)."""
    gen_lines = [piece_bar_lines(s.notes, s.time_signatures) for _, s in generated]
    train_lines = [piece_bar_lines(s.notes, s.time_signatures) for _, s in train]
    width = int(max(np.diff(lines).max() for lines in gen_lines + train_lines))
    gen_bars, gen_where = _bars(generated, gen_lines, width, min_cells)
    train_packed, train_where = _bars(train, train_lines, width, 1, packed=True)
    if not len(train_packed):
        raise ValueError("the training set has no non-empty bar")
    train_bars = len(train_packed)
    train_packed, first = np.unique(train_packed, axis=0, return_index=True)
    train_where = [train_where[i] for i in first]
    pitch_used = np.unpackbits(np.bitwise_or.reduce(train_packed, axis=0)).reshape(width, -1).any(axis=0)
    columns = np.flatnonzero(np.tile(pitch_used, width))
    shifts = 2 * max_shift + 1
    best_iou = np.zeros((len(gen_bars), shifts), np.float32)
    best_bar = np.zeros((len(gen_bars), shifts), np.int64)
    for g in range(0, len(gen_bars), gen_block):
        rows = _shifted(gen_bars[g : g + gen_block], max_shift).reshape(-1, width * NUM_PITCHES)
        row_size = rows.sum(axis=1, dtype=np.float32)
        rows = rows[:, columns].astype(np.float32)
        iou_rows = np.zeros(len(rows), np.float32)
        bar_rows = np.zeros(len(rows), np.int64)
        for t in range(0, len(train_packed), train_block):
            block = np.unpackbits(train_packed[t : t + train_block], axis=1)[:, columns].astype(np.float32)
            inter = rows @ block.T
            iou = np.add.outer(row_size, block.sum(axis=1))
            iou -= inter
            np.divide(inter, iou, out=iou)
            j = iou.argmax(axis=1)
            value = iou[np.arange(len(rows)), j]
            better = value > iou_rows
            iou_rows[better] = value[better]
            bar_rows[better] = t + j[better]
        best_iou[g : g + gen_block] = iou_rows.reshape(-1, shifts)
        best_bar[g : g + gen_block] = bar_rows.reshape(-1, shifts)

    k = best_iou.argmax(axis=1)
    iou = best_iou[np.arange(len(gen_bars)), k]
    source = best_bar[np.arange(len(gen_bars)), k]
    cells = gen_bars.sum(axis=(1, 2))
    per_bar = [
        {
            "file": generated[gen_where[i][0]][0],
            "bar": gen_where[i][1],
            "cells": int(cells[i]),
            "best_iou": float(iou[i]),
            "train_file": train[train_where[source[i]][0]][0],
            "train_bar": train_where[source[i]][1],
            "shift": int(k[i]) - max_shift,
        }
        for i in range(len(gen_bars))
    ]
    near = int((iou >= threshold).sum())
    return {
        "representation": f"sounding cells, {width} steps x 128 pitches per bar (each piece's meter, "
        "shorter bars padded with silence)",
        "threshold": threshold,
        "max_shift": max_shift,
        "min_cells": min_cells,
        "generated_bars": sum(len(lines) - 1 for lines in gen_lines),
        "checked_bars": len(gen_bars),
        "train_bars": train_bars,
        "distinct_train_bars": len(train_packed),
        "near_copies": near,
        "near_copy_fraction": _number(near / len(gen_bars)) if len(gen_bars) else None,
        "mean_best_iou": _number(iou.mean()) if len(gen_bars) else None,
        "bars": per_bar,
    }


def _bars(named_scores, bar_lines, width: int, min_cells: int, packed: bool = False):
    """The bars with at least min_cells sounding cells of all files, stacked (bool
    [bars, width, 128], or bit-packed uint8 [bars, 16 width] to keep a large training set
    small), and (file index, bar index) of each."""
    out = [
        np.zeros((0, width * NUM_PITCHES // 8), np.uint8)
        if packed
        else np.zeros((0, width, NUM_PITCHES), bool)
    ]
    where = []
    for i, ((_, score), lines) in enumerate(zip(named_scores, bar_lines)):
        bars = bar_cells(score.notes, lines, width)
        keep = np.flatnonzero(bars.reshape(len(bars), -1).sum(axis=1) >= max(min_cells, 1))
        out.append(np.packbits(bars[keep].reshape(len(keep), -1), axis=1) if packed else bars[keep])
        where.extend((i, b) for b in keep.tolist())
    return np.concatenate(out), where
