"""Generation: the Python API (`Generator`, `load`) and what generate.py does with it: load a
checkpoint, build the canvas a mode asks for, run the jitted sampler in batches, and write MIDI
(plus pictures, GIFs and audio when asked), one JSON and an index.html into a fresh run folder.

Modes:
- unconditional: an empty canvas.
- continuation: the first `prompt_steps` steps of `prompt_midi` are known and held fixed;
  the model writes the rest, conditioned on them.
- inpainting: the first `target_width` steps of `input_midi` are known except the region
  [mask_start, mask_end) x [mask_pitch_low, mask_pitch_high], which is regenerated.

Conditions and whole pieces (both modes but inpainting may have them):
- a model trained with `--conditions` follows per-bar chords and density (`--chords "C G Am F"`,
  `--density 8`; conditions.py), guided at `--cfg` (1 = plain conditional; classifier-free
  guidance, sampler.py; CFG_WHEN_ASKED unless told). A model trained without refuses them.
- `--num_bars N` (bars of 16 steps) writes a piece longer than the model's width by windows of
  `--target_width`: each window after the first keeps the last `--overlap_bars` of the piece so
  far as known cells (the continuation machinery) and writes on; a condition list covers the
  whole piece, each window reading its own bars.

Notes at the region's border (rule): a note of the input that lies partly inside the region
and partly outside is kept whole, as context; only notes wholly inside are regenerated. So
every note that is not wholly inside the region comes back note for note (onset, pitch,
velocity, length): its cells are copied, and decoding starts a new note wherever known and
generated cells meet (`roll.roll_to_notes(..., starts=...)`), so a generated cell never
lengthens or joins a known note.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fractalmidi_jax import checkpoint as ckpt
from fractalmidi_jax import conditions as conditions_lib
from fractalmidi_jax import data, html_index, midi, progress, render, sharding, steps
from fractalmidi_jax import grid as grid_lib
from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax import sampler as sampler_lib
from fractalmidi_jax.cli import Parser
from fractalmidi_jax.config import NUM_PITCHES, Config, ConfigError, from_dict, use_compilation_cache
from fractalmidi_jax.fractal import build_model
from fractalmidi_jax.head import Sampling
from fractalmidi_jax.output_dir import OutputDirError, check_writable
from fractalmidi_jax.writer import next_numbered_dir

MODES = ("unconditional", "continuation", "inpainting")
BATCH_SIZE = 4  # samples per sampler call unless told: the CLI and the API draw the same music
BAR_STEPS = conditions_lib.BAR_STEPS  # --num_bars and --overlap_bars count bars of 16 steps
NUM_BARS_MODES = (
    "--num_bars writes a new piece (unconditional or continuation); inpainting edits its input's width"
)
# The seed's key folded with this, then with the window index, keys the windows after the first.
WINDOW_STREAM = 1 << 20
# The guidance scale when conditions are asked and no --cfg is given: on POP909 it follows chords
# and density (chroma cosine 0.95, density r 0.83) at the unconditional model's mean OA (README).
CFG_WHEN_ASKED = 1.5


class GenerationError(ValueError):
    """Bad generation settings or inputs; the message says what to change."""


def load_model(checkpoint: str, use_ema: bool = True):
    """(config, graphdef, params) of a checkpoint; clear errors for missing or foreign ones."""
    path = ckpt.resolve(checkpoint)
    try:
        config = from_dict(ckpt.read_config(path)).validate()
    except ConfigError as error:
        raise ckpt.CheckpointError(f"checkpoint {path} has an unreadable config: {error}") from None
    state = ckpt.restore(path, steps.restore_target(config, sharding.make_mesh("1")))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(config)))
    params = steps.eval_params(state) if use_ema else state["params"]
    if not ckpt.is_finite(params):
        raise ckpt.CheckpointError(
            f"checkpoint {path} holds NaN or inf weights (its training diverged): generate from an earlier one"
        )
    return config, graphdef, params, path


def check_width(config: Config, width: int) -> None:
    if width <= 0 or width % 4 or width > config.max_crop_length:
        raise GenerationError(
            f"--target_width {width}: this model generates widths that are multiples of 4 from 4 to "
            f"{config.max_crop_length} steps (its max_crop_length)"
        )


def check_ar_prefix(config: Config, known_mask_PxW: np.ndarray) -> None:
    """An AR (or column) level 0 conditions only on what comes before in its scan: the known cells
    must lie in level-0 patches (columns) that precede every patch (column) with something to
    generate."""
    kind = config.generator_types[0]
    if kind == "mar":
        return
    patch = config.img_size_list[1]
    width = known_mask_PxW.shape[1]
    padded = np.zeros((NUM_PITCHES, -(-width // patch) * patch), bool)
    padded[:, :width] = known_mask_PxW
    if kind == "column":
        steps = (
            padded.reshape(NUM_PITCHES, -1, patch).transpose(1, 0, 2).reshape(padded.shape[1] // patch, -1)
        )
        all_known, any_known = steps.all(axis=1), steps.any(axis=1)
    else:
        tiles = grid_lib.patchify(padded[None], patch)[0]
        scan = grid_lib.Grid(NUM_PITCHES // patch, padded.shape[1] // patch, patch).scan_order(
            config.scan_order
        )
        all_known, any_known = tiles.all(axis=1)[scan], tiles.any(axis=1)[scan]
    first_open = int(np.argmin(all_known)) if not all_known.all() else len(all_known)
    if any_known[first_open + 1 :].any():
        order = "time" if kind == "column" else config.scan_order
        raise GenerationError(
            f"this model's level 0 is autoregressive in {order} order, so it can only condition on "
            "music that comes first in that order; the known music here lies after the part to generate. "
            + (
                "Use continuation with a column_major model, or a model with a MAR level 0."
                if order == "row_major"
                else "Use a model with a MAR level 0 for inpainting."
            )
        )


def read_input(path: str, kind: str) -> tuple[np.ndarray, midi.Score]:
    """(stored roll, score) of a MIDI file."""
    try:
        return roll_lib.read_roll(path, kind)
    except midi.MidiError as error:
        raise GenerationError(f"cannot read {path}: {error}") from None


def keep_border_notes_whole(tokens_PxW: np.ndarray, region_PxW: np.ndarray, kind: str) -> np.ndarray:
    """The region to regenerate, less the cells of every note that lies partly outside it."""
    notes = roll_lib.roll_to_notes(tokens_PxW, kind)
    onset, end, pitch, _ = notes.T.astype(np.int64)
    inside_before = np.zeros((region_PxW.shape[0], region_PxW.shape[1] + 1), np.int64)
    inside_before[:, 1:] = np.cumsum(region_PxW, axis=1)
    inside = inside_before[pitch, end] - inside_before[pitch, onset]
    crossing = (inside > 0) & (inside < end - onset)
    cell_pitch, cell_step, _ = roll_lib.note_cells(onset[crossing], end[crossing], pitch[crossing])
    region = region_PxW.copy()
    region[cell_pitch, cell_step] = False
    return region


def steps_of(steps: int | None, bars: float | None, score: midi.Score, name: str) -> int | None:
    """A position given in steps (`--<name>`) or in bars of the input's meter (`--<name>_bar(s)`)."""
    if steps is not None and bars is not None:
        raise GenerationError(f"give --{name} or its bar form, not both")
    if bars is not None and not np.isfinite(bars):
        raise GenerationError(f"the bar form of --{name} must be a finite number of bars, not {bars}")
    return steps if bars is None else midi.bar_step(score.time_signatures, bars)


