"""Tests of data.py on tiny MIDI files written with pretty_midi (CPU, a few seconds)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pretty_midi
import pytest

from fractalmidi_jax import data, midi
from fractalmidi_jax import library as rolls
from fractalmidi_jax import roll as roll_lib

SECONDS_PER_STEP = 0.125  # a sixteenth at 120 bpm


def write_song(path, notes, program=0):
    """notes: (pitch, onset_step, end_step, velocity) rows -> a MIDI file at 120 bpm."""
    song = pretty_midi.PrettyMIDI(resolution=480, initial_tempo=120.0)
    piano = pretty_midi.Instrument(program=program)
    for pitch, onset, end, velocity in notes:
        piano.notes.append(
            pretty_midi.Note(velocity, pitch, onset * SECONDS_PER_STEP, end * SECONDS_PER_STEP)
        )
    song.instruments.append(piano)
    path.parent.mkdir(parents=True, exist_ok=True)
    song.write(str(path))
    return path


def random_song(path, seed, num_steps=200, pitches=(40, 90)):
    rng = np.random.default_rng(seed)
    onsets = rng.integers(0, num_steps - 8, 60)
    notes = [
        (int(rng.integers(*pitches)), int(t), int(t + rng.integers(1, 8)), int(rng.integers(20, 128)))
        for t in onsets
    ]
    notes.append((60, num_steps - 1, num_steps, 100))  # pins the length
    return write_song(path, notes)


def write_broken(path):
    path.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0MTrk\x00\x00\x10\x00\x00\x90")
    return path


@pytest.fixture
def songs(tmp_path):
    """Five songs of 64..320 steps."""
    return [random_song(tmp_path / "songs" / f"{k}.mid", k, num_steps=64 * (k + 1)) for k in range(5)]


def library_of(files, tmp_path, **kwargs):
    kwargs.setdefault("num_workers", 0)
    return rolls.RollLibrary(files, cache_dir=tmp_path / "cache", **kwargs)


# --- file lists ---


def test_list_file_skips_comments_and_resolves_relative_paths(tmp_path):
    a = write_song(tmp_path / "music" / "a.mid", [(60, 0, 4, 90)])
    b = write_song(tmp_path / "elsewhere" / "b.mid", [(62, 0, 4, 90)])
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(f"# a comment\n\n  ../music/a.mid  \n{b}\n")
    files = rolls.resolve_files(listing)
    assert [f.resolve() for f in files] == [a.resolve(), b.resolve()]


def test_folder_is_walked_recursively_and_sorted(tmp_path):
    for name in ("b.mid", "a/c.MIDI", "a/d.midi", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [f.relative_to(tmp_path).as_posix() for f in rolls.resolve_files(tmp_path)] == [
        "a/c.MIDI",
        "a/d.midi",
        "b.mid",
    ]


def test_resolve_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file list nor a folder"):
        rolls.resolve_files(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError):
        rolls.resolve_files(tmp_path / "missing_folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.mid"):
        rolls.resolve_files(tmp_path / "empty")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="names no files"):
        rolls.resolve_files(tmp_path / "empty.txt")


def test_make_lists_is_deterministic_and_stable_when_files_are_added(tmp_path):
    folder = tmp_path / "corpus"
    for k in range(60):
        (folder / f"{k // 10}").mkdir(parents=True, exist_ok=True)
        (folder / f"{k // 10}" / f"{k}.mid").write_bytes(b"")
    first = rolls.make_lists(folder, tmp_path / "lists1", 0.2, 0.2)
    again = rolls.make_lists(folder, tmp_path / "lists2", 0.2, 0.2)
    assert first == again
    assert all(first[name] for name in rolls.SPLITS)
    assert sorted(p for paths in first.values() for p in paths) == rolls.resolve_files(folder)
    # The written lists hold relative paths that resolve back to the files.
    text = (tmp_path / "lists1" / "valid.txt").read_text()
    assert not any(line.startswith("/") for line in text.splitlines())
    assert [p.resolve() for p in rolls.resolve_files(tmp_path / "lists1" / "valid.txt")] == [
        p.resolve() for p in first["valid"]
    ]
    for k in range(60, 90):
        (folder / f"{k}.mid").write_bytes(b"")
    grown = rolls.make_lists(folder, tmp_path / "lists3", 0.2, 0.2)
    for name in rolls.SPLITS:
        assert set(first[name]) <= set(grown[name])


# --- the cache ---


def test_segments_round_trip():
    rng = np.random.default_rng(0)
    for num_steps in (0, 1, 7, 300):
        roll = (rng.integers(0, 4, (128, num_steps)) * (rng.random((128, num_steps)) < 0.3)).astype(np.uint8)
        segments = rolls.roll_to_segments(roll)
        assert segments.dtype == np.int32 and segments.shape[1] == 4
        np.testing.assert_array_equal(rolls.segments_to_roll(segments, num_steps), roll)


def test_library_matches_midi_and_reads_from_cache_second_time(songs, tmp_path):
    cold = library_of(songs, tmp_path)
    assert cold.num_from_cache == 0 and len(cold) == len(songs)
    for k, path in enumerate(songs):
        np.testing.assert_array_equal(cold.roll(k), roll_lib.read_roll(path, "note")[0])
    assert len(list((tmp_path / "cache").glob("*.npz"))) == len(songs)
    warm = library_of(songs, tmp_path)
    assert warm.num_from_cache == len(songs)
    from_disk = library_of(songs, tmp_path, cache_in_memory=False)
    for k in range(len(songs)):
        np.testing.assert_array_equal(warm.roll(k), cold.roll(k))
        np.testing.assert_array_equal(from_disk.roll(k), cold.roll(k))
    np.testing.assert_array_equal(warm.num_steps, [64 * (k + 1) for k in range(5)])
    velocity = library_of(songs, tmp_path, kind="velocity")
    assert velocity.num_from_cache == 0  # another roll kind is another cache entry
    np.testing.assert_array_equal(velocity.roll(0), roll_lib.read_roll(songs[0], "velocity")[0])
    assert library_of(songs, tmp_path, kind="velocity").num_from_cache == len(songs)


def test_a_cache_record_of_another_roll_kind_is_never_used(songs, tmp_path):
    library_of(songs[:1], tmp_path)
    (record,) = (tmp_path / "cache").glob("*.npz")
    with pytest.raises(KeyError, match="holds a note roll, not a velocity roll"):
        rolls._read_record(record, "velocity")


def test_cache_key_follows_file_bytes_pipeline_version_and_options(songs, tmp_path, monkeypatch):
    path = songs[0]
    key = rolls.cache_key(path, midi.ReadOptions(), "note")
    assert rolls.cache_key(path, midi.ReadOptions(), "note") == key
    assert rolls.cache_key(path, midi.ReadOptions(), "velocity") != key
    assert rolls.cache_key(path, midi.ReadOptions(sustain_pedal=True), "note") != key
    monkeypatch.setattr(midi, "PIPELINE_VERSION", midi.PIPELINE_VERSION + 1)
    assert rolls.cache_key(path, midi.ReadOptions(), "note") != key
    assert library_of([path], tmp_path).num_from_cache == 0  # the new version misses the old cache
    monkeypatch.undo()
    library_of([path], tmp_path)
    write_song(path, [(70, 0, 9, 80)])  # editing the file
    assert rolls.cache_key(path, midi.ReadOptions(), "note") != key
    edited = library_of([path], tmp_path)
    assert edited.num_from_cache == 0
    assert edited.num_steps[0] == 9 and roll_lib.roll_to_notes(edited.roll(0), "note").tolist() == [
        [0, 9, 70, 80]
    ]


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FRACTALMIDI_CACHE", str(tmp_path))
    assert rolls.default_cache_dir() == tmp_path / "rolls"
    monkeypatch.delenv("FRACTALMIDI_CACHE")
    assert rolls.default_cache_dir() == Path.home() / ".cache" / "fractalmidi_jax" / "rolls"


# --- unusable files ---


def test_broken_files_are_skipped_never_silent(songs, tmp_path, caplog):
    broken = write_broken(tmp_path / "broken.mid")
    empty = write_song(tmp_path / "empty.mid", [])
    files = [broken, songs[0], empty, tmp_path / "missing.mid", songs[1]]
    library = library_of(files, tmp_path)
    assert library.files == [songs[0], songs[1]]
    assert [p for p, _ in library.skipped] == [broken, empty, tmp_path / "missing.mid"]
    assert sum(library.skip_counts().values()) == 3
    assert all(library.roll(k).any() for k in range(len(library)))
    assert "broken.mid: truncated" in caplog.text
    assert "3 skipped" in library.summary()


def test_all_broken_is_a_clear_error(tmp_path):
    files = [write_broken(tmp_path / f"{k}.mid") for k in range(3)]
    with pytest.raises(ValueError, match="no usable MIDI file.*3 skipped"):
        library_of(files, tmp_path)


def _parse_or_misbehave(x):
    if x == "crash":
        os._exit(3)
    if x == "hang":
        time.sleep(60)
    if x == "bad":
        raise midi.MidiError("bad input")
    return x * 2


def test_worker_crash_and_hang_cost_only_their_item():
    items = [(1,), ("crash",), (2,), ("hang",), ("bad",), (3,)]
    results = {
        index: (ok, value) for index, ok, value in rolls._map_isolated(_parse_or_misbehave, items, 2, 1.0)
    }
    assert results[0] == (True, 2) and results[2] == (True, 4) and results[5] == (True, 6)
    assert results[1][0] is False and "exit code 3" in results[1][1]
    assert results[3][0] is False and "no result within 1 s" in results[3][1]
    assert results[4] == (False, "bad input")


def test_parse_in_worker_processes_equals_in_process(songs, tmp_path):
    files = [*songs, write_broken(tmp_path / "broken.mid")]
    pooled = rolls.RollLibrary(files, cache_dir=tmp_path / "pool_cache", num_workers=2)
    local = rolls.RollLibrary(files, cache_dir=tmp_path / "local_cache", num_workers=0)
    assert pooled.files == local.files and pooled.skipped == local.skipped
    for k in range(len(local)):
        np.testing.assert_array_equal(pooled.roll(k), local.roll(k))


# --- crops ---


def test_crop_pads_short_pieces_and_drops_shifted_out_notes():
    roll = np.zeros((128, 10), np.uint8)
    roll[126, 0:4] = 90
    roll[1, 2:5] = 70
    roll[60, 8:10] = 50
    up = data.crop_roll(roll, 8, 16, "velocity", shift=3)
    assert up.shape == (128, 16) and up.dtype == np.uint8
    assert up[63, :2].tolist() == [50, 50] and up[:, 2:].sum() == 0  # past the end: silence
    shifted = data.crop_roll(roll, 0, 12, "velocity", shift=2)
    assert (
        shifted[3, 2:5].tolist() == [70] * 3 and shifted[:2].sum() == 0
    )  # pitch 126 + 2 is gone, not wrapped
    assert np.count_nonzero(shifted) == np.count_nonzero(roll) - 4
    down = data.crop_roll(roll, 0, 12, "velocity", shift=-2)
    assert down[124, :4].tolist() == [90] * 4 and down[126:].sum() == 0 and np.count_nonzero(down) == 4 + 2


def test_crop_spec_is_validated():
    for bad in (
        dict(crop_length=130),
        dict(crop_length=0),
        dict(crop_length=16, crop_alignment=-1),
        dict(crop_length=16, augment_factor=0),
        dict(crop_length=16, pitch_shift_min=2, pitch_shift_max=1),
    ):
        with pytest.raises(ValueError):
            data.CropSpec(**bad)


def test_samples_cover_each_file_augment_factor_times_per_epoch_at_aligned_starts(songs, tmp_path):
    library = library_of(songs, tmp_path)
    spec = data.CropSpec(96, augment_factor=3, pitch_shift_min=-2, pitch_shift_max=2, crop_alignment=16)
    stream = data.BatchStream(library, spec, global_batch=4, seed=7)
    epoch = [stream.sample(i) for i in range(len(songs) * 3)]
    assert sorted(f for f, _, _ in epoch) == sorted(list(range(len(songs))) * 3)
    samples = [stream.sample(i) for i in range(600)]
    for file_index, start, _ in samples:
        assert start % 16 == 0 and 0 <= start <= max(int(library.num_steps[file_index]) - 96, 0)
    assert {s for _, _, s in samples} == set(range(-2, 3))
    assert len({st for f, st, _ in samples if f == 4}) == (320 - 96) // 16 + 1


def test_batch_is_a_pure_function_of_seed_and_step(songs, tmp_path):
    library = library_of(songs, tmp_path)
    spec = data.CropSpec(64, augment_factor=2, pitch_shift_min=-3, pitch_shift_max=3, crop_alignment=4)
    one = data.BatchStream(library, spec, global_batch=4, seed=1)
    two = data.BatchStream(library_of(songs, tmp_path, cache_in_memory=False), spec, global_batch=4, seed=1)
    batch = one.batch(0)
    assert batch["roll"].shape == (4, 128, 64) and batch["roll"].dtype == np.uint8
    for step in (0, 3, 11, 1000):  # 1000: far past the first epoch
        np.testing.assert_array_equal(one.batch(step)["roll"], two.batch(step)["roll"])
    assert not np.array_equal(
        one.batch(0)["roll"], data.BatchStream(library, spec, 4, seed=2).batch(0)["roll"]
    )
    with data.Loader(one, num_workers=0) as run, data.Loader(two, start_step=5, num_workers=0) as resumed:
        batches = [next(run)["roll"] for _ in range(9)]
        for step in range(5, 9):
            np.testing.assert_array_equal(next(resumed)["roll"], batches[step])


def test_process_slices_make_up_the_global_batch(songs, tmp_path):
    library = library_of(songs, tmp_path)
    spec = data.CropSpec(32, pitch_shift_min=-5, pitch_shift_max=5)
    whole = data.BatchStream(library, spec, global_batch=8, seed=3)
    parts = [
        data.BatchStream(library, spec, global_batch=8, seed=3, process_index=p, process_count=4)
        for p in range(4)
    ]
    for step in (0, 2, 9):
        local = [part.batch(step)["roll"] for part in parts]
        assert all(x.shape == (2, 128, 32) for x in local)
        np.testing.assert_array_equal(np.concatenate(local), whole.batch(step)["roll"])
    with pytest.raises(ValueError, match="multiple of process_count"):
        data.BatchStream(library, spec, global_batch=6, process_count=4)


def test_background_loader_equals_synchronous_loader(songs, tmp_path):
    stream = data.BatchStream(
        library_of(songs, tmp_path), data.CropSpec(48, pitch_shift_min=-1, pitch_shift_max=1), 4
    )
    with (
        data.Loader(stream, start_step=3, num_workers=0) as sync,
        data.Loader(stream, start_step=3, num_workers=3) as threads,
    ):
        for _ in range(20):
            np.testing.assert_array_equal(next(threads)["roll"], next(sync)["roll"])
        assert threads.step == sync.step == 23


def test_unclosed_loader_does_not_hang_interpreter_exit(songs, tmp_path):
    script = f"""
