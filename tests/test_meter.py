"""Meter: time signatures are read, and bars follow each piece's meter (a 3/4 piece has 12-step
bars): bar-based generation arguments, written files, crop starts and the cache, statistics and
pictures; without a trained model."""

import argparse
import json

import numpy as np
import pretty_midi
import pytest
from PIL import Image
from tiny import tiny, write_song

from fractalmidi_jax import data, evaluate, generation, midi, music_stats, render, trainer
from fractalmidi_jax.library import RollLibrary


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
    """A 3/4 piece that turns to 6/8 at step 48: both on the step grid, 12-step bars throughout."""
    path = with_meters(write_song(tmp_path / "a.mid", seed=0), (0.0, 3, 4), (6.0, 6, 8))
    score = midi.read_score(path)
    assert score.time_signatures == ((0, 3, 4), (48, 6, 8))
    assert midi.bar_lines(score.time_signatures, score.num_steps).tolist() == list(range(0, 133, 12))


def test_one_beat_signatures_are_left_out(tmp_path):
    """1/4 (as POP909 writes) marks beats, not bars: at the start the piece is 4/4, later the meter
    before it goes on."""
    beats = with_meters(write_song(tmp_path / "pop.mid", seed=6), (0.0, 1, 4))
    assert midi.read_score(beats).time_signatures == ()
    later = with_meters(write_song(tmp_path / "later.mid", seed=7), (0.0, 3, 4), (3.0, 1, 4))
    assert midi.read_score(later).time_signatures == ((0, 3, 4),)


def test_bar_lines_follow_meter_changes():
    """3/4 turning to 4/4 at step 36; a file without a time signature (or before its first) is 4/4;
    the last bar line is the end of the bar that holds the last step."""
    change = [(0, 3, 4), (36, 4, 4)]
    assert midi.bar_lines(change, 70).tolist() == [0, 12, 24, 36, 52, 68, 84]
    assert midi.bar_lines((), 32).tolist() == [0, 16, 32]
    assert midi.bar_lines([(8, 3, 4)], 30).tolist() == [0, 8, 20, 32]
    assert [midi.bar_step(change, bar) for bar in (0, 1.5, 3, 4, 10)] == [0, 18, 36, 52, 36 + 7 * 16]
    assert midi.bar_step((), 2.5) == 40


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
    with pytest.raises(generation.GenerationError, match="finite"):
        generation.canvas(
            request(mode="continuation", prompt_midi=str(path), prompt_bars=float("nan")), 64, "note"
        )


# --- crops ---


def meter_library(tmp_path):
    """A 3/4 piece, one in 3/4 that turns to 4/4 at step 36, and a 4/4 one, 160 steps each."""
    folder = tmp_path / "songs"
    waltz = with_meters(write_song(folder / "waltz.mid", seed=3, num_steps=160), (0.0, 3, 4))
    change = with_meters(write_song(folder / "change.mid", seed=4, num_steps=160), (0.0, 3, 4), (4.5, 4, 4))
    plain = write_song(folder / "plain.mid", seed=5, num_steps=160)
    return RollLibrary([waltz, change, plain], cache_dir=tmp_path / "cache", num_workers=0)


WALTZ_STARTS = list(range(0, 129, 12))  # crops of 32 steps of a 160-step piece start at 128 at the latest
CHANGE_STARTS = [0, 12, 24, 36, 52, 68, 84, 100, 116]
PLAIN_STARTS = list(range(0, 129, 16))


def test_crops_start_on_each_piece_bar_lines(tmp_path):
    """By default (crop_alignment 0) a 3/4 piece is cropped at its 12-step bar lines, a meter change
    moves them, a 4/4 piece keeps its 16; crop_alignment N > 0 ignores the meter."""
    library = meter_library(tmp_path)
    assert library.time_signatures == [((0, 3, 4),), ((0, 3, 4), (36, 4, 4)), ((0, 4, 4),)]
    stream = data.BatchStream(library, data.CropSpec(32, augment_factor=40), global_batch=4)
    seen = {k: set() for k in range(3)}
    for i in range(360):
        k, start, _ = stream.sample(i)
        seen[k].add(start)
    assert seen == {0: set(WALTZ_STARTS), 1: set(CHANGE_STARTS), 2: set(PLAIN_STARTS)}
    assert data.crop_starts(library, 0, 32, 16).tolist() == PLAIN_STARTS
    fixed = data.fixed_crop_starts(library, 32, crops_per_file=3, seed=0)
    assert all(start in (WALTZ_STARTS, CHANGE_STARTS, PLAIN_STARTS)[k] for k, start in fixed)
    assert data.bar_lines_in_crop(library, 1, 24, 32).tolist() == [0, 12, 28]


