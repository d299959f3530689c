"""The piano roll: what a cell holds, how notes become cells and cells become notes, what the
network sees of a cell, and MIDI files in and out as rolls.

A roll is uint8 [128 pitches, steps], one step a sixteenth note. Two kinds (`Config.roll`):

- `note` (the default): a cell is silence (0), the onset of a note of velocity v (1..127), or
  the sustain of the note to its left (SUSTAIN = 128). A note is its onset plus the sustains
  after it, so decoding is exact and a repeated note is simply a new onset: no gap is needed.
  Its velocity is drawn once, at the onset. The head predicts 129 classes.
  Pieces are stored (cache, library) with each sustain as 128 + v, the velocity of its note,
  so a crop that starts inside a note turns its first cell into that note's onset
  (`crop_tokens`): every crop is a self-contained piece and training never sees a sustain
  without a note to its left.
  A sustain with silence (or the roll's start) to its left (policy): it starts a note, with the
  velocity of the latest onset before it on that pitch, else DEFAULT_VELOCITY.
- `velocity` (the FractalMIDI original's): a cell holds the velocity of the note sounding
  there (0 = silence), 128 classes. A note that runs into the next onset of its pitch is
  shortened by one step, so onsets survive; decoding starts a note wherever a cell sounds after
  silence or with another velocity than the cell before it (beyond `velocity_tolerance`), so
  two back-to-back one-step notes of one velocity merge (0.5% of POP909's notes).

In both kinds, where notes of one pitch overlap, a later onset ends the earlier note (at one
onset the loudest note wins, with the longest end).

Network inputs (`cell_features`): velocity rolls give one channel, velocity / 127; note rolls
three: sounding, onset, and velocity / 127 at onsets.
"""

from __future__ import annotations

import numpy as np

from fractalmidi_jax import midi

NUM_PITCHES = 128
KINDS = ("note", "velocity")
SUSTAIN = 128  # a note roll's token for "the note to the left goes on"
DEFAULT_VELOCITY = 64  # an orphan sustain's velocity when its pitch had no onset before it


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"roll kind {kind!r}; use one of {', '.join(KINDS)}")
    return kind


def num_classes(kind: str) -> int:
    """Values a cell token can take: the head's softmax size."""
    return 129 if check_kind(kind) == "note" else 128


def num_channels(kind: str) -> int:
    """Input features per cell (`cell_features`)."""
    return 3 if check_kind(kind) == "note" else 1


# --- notes -> roll ---


def _resolve_overlaps(notes) -> tuple[np.ndarray, ...]:
    """(onset, end, pitch, velocity) arrays sorted by pitch then onset, one note per (pitch,
    onset) (loudest, longest), each ended at the next onset of its pitch; invalid rows dropped."""
    notes = np.asarray(notes, dtype=np.int64).reshape(-1, 4)
    onset, end, pitch, velocity = notes[:, 0], notes[:, 1], notes[:, 2], np.minimum(notes[:, 3], 127)
    keep = (onset >= 0) & (end > onset) & (pitch >= 0) & (pitch < NUM_PITCHES) & (velocity > 0)
    onset, end, pitch, velocity = onset[keep], end[keep], pitch[keep], velocity[keep]
    order = np.lexsort((-velocity, onset, pitch))  # by pitch, then onset, loudest first
    onset, end, pitch, velocity = onset[order], end[order], pitch[order], velocity[order]
    first = np.ones(len(onset), bool)
    first[1:] = (pitch[1:] != pitch[:-1]) | (onset[1:] != onset[:-1])
    if len(onset):
        end = np.maximum.reduceat(end, np.flatnonzero(first))
    onset, pitch, velocity = onset[first], pitch[first], velocity[first]
    next_onset = np.full(len(onset), np.iinfo(np.int64).max)
    same_pitch = pitch[1:] == pitch[:-1]
    next_onset[:-1][same_pitch] = onset[1:][same_pitch]
    return onset, np.minimum(end, next_onset), pitch, velocity, next_onset