from fractalmidi_jax import data
from fractalmidi_jax import library as rolls
from fractalmidi_jax import roll as roll_lib
library = rolls.RollLibrary({[str(s) for s in songs]!r}, cache_dir={str(tmp_path / "cache")!r}, num_workers=0)
loader = data.Loader(data.BatchStream(library, data.CropSpec(64), 2), num_workers=2, prefetch=8)
next(loader)
print("done")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "done" in result.stdout, result.stderr


# --- evaluation crops ---


def test_fixed_crops_are_deterministic_distinct_and_unshifted(songs, tmp_path):
    library = library_of(songs, tmp_path)
    crops = data.fixed_crops(library, 64, crops_per_file=4, seed=0)
    # Songs of 64, 128, 192, 256, 320 steps have 1, 5, 9, 13, 17 bar-aligned starts.
    assert crops.shape == (1 + 4 * 4, 128, 64) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops, data.fixed_crops(library, 64, 4, seed=0))
    np.testing.assert_array_equal(crops[0], roll_lib.crop_tokens(library.roll(0).copy(), "note"))
    for k in range(1, len(crops)):
        assert not np.array_equal(crops[k], crops[k - 1])
    song = library.roll(4)
    windows = [roll_lib.crop_tokens(song[:, s : s + 64].copy(), "note") for s in range(0, 320 - 64 + 1, 16)]
    assert all(any(np.array_equal(c, w) for w in windows) for c in crops[-4:])


