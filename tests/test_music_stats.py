"""Music statistics, overlap, bootstrap, copying check and the evaluate CLI, on
hand-made MIDI files whose statistics are known exactly."""

import json

import numpy as np
import pretty_midi
import pytest
from PIL import Image

from fractalmidi_jax import evaluate, midi, music_stats

SECONDS_PER_STEP = 0.125  # a sixteenth at 120 bpm


def write(path, notes):
    """Write (onset_step, end_step, pitch, velocity) rows with pretty_midi at 120 bpm."""
    pm = pretty_midi.PrettyMIDI(resolution=480, initial_tempo=120.0)
    piano = pretty_midi.Instrument(program=0)
    for onset, end, pitch, velocity in notes:
        piano.notes.append(
            pretty_midi.Note(
                velocity=velocity, pitch=pitch, start=onset * SECONDS_PER_STEP, end=end * SECONDS_PER_STEP
            )
        )
    pm.instruments.append(piano)
    path.parent.mkdir(parents=True, exist_ok=True)
    pm.write(str(path))
    return path


def values_of(path):
    return music_stats.feature_values(midi.read_score(path).notes)


def random_song(rng, bars, density, low, high):
    """Random notes (onset, end, pitch, velocity), about density onsets per step."""
    onsets = np.flatnonzero(rng.random(bars * 16) < density)
    rows = []
    for onset in onsets:
        for pitch in rng.choice(np.arange(low, high), size=rng.integers(1, 4), replace=False):
            end = min(onset + int(rng.choice([1, 2, 4, 8])), bars * 16)
            rows.append((int(onset), end, int(pitch), int(rng.integers(30, 120))))
    return rows


QUARTERS = [(0, 4, 60, 80), (4, 8, 60, 80), (8, 12, 60, 80), (12, 16, 60, 80)]
TRIAD = [(0, 16, 60, 90), (0, 16, 64, 90), (0, 16, 67, 90)]


def test_four_quarter_notes(tmp_path):
    v = values_of(write(tmp_path / "q.mid", QUARTERS))
    assert v["notes_per_bar"].tolist() == [4]
    assert v["ioi"].tolist() == [4, 4, 4]
    assert v["note_length"].tolist() == [4, 4, 4, 4]
    assert v["polyphony"].tolist() == [1] * 16
    assert v["empty_bar"].tolist() == [0]
    assert v["pitch_range"].tolist() == [0]
    assert v["pitch_std"].tolist() == [0.0]
    assert v["pitch_class"].tolist() == [0, 0, 0, 0]
    assert v["velocity"].tolist() == [80] * 4
    assert v["sounding_share"].tolist() == [16 / (128 * 16)]


def test_held_triad(tmp_path):
    v = values_of(write(tmp_path / "t.mid", TRIAD))
    assert v["polyphony"].tolist() == [3] * 16
    assert v["pitch_range"].tolist() == [7]
    assert v["pitch_mean"] == pytest.approx([191 / 3])
    assert v["pitch_class"].tolist() == [0, 4, 7]
    assert v["notes_per_bar"].tolist() == [3]
    assert v["note_length"].tolist() == [16, 16, 16]
    assert v["ioi"].size == 0


def test_empty_bars_and_windows(tmp_path):
    # bar 0: one note; bars 1-8 silent; bar 9: two notes held into bar 10; 11 bars in all.
    notes = [(0, 2, 40, 64), (144, 168, 70, 64), (144, 176, 90, 64)]
    v = values_of(write(tmp_path / "e.mid", notes))
    assert v["notes_per_bar"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0]
    assert v["empty_bar"].tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    assert v["ioi"].tolist() == [144]
    # one whole 8-bar window (bars 0-7) with one note; bars 8-10 are a partial window, left out
    assert v["pitch_range"].tolist() == [0]
    assert v["sounding_share"].tolist() == [2 / (128 * 128)]


def test_short_file_is_one_window(tmp_path):
    v = values_of(write(tmp_path / "s.mid", [(0, 4, 50, 64), (16, 20, 62, 64)]))
    assert v["pitch_range"].tolist() == [12]
    assert v["pitch_std"] == pytest.approx([6.0])
    assert v["sounding_share"].tolist() == [8 / (128 * 32)]


