"""The benchmark tool runs end to end on CPU (its timings only mean something on a GPU)."""

import numpy as np
from tiny import TINY

from fractalmidi_jax import bench
from fractalmidi_jax import roll as roll_lib


def test_realistic_rolls_are_sparse_notes():
    rolls = bench.realistic_rolls(2, 128)
    assert rolls.shape == (2, 128, 128) and rolls.dtype == np.uint8
    sounding = (rolls > 0).mean(axis=(1, 2))
    assert np.all((sounding >= 0.025) & (sounding < 0.06)), sounding  # overlapping notes merge
    assert roll_lib.SUSTAIN in rolls and bench.realistic_rolls(1, 64, "velocity").max() < roll_lib.SUSTAIN


def test_train_and_sample_cases_report_a_row():
    """A training and a sampling case on the tiny model: times, samples/s, MFU and compile
    time are positive, and they format as a table row."""
    train = bench.bench_train(TINY, batch=2, width=64, num_steps=1)
    sample = bench.bench_sample(TINY, batch=1, width=64, num_iter=(1, 1, 1, 1), repeats=1)
    for row in (train, sample):
        assert row["seconds"] > 0 and row["compile_s"] > 0 and row["samples_per_s"] > 0
    assert 0 < train["mfu"] < 1
    train.update(name="train tiny", reference_seconds=1.0, speedup=1.0 / train["seconds"])
    assert bench._format_row(train).startswith("train tiny")
