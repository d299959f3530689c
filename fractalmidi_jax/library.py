"""MIDI files -> piano rolls: file lists, and a library of parsed rolls with a disk cache.

Letters in names: P = 128 pitches, T = steps of a whole piece, N = rows.

1. Files. `resolve_files` reads a list file (one path a line, relative to the list's folder) or
   walks a folder for *.mid / *.midi. `make_lists` splits a folder into train/valid/test by a
   hash of each relative path, so adding files never moves the files already assigned.
2. Library. `RollLibrary` parses each file once with `midi.read_score` in a worker process (a
   crash or hang costs that file only) and caches the roll's constant-velocity runs as a small
   .npz named by sha256(file bytes, CACHE_FORMAT, PIPELINE_VERSION, ReadOptions, roll kind),
   with the piece's time signatures (its meter: `bar_lines` are where its crops may start); a
   record names the roll kind it holds and a record of another kind is never used. Unusable
   files are skipped with a logged reason, never replaced by silence. Rolls live in RAM, or are
   rebuilt from the disk cache on each access.
"""

import collections
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from fractalmidi_jax import midi, progress
from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax.config import cache_root

log = logging.getLogger(__name__)

MIDI_SUFFIXES = (".mid", ".midi")
SPLITS = ("train", "valid", "test")
CACHE_FORMAT = 3  # bump when the .npz layout written by _parse_file changes (3: time signatures)


# --- file lists ---


def resolve_files(spec) -> list[Path]:
    """A list file or a folder -> MIDI paths, with an error that says what was wrong."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"folder {path} holds no *.mid or *.midi files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path} is neither a file list nor a folder")
    entries = (line.strip() for line in path.read_text().splitlines())
    files = [path.parent / Path(e).expanduser() for e in entries if e and not e.startswith("#")]
    if not files:
        raise ValueError(f"file list {path} names no files")
    return files


def make_lists(folder, out_dir, valid_fraction=0.05, test_fraction=0.05, seed=0) -> dict[str, list[Path]]:
    """Writes out_dir/{train,valid,test}.txt, paths relative to out_dir; the split of a file
    depends only on its path below `folder` (and the seed), not on which other files exist."""
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise ValueError("need valid_fraction >= 0, test_fraction >= 0 and a sum below 1")
    folder, out_dir = Path(folder), Path(out_dir)
    splits = {name: [] for name in SPLITS}
    for path in resolve_files(folder):
        digest = hashlib.sha256(f"{seed}/{path.relative_to(folder).as_posix()}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        name = "valid" if u < valid_fraction else "test" if u < valid_fraction + test_fraction else "train"
        splits[name].append(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, paths in splits.items():
        lines = [
            Path(os.path.relpath(os.path.abspath(p), os.path.abspath(out_dir))).as_posix() for p in paths
        ]
        (out_dir / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
    return splits


# --- the cache: a roll as its runs of one velocity ---


def default_cache_dir() -> Path:
    return cache_root() / "rolls"


def cache_key(path, options: midi.ReadOptions, kind: str) -> str:
    """sha256 of the file's bytes and of everything that shapes its roll: editing the file,
    bumping midi.PIPELINE_VERSION, changing an option or the roll kind makes a new key."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    settings = {
        "format": CACHE_FORMAT,
        "pipeline": midi.PIPELINE_VERSION,
        "options": dataclasses.asdict(options),
        "roll": kind,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def roll_to_segments(roll_PxT: np.ndarray) -> np.ndarray:
    """int32 [N, 4] rows (pitch, start, length, value): the maximal runs of one non-zero cell value."""
    num_pitches, num_steps = roll_PxT.shape
    padded = np.zeros((num_pitches, num_steps + 2), np.int16)
    padded[:, 1:-1] = roll_PxT
    # Boundaries in row-major order; a run of row p starts at boundary t and lasts to the next one.
    pitch, step = np.nonzero(padded[:, 1:] != padded[:, :-1])
    same_row = pitch[:-1] == pitch[1:]
    pitch, start, end = pitch[:-1][same_row], step[:-1][same_row], step[1:][same_row]
    velocity = roll_PxT[pitch, start]
    sounding = velocity > 0
    return np.stack([pitch, start, end - start, velocity], 1)[sounding].astype(np.int32)


def segments_to_roll(segments_Nx4: np.ndarray, num_steps: int) -> np.ndarray:
    """The inverse of roll_to_segments: uint8 [128, num_steps]."""
    roll_PxT = np.zeros((roll_lib.NUM_PITCHES, num_steps), np.uint8)
    pitch, start, length, velocity = segments_Nx4.astype(np.int64).T
    run_first_cell = np.cumsum(length) - length
    steps = np.repeat(start - run_first_cell, length) + np.arange(length.sum())
    roll_PxT[np.repeat(pitch, length), steps] = np.repeat(velocity, length)
    return roll_PxT