def test_eval_batches_count_every_crop_once(songs, tmp_path):
    crops = np.arange(11, dtype=np.uint8)[:, None, None] * np.ones((1, 128, 8), np.uint8)
    batches = data.eval_batches(crops, global_batch=4)
    assert len(batches) == 3 and all(b["roll"].shape == (4, 128, 8) for b in batches)
    weights = np.concatenate([b["weight"] for b in batches])
    assert weights.tolist() == [1.0] * 11 + [0.0]
    kept = np.concatenate([b["roll"][b["weight"] > 0] for b in batches])
    np.testing.assert_array_equal(kept, crops)
    parts = [data.eval_batches(crops, 4, p, 2) for p in range(2)]
    for k, batch in enumerate(batches):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][k]["roll"], parts[1][k]["roll"]]), batch["roll"]
        )
        np.testing.assert_array_equal(
            np.concatenate([parts[0][k]["weight"], parts[1][k]["weight"]]), batch["weight"]
        )


# --- command line ---


def test_cli_make_lists_and_check(songs, tmp_path, capsys, caplog):
    write_broken(songs[0].parent / "broken.mid")
    data.main(
        ["make-lists", str(songs[0].parent), "--out", str(tmp_path / "lists"), "--valid_fraction", "0.3"]
    )
    assert "files listed" in capsys.readouterr().out
    data.main(["check", str(songs[0].parent), "--num_workers", "0", "--cache_dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert "broken.mid: truncated" in caplog.text  # skipped files are logged (stdout when run as a command)
    assert "usable: 5 files" in out and f"{64 * 15:,} steps" in out
    data.main(["roundtrip", str(songs[0].parent)])
    assert "files 5, skipped 1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        data.main(["check", str(tmp_path / "nowhere")])
