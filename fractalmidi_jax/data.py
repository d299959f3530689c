"""Piano rolls -> training batches: crops, a stream reproducible from (seed, step), a background
loader, fixed evaluation crops; and the data command line (`python -m fractalmidi_jax.data`).

Letters in names: P = 128 pitches, T = steps of a whole piece, L = crop length, B = batch.

1. Stream. Global sample i = step * G + j for a global batch of G. With F files and augment
   factor A, epoch e = i // (F * A); the sample takes file order_e[i mod F*A] mod F, where
   order_e is a permutation seeded by (seed, e); its crop start (one of `crop_starts`: a bar line
   of the piece in its own meter, or a multiple of crop_alignment) and pitch shift come from
   default_rng((seed, e, i)). A batch is therefore a pure function of (seed, step), and process
   p of P builds only samples j in [p G / P, (p + 1) G / P).
2. Loader. Threads build the batches of steps s, s + 1, ... ahead of use; they come out in order.
3. Evaluation. `fixed_crops` takes seeded, distinct crop starts per file (`fixed_crop_starts`)
   and no pitch shift;
   `eval_batches` pads the last batch and gives padding weight 0, so every crop counts once.
Files and their parsed rolls: library.py.

A batch is a dict of arrays, one row per sample. It travels whole, as one pytree, through
sharding.global_batch and the jitted steps into fractal.fractal_loss, so a new per-sample input
is added here and read in the loss, with no signature in between to change. Its keys:
  roll    uint8 B x P x L   model tokens (roll.py)
  weight  float32 B         evaluation only: 0 for a padding sample, else 1 (absent: all 1)
"""

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import sys
import time

import numpy as np

from fractalmidi_jax import midi
from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax.cli import Parser
from fractalmidi_jax.library import RollLibrary, make_lists, resolve_files

# First seed word of each random stream, so that no two streams share a seed.
_ORDER_STREAM, _CROP_STREAM, _EVAL_STREAM = 1, 2, 3


# --- crops and the training stream ---


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """What one training sample is; checked on construction."""

    crop_length: int  # steps; a positive multiple of 4
    augment_factor: int = 1  # crops per file per epoch
    pitch_shift_min: int = 0  # semitones, inclusive
    pitch_shift_max: int = 0  # semitones, inclusive
    crop_alignment: int = 0  # 0: crops start on the piece's bar lines; N: on multiples of N steps

    def __post_init__(self):
        if self.crop_length <= 0 or self.crop_length % 4:
            raise ValueError(f"crop_length={self.crop_length} must be a positive multiple of 4")
        if self.augment_factor < 1 or self.crop_alignment < 0:
            raise ValueError("augment_factor must be at least 1 and crop_alignment at least 0")
        if self.pitch_shift_min > self.pitch_shift_max:
            raise ValueError(
                f"pitch_shift_min={self.pitch_shift_min} exceeds pitch_shift_max={self.pitch_shift_max}"
            )


def crop_starts(library: RollLibrary, k: int, crop_length: int, crop_alignment: int) -> np.ndarray:
    """Where a crop of file k may start, up to max(T - L, 0) (a short piece has one start, 0, and is
    padded at the end): its bar lines in its own meter (a 3/4 piece's every 12 steps) when
    crop_alignment is 0, else 0, a, 2a, ... for a = crop_alignment."""
    last = max(int(library.num_steps[k]) - crop_length, 0)
    if crop_alignment:
        return np.arange(0, last + 1, crop_alignment)
    lines = library.bar_lines[k]
    return lines[lines <= last]


def bar_lines_in_crop(library: RollLibrary, k: int, start: int, crop_length: int) -> np.ndarray:
    """The bar lines of file k inside its crop [start, start + L), counted from the crop's start:
    where a picture of the crop draws them."""
    lines = library.bar_lines[k] - start
    return lines[(lines >= 0) & (lines < crop_length)]