def _parse_file(path: str, options: midi.ReadOptions, kind: str) -> dict:
    """Worker side: the cache record of one file; raises midi.MidiError when it is unusable."""
    roll_PxT, score = roll_lib.read_roll(path, kind, options)
    if len(score.notes) == 0:  # read_score refuses these already; an empty roll must never pass
        raise midi.MidiError("no notes")
    return {
        "roll": np.str_(kind),
        "segments": roll_to_segments(roll_PxT),
        "num_steps": np.int64(score.num_steps),
        "num_notes": np.int64(len(score.notes)),
        "seconds": np.float64(score.kept_seconds),
        "file_seconds": np.float64(score.seconds),
        "capped": np.bool_(score.capped),
        "warning": np.str_("; ".join(score.warnings)),
        "time_signatures": np.array(score.time_signatures, np.int64).reshape(-1, 3),
    }


def _read_record(cache_path: Path, kind: str) -> dict:
    """A cache record of roll `kind`; KeyError if the file holds another kind (never used)."""
    with np.load(cache_path) as z:
        record = {name: z[name] for name in z.files}
    if str(record.get("roll", "")) != kind:
        raise KeyError(f"{cache_path} holds a {record.get('roll')} roll, not a {kind} roll")
    return record


def _write_record(cache_path: Path, record: dict) -> None:
    """Write-then-rename, so a reader (another process or host) never sees half a file."""
    partial = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as f:
        np.savez(f, **record)
    os.replace(partial, cache_path)


# --- parsing in worker processes ---


def _attempt(fn, args) -> tuple[bool, object]:
    """(True, fn(*args)) or (False, one-line reason); an unexpected error is a reason too, so one
    odd file cannot stop a load of thousands."""
    try:
        return True, fn(*args)
    except midi.MidiError as e:
        return False, str(e)
    except Exception as e:  # reported per file and counted in the summary, like a MidiError
        return False, f"unexpected {type(e).__name__}: {e}"


def _serve(conn, fn) -> None:
    """Worker process loop: answers each args tuple with _attempt(fn, args) until None arrives."""
    conn.send("ready")  # imports are done: from here on, the parent's clock is fair
    while (args := conn.recv()) is not None:
        conn.send(_attempt(fn, args))


class _Worker:
    """One spawned process serving fn over a pipe; `job` is (index, deadline) while it is busy."""

    def __init__(self, context, fn):
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_conn, fn), daemon=True)
        self.process.start()
        child_conn.close()
        self.job = None

    def wait_ready(self) -> "_Worker":
        try:
            self.conn.recv()
        except EOFError:
            self.process.join()
            raise RuntimeError(
                f"a parse worker failed to start (exit code {self.process.exitcode})"
            ) from None
        return self

    def answer(self, timeout_s: float):
        """The job's (ok, value), a failure if the process died or overran (then it is killed),
        or None while the job runs."""
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=5)
        if not self.process.is_alive():
            return False, f"worker process died (exit code {self.process.exitcode})"
        if time.monotonic() > self.job[1]:
            self.stop(kill=True)
            return False, f"no result within {timeout_s:g} s (worker killed)"
        return None

    def stop(self, kill: bool) -> None:
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _map_isolated(fn, arg_tuples, num_workers: int, timeout_s: float):
    """Yields (index, ok, value or reason) for fn(*args) over arg_tuples, as results arrive.

    Each call runs in a spawned worker (spawn, not fork: the caller may hold JAX threads). A
    worker that dies or takes longer than timeout_s is killed and replaced, failing only its call.
    """
    context = multiprocessing.get_context("spawn")
    todo = collections.deque(enumerate(arg_tuples))
    workers = [_Worker(context, fn) for _ in range(min(num_workers, len(todo)))]
    try:
        for w in workers:
            w.wait_ready()
        while todo or any(w.job for w in workers):
            for w in workers:
                if w.job is None and todo:
                    index, args = todo.popleft()
                    w.conn.send(args)
                    w.job = (index, time.monotonic() + timeout_s)
            busy = [w for w in workers if w.job]
            wait_s = max(0.0, min(w.job[1] for w in busy) - time.monotonic())
            multiprocessing.connection.wait(
                [w.conn for w in busy] + [w.process.sentinel for w in busy], wait_s
            )
            for k, w in enumerate(workers):
                answer = w.answer(timeout_s) if w.job else None
                if answer is None:
                    continue
                index, w.job = w.job[0], None
                if not w.process.is_alive():
                    w.stop(kill=True)
                    workers[k] = _Worker(context, fn).wait_ready()
                yield index, *answer
    finally:
        for w in workers:
            w.stop(kill=w.job is not None)


# --- the library ---


