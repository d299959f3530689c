"""Standard MIDI Files <-> notes on a sixteenth-note grid.

Reading (`read_score`) uses a small parser of our own (pure Python + numpy) so that a
bad file can only ever raise `MidiError` with a one-line reason: the size is checked
before reading, every declared length is checked against the bytes that are left,
variable-length quantities stop at 4 bytes, and the event loop checks a time budget.

Algorithm:
1. Each track is walked once. Note-ons are paired with note-offs per (channel, key)
   in that track (a note-on of velocity 0 is a note-off); tempo metas of every track
   form the tempo map, and time-signature metas the meter (`Score.time_signatures`, whose
   bars `bar_lines` puts on the step grid). A one-beat signature (numerator 1: 1/4, 1/8)
   marks beats, not bars, so it is left out (the meter before it goes on; 4/4 at the start):
   POP909 writes 1/4 into 621 of its 818 training files, pop songs that are not in 1/4.
   Channel 10 (index 9) holds drums, dropped unless include_drums.
2. Ticks become steps, never seconds: step = round(tick * 4 / resolution) (half up,
   in integer arithmetic, so odd resolutions and huge ticks are exact); a note ends at
   round(off_tick * 4 / resolution) but lasts at least one step, so notes shorter than
   a sixteenth occupy one step instead of vanishing. Tempo changes only affect
   `Score.seconds` and `Score.tempo_bpm`.
3. All non-drum tracks and channels are merged (format 2 files too, as if their
   tracks played together): one row per (onset, pitch), with the loudest velocity and
   the longest end.
4. The roll is capped at `max_steps`: notes starting at or after it are dropped, notes
   crossing it are cut. Only the kept notes are ever put on a grid, so an absurd last
   tick costs nothing.

A last track whose length field is short of its End-of-Track (the events go on past the
declared end) is read on to its End-of-Track when the events parse, and `Score.warnings`
says so; otherwise the declared length holds.

Notes without a note-off (policy): a note-on on a key that is already sounding on the
same channel of the same track ends the earlier note at that tick (a re-strike); a
note still sounding at the end of its track ends at the track's last event tick (and,
like every note, lasts at least one step).

Sustain pedal (CC 64, value >= 64 = down, per channel): ignored by default, because
pedalled notes would otherwise blur into long overlapping notes on the roll. With
`sustain_pedal=True`, a note released while the pedal is down sounds on until the
pedal lifts, or until the same key is struck again on that channel, whichever first.

The roll these notes become (two encodings, encode and decode) lives in roll.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import time

import numpy as np

STEPS_PER_QUARTER = 4  # one step = one sixteenth note
DEFAULT_BAR_STEPS = 16  # 4/4, the meter of a file (or of its start) without a time signature
PIPELINE_VERSION = 4  # bump whenever read_score's output can change (4: one-beat meters left out)

_DRUM_CHANNEL = 9
_DEFAULT_TEMPO_US = 500_000  # 120 bpm, the SMF default before any tempo meta
_DATA_BYTES = {0x80: 2, 0x90: 2, 0xA0: 2, 0xB0: 2, 0xC0: 1, 0xD0: 1, 0xE0: 2}
_BUDGET_CHECK_MASK = 4095  # look at the clock every 4096 events
_WRITE_RESOLUTION = 480  # ticks per quarter in written files (120 ticks per step)


class MidiError(ValueError):
    """A file that cannot be used. str(err) is a one-line reason, e.g.
    'truncated: track 2 declares 5000 bytes, 1200 remain'."""


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    include_drums: bool = False  # channel 10 (index 9) notes are dropped unless True
    sustain_pedal: bool = False  # True: a note released while CC64 >= 64 sounds on until the pedal lifts
    max_steps: int = 32768  # roll length cap in steps; later notes are cut and Score.capped is set
    max_file_bytes: int = 32 << 20  # bigger files are refused before reading
    time_budget_s: float = 20.0  # a parse that runs longer is abandoned with MidiError


@dataclasses.dataclass(frozen=True)
class Score:
    """Notes on the sixteenth-note grid, all (non-drum) tracks merged."""

    notes: np.ndarray  # int32 [N, 4] rows (onset_step, end_step, pitch, velocity), end > onset,
    # velocity 1..127, sorted by (onset, pitch); one row per (onset, pitch)
    # (duplicates merged: loudest velocity, longest end)
    num_steps: int  # roll length in steps (max end_step, <= max_steps)
    seconds: float  # duration by the tempo map (the whole file, before any cap)
    tempo_bpm: float  # the first tempo of the file (120 if it has none)
    resolution: int  # ticks per quarter note
    capped: bool  # notes beyond max_steps were cut
    kept_seconds: float = 0.0  # duration of what the roll keeps (= seconds unless capped)
    warnings: tuple[str, ...] = ()  # faults read around, one line each (e.g. a short track length)
    time_signatures: tuple[tuple[int, int, int], ...] = ()  # (step, numerator, denominator) by step;
    # none = 4/4 (its bars: bar_lines(time_signatures, num_steps))


def bar_steps(numerator: int, denominator: int) -> int:
    """Sixteenth-note steps in a bar of numerator/denominator (3/4 -> 12, 6/8 -> 12), at least 1."""
    return max(1, round(numerator * 4 * STEPS_PER_QUARTER / denominator))


def _meter_changes(time_signatures) -> list[tuple[int, int]]:
    """(first step, steps a bar) of each stretch of one meter, from step 0 (4/4 until the first
    time signature)."""
    changes = [(step, bar_steps(numerator, denominator)) for step, numerator, denominator in time_signatures]
    return changes if changes and changes[0][0] == 0 else [(0, DEFAULT_BAR_STEPS), *changes]


def bar_lines(time_signatures, num_steps: int) -> np.ndarray:
    """int64 steps where bars start: every one before num_steps, then the first at or after it
    (the end of the last bar), so [lines[i], lines[i + 1]) are the bars that cover the piece.

    Step 0 is a downbeat, and a time signature starts a bar at its step (as in a score, where a
    meter changes at a bar line; one in mid-bar cuts that bar short)."""
    changes = _meter_changes(time_signatures)
    lines = []
    for (start, length), (next_start, _) in zip(changes, [*changes[1:], (None, None)]):
        if next_start is None or next_start >= num_steps:  # the meter the piece ends in
            lines.append(np.arange(start, max(num_steps, start + 1) + length, length))
            break
        lines.append(np.arange(start, next_start, length))
    return np.concatenate(lines).astype(np.int64)


def bar_step(time_signatures, bar: float) -> int:
    """The step `bar` bars from the start in the piece's meter (0 = step 0; a fraction reaches into
    its bar, by that bar's length): what the bar-based generation arguments mean."""
    changes = _meter_changes(time_signatures)
    lines = bar_lines(time_signatures, changes[-1][0] + 1)  # up to the last meter's first bar
    whole = math.floor(bar)
    if bar < 0 or whole >= len(lines) - 2:  # before the start, or in the last meter: its bars go on
        first, length = (0, changes[0][1]) if bar < 0 else (len(lines) - 2, changes[-1][1])
        return round(int(lines[first]) + (bar - first) * length)
    return round(int(lines[whole]) + (bar - whole) * int(lines[whole + 1] - lines[whole]))


