"""The Python API (`fractalmidi_jax.load(...).generate(...)`): cheap to import, PrettyMIDI out,
the same music as the command line for the same flags, continuation and inpainting in the
input's meter; with a checkpoint of a tiny 2-step training run (CPU)."""

import subprocess
import sys

import numpy as np
import pretty_midi
import pytest
from tiny import TINY, tiny_run, write_song

import fractalmidi_jax
from fractalmidi_jax import data, generation, midi
from fractalmidi_jax import roll as roll_lib

pytestmark = pytest.mark.usefixtures("compilation_cache")
SAMPLING = dict(seed=1, temperature=1.0, num_iter_list=(2, 2, 2, 1))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return fractalmidi_jax.load(tiny_run(tmp_path_factory.mktemp("api")))


def waltz(path, num_steps=96):
    """A random song in 3/4 (12-step bars)."""
    write_song(path, seed=3, num_steps=num_steps)
    song = pretty_midi.PrettyMIDI(str(path))
    song.time_signature_changes = [pretty_midi.TimeSignature(3, 4, 0.0)]
    song.write(str(path))
    return path


def test_import_is_cheap():
    """`import fractalmidi_jax` loads no JAX; the API arrives on first use."""
    code = "import sys, fractalmidi_jax; assert 'jax' not in sys.modules; print(fractalmidi_jax.__all__)"
    assert (
        "load"
        in subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    )
    assert fractalmidi_jax.load is generation.load and fractalmidi_jax.Generator is generation.Generator


def test_generate_returns_pretty_midi_and_matches_the_command_line(model, tmp_path):
    """generate() gives PrettyMIDI objects whose notes decode the rolls; the CLI with the same
    seed and settings writes the same notes."""
    songs, rolls = model.generate(num_samples=2, target_width=TINY.crop_length, return_rolls=True, **SAMPLING)
    assert len(songs) == 2 and all(isinstance(s, pretty_midi.PrettyMIDI) for s in songs)
    assert rolls.shape == (2, 128, TINY.crop_length)
    generation.main(
        [
            "--checkpoint",
            str(model.path),
            "--output_dir",
            str(tmp_path),
            "--reuse_output_dir",
            "--num_samples",
            "2",
        ]
        + ["--seed", "1", "--num_iter_list", "2", "2", "2", "1", "--temperature", "1.0"]
    )
    for k, (song, roll) in enumerate(zip(songs, rolls)):
        song.write(str(tmp_path / f"api_{k}.mid"))
        api = midi.read_score(tmp_path / f"api_{k}.mid").notes
        np.testing.assert_array_equal(api, roll_lib.roll_to_notes(roll, TINY.roll))
        np.testing.assert_array_equal(api, midi.read_score(tmp_path / f"sample_{k:03d}.mid").notes)
    assert not np.array_equal(*rolls)


def test_continuation_in_bars_keeps_the_prompt_and_its_meter(model, tmp_path):
    """prompt_bars=2 of a 3/4 file keeps its first 24 steps, cell for cell, and the songs are in 3/4
    at the file's tempo."""
    source = waltz(tmp_path / "waltz.mid")
    songs, rolls = model.continuation(source, prompt_bars=2, num_samples=2, return_rolls=True, **SAMPLING)
    prompt = data.crop_roll(roll_lib.read_roll(source, TINY.roll)[0], 0, 24, TINY.roll)
    for song, roll in zip(songs, rolls):
        np.testing.assert_array_equal(roll[:, :24], prompt)
        assert [(t.numerator, t.denominator) for t in song.time_signature_changes] == [(3, 4)]
        assert song.estimate_tempo() > 0 and abs(song.get_tempo_changes()[1][0] - 120.0) < 0.01


def test_inpainting_in_bars_changes_only_that_bar(model, tmp_path):
    """mask_start_bar=1, mask_end_bar=2 of a 3/4 file regenerates steps 12..24 only."""
    source = waltz(tmp_path / "waltz.mid")
    songs, rolls = model.inpainting(source, mask_start_bar=1, mask_end_bar=2, return_rolls=True, **SAMPLING)
    original = data.crop_roll(roll_lib.read_roll(source, TINY.roll)[0], 0, TINY.crop_length, TINY.roll)
    region = np.zeros_like(original, bool)
    region[:, 12:24] = True
    for song, roll in zip(songs, rolls):
        np.testing.assert_array_equal(roll[~region], original[~region])
        assert song.time_signature_changes[0].numerator == 3
    assert any(not np.array_equal(roll[region], original[region]) for roll in rolls)


def test_bad_arguments_raise_generation_error(model, tmp_path):
    with pytest.raises(generation.GenerationError, match="multiples of 4"):
        model.generate(target_width=30)
    with pytest.raises(generation.GenerationError, match="not both"):
        model.continuation(waltz(tmp_path / "w.mid"), prompt_steps=8, prompt_bars=1)
    with pytest.raises(generation.GenerationError, match=r"--min_p 1.5 must be in \[0, 1\)"):
        model.generate(min_p=1.5)
    with pytest.raises(generation.GenerationError, match="--temperature 0 must be a positive number"):
        model.generate(temperature=0)