def test_overlapping_area():
    p = np.array([1.0, 2.0, 3.0, 0.0])
    assert music_stats.overlapping_area(p, 10 * p) == pytest.approx(1.0)
    assert music_stats.overlapping_area([1, 1, 0, 0], [0, 0, 2, 5]) == 0.0
    assert music_stats.overlapping_area([1, 1], [1, 0]) == pytest.approx(0.5)
    assert np.isnan(music_stats.overlapping_area([0, 0], [1, 0]))


def make_set(tmp_path, name, seed, files=12, density=0.3, low=40, high=80):
    rng = np.random.default_rng(seed)
    paths = [
        write(tmp_path / name / f"{i}.mid", random_song(rng, 16, density, low, high)) for i in range(files)
    ]
    return music_stats.set_stats(*music_stats.load_scores(paths))


def test_set_with_itself_has_full_overlap(tmp_path):
    songs = make_set(tmp_path, "a", seed=1)
    result = music_stats.compare(songs, songs, bootstrap=100)
    for name, feature in result["features"].items():
        assert feature["oa"] == pytest.approx(1.0), name
    assert result["mean_oa"] == pytest.approx(1.0)


def test_disjoint_sets_do_not_overlap_in_pitch(tmp_path):
    low = make_set(tmp_path, "low", seed=2, low=30, high=40)
    high = make_set(tmp_path, "high", seed=3, low=90, high=100)
    result = music_stats.compare(low, high, bootstrap=100)
    assert result["features"]["pitch_mean"]["oa"] == 0.0
    assert result["features"]["pitch_mean"]["oa_ci"] == [0.0, 0.0]


def test_bootstrap_intervals_contain_the_point_estimate(tmp_path):
    sparse = make_set(tmp_path, "sparse", seed=4, density=0.15)
    dense = make_set(tmp_path, "dense", seed=5, density=0.5, low=50, high=90)
    result = music_stats.compare(sparse, dense, bootstrap=400, seed=0)
    for which in ("generated", "reference"):
        for name, summary in result["sets"][which]["features"].items():
            if music_stats.FEATURE_BY_NAME[name].categorical:
                assert summary["mean"] is None
                continue
            lo, hi = summary["mean_ci"]
            assert lo <= summary["mean"] <= hi, (which, name)
    for name in ("notes_per_bar", "ioi", "polyphony"):
        lo, hi = result["features"][name]["oa_ci"]
        assert lo <= result["features"][name]["oa"] <= hi, name
    again = music_stats.compare(sparse, dense, bootstrap=400, seed=0)
    assert again == result


def test_bootstrap_mean_of_pooled_values(tmp_path):
    songs = music_stats.set_stats(
        [
            ("q", midi.read_score(write(tmp_path / "q.mid", QUARTERS))),
            ("t", midi.read_score(write(tmp_path / "t.mid", TRIAD))),
        ]
    )
    summary = music_stats.compare(songs, songs, bootstrap=50)["sets"]["generated"]["features"]
    assert summary["polyphony"]["mean"] == pytest.approx(2.0)  # 16 steps of 1, 16 steps of 3
    assert summary["polyphony"]["std"] == pytest.approx(1.0)
    assert summary["note_length"]["mean"] == pytest.approx((4 * 4 + 3 * 16) / 7)
    assert sum(summary["pitch_class"]["histogram"]) == pytest.approx(1.0)


def bar_notes(pattern, shift=0, start_bar=0):
    return [(on + 16 * start_bar, end + 16 * start_bar, pitch + shift, 80) for on, end, pitch in pattern]


PATTERN = [(0, 4, 48), (0, 8, 60), (4, 6, 64), (6, 8, 67), (8, 16, 55), (10, 12, 72), (12, 16, 71)]


def test_copying_check_finds_a_shifted_copy(tmp_path):
    filler = bar_notes([(0, 16, 30), (2, 3, 100)])
    train = [
        ("song", midi.read_score(write(tmp_path / "train.mid", filler + bar_notes(PATTERN, 0, 1)))),
        ("other", midi.read_score(write(tmp_path / "other.mid", bar_notes([(0, 2, 40), (8, 10, 41)])))),
    ]
    unrelated = [(0, 1, 90), (3, 5, 91), (5, 7, 35), (9, 13, 86), (14, 16, 88)]
    generated_notes = bar_notes(unrelated) + bar_notes(PATTERN, 5, 1) + bar_notes(PATTERN[:-1], 0, 3)
    generated = [("gen", midi.read_score(write(tmp_path / "gen.mid", generated_notes)))]

    result = music_stats.copying_check(generated, train, threshold=0.8)
    by_bar = {b["bar"]: b for b in result["bars"]}
    assert sorted(by_bar) == [0, 1, 3]  # bar 2 is empty
    assert result["generated_bars"] == 4 and result["checked_bars"] == 3
    copy = by_bar[1]
    assert copy["best_iou"] == pytest.approx(1.0)
    assert (copy["train_file"], copy["train_bar"], copy["shift"]) == ("song", 1, -5)
    cells = sum(end - on for on, end, _ in PATTERN)
    assert by_bar[3]["best_iou"] == pytest.approx((cells - 4) / cells)  # the last note (4 cells) left out
    assert by_bar[0]["best_iou"] < 0.3
    assert result["near_copies"] == 2
    assert result["near_copy_fraction"] == pytest.approx(2 / 3)