def note_cells(onset, end, pitch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pitch, step, steps since the onset) of every cell of the notes [onset, end) of `pitch`,
    note after note."""
    length = np.asarray(end) - onset
    since_onset = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    return np.repeat(pitch, length), np.repeat(onset, length) + since_onset, since_onset


def notes_to_roll(notes, num_steps: int, kind: str) -> np.ndarray:
    """int [N, 4] (onset, end, pitch, velocity) rows -> the stored uint8 [128, num_steps] roll.

    Ends are cut at num_steps; rows with onset >= num_steps, end <= onset, a pitch outside
    0..127 or velocity <= 0 are left out."""
    onset, end, pitch, velocity, next_onset = _resolve_overlaps(notes)
    inside = onset < num_steps
    onset, end, pitch, velocity, next_onset = (x[inside] for x in (onset, end, pitch, velocity, next_onset))
    end = np.minimum(end, num_steps)
    if check_kind(kind) == "velocity":
        end = end - ((end == next_onset) & (end - onset >= 2))  # the gap before a repeated onset
    cell_pitch, cell_step, since_onset = note_cells(onset, end, pitch)
    cell_velocity = np.repeat(velocity, end - onset)
    if kind == "note":
        cell_velocity = cell_velocity + np.where(since_onset == 0, 0, SUSTAIN)
    roll = np.zeros((NUM_PITCHES, num_steps), np.uint8)
    roll[cell_pitch, cell_step] = cell_velocity
    return roll


def crop_tokens(window_PxL: np.ndarray, kind: str) -> np.ndarray:
    """A window of a stored roll as model tokens, in place: in a note roll a sustain in the first
    column becomes its note's onset, every other sustain the plain SUSTAIN token."""
    if kind == "note" and window_PxL.shape[1]:
        first = window_PxL[:, 0]
        first[first > SUSTAIN] -= SUSTAIN
        window_PxL[window_PxL > SUSTAIN] = SUSTAIN
    return window_PxL


def window_tokens(tokens_PxT: np.ndarray, start: int, width: int, kind: str) -> np.ndarray:
    """Model tokens of steps [start, start + width) of a token roll (silence past its end), as a
    training crop sees them: in a note roll a sustain in the first column becomes its note's
    onset, with the velocity of the latest onset before it on its pitch."""
    window = np.zeros((tokens_PxT.shape[0], width), np.uint8)
    part = tokens_PxT[:, start : start + width]
    window[:, : part.shape[1]] = part
    if check_kind(kind) == "note" and part.shape[1]:
        carried = window[:, 0] == SUSTAIN
        velocity = _latest_onset_velocity(np.asarray(tokens_PxT[:, : start + 1]).astype(np.int16))[:, start]
        window[carried, 0] = velocity[carried]
    return window


# --- roll -> notes ---


def roll_to_notes(
    roll,
    kind: str,
    min_velocity: int = 1,
    min_note_steps: int = 1,
    velocity_tolerance: int = 0,
    starts=None,
) -> np.ndarray:
    """A roll (stored or tokens) [pitches, steps] -> int32 [N, 4] (onset, end, pitch, velocity),
    sorted by onset then pitch. Notes quieter than min_velocity or shorter than min_note_steps
    are dropped; velocity_tolerance applies to velocity rolls only (note rolls decode exactly).
    `starts` (bool [pitches, steps]) marks more cells where a sounding cell begins a note (a
    sustain there takes the velocity of the latest onset on its pitch, as an orphan does)."""
    cells = np.asarray(roll).astype(np.int16)
    before = np.zeros_like(cells)
    before[:, 1:] = cells[:, :-1]
    sounding = cells > 0
    extra = np.zeros_like(sounding) if starts is None else np.asarray(starts, bool)
    if check_kind(kind) == "note":
        starts = sounding & ((cells < SUSTAIN) | (before == 0) | extra)
        velocity_cells = np.where(cells > SUSTAIN, cells - SUSTAIN, cells)
        velocity_cells = np.where(cells == SUSTAIN, _latest_onset_velocity(cells), velocity_cells)
    else:
        starts = sounding & ((before == 0) | (np.abs(cells - before) > velocity_tolerance) | extra)
        velocity_cells = cells
    after_sounds = np.zeros_like(sounding)
    after_sounds[:, :-1] = sounding[:, 1:]
    after_starts = np.zeros_like(starts)
    after_starts[:, :-1] = starts[:, 1:]
    lasts = sounding & (~after_sounds | after_starts)
    pitch, onset = np.nonzero(starts)
    _, last = np.nonzero(lasts)  # row-major order pairs each note's first cell with its last
    velocity = velocity_cells[pitch, onset].astype(np.int64)
    end = last + 1
    keep = (velocity >= min_velocity) & (end - onset >= min_note_steps)
    notes = np.stack([onset, end, pitch, velocity], axis=1)[keep]
    return notes[np.lexsort((notes[:, 2], notes[:, 0]))].astype(np.int32)


