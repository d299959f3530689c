"""Meter: time signatures are read, bar-based generation arguments and written files follow the
piece's meter (a 3/4 piece has 12-step bars), without a model."""

import argparse
import dataclasses

import numpy as np
import pretty_midi
import pytest
from tiny import write_song

from fractalmidi_jax import generation, midi


def with_meters(path, *meters):
    """Rewrites a song with the given (seconds, numerator, denominator) time signatures (120 bpm:
    a quarter is 0.5 s, a step 0.125 s)."""
    song = pretty_midi.PrettyMIDI(str(path))
    song.time_signature_changes = [pretty_midi.TimeSignature(n, d, t) for t, n, d in meters]
    song.write(str(path))
    return path


@pytest.mark.parametrize(
    ("numerator", "denominator", "steps"), [(3, 4, 12), (4, 4, 16), (6, 8, 12), (7, 8, 14), (2, 2, 16)]
)
def test_bar_steps(numerator, denominator, steps):
    assert midi.bar_steps(numerator, denominator) == steps


def test_time_signatures_are_read(tmp_path):
    """A 3/4 piece that turns to 6/8 at step 48: both on the step grid; the first sets bar_steps.
    A file without one is 4/4."""
    path = with_meters(write_song(tmp_path / "a.mid", seed=0), (0.0, 3, 4), (6.0, 6, 8))
    score = midi.read_score(path)
    assert score.time_signatures == ((0, 3, 4), (48, 6, 8)) and score.bar_steps == 12
    plain = midi.read_score(write_song(tmp_path / "b.mid", seed=1))
    assert dataclasses.replace(plain, time_signatures=()).bar_steps == 16


def test_written_time_signature_reads_back(tmp_path):
    midi.write_midi(tmp_path / "w.mid", [[0, 4, 60, 90]], time_signature=(3, 4))
    assert midi.read_score(tmp_path / "w.mid").time_signatures == ((0, 3, 4),)


def request(**fields):
    values = dict(prompt_steps=None, prompt_bars=None, mask_start=None, mask_end=None)
    values.update(mask_start_bar=None, mask_end_bar=None, mask_pitch_low=0, mask_pitch_high=127)
    return argparse.Namespace(**dict(values, **fields))


def test_bar_arguments_follow_the_meter(tmp_path):
    """--prompt_bars 2 of a 3/4 piece keeps 24 steps; --mask_start_bar 1 --mask_end_bar 3 hides
    steps 12..36; the piece's meter is what generation writes."""
    path = with_meters(write_song(tmp_path / "waltz.mid", seed=2), (0.0, 3, 4))
    _, known, score = generation.canvas(
        request(mode="continuation", prompt_midi=str(path), prompt_bars=2), 64, "note"
    )
    assert known.all(axis=0).tolist() == [True] * 24 + [False] * 40
    assert generation.time_signature(score) == (3, 4)
    args = request(mode="inpainting", input_midi=str(path), mask_start_bar=1, mask_end_bar=3)
    cells, known, _ = generation.canvas(args, 64, "note")
    assert np.flatnonzero(~known.all(axis=0)).tolist() == list(range(12, 36))
    assert not cells[~known].any()
    assert generation.time_signature(None) == (4, 4)