def test_copying_check_min_cells_and_shift_range(tmp_path):
    train = [("t", midi.read_score(write(tmp_path / "t.mid", bar_notes(PATTERN))))]
    far = [
        (
            "g",
            midi.read_score(
                write(tmp_path / "g.mid", bar_notes(PATTERN, 20) + bar_notes([(0, 1, 60)], 0, 1))
            ),
        )
    ]
    result = music_stats.copying_check(far, train, max_shift=12, min_cells=2)
    assert result["checked_bars"] == 1  # the one-cell bar is not checked
    assert result["bars"][0]["best_iou"] < 0.8  # a copy 20 semitones up is out of the shift range
    assert music_stats.copying_check(far, train, max_shift=20, min_cells=2)["bars"][0]["best_iou"] == 1.0
    assert music_stats.copying_check(far, train, min_cells=1000)["near_copy_fraction"] is None


def test_midi_paths(tmp_path):
    a = write(tmp_path / "set" / "a.mid", QUARTERS)
    b = write(tmp_path / "set" / "deep" / "b.MIDI", TRIAD)
    (tmp_path / "set" / "notes.txt").write_text("not midi")
    assert music_stats.midi_paths(tmp_path / "set") == [a, b]
    listing = tmp_path / "list.txt"
    listing.write_text("set/a.mid\n\n" + str(b) + "\n")
    assert music_stats.midi_paths(listing) == [a, b]
    with pytest.raises(ValueError):
        music_stats.midi_paths(a)


def test_unreadable_files_are_skipped_with_a_reason(tmp_path):
    good = write(tmp_path / "good.mid", QUARTERS)
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"MThd\x00\x00")
    loaded, skipped = music_stats.load_scores([good, bad])
    assert [name for name, _ in loaded] == [str(good)]
    assert skipped[0][0] == str(bad) and "\n" not in skipped[0][1] and skipped[0][1]


def test_cli_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(7)
    for i in range(4):
        write(tmp_path / "gen" / f"{i}.mid", random_song(rng, 8, 0.3, 40, 80))
        write(tmp_path / "ref" / f"{i}.mid", random_song(rng, 8, 0.2, 45, 85))
    (tmp_path / "gen" / "broken.mid").write_bytes(b"garbage")
    (tmp_path / "ref.txt").write_text("\n".join(f"ref/{i}.mid" for i in range(4)))

    evaluate.main(
        [
            "music",
            "--generated",
            str(tmp_path / "gen"),
            "--reference",
            str(tmp_path / "ref.txt"),
            "--out",
            str(tmp_path / "out" / "music.json"),
            "--png",
            str(tmp_path / "out" / "music.png"),
            "--bootstrap",
            "50",
        ]
    )
    printed = capsys.readouterr()
    assert "broken.mid" in printed.err
    assert "notes_per_bar" in printed.out and "mean OA" in printed.out
    result = json.loads((tmp_path / "out" / "music.json").read_text())
    assert result["sets"]["generated"]["files"] == 4 and len(result["sets"]["generated"]["skipped"]) == 1
    assert set(result["features"]) == {f.name for f in music_stats.FEATURES}
    with Image.open(tmp_path / "out" / "music.png") as image:
        assert image.size[0] > 600 and image.size[1] > 600

    evaluate.main(
        [
            "copying",
            "--generated",
            str(tmp_path / "gen"),
            "--train",
            str(tmp_path / "ref"),
            "--out",
            str(tmp_path / "out" / "copying.json"),
        ]
    )
    copying = json.loads((tmp_path / "out" / "copying.json").read_text())
    assert copying["checked_bars"] == len(copying["bars"]) > 0
    assert all(0.0 <= b["best_iou"] <= 1.0 for b in copying["bars"])