def _latest_onset_velocity(cells: np.ndarray) -> np.ndarray:
    """Per cell, the velocity of the latest onset at or before it on its pitch (DEFAULT_VELOCITY
    where there is none): what an orphan SUSTAIN token starts its note with."""
    onsets = (cells > 0) & (cells < SUSTAIN)
    steps = np.arange(cells.shape[1])
    latest = np.maximum.accumulate(np.where(onsets, steps, -1), axis=1)
    found = np.take_along_axis(cells, np.maximum(latest, 0), axis=1)
    return np.where(latest >= 0, found, DEFAULT_VELOCITY)


def velocity_cells(roll, kind: str) -> np.ndarray:
    """uint8 [pitches, steps]: each sounding cell painted with its note's velocity (a velocity
    roll as it is): what pictures show."""
    cells = np.asarray(roll)
    if check_kind(kind) == "velocity":
        return cells.astype(np.uint8)
    onset, end, pitch, velocity = roll_to_notes(cells, kind).T.astype(np.int64)
    cell_pitch, cell_step, _ = note_cells(onset, end, pitch)
    out = np.zeros(cells.shape, np.uint8)
    out[cell_pitch, cell_step] = np.repeat(velocity, end - onset)
    return out


# --- what the network sees ---


def cell_features(cells, kind: str, dtype):
    """Float [..., C] inputs of integer cell tokens (jax or numpy arrays)."""
    import jax.numpy as jnp

    cells = jnp.asarray(cells)
    if check_kind(kind) == "velocity":
        return (cells / 127.0).astype(dtype)[..., None]
    onset = (cells > 0) & (cells < SUSTAIN)
    return jnp.stack([cells > 0, onset, jnp.where(onset, cells / 127.0, 0.0)], axis=-1).astype(dtype)


# --- MIDI files as rolls ---


def read_roll(
    path, kind: str, options: midi.ReadOptions = midi.ReadOptions()
) -> tuple[np.ndarray, midi.Score]:
    """(stored roll, score) of a MIDI file; raises midi.MidiError."""
    score = midi.read_score(path, options)
    return notes_to_roll(score.notes, score.num_steps, kind), score


def roundtrip_stats(paths, kind: str, options: midi.ReadOptions = midi.ReadOptions()) -> dict:
    """How many notes survive MIDI -> roll -> MIDI with (onset step, pitch, velocity) intact.

    The reference is each file's Score (quantised, tracks merged: the notes as the roll
    sees them). Returns files, notes, exact, fraction (exact / notes), spurious (notes
    after the round trip that were not there before) and skipped [(path, reason)]."""
    import tempfile
    from pathlib import Path

    files = total = exact = spurious = 0
    skipped = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "roundtrip.mid"
        for path in paths:
            try:
                roll, before = read_roll(path, kind, options)
            except midi.MidiError as err:
                skipped.append((str(path), str(err)))
                continue
            midi.write_midi(out, roll_to_notes(roll, kind), before.tempo_bpm)
            after = midi.read_score(out, options)
            want = set(map(tuple, before.notes[:, [0, 2, 3]].tolist()))
            got = set(map(tuple, after.notes[:, [0, 2, 3]].tolist()))
            files += 1
            total += len(want)
            exact += len(want & got)
            spurious += len(got - want)
    return {
        "kind": kind,
        "files": files,
        "notes": total,
        "exact": exact,
        "fraction": exact / total if total else float("nan"),
        "spurious": spurious,
        "skipped": skipped,
    }
