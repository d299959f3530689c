"""Tests of fractalmidi_jax.midi on MIDI files built byte by byte (valid and broken)."""

import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

from fractalmidi_jax import midi
from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax.midi import MidiError, ReadOptions, read_score, write_midi

TPQ = 480
STEP = TPQ // 4  # ticks per sixteenth


# ---- raw SMF builders: an event is (delta ticks, bytes) --------------------------------


def vlq(value):
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def on(pitch, velocity=100, channel=0):
    return bytes([0x90 | channel, pitch, velocity])


def off(pitch, channel=0):
    return bytes([0x80 | channel, pitch, 0])


def cc(number, value, channel=0):
    return bytes([0xB0 | channel, number, value])


def meta(kind, payload):
    return bytes([0xFF, kind]) + vlq(len(payload)) + payload


def tempo(bpm=None, microseconds=None):
    us = microseconds if microseconds is not None else round(60e6 / bpm)
    return meta(0x51, us.to_bytes(3, "big"))


def time_signature(numerator, denominator_power):
    return meta(0x58, bytes([numerator, denominator_power, 24, 8]))


def chunk(kind, payload):
    return kind + len(payload).to_bytes(4, "big") + payload


def track(events, end_of_track=True):
    body = b"".join(vlq(delta) + data for delta, data in events)
    if end_of_track:
        body += vlq(0) + meta(0x2F, b"")
    return chunk(b"MTrk", body)


def smf(tracks, division=TPQ, fmt=1, extra=b""):
    header = chunk(b"MThd", b"".join(n.to_bytes(2, "big") for n in (fmt, len(tracks), division)))
    return header + extra + b"".join(tracks)


def notes_track(notes, tpq=TPQ, channel=0, leading=()):
    """A track from (onset_tick, off_tick, pitch, velocity) notes (note-offs before note-ons at a tick)."""
    events = sorted(
        [(t0, 1, on(p, v, channel)) for t0, _, p, v in notes]
        + [(t1, 0, off(p, channel)) for _, t1, p, _ in notes],
        key=lambda e: (e[0], e[1]),
    )
    out, now = list(leading), 0
    for tick, _, data in events:
        out.append((tick - now, data))
        now = tick
    return track(out)