def window_starts(total: int, window: int, overlap_bars: int) -> tuple[int, ...]:
    """First steps of the windows that write `total` steps: each after the first starts
    overlap_bars (0 = half a window) before the end of the one before; the last ends at the end."""
    if total <= window:
        return (0,)
    window_bars = window // BAR_STEPS
    overlap = overlap_bars or window_bars // 2
    if not 0 < overlap < window_bars:
        raise GenerationError(
            f"--overlap_bars {overlap} must be from 1 to {window_bars - 1}: a window is {window_bars} bars"
        )
    starts = [0]
    while starts[-1] + window < total:
        starts.append(min(starts[-1] + window - overlap * BAR_STEPS, total - window))
    return tuple(starts)


def empty_canvas(width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((NUM_PITCHES, width), np.uint8), np.zeros((NUM_PITCHES, width), bool)


def canvas(args, width: int, kind: str) -> tuple[np.ndarray, np.ndarray, midi.Score | None]:
    """(known cells, known mask) for one sample (128 x width, model tokens), and the input's
    Score (its tempo and meter are written into the output)."""
    cells, known = empty_canvas(width)
    if args.mode == "unconditional":
        return cells, known, None
    region = np.zeros((NUM_PITCHES, width), bool)
    if args.mode == "continuation":
        if not args.prompt_midi or (args.prompt_steps is None and args.prompt_bars is None):
            raise GenerationError(
                "continuation needs --prompt_midi FILE and --prompt_steps N (or --prompt_bars B)"
            )
        stored, score = read_input(args.prompt_midi, kind)
        prompt_steps = steps_of(args.prompt_steps, args.prompt_bars, score, "prompt_steps")
        if not 0 < prompt_steps < width:
            raise GenerationError(f"--prompt_steps {prompt_steps} must be between 1 and {width - 1}")
        if prompt_steps > stored.shape[1]:
            raise GenerationError(
                f"--prompt_steps {prompt_steps} is longer than {args.prompt_midi} ({stored.shape[1]} steps)"
            )
        region[:, prompt_steps:] = True
    else:
        has_start = args.mask_start is not None or args.mask_start_bar is not None
        has_end = args.mask_end is not None or args.mask_end_bar is not None
        if not args.input_midi or not has_start or not has_end:
            raise GenerationError(
                "inpainting needs --input_midi FILE, --mask_start S and --mask_end E (or --mask_start_bar and --mask_end_bar)"
            )
        stored, score = read_input(args.input_midi, kind)
        mask_start = steps_of(args.mask_start, args.mask_start_bar, score, "mask_start")
        mask_end = steps_of(args.mask_end, args.mask_end_bar, score, "mask_end")
        length = min(stored.shape[1], width)
        low, high = args.mask_pitch_low, args.mask_pitch_high
        if not 0 <= mask_start < mask_end <= length:
            raise GenerationError(
                f"mask [{mask_start}, {mask_end}) is outside the input: it must lie within "
                f"[0, {length}) steps ({args.input_midi} has {stored.shape[1]} steps; the canvas is {width})"
            )
        if not 0 <= low <= high < NUM_PITCHES:
            raise GenerationError(
                f"--mask_pitch_low {low} / --mask_pitch_high {high} must satisfy 0 <= low <= high <= 127"
            )
        region[low : high + 1, mask_start:mask_end] = True
    tokens = data.crop_roll(stored, 0, width, kind)
    known = ~keep_border_notes_whole(tokens, region, kind)
    return np.where(known, tokens, 0).astype(np.uint8), known, score


def decode(roll_PxW, known_PxW, kind: str, min_velocity=1, min_note_steps=1, velocity_tolerance=0):
    """The notes of a generated roll; a note starts wherever known and generated cells meet."""
    meets = np.zeros_like(known_PxW)
    meets[:, 1:] = known_PxW[:, 1:] != known_PxW[:, :-1]
    return roll_lib.roll_to_notes(
        roll_PxW, kind, min_velocity, min_note_steps, velocity_tolerance, starts=meets
    )


def time_signature(score: midi.Score | None) -> tuple[int, int]:
    """The meter to write: the input's first time signature, else 4/4."""
    return tuple(score.time_signatures[0][1:]) if score and score.time_signatures else (4, 4)


@dataclasses.dataclass(frozen=True)
class Samples:
    """What one Generator.sample call made."""

    rolls_NxPxW: np.ndarray  # cell tokens (roll.py)
    frames_FxNxPxW: np.ndarray  # the canvas after each level-0 round
    known_PxW: np.ndarray  # the cells that were given
    num_iter_list: tuple[int, ...]
    compile_seconds: float
    seconds_per_batch: list[float]
    window_starts: tuple[int, ...] = (0,)  # first step of each window of a piece
    window_steps: int = 0  # width of a window (the whole roll when there is one)
    cfg: float = 1.0  # the guidance scale sampled at (1: none)


class Generator:
    """A checkpoint loaded once, that writes music: the Python API, and what generate.py runs.

        model = fractalmidi_jax.load("outputs/quickstart/checkpoints/best")
        songs = model.generate(num_samples=4, target_width=128, seed=0, temperature=1.0)
        songs[0].write("first.mid")  # each is a pretty_midi.PrettyMIDI
        more = model.continuation("song.mid", prompt_bars=2, num_samples=2)
        edits = model.inpainting("song.mid", mask_start_bar=2, mask_end_bar=4)
        piece = model.generate(num_bars=64, chords="C G Am F", density=8)  # guided at cfg 1.5

    Keyword arguments are generate.py's flags of the same names (conditions by their names in
    conditions.CONDITIONS). With return_rolls=True a call returns (songs, cell-token rolls
    [N, 128, W], roll.py). Compiled samplers are kept per shape, so a second call of the same
    shape starts at once."""

    def __init__(self, checkpoint: str, use_ema: bool = True):
        self.config, _, self.params, self.path = load_model(checkpoint, use_ema)
        self.weights = "ema" if use_ema else "raw"
        self._compiled = {}

    def sample(
        self,
        cells_PxW: np.ndarray,
        known_PxW: np.ndarray,
        num_samples: int = 4,
        batch_size: int = BATCH_SIZE,
        seed: int = 0,
        temperature: float | None = None,
        num_iter_list=None,
        num_bars: int = 0,
        overlap_bars: int = 0,
        cfg: float | None = None,
        conditions: dict | None = None,
        min_p: float | None = None,
    ) -> Samples:
        """num_samples rolls that keep the known cells, made batch_size at a time. With num_bars,
        pieces of num_bars bars made in windows of the canvas's width, each window after the first
        keeping the last overlap_bars (0 = half a window) written; `conditions` ({name: text or
        values}) are asked for the piece's bars and guided at `cfg` (None: CFG_WHEN_ASKED when any
        is asked); temperature and min_p None are the model's (head.Sampling)."""
        check_ar_prefix(self.config, known_PxW)
        if temperature is not None and not (temperature > 0 and np.isfinite(temperature)):
            raise GenerationError(
                f"--temperature {temperature} must be a positive number (1 = the model's own distribution)"
            )
        if min_p is not None and not 0 <= min_p < 1:
            raise GenerationError(f"--min_p {min_p} must be in [0, 1) (0 = off)")
        num_iter = tuple(num_iter_list or self.config.num_iter_list)
        if len(num_iter) != len(self.config.img_size_list):
            raise GenerationError(
                f"--num_iter_list needs {len(self.config.img_size_list)} entries, one per level"
            )
        window = cells_PxW.shape[1]
        total = max(num_bars * BAR_STEPS, window)
        starts = window_starts(total, window, overlap_bars)
        features, given = self._asked(conditions or {}, cfg, -(-total // BAR_STEPS))
        asked = given is not None and bool(given.any())
        cfg = (CFG_WHEN_ASKED if asked else 1.0) if cfg is None else cfg
        guidance = jnp.float32(cfg) if cfg != 1.0 and asked else None
        sampling = Sampling.of(self.config, temperature, min_p)
        piece = np.zeros((num_samples, NUM_PITCHES, total), np.uint8)
        known_piece = np.zeros((NUM_PITCHES, total), bool)
        known_piece[:, :window] = known_PxW
        cells = np.repeat(cells_PxW[None], num_samples, axis=0)
        known = np.repeat(known_PxW[None], num_samples, axis=0)
        key = jax.random.key(seed)
        compile_s, batch_seconds, piece_frames = 0.0, [], []
        for index, start in enumerate(starts):
            written = 0
            if index:
                written = starts[index - 1] + window - start
                cells = np.stack([roll_lib.window_tokens(p, start, window, self.config.roll) for p in piece])
                known = np.zeros(cells.shape, bool)
                known[:, :, :written] = True
                cells = np.where(known, cells, 0).astype(np.uint8)
                key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), WINDOW_STREAM), index)
            bars = slice(start // BAR_STEPS, start // BAR_STEPS + -(-window // BAR_STEPS))
            window_features = window_given = None
            if features is not None:
                window_features = {
                    name: np.repeat(f[None, bars], num_samples, 0) for name, f in features.items()
                }
                window_given = np.repeat(given[None], num_samples, 0)
            rolls, frames, seconds = self.sample_batches(
                cells, known, window_features, window_given, key, batch_size, sampling, num_iter, guidance
            )
            piece[:, :, start + written : start + window] = rolls[:, :, written:]
            compile_s, batch_seconds = compile_s + seconds[0], batch_seconds + seconds[1]
            if len(starts) > 1:
                piece_frames.append(piece.copy())
        return Samples(
            piece,
            np.stack(piece_frames) if piece_frames else frames,
            known_piece,
            num_iter,
            compile_s,
            batch_seconds,
            starts,
            window,
            cfg if guidance is not None else 1.0,
        )

    def _asked(self, requests: dict, cfg: float | None, num_bars: int):
        """(features {name: Bars x size}, given K) of the conditions asked for, or (None, None) for
        a model without conditions; GenerationError for what the model cannot follow."""
        if cfg is not None and not (np.isfinite(cfg) and cfg >= 0):
            raise GenerationError(
                f"--cfg {cfg} must be a number >= 0 (1 = plain conditional, more = stronger)"
            )
        if cfg not in (None, 1.0) and not self.config.conditions:
            raise GenerationError(
                f"--cfg {cfg} guides conditions, and this model was trained without them "
                "(train one with --conditions chords,density)"
            )
        try:
            features, given = conditions_lib.asked(self.config.conditions, requests, num_bars)
        except conditions_lib.ConditionError as error:
            raise GenerationError(str(error)) from None
        return (features, given) if self.config.conditions else (None, None)

    def sample_batches(
        self, cells_NxPxW, known_NxPxW, features, given_NxK, key, batch_size, sampling, num_iter, cfg
    ):
        """(rolls N x 128 x W uint8, frames F x N x 128 x W, (compile seconds, seconds per batch)):
        the sampler over N canvases batch_size at a time, batch b drawing with fold_in(key, b).
        `features` ({name: N x Bars x size}) and given_NxK are each sample's conditions (None for a
        model without), `cfg` a guidance scale (None: none); num_iter rounds per level; `sampling`
        a head.Sampling."""
        num_samples, _, width = cells_NxPxW.shape
        num_batches = -(-num_samples // batch_size)
        fill = np.arange(num_batches * batch_size) % num_samples  # the last batch is filled up with repeats
        cells_NxPxW, known_NxPxW = cells_NxPxW[fill], known_NxPxW[fill]
        batch = lambda x, b: x[b * batch_size : (b + 1) * batch_size]
        conditions = lambda b: None
        if features is not None:
            features, given_NxK = {name: f[fill] for name, f in features.items()}, given_NxK[fill]
            conditions = lambda b: ({name: batch(f, b) for name, f in features.items()}, batch(given_NxK, b))
        shape = (batch_size, width, num_iter, cfg is not None)
        started = time.perf_counter()
        if shape not in self._compiled:
            run = sampler_lib.make_sampler(self.config, num_iter)
            with progress.status(f"compiling the sampler for {batch_size} x {width} steps"):
                self._compiled[shape] = run.lower(
                    self.params,
                    batch(cells_NxPxW, 0),
                    batch(known_NxPxW, 0),
                    key,
                    sampling,
                    conditions(0),
                    cfg,
                ).compile()
        compile_s = time.perf_counter() - started
        rolls, frames, batch_seconds = [], [], []
        for b in progress.track(range(num_batches), "generating", total=num_batches):
            started = time.perf_counter()
            batch_rolls, batch_frames = self._compiled[shape](
                self.params,
                batch(cells_NxPxW, b),
                batch(known_NxPxW, b),
                jax.random.fold_in(key, b),
                sampling,
                conditions(b),
                cfg,
            )
            rolls.append(np.asarray(batch_rolls).astype(np.uint8))
            frames.append(np.asarray(batch_frames))
            batch_seconds.append(time.perf_counter() - started)
        rolls = np.concatenate(rolls)[:num_samples]
        return rolls, np.concatenate(frames, axis=1)[:, :num_samples], (compile_s, batch_seconds)

    def generate(self, num_samples: int = 4, target_width: int = 0, num_bars: int = 0, **options):
        """Music from nothing: num_samples pieces of target_width steps (0 = the training crop), or
        of num_bars bars in windows of target_width; with chords=, density= and cfg= on a model
        trained with conditions."""
        canvas_cells_known = empty_canvas(self.width(target_width, num_bars))
        return self._songs(canvas_cells_known, None, num_samples, num_bars=num_bars, **options)

    def continuation(
        self,
        prompt_midi: str,
        prompt_steps=None,
        prompt_bars=None,
        num_samples=4,
        target_width=0,
        num_bars=0,
        **options,
    ):
        """Keeps the first prompt_steps (or prompt_bars, in the file's meter) of prompt_midi and
        writes on from there, to target_width steps or num_bars bars."""
        request = argparse.Namespace(
            mode="continuation",
            prompt_midi=str(prompt_midi),
            prompt_steps=prompt_steps,
            prompt_bars=prompt_bars,
        )
        cells, known, score = canvas(request, self.width(target_width, num_bars), self.config.roll)
        return self._songs((cells, known), score, num_samples, num_bars=num_bars, **options)

    def inpainting(
        self,
        input_midi: str,
        mask_start=None,
        mask_end=None,
        mask_start_bar=None,
        mask_end_bar=None,
        mask_pitch_low: int = 0,
        mask_pitch_high: int = NUM_PITCHES - 1,
        num_samples: int = 4,
        target_width: int = 0,
        **options,
    ):
        """Regenerates [mask_start, mask_end) x [mask_pitch_low, mask_pitch_high] of input_midi
        (positions in steps, or in bars of the file's meter) and keeps everything else."""
        if options.get("num_bars"):
            raise GenerationError(NUM_BARS_MODES)
        request = argparse.Namespace(
            mode="inpainting",
            input_midi=str(input_midi),
            mask_start=mask_start,
            mask_end=mask_end,
            mask_start_bar=mask_start_bar,
            mask_end_bar=mask_end_bar,
            mask_pitch_low=mask_pitch_low,
            mask_pitch_high=mask_pitch_high,
        )
        cells, known, score = canvas(request, self.width(target_width), self.config.roll)
        return self._songs((cells, known), score, num_samples, **options)

    def width(self, target_width: int = 0, num_bars: int = 0) -> int:
        """Steps of one sampler call: target_width (0 = the training crop), or all of a piece of
        num_bars bars that is shorter."""
        width = target_width or self.config.crop_length
        check_width(self.config, width)
        if num_bars < 0:
            raise GenerationError(f"--num_bars {num_bars} must not be negative (0 = one window)")
        if num_bars * BAR_STEPS > width and width % BAR_STEPS:
            raise GenerationError(
                f"--num_bars {num_bars} writes windows of --target_width {width} steps, which must be whole "
                f"bars (a multiple of {BAR_STEPS})"
            )
        return min(width, num_bars * BAR_STEPS) if num_bars else width

    def _songs(
        self,
        canvas_cells_known,
        score,
        num_samples,
        batch_size=BATCH_SIZE,
        seed=0,
        temperature=None,
        num_iter_list=None,
        num_bars=0,
        overlap_bars=0,
        cfg=None,
        min_p=None,
        tempo=0.0,
        min_velocity=1,
        min_note_steps=1,
        velocity_tolerance=0,
        return_rolls=False,
        **conditions,
    ):
        unknown = sorted(set(conditions) - set(conditions_lib.CONDITIONS))
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
        samples = self.sample(
            *canvas_cells_known,
            num_samples,
            batch_size,
            seed,
            temperature,
            num_iter_list,
            num_bars,
            overlap_bars,
            cfg,
            conditions,
            min_p,
        )
        bpm = tempo or (score.tempo_bpm if score else 120.0)
        songs = [
            midi.to_pretty_midi(
                decode(
                    roll,
                    samples.known_PxW,
                    self.config.roll,
                    min_velocity,
                    min_note_steps,
                    velocity_tolerance,
                ),
                bpm,
                time_signature=time_signature(score),
            )
            for roll in samples.rolls_NxPxW
        ]
        return (songs, samples.rolls_NxPxW) if return_rolls else songs


def load(checkpoint: str, use_ema: bool = True) -> Generator:
    """`fractalmidi_jax.load(checkpoint)`: a Generator of that checkpoint (its EMA weights unless
    use_ema=False)."""
    return Generator(checkpoint, use_ema)


def generate(args) -> dict:
    model = Generator(args.checkpoint, not args.no_ema)
    if args.num_bars and args.mode == "inpainting":
        raise GenerationError(NUM_BARS_MODES)
    width = model.width(args.target_width, args.num_bars)
    known_cells, known_mask, score = canvas(args, width, model.config.roll)
    tempo = args.tempo or (score.tempo_bpm if score else 120.0)
    meter = time_signature(score)
    requests = {name: getattr(args, name) for name in conditions_lib.CONDITIONS}
    samples = model.sample(
        known_cells,
        known_mask,
        args.num_samples,
        args.batch_size,
        args.seed,
        args.temperature,
        args.num_iter_list,
        args.num_bars,
        args.overlap_bars,
        args.cfg,
        requests,
        args.min_p,
    )
    known_mask = samples.known_PxW
    out = run_folder(Path(args.output_dir), args.reuse_output_dir)
    audio = render.audio_backend(args.soundfont)[1] if args.save_wav else None
    written = zip(samples.rolls_NxPxW, np.swapaxes(samples.frames_FxNxPxW, 0, 1))
    items = progress.track(enumerate(written), "writing samples", total=args.num_samples)
    report = {
        "checkpoint": str(model.path),
        "roll": model.config.roll,
        "output_dir": str(out),
        "mode": args.mode,
        "seed": args.seed,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "target_width": width,
        "num_bars": args.num_bars,
        "piece_steps": int(samples.rolls_NxPxW.shape[-1]),
        "window_starts": list(samples.window_starts),
        "conditions": {name: conditions_lib.as_text(v) for name, v in requests.items() if v is not None},
        "cfg": samples.cfg,
        "num_iter_list": list(samples.num_iter_list),
        "temperature": model.config.temperature if args.temperature is None else args.temperature,
        "min_p": model.config.min_p if args.min_p is None else args.min_p,
        "tempo_bpm": tempo,
        "time_signature": list(meter),
        "weights": model.weights,
        "audio": audio,
        "device": jax.devices()[0].device_kind,
        "compile_seconds": samples.compile_seconds,
        "seconds_per_batch": samples.seconds_per_batch,
        "samples": [
            _write_sample(args, model.config.roll, out, index, roll, frames, known_mask, tempo, meter)
            for index, (roll, frames) in items
        ],
    }
    (out / "generation.json").write_text(json.dumps(report, indent=1))
    html_index.write_index(out, report)
    return report


def run_folder(output_dir: Path, reuse: bool) -> Path:
    """output_dir itself when reuse, else a fresh output_dir/run_N (the next free N), so a second
    run never overwrites the first."""
    out = output_dir if reuse else next_numbered_dir(output_dir, "run")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_sample(
    args, kind: str, out: Path, index: int, roll: np.ndarray, frames: np.ndarray, known, tempo: float, meter
) -> dict:
    stem = out / f"sample_{index:03d}"
    notes = decode(roll, known, kind, args.min_velocity, args.min_note_steps, args.velocity_tolerance)
    midi.write_midi(stem.with_suffix(".mid"), notes, tempo_bpm=tempo, time_signature=meter)
    files = [stem.with_suffix(".mid").name]
    bars = midi.bar_lines([(0, *meter)], roll.shape[1])
    if args.save_png:
        render.save_png(stem.with_suffix(".png"), roll_lib.velocity_cells(roll, kind), bar_lines=bars)
        files.append(stem.with_suffix(".png").name)
    if args.save_gif:
        pictures = [roll_lib.velocity_cells(frame, kind) for frame in frames]
        render.save_gif(stem.with_suffix(".gif"), pictures, bar_lines=bars)
        files.append(stem.with_suffix(".gif").name)
    if args.save_wav:
        render.save_wav(stem.with_suffix(".wav"), stem.with_suffix(".mid"), args.soundfont)
        files.append(stem.with_suffix(".wav").name)
    return {
        "index": index,
        "files": files,
        "notes": int(len(notes)),
        "sounding_cells": float((roll > 0).mean()),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        description="Generate MIDI with a trained FractalMIDI checkpoint.",
        usage="%(prog)s --checkpoint DIR [--mode MODE] [--flag value ...]",
    )
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint folder, or <output_dir>/checkpoints/latest or best")
    add("--mode", choices=MODES, default="unconditional", help="what to write (see the module docstring)")
    add("--num_samples", type=int, default=4, help="pieces to write")
    add("--batch_size", type=int, default=BATCH_SIZE, help="samples per sampler call")
    add("--target_width", type=int, default=0, help="steps to generate (default: the training crop_length)")
    add("--num_iter_list", type=int, nargs="+", help="rounds per level (default: the checkpoint's)")
    add(
        "--num_bars",
        type=int,
        default=0,
        help="bars of 16 steps to write; longer than --target_width: in windows, each continuing the last",
    )
    add(
        "--overlap_bars",
        type=int,
        default=0,
        help="--num_bars: bars of the piece so far each window keeps (default: half a window)",
    )
    for name, condition in conditions_lib.CONDITIONS.items():
        add(f"--{name}", nargs="+", help=f"a model trained with this condition: {condition.help}")
    add(
        "--cfg",
        type=float,
        help=f"guidance of the conditions: 1 = plain conditional, more = stronger (default: {CFG_WHEN_ASKED} "
        "when any is asked)",
    )
    add(
        "--temperature",
        type=float,
        help="the head's sampling temperature (default: the model's, 0.97 for today's; below: sparser, above: busier)",
    )
    add(
        "--min_p",
        type=float,
        help="never draw a token less likely than this times the likeliest (default: the model's; "
        "0.001 removes stray notes of a small model)",
    )
    add("--seed", type=int, default=0, help="the same seed, checkpoint and flags give the same files")
    add("--output_dir", default="outputs/generated", help="each run writes a fresh run_N folder inside it")
    add(
        "--reuse_output_dir",
        action="store_true",
        help="write into --output_dir itself, replacing its samples",
    )
    add("--tempo", type=float, default=0.0, help="bpm (default: 120, or the input file's first tempo)")
    add("--min_velocity", type=int, default=1, help="drop notes quieter than this")
    add("--min_note_steps", type=int, default=1, help="drop notes shorter than this many steps")
    add(
        "--velocity_tolerance",
        type=int,
        default=0,
        help="velocity changes up to this do not start a new note",
    )
    add("--no_ema", action="store_true", help="use the raw weights instead of their moving average")
    add("--save_png", action="store_true", help="the piano roll as a picture")
    add("--save_gif", action="store_true", help="the generation process, one frame per level-0 round")
    add(
        "--save_wav",
        action="store_true",
        help="audio: FluidSynth with a General MIDI sound font if installed, else pretty_midi's sine tones",
    )
    add("--soundfont", default=None, help="a .sf2 file for --save_wav")
    add("--prompt_midi", help="continuation: the file whose beginning is kept")
    add("--prompt_steps", type=int, help="continuation: steps of the prompt to keep")
    add("--prompt_bars", type=float, help="continuation: bars of the prompt to keep, in its meter")
    add("--input_midi", help="inpainting: the file to edit")
    add("--mask_start", type=int, help="inpainting: first step to regenerate")
    add("--mask_end", type=int, help="inpainting: step after the last one to regenerate")
    add(
        "--mask_start_bar",
        type=float,
        help="inpainting: --mask_start in bars of the input's meter (0 = the start)",
    )
    add("--mask_end_bar", type=float, help="inpainting: --mask_end in bars of the input's meter")
    add("--mask_pitch_low", type=int, default=0, help="inpainting: lowest pitch to regenerate")
    add(
        "--mask_pitch_high", type=int, default=NUM_PITCHES - 1, help="inpainting: highest pitch to regenerate"
    )
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error("--num_samples and --batch_size must be at least 1")
    use_compilation_cache()
    try:
        if args.num_iter_list and min(args.num_iter_list) < 1:
            rounds = " ".join(map(str, args.num_iter_list))
            raise GenerationError(f"--num_iter_list {rounds}: every level needs at least 1 round")
        check_writable(args.output_dir)
        report = generate(args)
    except (GenerationError, OutputDirError, ckpt.CheckpointError, render.AudioUnavailable) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    seconds = report["seconds_per_batch"]
    print(
        f"wrote {report['num_samples']} samples to {report['output_dir']} (compile {report['compile_seconds']:.1f} s, "
        f"{np.median(seconds):.3f} s per batch of {args.batch_size}); open {report['output_dir']}/index.html"
    )
    if report["audio"]:
        print(f"audio: {report['audio']}")


if __name__ == "__main__":
    main()
