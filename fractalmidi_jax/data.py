"""MIDI files -> training batches: file lists, a parse cache, and a stream reproducible from (seed, step).

Letters in names: P = 128 pitches, T = steps of a whole piece, L = crop length, B = batch, N = rows.

1. Files. `resolve_files` reads a list file (one path a line, relative to the list's folder) or
   walks a folder for *.mid / *.midi. `make_lists` splits a folder into train/valid/test by a
   hash of each relative path, so adding files never moves the files already assigned.
2. Library. `RollLibrary` parses each file once with `midi.read_score` in a worker process (a
   crash or hang costs that file only) and caches the roll's constant-velocity runs as a small
   .npz named by sha256(file bytes, PIPELINE_VERSION, ReadOptions). Unusable files are skipped
   with a logged reason, never replaced by silence. Rolls live in RAM, or are rebuilt from the
   disk cache on each access.
3. Stream. Global sample i = step * G + j for a global batch of G. With F files and augment
   factor A, epoch e = i // (F * A); the sample takes file order_e[i mod F*A] mod F, where
   order_e is a permutation seeded by (seed, e); its crop start (a multiple of crop_alignment)
   and pitch shift come from default_rng((seed, e, i)). A batch is therefore a pure function of
   (seed, step), and process p of P builds only samples j in [p G / P, (p + 1) G / P).
4. Loader. Threads build the batches of steps s, s + 1, ... ahead of use; they come out in order.
5. Evaluation. `fixed_crops` takes seeded, distinct crop starts per file and no pitch shift;
   `eval_batches` pads the last batch and gives padding weight 0, so every crop counts once.
"""

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from fractalmidi_jax import midi
from fractalmidi_jax.config import cache_root

log = logging.getLogger(__name__)

MIDI_SUFFIXES = (".mid", ".midi")
SPLITS = ("train", "valid", "test")
CACHE_FORMAT = 1  # bump when the .npz layout written by _parse_file changes
# First seed word of each random stream, so that no two streams share a seed.
_ORDER_STREAM, _CROP_STREAM, _EVAL_STREAM = 1, 2, 3


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