def crop_roll(
    roll_PxT: np.ndarray, start: int, crop_length: int, kind: str, shift: int = 0, out_PxL=None
) -> np.ndarray:
    """uint8 [128, L] model tokens of the window of a stored roll from `start`, moved up `shift`
    semitones; notes leaving 0..127 are dropped (not wrapped) and steps past the end of the piece
    are silence. A note cut by the window's start begins with an onset (roll.crop_tokens)."""
    if out_PxL is None:
        out_PxL = np.zeros((roll_lib.NUM_PITCHES, crop_length), np.uint8)
    else:
        out_PxL[:] = 0
    window = roll_PxT[:, start : start + crop_length]
    low, high = max(shift, 0), min(roll_lib.NUM_PITCHES + shift, roll_lib.NUM_PITCHES)
    out_PxL[low:high, : window.shape[1]] = window[low - shift : high - shift]
    return roll_lib.crop_tokens(out_PxL, kind)


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
        starts = crop_starts(self.library, file_index, spec.crop_length, spec.crop_alignment)
        start = int(starts[rng.integers(len(starts))])
        shift = int(rng.integers(spec.pitch_shift_min, spec.pitch_shift_max + 1))
        return file_index, start, shift

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """{'roll': uint8 [local_batch, 128, crop_length]}."""
        roll_BxPxL = np.empty((self.local_batch, roll_lib.NUM_PITCHES, self.spec.crop_length), np.uint8)
        first = step * self.global_batch + self.first_sample
        for b in range(self.local_batch):
            file_index, start, shift = self.sample(first + b)
            crop_roll(
                self.library.roll(file_index),
                start,
                self.spec.crop_length,
                self.library.kind,
                shift,
                out_PxL=roll_BxPxL[b],
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


def fixed_crop_starts(
    library: RollLibrary, crop_length: int, crops_per_file: int, seed: int = 0, crop_alignment: int = 0
) -> list[tuple[int, int]]:
    """(file index, crop start) of up to crops_per_file distinct seeded crop starts per file; the
    same on every call and every process."""
    CropSpec(crop_length, crop_alignment=crop_alignment)  # validates
    chosen = []
    for k in range(len(library)):
        starts = crop_starts(library, k, crop_length, crop_alignment)
        rng = np.random.default_rng([_EVAL_STREAM, seed, k])
        picked = np.sort(rng.choice(len(starts), min(crops_per_file, len(starts)), replace=False))
        chosen += [(k, int(starts[c])) for c in picked]
    return chosen


def fixed_crops(
    library: RollLibrary, crop_length: int, crops_per_file: int, seed: int = 0, crop_alignment: int = 0
) -> np.ndarray:
    """uint8 [N, 128, L]: the crops of fixed_crop_starts, no pitch shift."""
    return crops_at(
        library, fixed_crop_starts(library, crop_length, crops_per_file, seed, crop_alignment), crop_length
    )


def crops_at(library: RollLibrary, starts: list[tuple[int, int]], crop_length: int) -> np.ndarray:
    """uint8 [N, 128, L]: the crop of each (file index, start), no pitch shift."""
    return np.stack([crop_roll(library.roll(k), start, crop_length, library.kind) for k, start in starts])


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
        args.files,
        _read_options(args),
        args.roll,
        args.cache_dir,
        cache_in_memory=False,
        num_workers=args.num_workers,
    )
    if args.verbose:
        for k, path in enumerate(library.files):
            meter = ", ".join(
                f"{n}/{d}" + (f" from step {step}" if step else "")
                for step, n, d in library.time_signatures[k]
            )
            print(
                f"ok {path}: {library.num_notes[k]} notes, {library.num_steps[k]} steps, {library.seconds[k]:.1f} s, {meter or '4/4'}"
            )
    print(
        f"usable: {len(library)} files, {library.seconds.sum() / 3600:.2f} hours, "
        f"{library.num_notes.sum():,} notes, {library.num_steps.sum():,} steps"
    )


def _roundtrip(args) -> None:
    """How many notes survive MIDI -> roll -> MIDI (roll.roundtrip_stats)."""
    stats = roll_lib.roundtrip_stats(resolve_files(args.files), args.roll, _read_options(args))
    for path, reason in stats["skipped"]:
        print(f"skipped {path}: {reason}")
    print(
        f"{args.roll} roll: files {stats['files']}, skipped {len(stats['skipped'])}; notes {stats['notes']:,}, "
        f"exact {stats['exact']:,} ({stats['fraction']:.4%}), spurious {stats['spurious']:,}"
    )


def _bench(args) -> None:
    """Loader samples/s; run it twice, the first run fills the cache."""
    library = RollLibrary(
        args.files,
        _read_options(args),
        args.roll,
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
    parser = Parser(description=__doc__.split("\n")[0])
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
        command.add_argument("--roll", choices=roll_lib.KINDS, default="note", help="the roll encoding")
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
    bench.add_argument(
        "--crop_alignment",
        type=int,
        default=0,
        help="0: crops start on bar lines; N: on multiples of N steps",
    )

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
