"""Files that lose nothing silently: a last track whose length field is short of its End-of-Track
is read to its end with a warning counted in the summary, and capped files are named with what was
kept, their totals counted after the cap (midi.py's parser, library.py, `data check`)."""

import logging

import pytest
from test_midi import STEP, TPQ, meta, notes_track, off, on, smf, track

from fractalmidi_jax import data, midi
from fractalmidi_jax import library as rolls

NUM_NOTES = 40


def short_last_track(shortfall: int) -> bytes:
    """A format-0 file of NUM_NOTES notes (every event 4 bytes) whose track length field is
    `shortfall` bytes short."""
    notes = [(k * STEP, k * STEP + STEP // 2, 40 + k, 90) for k in range(NUM_NOTES)]
    full = smf([notes_track(notes)], fmt=0)
    at = full.index(b"MTrk") + 4
    length = int.from_bytes(full[at : at + 4], "big")
    assert length == 8 * NUM_NOTES + 4  # each event: a 1-byte delta and 3 bytes
    return full[:at] + (length - shortfall).to_bytes(4, "big") + full[at + 4 :]


@pytest.mark.parametrize("shortfall", [100, 102])  # the declared end on an event boundary, or inside one
def test_short_last_track_length_is_read_to_its_end_of_track(tmp_path, shortfall):
    """Today: 100 bytes short lost 12 of 40 notes silently, 102 short lost the whole file. Now every
    note is read, and the score says what was read around."""
    path = tmp_path / "short.mid"
    path.write_bytes(short_last_track(shortfall))
    score = midi.read_score(path)
    assert len(score.notes) == NUM_NOTES
    (warning,) = score.warnings
    assert warning == (
        f"track 1 declares {8 * NUM_NOTES + 4 - shortfall} bytes but its End-of-Track ends {shortfall} bytes "
        "later; read to the End-of-Track"
    )


def test_garbage_after_a_short_track_keeps_the_declared_length(tmp_path):
    """Bytes after the declared end that do not parse to an End-of-Track are not read: the
    declared length holds, as before, and nothing is claimed."""
    events = [(0, on(60)), (STEP, off(60))]
    data_bytes = smf([track(events, end_of_track=True)], fmt=0) + b"\xf4\xf4\xf4\xf4"
    path = tmp_path / "trailing.mid"
    path.write_bytes(data_bytes)
    score = midi.read_score(path)
    assert len(score.notes) == 1 and score.warnings == ()


def test_library_and_check_count_and_name_faults_and_caps(tmp_path, capsys, caplog):
    """`data check` names the file read around a fault and every capped file with what was kept;
    its totals count the capped file's kept part only (today: 621 hours for one 1-hour roll)."""
    songs = tmp_path / "songs"
    songs.mkdir()
    (songs / "short.mid").write_bytes(short_last_track(100))
    far = 2**28 - 1
    events = [(0, on(60)), (STEP, off(60)), (0, on(62))]  # 62 sounds until a note at tick > 2**31
    events += [(far, meta(0x01, b"rest")) for _ in range(8)] + [(0, on(64)), (STEP, off(64))]
    (songs / "long.mid").write_bytes(smf([track(events)]))
    with caplog.at_level(logging.WARNING):
        library = rolls.RollLibrary(songs, cache_dir=tmp_path / "cache", num_workers=0)
    summary = library.summary()
    assert "2 loaded" in summary and "1 capped, 1 read around a fault" in summary
    file_hours = (2 * STEP + 8 * far) / TPQ * 0.5 / 3600
    kept_hours = 32768 / 4 * 0.5 / 3600
    kept = f"kept its first 32,768 steps ({kept_hours:.2f} of {file_hours:,.2f} hours)"
    assert f"capped {songs / 'long.mid'}: {kept}" in caplog.text
    assert f"read around a fault in {songs / 'short.mid'}: track 1 declares" in caplog.text
    caplog.clear()

    data.main(["check", str(songs), "--num_workers", "0", "--cache_dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    short_hours = (NUM_NOTES * STEP) / TPQ * 0.5 / 3600
    assert (
        f"usable: 2 files, {kept_hours + short_hours:.2f} hours, {NUM_NOTES + 2} notes" in out
    )  # 64 starts after the cap
    assert "capped" in caplog.text and "read around a fault" in caplog.text  # also from the cache