class RollLibrary:
    """The usable files of a list, each a stored uint8 [128, T] roll of one kind (roll.py),
    parsed once and cached on disk.

    Raises ValueError when no file is usable, so a bad data path fails before anything compiles.
    """

    def __init__(
        self,
        source,
        options: midi.ReadOptions = midi.ReadOptions(),
        kind: str = "note",
        cache_dir=None,
        cache_in_memory: bool = True,
        num_workers: int = 2,
        file_timeout_s: float = 60.0,
    ):
        """source: a list file, a folder, or a sequence of paths. num_workers: parse processes
        (0 parses in this process: faster for a handful of files, but without the isolation)."""
        started = time.perf_counter()
        from_spec = isinstance(source, (str, os.PathLike))
        listed = resolve_files(source) if from_spec else [Path(p) for p in source]
        self.options = options
        self.kind = roll_lib.check_kind(kind)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        cache_paths, facts, rolls, reasons, misses = {}, {}, {}, {}, []

        def keep(index, record):  # the segments themselves stay only as rolls, and only in memory mode
            meter = tuple(map(tuple, record["time_signatures"].tolist()))
            facts[index] = {
                name: record[name].item()
                for name in ("num_steps", "num_notes", "seconds", "file_seconds", "capped", "warning")
            } | {"time_signatures": meter}
            if cache_in_memory:
                rolls[index] = segments_to_roll(record["segments"], facts[index]["num_steps"])

        def skip(index, reason):
            reasons[index] = reason
            log.warning("skipped %s: %s", listed[index], reason)

        for index, path in enumerate(listed):
            try:
                cache_paths[index] = self.cache_dir / f"{cache_key(path, options, kind)}.npz"
            except OSError as e:
                skip(index, f"cannot read file: {e.strerror or e}")
                continue
            try:
                keep(index, _read_record(cache_paths[index], kind))
            except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
                misses.append(index)
        self.num_from_cache = len(facts)
        args = [(str(listed[index]), options, kind) for index in misses]
        if num_workers > 0:
            results = _map_isolated(_parse_file, args, num_workers, file_timeout_s)
        else:
            results = ((k, *_attempt(_parse_file, a)) for k, a in enumerate(args))
        for k, ok, value in progress.track(results, "parsing MIDI files", len(args)):
            if ok:
                _write_record(cache_paths[misses[k]], value)
                keep(misses[k], value)
            else:
                skip(misses[k], value)

        usable = sorted(facts)
        self.files = [listed[i] for i in usable]
        self.skipped = [(listed[i], reasons[i]) for i in sorted(reasons)]
        self.num_listed = len(listed)
        self.num_steps = np.array([facts[i]["num_steps"] for i in usable], np.int64)
        self.num_notes = np.array([facts[i]["num_notes"] for i in usable], np.int64)
        self.seconds = np.array([facts[i]["seconds"] for i in usable], np.float64)
        self.capped = np.array([facts[i]["capped"] for i in usable], bool)
        self.time_signatures = [facts[i]["time_signatures"] for i in usable]  # Score.time_signatures
        self.bar_lines = [  # midi.bar_lines of each piece: where its bars start
            midi.bar_lines(meter, steps) for meter, steps in zip(self.time_signatures, self.num_steps)
        ]
        self.capped_notes = [
            f"{listed[i]}: kept its first {facts[i]['num_steps']:,} steps "
            f"({facts[i]['seconds'] / 3600:,.2f} of {facts[i]['file_seconds'] / 3600:,.2f} hours)"
            for i in usable
            if facts[i]["capped"]
        ]
        self.warnings = [(listed[i], facts[i]["warning"]) for i in usable if facts[i]["warning"]]
        for note in self.capped_notes:
            log.warning("capped %s", note)
        for path, warning in self.warnings:
            log.warning("read around a fault in %s: %s", path, warning)
        self._cache_paths = [cache_paths[i] for i in usable]
        self._rolls = [rolls[i] for i in usable] if cache_in_memory else None
        self.load_seconds = time.perf_counter() - started
        if not usable:
            raise ValueError(
                f"no usable MIDI file in {source if from_spec else 'the given paths'}: {self.summary()}"
            )
        log.info("%s", self.summary())

    def __len__(self) -> int:
        return len(self.files)

    def roll(self, k: int) -> np.ndarray:
        """The stored uint8 [128, T] roll of file k (crops become tokens through data.crop_roll)."""
        if self._rolls is not None:
            return self._rolls[k]
        record = _read_record(self._cache_paths[k], self.kind)
        return segments_to_roll(record["segments"], int(record["num_steps"]))

    def skip_counts(self) -> collections.Counter:
        """Skipped files by the kind of reason (the text before the first colon)."""
        return collections.Counter(reason.split(":")[0] for _, reason in self.skipped)

    def summary(self) -> str:
        skipped = ", ".join(f"{kind} {n}" for kind, n in self.skip_counts().most_common())
        return (
            f"{self.num_listed} files listed: {len(self.files)} loaded "
            f"({len(self.files) - self.num_from_cache} parsed, {self.num_from_cache} from cache), "
            f"{len(self.skipped)} skipped{f' ({skipped})' if skipped else ''}, "
            f"{int(self.capped.sum())} capped, {len(self.warnings)} read around a fault; {self.load_seconds:.1f} s"
        )