def test_the_cache_keeps_the_meter(tmp_path):
    """A second load reads the meter from the cache; a record without one (an older layout) is
    parsed again, never read as 4/4."""
    first = meter_library(tmp_path)
    again = meter_library(tmp_path)
    assert again.num_from_cache == 3 and again.time_signatures == first.time_signatures
    for path in (tmp_path / "cache").glob("*.npz"):
        with np.load(path) as record:
            old = {name: record[name] for name in record.files if name != "time_signatures"}
        np.savez(path, **old)
    rebuilt = meter_library(tmp_path)
    assert rebuilt.num_from_cache == 0 and rebuilt.time_signatures == first.time_signatures


# --- statistics ---

QUARTERS = [(4 * k, 4 * k + 4, 60 + k, 80) for k in range(12)]  # 12 quarter notes: 4 bars of 3/4, 3 of 4/4


def test_statistics_count_bars_in_the_piece_meter(tmp_path):
    midi.write_midi(tmp_path / "waltz.mid", QUARTERS, time_signature=(3, 4))
    midi.write_midi(tmp_path / "march.mid", QUARTERS)
    waltz, march = midi.read_score(tmp_path / "waltz.mid"), midi.read_score(tmp_path / "march.mid")
    assert music_stats.feature_values(waltz.notes, waltz.time_signatures)["notes_per_bar"].tolist() == [3] * 4
    assert music_stats.feature_values(march.notes, march.time_signatures)["notes_per_bar"].tolist() == [4] * 3
    gapped = [row for row in QUARTERS if not 12 <= row[0] < 24]  # bar 2 of 3/4 is silent
    values = music_stats.feature_values(np.array(gapped), waltz.time_signatures)
    assert values["empty_bar"].tolist() == [0, 1, 0, 0] and values["notes_per_bar"].tolist() == [3, 0, 3, 3]


def test_evaluate_music_reads_each_set_in_its_meter(tmp_path, capsys):
    """Reference pieces in 3/4 count 3 quarter notes a bar, generated ones written in 4/4 count 4."""
    (tmp_path / "reference").mkdir()
    (tmp_path / "generated").mkdir()
    for k in range(2):
        midi.write_midi(tmp_path / "reference" / f"{k}.mid", QUARTERS, time_signature=(3, 4))
        midi.write_midi(tmp_path / "generated" / f"{k}.mid", QUARTERS, time_signature=(4, 4))
    out = tmp_path / "music.json"
    evaluate.main(
        ["music", "--generated", str(tmp_path / "generated"), "--reference", str(tmp_path / "reference")]
        + ["--out", str(out), "--bootstrap", "20"]
    )
    assert "2 in 3/4" in capsys.readouterr().out
    result = json.loads(out.read_text())
    sets = result["sets"]
    assert sets["reference"]["meters"] == {"3/4": 2} and sets["generated"]["meters"] == {"4/4": 2}
    assert sets["reference"]["features"]["notes_per_bar"]["mean"] == 3.0
    assert sets["generated"]["features"]["notes_per_bar"]["mean"] == 4.0


def test_copying_check_compares_bars_of_the_piece_meter(tmp_path):
    """A 3/4 bar copied from bar 1 of a 3/4 training piece into bar 2 is found whole."""
    pattern = [(0, 3, 60, 80), (3, 6, 64, 80), (6, 12, 67, 80)]
    moved = lambda bar: [(on + 12 * bar, end + 12 * bar, pitch, v) for on, end, pitch, v in pattern]
    midi.write_midi(tmp_path / "train.mid", [(0, 12, 40, 80)] + moved(1), time_signature=(3, 4))
    midi.write_midi(
        tmp_path / "gen.mid", [(0, 2, 90, 80), (12, 13, 91, 80)] + moved(2), time_signature=(3, 4)
    )
    train = [("train", midi.read_score(tmp_path / "train.mid"))]
    generated = [("gen", midi.read_score(tmp_path / "gen.mid"))]
    result = music_stats.copying_check(generated, train)
    copy = next(bar for bar in result["bars"] if bar["bar"] == 2)
    assert (copy["best_iou"], copy["train_bar"], copy["shift"]) == (1.0, 1, 0)
    assert result["generated_bars"] == 3 and result["representation"].startswith("sounding cells, 12 steps")


