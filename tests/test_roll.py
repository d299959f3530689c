"""Tests of fractalmidi_jax.roll: both roll kinds' encoding and exact decoding, repeated notes,
crops that start inside a note, the orphan-sustain policy, forced note starts, the network's
input features and the head's class count."""

import numpy as np
import pytest

from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax.roll import SUSTAIN, notes_to_roll, roll_to_notes

NOTES = np.array(
    [
        [0, 4, 60, 50],
        [4, 6, 60, 90],  # back to back
        [10, 20, 62, 40],
        [12, 14, 62, 100],  # a re-strike inside a held note ends it
        [30, 31, 64, 70],
        [31, 33, 64, 20],  # a one-step note then an onset of another velocity
        [35, 36, 64, 20],
        [36, 37, 64, 20],  # ... and of the same velocity
        [40, 50, 65, 30],
        [40, 45, 65, 80],  # two notes at one onset: loudest, longest
    ]
)


def test_velocity_roll_encoding():
    roll = notes_to_roll(NOTES, 60, "velocity")
    assert roll.shape == (128, 60) and roll.dtype == np.uint8
    assert roll[60, :7].tolist() == [50, 50, 50, 0, 90, 90, 0]
    assert roll[62, 9:21].tolist() == [0, 40, 0, 100, 100] + [0] * 7
    assert roll[64, 30:38].tolist() == [70, 20, 20, 0, 0, 20, 20, 0]
    assert roll[65, 40:51].tolist() == [80] * 10 + [0]
    assert roll_to_notes(roll, "velocity").tolist() == [
        [0, 3, 60, 50],
        [4, 6, 60, 90],
        [10, 11, 62, 40],
        [12, 14, 62, 100],
        [30, 31, 64, 70],
        [31, 33, 64, 20],
        [35, 37, 64, 20],  # back-to-back one-step notes of one velocity merge
        [40, 50, 65, 80],
    ]
    loud = [[4, 6, 60, 90], [12, 14, 62, 100], [30, 31, 64, 70], [40, 50, 65, 80]]
    assert roll_to_notes(roll, "velocity", min_velocity=60).tolist() == loud
    long = [[0, 3, 60, 50], [40, 50, 65, 80]]
    assert roll_to_notes(roll, "velocity", min_note_steps=3).tolist() == long


def test_note_roll_encodes_onsets_and_sustains_and_decodes_exactly():
    roll = notes_to_roll(NOTES, 60, "note")
    s = SUSTAIN
    assert roll[60, :7].tolist() == [50, s + 50, s + 50, s + 50, 90, s + 90, 0]  # no gap before a repeat
    assert roll[62, 9:15].tolist() == [0, 40, s + 40, 100, s + 100, 0]
    assert roll[64, 35:38].tolist() == [20, 20, 0]  # repeated sixteenths stay two notes
    assert roll_to_notes(roll, "note").tolist() == [
        [0, 4, 60, 50],
        [4, 6, 60, 90],
        [10, 12, 62, 40],
        [12, 14, 62, 100],
        [30, 31, 64, 70],
        [31, 33, 64, 20],
        [35, 36, 64, 20],
        [36, 37, 64, 20],
        [40, 50, 65, 80],
    ]
    tokens = roll_lib.crop_tokens(roll.copy(), "note")
    assert (
        tokens.max() == SUSTAIN
        and roll_to_notes(tokens, "note").tolist() == roll_to_notes(roll, "note").tolist()
    )


def test_note_roll_round_trips_random_notes():
    rng = np.random.default_rng(0)
    onset = rng.integers(0, 500, 3000)
    notes = np.stack(
        [onset, onset + rng.integers(1, 20, 3000), rng.integers(0, 128, 3000), rng.integers(1, 128, 3000)], 1
    )
    roll = notes_to_roll(notes, 512, "note")
    decoded = roll_to_notes(roll, "note")
    # what the roll can hold: one note per (pitch, onset), each ended by the next onset of its pitch
    onset, end, pitch, velocity, _ = roll_lib._resolve_overlaps(notes)
    inside = onset < 512
    want = np.stack([onset, np.minimum(end, 512), pitch, velocity], 1)[inside]
    want = want[np.lexsort((want[:, 2], want[:, 0]))]
    assert decoded.tolist() == want.tolist()
    assert roll_to_notes(roll_lib.crop_tokens(roll.copy(), "note"), "note").tolist() == want.tolist()