def write(tmp_path, data, name="x.mid"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def rows(score):
    return [tuple(r) for r in score.notes.tolist()]


def error_of(tmp_path, data, **options):
    with pytest.raises(MidiError) as info:
        read_score(write(tmp_path, data), ReadOptions(**options))
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- round trip -------------------------------------------------------------------------


def test_repeated_notes_and_chords_round_trip_exactly(tmp_path):
    s = STEP
    notes = [
        # back-to-back repeated sixteenths and eighths of one pitch
        (0, 2 * s, 60, 90),
        (2 * s, 4 * s, 60, 70),
        (4 * s, 6 * s, 60, 110),
        (6 * s, 8 * s, 60, 50),
        # repeated chords, back to back
        (8 * s, 12 * s, 64, 80),
        (8 * s, 12 * s, 67, 81),
        (8 * s, 12 * s, 72, 82),
        (12 * s, 16 * s, 64, 60),
        (12 * s, 16 * s, 67, 61),
        (12 * s, 16 * s, 72, 62),
        # a held bass under the chords, then a repeated long note
        (8 * s, 24 * s, 36, 100),
        (24 * s, 28 * s, 36, 100),
    ]
    score = read_score(write(tmp_path, smf([notes_track(notes)])))
    want = sorted((t0 // s, p, v) for t0, _, p, v in notes)
    assert sorted((o, p, v) for o, _, p, v in rows(score)) == want

    for kind in roll_lib.KINDS:
        roll, _ = roll_lib.read_roll(tmp_path / "x.mid", kind)
        write_midi(tmp_path / "back.mid", roll_lib.roll_to_notes(roll, kind), tempo_bpm=score.tempo_bpm)
        back = read_score(tmp_path / "back.mid")
        assert sorted((o, p, v) for o, _, p, v in rows(back)) == want
        stats = roll_lib.roundtrip_stats([tmp_path / "x.mid", write(tmp_path, b"", "empty.mid")], kind)
        assert stats["files"] == 1 and stats["exact"] == stats["notes"] == len(notes)
        assert stats["fraction"] == 1.0 and stats["spurious"] == 0
        assert stats["skipped"] == [(str(tmp_path / "empty.mid"), "empty file")]
    # a note roll keeps every length; in a velocity roll the earlier of two back-to-back notes is
    # one step shorter, the last keeps its length
    decoded = {
        kind: roll_lib.roll_to_notes(roll_lib.read_roll(tmp_path / "x.mid", kind)[0], kind)
        for kind in roll_lib.KINDS
    }
    assert decoded["note"].tolist() == score.notes.tolist()
    assert [0, 1, 60, 90] in decoded["velocity"].tolist() and [6, 8, 60, 50] in decoded["velocity"].tolist()


def test_write_midi_keeps_steps_at_any_tempo(tmp_path):
    notes = np.array([[0, 3, 60, 100], [5, 6, 0, 1], [7, 40, 127, 127]])
    write_midi(tmp_path / "t.mid", notes, tempo_bpm=97.3)
    score = read_score(tmp_path / "t.mid")
    assert score.notes.tolist() == notes.tolist()
    assert score.tempo_bpm == pytest.approx(97.3, rel=1e-5)


# ---- bad input --------------------------------------------------------------------------

GOOD_TRACK = notes_track([(0, STEP, 60, 100)])


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "empty file"),
        (b"MThd\x00\x00", "truncated"),
        (bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "not a MIDI file"),
        (b"RIFF" + bytes(100), "not a MIDI file"),
        (smf([GOOD_TRACK], division=0), "zero resolution"),
        (smf([GOOD_TRACK], division=0xE250), "convert"),
        (smf([GOOD_TRACK], fmt=3), "format"),
        (chunk(b"MThd", b"\x00\x01\x00"), "length 3 < 6"),
        (smf([GOOD_TRACK])[:-5], "truncated: track 1 declares"),
        (
            smf([chunk(b"MTrk", b"")[:4] + (10**9).to_bytes(4, "big") + b"\x00\x90"]),
            "declares 1000000000 bytes",
        ),
        (smf([track([(0, tempo(microseconds=0)), (0, on(60)), (STEP, off(60))])]), "zero tempo"),
        (smf([track([(0, bytes([0xFF, 0x01]) + vlq(2**27) + b"abc"), (0, on(60))])]), "meta event"),
        (smf([track([(0, bytes([0xF0]) + vlq(2**27) + b"abc"), (0, on(60))])]), "sysex"),
        (smf([track([(0, on(60)), (0, b"\xff\x7f\xff\xff\xff\xff\x7f")])]), "longer than 4 bytes"),
        (smf([track([(0, b"\x90\x3c\x90")])]), "status byte inside a channel message"),
        (smf([track([(0, b"\x3c\x40")])]), "without a status byte"),
        (smf([track([(0, b"\xf2\x01\x02")])]), "unexpected status byte 0xF2"),
        (smf([chunk(b"MTrk", b"\x00\x90\x3c")]), "truncated: track 1 ends inside a channel message"),
        (smf([track([(0, time_signature(4, 2))])]), "no notes"),
        (smf([notes_track([(0, STEP, 36, 100)], channel=9)]), "include_drums"),
        (smf([]), "no notes"),
    ],
)
def test_bad_files_raise_one_line_reasons(tmp_path, data, fragment):
    assert fragment in error_of(tmp_path, data)