# --- pictures ---


def grid_columns(picture, pitch, scale, steps, left=0, top=0):
    """The steps whose cell of `pitch` shows the grid colour in a picture of a roll of `steps` steps
    whose top left pixel is (top, left)."""
    row = picture[top + (127 - pitch) * scale, left : left + steps * scale : scale]
    return {step for step, colour in enumerate(row) if tuple(colour) == render._GRID_RGB}


def test_png_bar_numbers_follow_the_meter():
    """Bar numbers stand above each 12-step bar line of a 3/4 roll, not above 4/4's."""
    waltz = midi.bar_lines([(0, 3, 4)], 64)
    image = np.asarray(render.labelled_image(np.zeros((128, 64), np.uint8), scale=2, bar_lines=waltz))
    strip = image[: render.BAR_AXIS_PIXELS, render.NOTE_AXIS_PIXELS :]
    inked = np.flatnonzero((strip < 128).all(axis=2).any(axis=0))
    label_starts = inked[np.r_[True, np.diff(inked) > 3]]
    assert [x // 24 for x in label_starts] == [0, 1, 2, 3, 4, 5] and (label_starts % 24 < 6).all()


def test_generated_pictures_follow_the_written_meter(tmp_path):
    """A sample written in 3/4 (the input's meter) gets 3/4 bar lines in its PNG and GIF."""
    args = argparse.Namespace(min_velocity=1, min_note_steps=1, velocity_tolerance=0, soundfont=None)
    args.save_png, args.save_gif, args.save_wav = True, True, False
    roll, known = np.zeros((128, 64), np.uint8), np.zeros((128, 64), bool)
    generation._write_sample(args, "note", tmp_path, 0, roll, roll[None], known, 120.0, (3, 4))
    with Image.open(tmp_path / "sample_000.png") as png:
        picture = np.asarray(png.convert("RGB"))
    top, left = render.BAR_AXIS_PIXELS, render.NOTE_AXIS_PIXELS
    assert grid_columns(picture, 70, 2, 64, left, top) == {0, 12, 24, 36, 48, 60}
    with Image.open(tmp_path / "sample_000.gif") as gif:
        assert grid_columns(np.asarray(gif.convert("RGB")), 70, 2, 64) == {0, 12, 24, 36, 48, 60}


def test_tensorboard_validation_pictures_follow_the_meter(tmp_path, monkeypatch):
    """Validation crops of a 3/4 piece are drawn with its bar lines, generated samples in 4/4."""
    library = meter_library(tmp_path)
    starts = [(0, 0), (1, 24)]
    crops = data.crops_at(library, starts, 32)
    bar_lines = [data.bar_lines_in_crop(library, k, start, 32) for k, start in starts]
    monkeypatch.setattr(trainer.sampler_lib, "make_sampler", lambda *_: lambda p, cells, *rest: (cells, None))
    monkeypatch.setattr(trainer.render, "audio", lambda *_, **__: (np.zeros(8, np.float32), "silence"))

    class Pictures:
        images = {}

        def image(self, step, name, image):
            self.images[name] = image

        def audio(self, *_):
            pass

    writer = Pictures()
    trainer.log_images(writer, 0, tiny(), None, crops, bar_lines)
    scale, tile_left = trainer.IMAGE_SCALE, 32 * trainer.IMAGE_SCALE + render.TILE_GAP
    validation = writer.images["samples/validation"]
    silent = lambda crop: next(p for p in range(1, 127) if p % 12 and not crop[p].any())
    assert grid_columns(validation, silent(crops[0]), scale, 32) == {0, 12, 24}
    assert grid_columns(validation, silent(crops[1]), scale, 32, tile_left) == {0, 12, 28}
    assert grid_columns(writer.images["samples/generated"], 70, scale, 32) == {0, 16}
