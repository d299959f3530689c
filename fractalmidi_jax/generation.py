"""What generate.py does: load a checkpoint, build the canvas a mode asks for, run the jitted
sampler in batches, and write MIDI (plus pictures, GIFs and audio when asked) and one JSON.

Modes:
- unconditional: an empty canvas.
- continuation: the first `prompt_steps` steps of `prompt_midi` are known and held fixed;
  the model writes the rest, conditioned on them.
- inpainting: the first `target_width` steps of `input_midi` are known except the region
  [mask_start, mask_end) x [mask_pitch_low, mask_pitch_high], which is regenerated.

Notes at the region's border (rule): a note of the input that lies partly inside the region
and partly outside is kept whole, as context; only notes wholly inside are regenerated. So
every note that is not wholly inside the region comes back note for note (onset, pitch,
velocity, length): its cells are copied, and decoding starts a new note wherever known and
generated cells meet (`roll.roll_to_notes(..., starts=...)`), so a generated cell never
lengthens or joins a known note.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fractalmidi_jax import checkpoint as ckpt
from fractalmidi_jax import data, midi, render, sharding, steps
from fractalmidi_jax import grid as grid_lib
from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax import sampler as sampler_lib
from fractalmidi_jax.config import NUM_PITCHES, Config, ConfigError, from_dict
from fractalmidi_jax.fractal import build_model
from fractalmidi_jax.output_dir import OutputDirError, check_writable

MODES = ("unconditional", "continuation", "inpainting")


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
    """An AR level 0 conditions only on what comes before in its scan: the known cells must lie in
    level-0 patches that precede every patch with something to generate."""
    if config.generator_types[0] != "ar":
        return
    patch = config.img_size_list[1]
    width = known_mask_PxW.shape[1]
    padded = np.zeros((NUM_PITCHES, -(-width // patch) * patch), bool)
    padded[:, :width] = known_mask_PxW
    tiles = grid_lib.patchify(padded[None], patch)[0]
    scan = grid_lib.Grid(NUM_PITCHES // patch, padded.shape[1] // patch, patch).scan_order(config.scan_order)
    all_known, any_known = tiles.all(axis=1)[scan], tiles.any(axis=1)[scan]
    first_open = int(np.argmin(all_known)) if not all_known.all() else len(scan)
    if any_known[first_open + 1 :].any():
        raise GenerationError(
            f"this model's level 0 is autoregressive in {config.scan_order} order, so it can only condition on "
            "music that comes first in that order; the known music here lies after the part to generate. "
            + (
                "Use continuation with a column_major model, or a model with a MAR level 0."
                if config.scan_order == "row_major"
                else "Use a model with a MAR level 0 for inpainting."
            )
        )


def read_roll(path: str, kind: str) -> tuple[np.ndarray, float]:
    """(stored roll, first tempo) of a MIDI file."""
    try:
        stored, score = roll_lib.read_roll(path, kind)
    except midi.MidiError as error:
        raise GenerationError(f"cannot read {path}: {error}") from None
    return stored, score.tempo_bpm


def keep_border_notes_whole(tokens_PxW: np.ndarray, region_PxW: np.ndarray, kind: str) -> np.ndarray:
    """The region to regenerate, less the cells of every note that lies partly outside it."""
    notes = roll_lib.roll_to_notes(tokens_PxW, kind)
    onset, end, pitch, _ = notes.T.astype(np.int64)
    inside_before = np.zeros((region_PxW.shape[0], region_PxW.shape[1] + 1), np.int64)
    inside_before[:, 1:] = np.cumsum(region_PxW, axis=1)
    inside = inside_before[pitch, end] - inside_before[pitch, onset]
    crossing = (inside > 0) & (inside < end - onset)
    length = (end - onset)[crossing]
    steps = np.repeat(onset[crossing] - np.cumsum(length) + length, length) + np.arange(length.sum())
    region = region_PxW.copy()
    region[np.repeat(pitch[crossing], length), steps] = False
    return region


def canvas(args, width: int, kind: str) -> tuple[np.ndarray, np.ndarray, float | None]:
    """(known cells, known mask) for one sample (128 x width, model tokens), and the input's tempo."""
    cells, known = np.zeros((NUM_PITCHES, width), np.uint8), np.zeros((NUM_PITCHES, width), bool)
    if args.mode == "unconditional":
        return cells, known, None
    region = np.ones((NUM_PITCHES, width), bool)
    if args.mode == "continuation":
        if not args.prompt_midi or args.prompt_steps is None:
            raise GenerationError("continuation needs --prompt_midi FILE and --prompt_steps N")
        stored, tempo = read_roll(args.prompt_midi, kind)
        if not 0 < args.prompt_steps < width:
            raise GenerationError(f"--prompt_steps {args.prompt_steps} must be between 1 and {width - 1}")
        if args.prompt_steps > stored.shape[1]:
            raise GenerationError(
                f"--prompt_steps {args.prompt_steps} is longer than {args.prompt_midi} ({stored.shape[1]} steps)"
            )
        region[:, : args.prompt_steps] = False
    else:
        if not args.input_midi or args.mask_start is None or args.mask_end is None:
            raise GenerationError("inpainting needs --input_midi FILE, --mask_start S and --mask_end E")
        stored, tempo = read_roll(args.input_midi, kind)
        length = min(stored.shape[1], width)
        low, high = args.mask_pitch_low, args.mask_pitch_high
        if not 0 <= args.mask_start < args.mask_end <= length:
            raise GenerationError(
                f"mask [{args.mask_start}, {args.mask_end}) is outside the input: it must lie within "
                f"[0, {length}) steps ({args.input_midi} has {stored.shape[1]} steps; the canvas is {width})"
            )
        if not 0 <= low <= high < NUM_PITCHES:
            raise GenerationError(
                f"--mask_pitch_low {low} / --mask_pitch_high {high} must satisfy 0 <= low <= high <= 127"
            )
        region[:] = False
        region[low : high + 1, args.mask_start : args.mask_end] = True
    tokens = data.crop_roll(stored, 0, width, kind)
    known = ~keep_border_notes_whole(tokens, region, kind)
    return np.where(known, tokens, 0).astype(np.uint8), known, tempo