def test_size_and_time_limits(tmp_path, monkeypatch):
    big = smf([GOOD_TRACK]) + bytes(2000)
    assert "too large" in error_of(tmp_path, big, max_file_bytes=1000)
    many = smf([track([(1, on(60 + i % 2)) for i in range(10_000)])])
    assert "time budget" in error_of(tmp_path, many, time_budget_s=0.0)
    clock = iter(range(1000))  # a fake clock that ticks one second per look
    monkeypatch.setattr(midi, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert "time budget of 2.5 s exceeded in track 1" in error_of(tmp_path, many, time_budget_s=2.5)
    with pytest.raises(MidiError, match="not a regular file"):
        read_score(tmp_path)
    with pytest.raises(MidiError, match="cannot read"):
        read_score(tmp_path / "missing.mid")


def test_absurd_last_tick_is_capped_quickly(tmp_path):
    far = 2**28 - 1  # the largest delta a 4-byte quantity holds
    events = [(0, on(60)), (STEP, off(60)), (0, on(62))]  # 62 never ends before tick ~2**31
    events += [(far, meta(0x01, b"rest")) for _ in range(8)]
    events += [(0, on(64)), (STEP, off(64))]  # a note at tick > 2**31
    start = time.perf_counter()
    score = read_score(write(tmp_path, smf([track(events)])))
    assert time.perf_counter() - start < 1.0
    assert score.capped and score.num_steps == 32768
    assert rows(score) == [(0, 1, 60, 100), (1, 32768, 62, 100)]
    assert score.seconds == pytest.approx((2 * STEP + 8 * far) / TPQ * 0.5)

    late = smf([track([(far, meta(0x01, b"x"))] * 9 + [(0, on(60)), (STEP, off(60))])])
    assert "no notes before the cap" in error_of(tmp_path, late)
    two = smf([notes_track([(0, 10 * STEP, 60, 1), (20 * STEP, 21 * STEP, 61, 1)])])
    small = read_score(write(tmp_path, two), ReadOptions(max_steps=8))
    assert small.capped and rows(small) == [(0, 8, 60, 1)] and small.num_steps == 8


# ---- unusual but valid ------------------------------------------------------------------


def test_odd_meters_tempo_changes_pickup_and_triplets(tmp_path):
    conductor = [(0, time_signature(3, 2)), (0, tempo(100))]
    for bar in range(1, 8):  # a tempo change every 3/4 bar, then 6/8 and 7/8 metas
        conductor.append((3 * TPQ, tempo(100 + 10 * bar)))
    conductor += [(0, time_signature(6, 3)), (0, time_signature(7, 3))]
    notes = [(TPQ // 2, TPQ, 67, 80)]  # pickup: an upbeat eighth
    notes += [(TPQ + k * TPQ // 3, TPQ + (k + 1) * TPQ // 3, 60 + k, 90) for k in range(3)]  # eighth triplets
    notes += [(20 * TPQ, 21 * TPQ, 72, 70)]
    score = read_score(write(tmp_path, smf([track(conductor), notes_track(notes)])))
    assert [r[0] for r in rows(score)] == [2, 4, 5, 7, 80]  # triplets land on the nearest sixteenth
    assert [r[1] for r in rows(score)] == [4, 5, 7, 8, 84]
    assert score.tempo_bpm == pytest.approx(100, rel=1e-6)
    want = sum(3 * 60 / (100 + 10 * k) for k in range(7))  # 3 beats at each of 100..160 bpm
    assert score.seconds == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("tpq", [15360, 97, 1, 3])
def test_resolutions(tmp_path, tpq):
    notes = [(0, tpq, 60, 100), (tpq, 2 * tpq, 62, 90), (4 * tpq, 5 * tpq, 64, 80)]
    score = read_score(write(tmp_path, smf([notes_track(notes)], division=tpq)))
    assert rows(score) == [(0, 4, 60, 100), (4, 8, 62, 90), (16, 20, 64, 80)]
    assert score.resolution == tpq and score.seconds == pytest.approx(2.5)


def test_unknown_chunks_extreme_pitches_many_tracks_running_status(tmp_path):
    tracks = [notes_track([(0, STEP, 0, 1), (STEP, 2 * STEP, 127, 127)])]
    tracks += [notes_track([(t * STEP, (t + 1) * STEP, 20 + t % 80, 50)]) for t in range(299)]
    data = smf(tracks, extra=chunk(b"XFIH", b"\x01\x02\x03"))
    score = read_score(write(tmp_path, data))
    assert len(score.notes) == 301 and rows(score)[:2] == [(0, 1, 0, 1), (0, 1, 20, 50)]
    assert (1, 2, 127, 127) in rows(score)

    running = track([(0, b"\x90\x3c\x40"), (0, b"\x40\x41"), (STEP, b"\x3c\x00"), (0, b"\x40\x00")])
    assert rows(read_score(write(tmp_path, smf([running]), "r.mid"))) == [(0, 1, 60, 64), (0, 1, 64, 65)]


def test_short_notes_and_duplicates(tmp_path):
    notes = [(0, 10, 60, 100), (STEP * 3, STEP * 3 + 1, 61, 90)]
    twins = [(0, 2 * STEP, 70, 40), (0, 5 * STEP, 70, 20), (0, STEP, 70, 90)]  # one (onset, pitch)
    score = read_score(write(tmp_path, smf([notes_track(notes)] + [notes_track([twin]) for twin in twins])))
    assert rows(score) == [(0, 1, 60, 100), (0, 5, 70, 90), (3, 4, 61, 90)]


def test_missing_note_off_and_restrike(tmp_path):
    events = [
        (0, on(60, 80)),
        (3 * STEP, on(60, 90)),
        (2 * STEP, off(60)),  # re-strike
        (0, on(62, 70)),
        (STEP, on(64, 60)),
        (8 * STEP, meta(0x01, b"end")),
    ]  # never released
    score = read_score(write(tmp_path, smf([track(events)])))
    assert rows(score) == [(0, 3, 60, 80), (3, 5, 60, 90), (5, 14, 62, 70), (6, 14, 64, 60)]
    vel0 = track([(0, on(60)), (STEP * 2, on(60, 0)), (STEP, on(60, 50))])  # velocity 0 = note-off
    assert rows(read_score(write(tmp_path, smf([vel0]), "v.mid"))) == [(0, 2, 60, 100), (3, 4, 60, 50)]


def test_sustain_pedal(tmp_path):
    events = [
        (0, cc(64, 127)),
        (0, on(60)),
        (STEP, off(60)),
        (0, on(62)),
        (STEP, off(62)),
        (2 * STEP, on(62, 50)),  # struck again while held: ends the held 62
        (STEP, off(62)),
        (2 * STEP, cc(64, 0)),  # pedal up: 60 and the second 62 end
        (0, on(65)),
        (STEP, off(65)),
    ]  # after the pedal: unaffected
    data = smf([track(events)])
    plain = rows(read_score(write(tmp_path, data)))
    assert plain == [(0, 1, 60, 100), (1, 2, 62, 100), (4, 5, 62, 50), (7, 8, 65, 100)]
    pedal = rows(read_score(write(tmp_path, data), ReadOptions(sustain_pedal=True)))
    assert pedal == [(0, 7, 60, 100), (1, 4, 62, 100), (4, 7, 62, 50), (7, 8, 65, 100)]
    pedalled = ReadOptions(sustain_pedal=True)
    other_channel = smf(
        [track([(0, cc(64, 127, channel=1)), (0, on(60)), (STEP, off(60)), (4 * STEP, cc(64, 0, 1))])]
    )
    assert rows(read_score(write(tmp_path, other_channel, "c.mid"), pedalled)) == [(0, 1, 60, 100)]
    held_to_end = smf([track([(0, cc(64, 100)), (0, on(60)), (STEP, off(60)), (5 * STEP, meta(0x01, b"."))])])
    assert rows(read_score(write(tmp_path, held_to_end, "e.mid"), pedalled)) == [(0, 6, 60, 100)]


def test_drums(tmp_path):
    drums = notes_track([(0, STEP, 36, 110), (STEP, 2 * STEP, 38, 90)], channel=9)
    data = smf([notes_track([(0, STEP, 60, 100)]), drums])
    assert rows(read_score(write(tmp_path, data))) == [(0, 1, 60, 100)]
    with_drums = read_score(write(tmp_path, data), ReadOptions(include_drums=True))
    assert rows(with_drums) == [(0, 1, 36, 110), (0, 1, 60, 100), (1, 2, 38, 90)]
    drums_only = smf([notes_track([(0, STEP, 36, 110)], channel=9)])
    assert len(read_score(write(tmp_path, drums_only), ReadOptions(include_drums=True)).notes) == 1


def test_read_is_fast_on_a_50kb_file(tmp_path):
    notes = [(t * STEP, (t + 2) * STEP, 40 + (t * 7) % 40, 1 + t % 127) for t in range(6000)]
    path = write(tmp_path, smf([notes_track(notes)]))
    assert os.path.getsize(path) > 45_000
    start = time.perf_counter()
    score = read_score(path)
    assert time.perf_counter() - start < 0.5 and len(score.notes) == 6000