def test_a_crop_inside_a_note_starts_with_its_onset():
    roll = notes_to_roll([[2, 9, 60, 77], [0, 3, 61, 50]], 12, "note")
    window = roll_lib.crop_tokens(roll[:, 4:10].copy(), "note")
    assert window[60].tolist() == [77, SUSTAIN, SUSTAIN, SUSTAIN, SUSTAIN, 0]
    assert window[61].tolist() == [0] * 6
    assert roll_to_notes(window, "note").tolist() == [[0, 5, 60, 77]]
    velocity = roll_lib.crop_tokens(
        notes_to_roll([[2, 9, 60, 77]], 12, "velocity")[:, 4:10].copy(), "velocity"
    )
    assert velocity[60].tolist() == [77] * 5 + [0]


def test_orphan_sustain_policy():
    tokens = np.zeros((128, 10), np.uint8)
    tokens[60, [0, 1]] = [SUSTAIN, SUSTAIN]  # nothing before it on its pitch: DEFAULT_VELOCITY
    tokens[61, [0, 1, 4, 5]] = [90, SUSTAIN, SUSTAIN, SUSTAIN]  # after silence: the latest onset's velocity
    assert roll_to_notes(tokens, "note").tolist() == [
        [0, 2, 60, roll_lib.DEFAULT_VELOCITY],
        [0, 2, 61, 90],
        [4, 6, 61, 90],
    ]


def test_forced_starts_split_notes_where_known_and_generated_cells_meet():
    tokens = np.zeros((128, 6), np.uint8)
    tokens[60, :4] = [70, SUSTAIN, SUSTAIN, SUSTAIN]
    starts = np.zeros_like(tokens, bool)
    starts[60, 2] = True
    assert roll_to_notes(tokens, "note", starts=starts).tolist() == [[0, 2, 60, 70], [2, 4, 60, 70]]
    velocity = np.zeros((128, 6), np.uint8)
    velocity[60, :4] = 70
    assert roll_to_notes(velocity, "velocity", starts=starts).tolist() == [[0, 2, 60, 70], [2, 4, 60, 70]]


def test_velocity_tolerance_merges_jitter():
    roll = np.zeros((128, 8), np.uint8)
    roll[60, 1:7] = [80, 82, 79, 81, 0, 90]
    assert roll_to_notes(roll, "velocity").shape[0] == 5
    assert roll_to_notes(roll, "velocity", velocity_tolerance=3).tolist() == [[1, 5, 60, 80], [6, 7, 60, 90]]


@pytest.mark.parametrize("kind", roll_lib.KINDS)
def test_notes_to_roll_cuts_and_skips(kind):
    roll = notes_to_roll([[5, 100, 127, 10], [20, 30, 0, 5], [3, 3, 1, 5], [0, 2, 128, 5]], 10, kind)
    assert roll_to_notes(roll, kind).tolist() == [[5, 10, 127, 10]]
    assert roll_to_notes(notes_to_roll(np.zeros((0, 4)), 4, kind), kind).shape == (0, 4)


def test_pictures_paint_each_note_with_its_velocity():
    tokens = np.zeros((128, 5), np.uint8)
    tokens[60, :3] = [99, SUSTAIN, SUSTAIN]
    assert roll_lib.velocity_cells(tokens, "note")[60].tolist() == [99, 99, 99, 0, 0]
    assert roll_lib.velocity_cells(tokens[:, :3].clip(0, 127), "velocity")[60].tolist() == [99, 127, 127]


def test_features_and_classes():
    cells = np.array([0, 64, SUSTAIN])
    note = np.asarray(roll_lib.cell_features(cells, "note", np.float32))
    np.testing.assert_allclose(note, [[0, 0, 0], [1, 1, 64 / 127], [1, 0, 0]], rtol=1e-6)
    velocity = np.asarray(roll_lib.cell_features(np.array([0, 127]), "velocity", np.float32))
    np.testing.assert_allclose(velocity, [[0], [1]])
    assert (roll_lib.num_classes("note"), roll_lib.num_classes("velocity")) == (129, 128)
    assert (roll_lib.num_channels("note"), roll_lib.num_channels("velocity")) == (3, 1)
    with pytest.raises(ValueError, match="roll kind"):
        roll_lib.num_classes("piano")