def generate(args) -> dict:
    config, _, params, path = load_model(args.checkpoint, not args.no_ema)
    width = args.target_width or config.crop_length
    check_width(config, width)
    known_cells, known_mask, input_tempo = canvas(args, width, config.roll)
    check_ar_prefix(config, known_mask)
    num_iter = tuple(args.num_iter_list or config.num_iter_list)
    if len(num_iter) != len(config.img_size_list):
        raise GenerationError(f"--num_iter_list needs {len(config.img_size_list)} entries, one per level")
    tempo = args.tempo or input_tempo or 120.0
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = sampler_lib.make_sampler(config, num_iter)
    batch_cells = np.repeat(known_cells[None], args.batch_size, axis=0)
    batch_known = np.repeat(known_mask[None], args.batch_size, axis=0)
    key = jax.random.key(args.seed)
    started = time.perf_counter()
    compiled = run.lower(params, batch_cells, batch_known, key, jnp.float32(args.temperature)).compile()
    compile_s = time.perf_counter() - started
    samples, batch_seconds = [], []
    for batch_index in range(-(-args.num_samples // args.batch_size)):
        started = time.perf_counter()
        rolls, frames = compiled(
            params,
            batch_cells,
            batch_known,
            jax.random.fold_in(key, batch_index),
            jnp.float32(args.temperature),
        )
        rolls, frames = np.asarray(rolls), np.asarray(frames)
        batch_seconds.append(time.perf_counter() - started)
        for b in range(args.batch_size):
            index = batch_index * args.batch_size + b
            if index < args.num_samples:
                samples.append(
                    _write_sample(args, config.roll, out, index, rolls[b], frames[:, b], known_mask, tempo)
                )
    report = {
        "checkpoint": str(path),
        "roll": config.roll,
        "mode": args.mode,
        "seed": args.seed,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "target_width": width,
        "num_iter_list": list(num_iter),
        "temperature": args.temperature,
        "tempo_bpm": tempo,
        "weights": "raw" if args.no_ema else "ema",
        "device": jax.devices()[0].device_kind,
        "compile_seconds": compile_s,
        "seconds_per_batch": batch_seconds,
        "samples": samples,
    }
    (out / "generation.json").write_text(json.dumps(report, indent=1))
    return report


def _write_sample(
    args,
    kind: str,
    out: Path,
    index: int,
    roll: np.ndarray,
    frames: np.ndarray,
    known: np.ndarray,
    tempo: float,
) -> dict:
    stem = out / f"sample_{index:03d}"
    meets = np.zeros_like(known)
    meets[:, 1:] = known[:, 1:] != known[:, :-1]
    notes = roll_lib.roll_to_notes(
        roll, kind, args.min_velocity, args.min_note_steps, args.velocity_tolerance, starts=meets
    )
    midi.write_midi(stem.with_suffix(".mid"), notes, tempo_bpm=tempo)
    files = [stem.with_suffix(".mid").name]
    if args.save_png:
        render.save_png(stem.with_suffix(".png"), roll_lib.velocity_cells(roll, kind))
        files.append(stem.with_suffix(".png").name)
    if args.save_gif:
        render.save_gif(stem.with_suffix(".gif"), [roll_lib.velocity_cells(f, kind) for f in frames])
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
    parser = argparse.ArgumentParser(description="Generate MIDI with a trained FractalMIDI checkpoint.")
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint folder, or <output_dir>/checkpoints/latest or best")
    add("--mode", choices=MODES, default="unconditional")
    add("--num_samples", type=int, default=4)
    add("--batch_size", type=int, default=4, help="samples per sampler call")
    add("--target_width", type=int, default=0, help="steps to generate (default: the training crop_length)")
    add("--num_iter_list", type=int, nargs="+", help="rounds per level (default: the checkpoint's)")
    add("--temperature", type=float, default=1.0)
    add("--seed", type=int, default=0)
    add("--output_dir", default="outputs/generated")
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
    add("--save_wav", action="store_true", help="audio through FluidSynth and a General MIDI sound font")
    add("--soundfont", default=None, help="a .sf2 file for --save_wav")
    add("--prompt_midi", help="continuation: the file whose beginning is kept")
    add("--prompt_steps", type=int, help="continuation: steps of the prompt to keep")
    add("--input_midi", help="inpainting: the file to edit")
    add("--mask_start", type=int, help="inpainting: first step to regenerate")
    add("--mask_end", type=int, help="inpainting: step after the last one to regenerate")
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
    try:
        if not args.temperature > 0 or not np.isfinite(args.temperature):
            raise GenerationError(
                f"--temperature {args.temperature} must be a positive number (1 = the model's own)"
            )
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
        f"wrote {report['num_samples']} samples to {args.output_dir} (compile {report['compile_seconds']:.1f} s, "
        f"{np.median(seconds):.3f} s per batch of {args.batch_size})"
    )