def cache_key(path, options: midi.ReadOptions) -> str:
    """sha256 of the file's bytes and of everything that shapes its roll: editing the file,
    bumping midi.PIPELINE_VERSION or changing an option makes a new key."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    settings = {
        "format": CACHE_FORMAT,
        "pipeline": midi.PIPELINE_VERSION,
        "options": dataclasses.asdict(options),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def roll_to_segments(roll_PxT: np.ndarray) -> np.ndarray:
    """int32 [N, 4] rows (pitch, start, length, velocity): the maximal runs of one non-zero velocity."""
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
    roll_PxT = np.zeros((midi.NUM_PITCHES, num_steps), np.uint8)
    pitch, start, length, velocity = segments_Nx4.astype(np.int64).T
    run_first_cell = np.cumsum(length) - length
    steps = np.repeat(start - run_first_cell, length) + np.arange(length.sum())
    roll_PxT[np.repeat(pitch, length), steps] = np.repeat(velocity, length)
    return roll_PxT


def _parse_file(path: str, options: midi.ReadOptions) -> dict:
    """Worker side: the cache record of one file; raises midi.MidiError when it is unusable."""
    score = midi.read_score(path, options)
    if len(score.notes) == 0:  # read_score refuses these already; an empty roll must never pass
        raise midi.MidiError("no notes")
    return {
        "segments": roll_to_segments(midi.score_to_roll(score)),
        "num_steps": np.int64(score.num_steps),
        "num_notes": np.int64(len(score.notes)),
        "seconds": np.float64(score.seconds),
        "capped": np.bool_(score.capped),
    }


def _read_record(cache_path: Path) -> dict:
    with np.load(cache_path) as z:
        return {name: z[name] for name in z.files}


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
    """The usable files of a list, each a uint8 [128, T] roll, parsed once and cached on disk.

    Raises ValueError when no file is usable, so a bad data path fails before anything compiles.
    """

    def __init__(
        self,
        source,
        options: midi.ReadOptions = midi.ReadOptions(),
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
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        cache_paths, facts, rolls, reasons, misses = {}, {}, {}, {}, []

        def keep(index, record):  # the segments themselves stay only as rolls, and only in memory mode
            facts[index] = {
                name: record[name].item() for name in ("num_steps", "num_notes", "seconds", "capped")
            }
            if cache_in_memory:
                rolls[index] = segments_to_roll(record["segments"], facts[index]["num_steps"])

        def skip(index, reason):
            reasons[index] = reason
            log.warning("skipped %s: %s", listed[index], reason)

        for index, path in enumerate(listed):
            try:
                cache_paths[index] = self.cache_dir / f"{cache_key(path, options)}.npz"
            except OSError as e:
                skip(index, f"cannot read file: {e.strerror or e}")
                continue
            try:
                keep(index, _read_record(cache_paths[index]))
            except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
                misses.append(index)
        self.num_from_cache = len(facts)
        args = [(str(listed[index]), options) for index in misses]
        if num_workers > 0:
            results = _map_isolated(_parse_file, args, num_workers, file_timeout_s)
        else:
            results = ((k, *_attempt(_parse_file, a)) for k, a in enumerate(args))
        for k, ok, value in results:
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
        """uint8 [128, T] of file k."""
        if self._rolls is not None:
            return self._rolls[k]
        record = _read_record(self._cache_paths[k])
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
            f"{int(self.capped.sum())} capped; {self.load_seconds:.1f} s"
        )


# --- crops and the training stream ---


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """What one training sample is; checked on construction."""

    crop_length: int  # steps; a positive multiple of 4
    augment_factor: int = 1  # crops per file per epoch
    pitch_shift_min: int = 0  # semitones, inclusive
    pitch_shift_max: int = 0  # semitones, inclusive
    crop_alignment: int = 16  # crop starts are multiples of this (16 = a 4/4 bar, 1 = anywhere)

    def __post_init__(self):
        if self.crop_length <= 0 or self.crop_length % 4:
            raise ValueError(f"crop_length={self.crop_length} must be a positive multiple of 4")
        if self.augment_factor < 1 or self.crop_alignment < 1:
            raise ValueError("augment_factor and crop_alignment must be at least 1")
        if self.pitch_shift_min > self.pitch_shift_max:
            raise ValueError(
                f"pitch_shift_min={self.pitch_shift_min} exceeds pitch_shift_max={self.pitch_shift_max}"
            )


def num_crop_starts(num_steps: int, crop_length: int, crop_alignment: int) -> int:
    """Starts 0, a, 2a, ... up to max(T - L, 0): a short piece has one (padded at the end)."""
    return max(num_steps - crop_length, 0) // crop_alignment + 1


def crop_roll(roll_PxT: np.ndarray, start: int, crop_length: int, shift: int = 0, out_PxL=None) -> np.ndarray:
    """uint8 [128, L] window from `start`, moved up `shift` semitones; notes leaving 0..127 are
    dropped (not wrapped) and steps past the end of the piece are silence."""
    if out_PxL is None:
        out_PxL = np.zeros((midi.NUM_PITCHES, crop_length), np.uint8)
    else:
        out_PxL[:] = 0
    window = roll_PxT[:, start : start + crop_length]
    low, high = max(shift, 0), min(midi.NUM_PITCHES + shift, midi.NUM_PITCHES)
    out_PxL[low:high, : window.shape[1]] = window[low - shift : high - shift]
    return out_PxL


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([_ORDER_STREAM, seed, epoch]).permutation(size)


class BatchStream:
    """batch(step): this process's share of global batch `step`, a pure function of (seed, step)."""

    def __init__(
        self,
        library: RollLibrary,
        spec: CropSpec,
        global_batch: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if global_batch < 1 or global_batch % process_count:
            raise ValueError(
                f"global_batch={global_batch} must be a positive multiple of process_count={process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
        if seed < 0:
            raise ValueError(f"seed={seed} must not be negative")
        self.library, self.spec, self.seed = library, spec, seed
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.first_sample = process_index * self.local_batch
        self.samples_per_epoch = len(library) * spec.augment_factor

    def sample(self, i: int) -> tuple[int, int, int]:
        """(file index, crop start, pitch shift) of global sample i."""
        epoch, slot = divmod(i, self.samples_per_epoch)
        file_index = int(_epoch_order(self.seed, epoch, self.samples_per_epoch)[slot]) % len(self.library)
        rng = np.random.default_rng([_CROP_STREAM, self.seed, epoch, i])
        spec = self.spec
        starts = num_crop_starts(
            int(self.library.num_steps[file_index]), spec.crop_length, spec.crop_alignment
        )
        start = int(rng.integers(starts)) * spec.crop_alignment
        shift = int(rng.integers(spec.pitch_shift_min, spec.pitch_shift_max + 1))
        return file_index, start, shift

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """{'roll': uint8 [local_batch, 128, crop_length]}."""
        roll_BxPxL = np.empty((self.local_batch, midi.NUM_PITCHES, self.spec.crop_length), np.uint8)
        first = step * self.global_batch + self.first_sample
        for b in range(self.local_batch):
            file_index, start, shift = self.sample(first + b)
            crop_roll(
                self.library.roll(file_index), start, self.spec.crop_length, shift, out_PxL=roll_BxPxL[b]
            )
        return {"roll": roll_BxPxL}


class Loader:
    """Yields stream.batch(start_step), stream.batch(start_step + 1), ... in order, built ahead
    by num_workers threads (numpy copies release the GIL) with at most `prefetch` batches
    waiting; num_workers=0 builds each batch when asked. Close it, or use it as a context manager."""

    def __init__(self, stream: BatchStream, start_step: int = 0, num_workers: int = 2, prefetch: int = 0):
        self.stream = stream
        self.step = start_step  # the step of the next batch handed out
        self._prefetch = prefetch or 2 * num_workers
        self._pending = collections.deque()  # futures of steps self.step, self.step + 1, ...
        self._pool = None
        if num_workers > 0:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                num_workers, thread_name_prefix="fractalmidi-loader"
            )

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._pool is None:
            batch = self.stream.batch(self.step)
        else:
            while len(self._pending) < self._prefetch:
                self._pending.append(self._pool.submit(self.stream.batch, self.step + len(self._pending)))
            batch = self._pending.popleft().result()
        self.step += 1
        return batch

    def close(self) -> None:
        """Drops the batches built ahead and joins the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# --- evaluation crops ---


def fixed_crops(
    library: RollLibrary, crop_length: int, crops_per_file: int, seed: int = 0, crop_alignment: int = 16
) -> np.ndarray:
    """uint8 [N, 128, L]: up to crops_per_file distinct seeded crop starts per file, no pitch
    shift; the same crops on every call and every process."""
    CropSpec(crop_length, crop_alignment=crop_alignment)  # validates
    crops = []
    for k in range(len(library)):
        starts = num_crop_starts(int(library.num_steps[k]), crop_length, crop_alignment)
        rng = np.random.default_rng([_EVAL_STREAM, seed, k])
        chosen = np.sort(rng.choice(starts, min(crops_per_file, starts), replace=False))
        crops += [crop_roll(library.roll(k), int(c) * crop_alignment, crop_length) for c in chosen]
    return np.stack(crops)


def eval_batches(
    crops_NxPxL: np.ndarray, global_batch: int, process_index: int = 0, process_count: int = 1
) -> list[dict[str, np.ndarray]]:
    """This process's share of each global batch of crops: {'roll', 'weight' float32 [B]}; the
    last batch is padded with silence of weight 0, so a weighted mean counts every crop once."""
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(
            f"global_batch={global_batch} must be a positive multiple of process_count={process_count}"
        )
    num_crops = len(crops_NxPxL)
    num_batches = -(-num_crops // global_batch)
    padded = np.zeros((num_batches * global_batch, *crops_NxPxL.shape[1:]), np.uint8)
    padded[:num_crops] = crops_NxPxL
    weight = (np.arange(len(padded)) < num_crops).astype(np.float32)
    local = global_batch // process_count
    firsts = range(process_index * local, len(padded), global_batch)
    return [{"roll": padded[f : f + local], "weight": weight[f : f + local]} for f in firsts]


# --- command line ---


def _read_options(args) -> midi.ReadOptions:
    return midi.ReadOptions(include_drums=args.include_drums, sustain_pedal=args.sustain_pedal)


def _check(args) -> None:
    """Parses every file (through the cache) and prints what is usable."""
    library = RollLibrary(
        args.files, _read_options(args), args.cache_dir, cache_in_memory=False, num_workers=args.num_workers
    )
    if args.verbose:
        for k, path in enumerate(library.files):
            print(
                f"ok {path}: {library.num_notes[k]} notes, {library.num_steps[k]} steps, {library.seconds[k]:.1f} s"
            )
    print(
        f"usable: {len(library)} files, {library.seconds.sum() / 3600:.2f} hours, "
        f"{library.num_notes.sum():,} notes, {library.num_steps.sum():,} steps"
    )


def _roundtrip(args) -> None:
    """How many notes survive MIDI -> roll -> MIDI (midi.roundtrip_stats)."""
    stats = midi.roundtrip_stats(resolve_files(args.files), _read_options(args))
    for path, reason in stats["skipped"]:
        print(f"skipped {path}: {reason}")
    print(
        f"files {stats['files']}, skipped {len(stats['skipped'])}; notes {stats['notes']:,}, "
        f"exact {stats['exact']:,} ({stats['fraction']:.4%}), spurious {stats['spurious']:,}"
    )


def _bench(args) -> None:
    """Loader samples/s; run it twice, the first run fills the cache."""
    library = RollLibrary(
        args.files,
        _read_options(args),
        args.cache_dir,
        not args.no_cache_in_memory,
        num_workers=args.parse_workers,
    )
    spec = CropSpec(
        args.crop_length, args.augment_factor, args.pitch_shift_min, args.pitch_shift_max, args.crop_alignment
    )
    stream = BatchStream(library, spec, args.batch_size)
    with Loader(stream, num_workers=args.num_workers) as loader:
        for _ in range(args.warmup_steps):
            next(loader)
        started = time.perf_counter()
        for _ in range(args.steps):
            next(loader)
        seconds = time.perf_counter() - started
    print(
        f"num_workers={args.num_workers}, cache_in_memory={not args.no_cache_in_memory}: {args.steps} batches of {args.batch_size} x 128 x "
        f"{args.crop_length} in {seconds:.2f} s = {args.steps * args.batch_size / seconds:,.0f} samples/s"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fractalmidi_jax.data", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    lists = commands.add_parser("make-lists", help="split a folder into train/valid/test lists")
    lists.add_argument("folder")
    lists.add_argument("--out", required=True, help="folder for train.txt, valid.txt, test.txt")
    lists.add_argument("--valid_fraction", type=float, default=0.05)
    lists.add_argument("--test_fraction", type=float, default=0.05)
    lists.add_argument("--seed", type=int, default=0)

    def reading_command(name, help_text):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("files", help="a file list (.txt) or a folder of MIDI files")
        command.add_argument("--include_drums", action="store_true")
        command.add_argument("--sustain_pedal", action="store_true")
        return command

    cache_help = "default: $FRACTALMIDI_CACHE/rolls, else ~/.cache/fractalmidi_jax/rolls"
    check = reading_command("check", "parse every file and report what is usable")
    check.add_argument("--cache_dir", default="", help=cache_help)
    check.add_argument("--num_workers", type=int, default=os.cpu_count(), help="parse processes")
    check.add_argument("--verbose", action="store_true", help="also one line per usable file")
    reading_command("roundtrip", "report how many notes survive MIDI -> roll -> MIDI")
    bench = reading_command("bench", "measure loader samples/s")
    bench.add_argument("--cache_dir", default="", help=cache_help)
    bench.add_argument(
        "--no_cache_in_memory", action="store_true", help="rebuild each roll from the disk cache"
    )
    bench.add_argument("--crop_length", type=int, default=512)
    bench.add_argument("--batch_size", type=int, default=16)
    bench.add_argument("--num_workers", type=int, default=2, help="batch-building threads")
    bench.add_argument(
        "--parse_workers", type=int, default=os.cpu_count(), help="parse processes for a cold cache"
    )
    bench.add_argument("--steps", type=int, default=200)
    bench.add_argument("--warmup_steps", type=int, default=5)
    bench.add_argument("--augment_factor", type=int, default=1)
    bench.add_argument("--pitch_shift_min", type=int, default=-3)
    bench.add_argument("--pitch_shift_max", type=int, default=3)
    bench.add_argument("--crop_alignment", type=int, default=16)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        if args.command == "make-lists":
            splits = make_lists(args.folder, args.out, args.valid_fraction, args.test_fraction, args.seed)
            print(
                ", ".join(f"{name} {len(paths)}" for name, paths in splits.items())
                + f" files listed in {args.out}"
            )
        else:
            {"check": _check, "roundtrip": _roundtrip, "bench": _bench}[args.command](args)
    except (OSError, ValueError) as e:
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