def read_score(path, options: ReadOptions = ReadOptions()) -> Score:
    """Read a Standard MIDI File into a Score; raises MidiError, never hangs."""
    deadline = time.perf_counter() + options.time_budget_s
    return _parse_smf(_read_bytes(path, options.max_file_bytes), options, deadline)


def _read_bytes(path, max_file_bytes: int) -> bytes:
    """The file's bytes, refusing non-regular and oversized files before reading."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise MidiError("not a regular file")
        if info.st_size > max_file_bytes:
            raise MidiError(f"file too large: {info.st_size} bytes > max_file_bytes {max_file_bytes}")
        with open(path, "rb") as f:
            data = f.read(max_file_bytes + 1)  # the file may have grown since stat
    except OSError as err:
        raise MidiError(f"cannot read file: {err.strerror or err}") from None
    if len(data) > max_file_bytes:
        raise MidiError(f"file too large: more than max_file_bytes {max_file_bytes}")
    return data


def _parse_smf(data: bytes, options: ReadOptions, deadline: float) -> Score:
    """Header and chunks; the tracks' notes become a Score."""
    if not data:
        raise MidiError("empty file")
    if data[:4] != b"MThd":
        raise MidiError("not a MIDI file (no MThd header)")
    if len(data) < 8:
        raise MidiError(f"truncated: the header chunk needs 8 bytes, the file has {len(data)}")
    header_len = int.from_bytes(data[4:8], "big")
    if header_len < 6:
        raise MidiError(f"bad header: length {header_len} < 6")
    if header_len > len(data) - 8:
        raise MidiError(f"truncated: header declares {header_len} bytes, {len(data) - 8} remain")
    fmt = int.from_bytes(data[8:10], "big")
    num_tracks = int.from_bytes(data[10:12], "big")
    division = int.from_bytes(data[12:14], "big")
    if fmt > 2:
        raise MidiError(f"unknown MIDI format {fmt} (expected 0, 1 or 2)")
    if division & 0x8000:
        raise MidiError(
            "SMPTE time division is not supported: convert the file to metrical ticks (ticks per quarter note)"
        )
    if division == 0:
        raise MidiError("zero resolution (0 ticks per quarter note)")

    notes: list[tuple[int, int, int, int]] = []  # (on_tick, off_tick, pitch, velocity)
    tempos: list[tuple[int, int]] = []  # (tick, microseconds per quarter)
    warnings: list[str] = []
    meters: list[tuple[int, int, int]] = []  # (tick, numerator, denominator)
    drum_notes = 0
    last_tick = 0
    pos = 8 + header_len
    track = 0
    while track < num_tracks and pos < len(data):
        if len(data) - pos < 8:
            raise MidiError(f"truncated: {len(data) - pos} stray bytes where chunk {track + 1} should start")
        kind = data[pos : pos + 4]
        length = int.from_bytes(data[pos + 4 : pos + 8], "big")
        pos += 8
        if length > len(data) - pos:
            name = f"track {track + 1}" if kind == b"MTrk" else f"chunk {kind!r}"
            raise MidiError(f"truncated: {name} declares {length} bytes, {len(data) - pos} remain")
        if kind == b"MTrk":
            track += 1
            if time.perf_counter() > deadline:
                raise MidiError(f"time budget of {options.time_budget_s} s exceeded at track {track}")
            is_last = track == num_tracks and pos + length < len(data)
            end_tick, drums, found_notes, found_tempos = _parse_track_to_its_end(
                data, pos, length, track, is_last, options, deadline, warnings, meters
            )
            notes += found_notes
            tempos += found_tempos
            last_tick = max(last_tick, end_tick)
            drum_notes += drums
        pos += length

    if not notes:
        if drum_notes:
            raise MidiError(
                f"no notes: the file has only drum notes ({drum_notes} on channel 10); "
                "pass ReadOptions(include_drums=True) to keep them"
            )
        raise MidiError("no notes")
    note_array, num_steps, capped = _quantise(np.array(notes, dtype=np.int64), division, options.max_steps)
    tempos.sort(key=lambda t: t[0])  # stable: at equal ticks, file order
    kept_tick = min(last_tick, -(-options.max_steps * division // STEPS_PER_QUARTER)) if capped else last_tick
    return Score(
        notes=note_array,
        num_steps=num_steps,
        seconds=_seconds(tempos, last_tick, division),
        tempo_bpm=60e6 / tempos[0][1] if tempos else 120.0,
        resolution=division,
        capped=capped,
        kept_seconds=_seconds([t for t in tempos if t[0] <= kept_tick], kept_tick, division),
        warnings=tuple(warnings),
        time_signatures=_meter_steps(meters, division),
    )


def _parse_track_to_its_end(data, pos, length, track, is_last, options, deadline, warnings, meters):
    """One MTrk chunk: (last tick, drum notes, notes, tempos). A last track whose declared length
    stops short of its End-of-Track (events that fail to parse, or no End-of-Track) is read on
    to the End-of-Track in the bytes that follow, when they parse; a warning says so."""
    notes, tempos = [], []
    try:
        end_tick, drums, end_of_track = _parse_track(
            data, pos, pos + length, track, options, deadline, notes, tempos, meters
        )
    except MidiError as error:
        failure, end_of_track = error, None
    else:
        failure = None
    if end_of_track is None and is_last:
        longer_notes, longer_tempos = [], []
        try:
            longer = _parse_track(
                data, pos, len(data), track, options, deadline, longer_notes, longer_tempos, []
            )
        except MidiError:
            longer = None
        if longer is not None and longer[2] is not None:
            warnings.append(
                f"track {track} declares {length} bytes but its End-of-Track ends {longer[2] - pos - length} "
                "bytes later; read to the End-of-Track"
            )
            return longer[0], longer[1], longer_notes, longer_tempos
    if failure is not None:
        raise failure
    return end_tick, drums, notes, tempos


def _read_vlq(data: bytes, pos: int, end: int, where: str) -> tuple[int, int]:
    """A variable-length quantity of at most 4 bytes starting at pos; returns (value, new pos)."""
    value = 0
    for _ in range(4):
        if pos >= end:
            raise MidiError(f"truncated: {where} ends inside a variable-length quantity")
        byte = data[pos]
        pos += 1
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, pos
    raise MidiError(f"bad variable-length quantity in {where} (longer than 4 bytes)")


def _parse_track(data, pos, end, track, options, deadline, notes, tempos, meters) -> tuple[int, int]:
    """Walk one MTrk chunk data[pos:end], appending its notes, tempos and time signatures.

    Returns (the track's last event tick, the number of drum notes dropped, the position after its
    End-of-Track or None if it has none)."""
    where = f"track {track}"
    include_drums = options.include_drums
    use_pedal = options.sustain_pedal
    sounding: dict[int, tuple[int, int]] = {}  # channel << 7 | key -> (on tick, velocity)
    released: dict[int, tuple[int, int]] = {}  # keys let go while the pedal was down
    pedal = [False] * 16
    tick = 0
    running = 0
    events = 0
    drums = 0
    end_of_track = None
    while pos < end:
        delta, pos = _read_vlq(data, pos, end, where)
        tick += delta
        events += 1
        if events & _BUDGET_CHECK_MASK == 0 and time.perf_counter() > deadline:
            raise MidiError(f"time budget of {options.time_budget_s} s exceeded in {where}")
        if pos >= end:
            raise MidiError(f"truncated: {where} ends inside an event at tick {tick}")
        status = data[pos]
        if status >= 0xF0:
            pos += 1
            if status == 0xFF:
                if pos >= end:
                    raise MidiError(f"truncated: {where} ends inside a meta event at tick {tick}")
                meta = data[pos]
                length, pos = _read_vlq(data, pos + 1, end, where)
                if length > end - pos:
                    raise MidiError(
                        f"truncated: meta event 0x{meta:02X} in {where} at tick {tick} "
                        f"declares {length} bytes, {end - pos} remain"
                    )
                if meta == 0x2F:  # end of track: anything after it is ignored
                    end_of_track = pos + length
                    break
                if meta == 0x51 and length == 3:
                    tempo = int.from_bytes(data[pos : pos + 3], "big")
                    if tempo == 0:
                        raise MidiError(f"zero tempo in {where} at tick {tick}")
                    tempos.append((tick, tempo))
                if meta == 0x58 and length >= 2 and data[pos] > 1 and data[pos + 1] < 8:
                    meters.append((tick, data[pos], 1 << data[pos + 1]))  # numerator, 2 ** power
            elif status in (0xF0, 0xF7):
                length, pos = _read_vlq(data, pos, end, where)
                if length > end - pos:
                    raise MidiError(
                        f"truncated: sysex event in {where} at tick {tick} declares {length} bytes, {end - pos} remain"
                    )
            else:
                raise MidiError(f"unexpected status byte 0x{status:02X} in {where} at tick {tick}")
            pos += length
            continue
        if status >= 0x80:
            running = status
            pos += 1
        elif not running:
            raise MidiError(f"data byte 0x{status:02X} without a status byte in {where} at tick {tick}")
        kind = running & 0xF0
        size = _DATA_BYTES[kind]
        if size > end - pos:
            raise MidiError(f"truncated: {where} ends inside a channel message at tick {tick}")
        a = data[pos]
        b = data[pos + 1] if size == 2 else 0
        pos += size
        if a >= 0x80 or b >= 0x80:
            raise MidiError(f"status byte inside a channel message in {where} at tick {tick}")
        if kind == 0x90 or kind == 0x80:
            channel = running & 0x0F
            if channel == _DRUM_CHANNEL and not include_drums:
                if kind == 0x90 and b:
                    drums += 1
                continue
            key = channel << 7 | a
            if kind == 0x90 and b:
                earlier = sounding.pop(key, None) or released.pop(key, None)
                if earlier is not None:  # re-strike: the earlier note ends here
                    notes.append((earlier[0], tick, a, earlier[1]))
                sounding[key] = (tick, b)
            else:
                earlier = sounding.pop(key, None)
                if earlier is None:
                    continue  # a stray note-off
                if pedal[channel]:
                    released[key] = earlier
                else:
                    notes.append((earlier[0], tick, a, earlier[1]))
        elif kind == 0xB0 and a == 64 and use_pedal:
            channel = running & 0x0F
            pedal[channel] = b >= 64
            if b < 64 and released:
                for key in [k for k in released if k >> 7 == channel]:
                    on, velocity = released.pop(key)
                    notes.append((on, tick, key & 0x7F, velocity))
    for key, (on, velocity) in (*sounding.items(), *released.items()):
        notes.append((on, tick, key & 0x7F, velocity))  # no note-off: ends with the track
    return tick, drums, end_of_track


def _quantise(ticks: np.ndarray, resolution: int, max_steps: int) -> tuple[np.ndarray, int, bool]:
    """(on_tick, off_tick, pitch, velocity) rows -> Score.notes, num_steps, capped."""
    onset = (ticks[:, 0] * 8 + resolution) // (2 * resolution)  # round(tick * 4 / res), half up
    end = np.maximum((ticks[:, 1] * 8 + resolution) // (2 * resolution), onset + 1)
    pitch, velocity = ticks[:, 2], ticks[:, 3]
    keep = onset < max_steps
    capped = bool((~keep).any() or (end > max_steps).any())
    if not keep.any():
        raise MidiError(f"no notes before the cap of max_steps={max_steps} steps")
    onset, end, pitch, velocity = onset[keep], np.minimum(end[keep], max_steps), pitch[keep], velocity[keep]

    order = np.lexsort((pitch, onset))
    onset, end, pitch, velocity = onset[order], end[order], pitch[order], velocity[order]
    first = np.flatnonzero(np.r_[True, (onset[1:] != onset[:-1]) | (pitch[1:] != pitch[:-1])])
    merged = np.stack(
        [onset[first], np.maximum.reduceat(end, first), pitch[first], np.maximum.reduceat(velocity, first)],
        axis=1,
    ).astype(np.int32)
    return merged, int(merged[:, 1].max()), capped


def _meter_steps(meters: list[tuple[int, int, int]], resolution: int) -> tuple[tuple[int, int, int], ...]:
    """Time signatures on the step grid, sorted, one per step (the last one at a step wins)."""
    by_step = {}
    for tick, numerator, denominator in sorted(meters, key=lambda m: m[0]):
        by_step[(tick * 8 + resolution) // (2 * resolution)] = (numerator, denominator)
    return tuple((step, *meter) for step, meter in sorted(by_step.items()))


def _seconds(tempos: list[tuple[int, int]], last_tick: int, resolution: int) -> float:
    """Duration of ticks 0..last_tick under the tempo map (sorted by tick)."""
    microticks = 0  # sum of ticks * microseconds per quarter
    tick, tempo = 0, _DEFAULT_TEMPO_US
    for change_tick, change_tempo in tempos:
        microticks += (change_tick - tick) * tempo
        tick, tempo = change_tick, change_tempo
    microticks += (last_tick - tick) * tempo
    return microticks / (1e6 * resolution)


def write_midi(path, notes, tempo_bpm: float = 120.0, program: int = 0, time_signature=(4, 4)) -> None:
    """Write (onset, end, pitch, velocity) rows as one piano track; one step = a sixteenth at tempo_bpm."""
    to_pretty_midi(notes, tempo_bpm, program, time_signature).write(str(path))


def to_pretty_midi(notes, tempo_bpm: float = 120.0, program: int = 0, time_signature=(4, 4)):
    """(onset, end, pitch, velocity) rows as a pretty_midi.PrettyMIDI of one piano track, in
    time_signature (numerator, denominator) from the start."""
    import pretty_midi  # imported here: reading never needs it

    midi = pretty_midi.PrettyMIDI(resolution=_WRITE_RESOLUTION, initial_tempo=float(tempo_bpm))
    midi.time_signature_changes.append(pretty_midi.TimeSignature(*map(int, time_signature), 0.0))
    instrument = pretty_midi.Instrument(program=program, name="Piano")
    seconds_per_step = 60.0 / (float(tempo_bpm) * STEPS_PER_QUARTER)
    for onset, end, pitch, velocity in np.asarray(notes, dtype=np.int64).reshape(-1, 4).tolist():
        instrument.notes.append(
            pretty_midi.Note(
                velocity=velocity, pitch=pitch, start=onset * seconds_per_step, end=end * seconds_per_step
            )
        )
    midi.instruments.append(instrument)
    return midi
