"""Control and length, measured: how well a model trained with conditions follows the chords and
density asked of it, and whether whole pieces hold together across their window seams. Prints two
tables and writes them as JSON. (How continuation follows a prompt that ends inside a bar is
`python -m fractalmidi_jax.evaluate prompts`.)

    python -m fractalmidi_jax.control --checkpoint C --data pop909/valid --out control.json

1. Control: fixed seeded crops of the model's width from --data; each crop's bars give the asked
   chroma and density (conditions.py); one sample per crop at every --cfg, and one with no
   condition given (unconditional), all with the same keys. Per row: chroma cosine (mean over the
   asked bars that sound of cos(asked, generated bar chroma); a silent generated bar counts 0),
   Pearson r of notes per bar (asked vs generated), notes per bar, and the mean OA of the samples
   against --data's files (music_stats, as `evaluate music`). "real, other crop" scores each
   crop's bars against another crop's asked bars: what unrelated real music gets.
2. Whole pieces: --num_pieces pieces of --piece_bars bars (unconditional, or on --piece_chords),
   written in windows of the model's width; the mean OA of each 8-bar window of the piece against
   --data; and per-bar statistics of the seam bars (the first bar each window after the first
   writes) against all other bars (their mean and spread).
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fractalmidi_jax import checkpoint as ckpt
from fractalmidi_jax import conditions as conditions_lib
from fractalmidi_jax import data, generation, midi, music_stats
from fractalmidi_jax import library as rolls_lib
from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax.cli import Parser
from fractalmidi_jax.conditions import BAR_STEPS
from fractalmidi_jax.head import Sampling

UNCONDITIONAL_STREAM = 0  # the key stream of every control row: they differ only in what is asked


def build_parser() -> Parser:
    parser = Parser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--checkpoint", required=True, help="a checkpoint trained with --conditions chords,density")
    add("--data", required=True, help="folder or .txt list of held-out MIDI files (e.g. POP909 valid)")
    add("--out", required=True, help="the JSON file to write")
    add("--num_crops", type=int, default=64, help="crops of the model's width whose bars are asked for")
    add("--cfg", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0], help="guidance scales to measure")
    add("--piece_bars", type=int, default=64, help="bars of each whole piece")
    add("--num_pieces", type=int, default=16, help="whole pieces to write")
    add("--piece_chords", default="", help='chords of the whole pieces, e.g. "C G Am F" (default: none)')
    add("--batch_size", type=int, default=32, help="samples per sampler call")
    add("--num_iter_list", type=int, nargs="+", help="rounds per level (default: the checkpoint's)")
    add("--temperature", type=float, help="the head's sampling temperature (default: the model's)")
    add("--min_p", type=float, help="the head's min-p (default: the model's)")
    add("--bootstrap", type=int, default=100, help="bootstrap draws of the OA intervals")
    add("--seed", type=int, default=0, help="chooses the crops and the samples")
    add("--cache_dir", default="", help="parsed-roll cache (default: ~/.cache/fractalmidi_jax/rolls)")
    return parser


def cosine(a_NxC, b_NxC) -> np.ndarray:
    """N cosines of rows (0 where either row is zero)."""
    return np.sum(np.asarray(conditions_lib.unit(a_NxC)) * np.asarray(conditions_lib.unit(b_NxC)), axis=-1)


def bar_chroma(rolls_NxPxW, kind: str) -> np.ndarray:
    return np.asarray(conditions_lib.chroma_from_roll(rolls_NxPxW, kind))


def bar_notes(rolls_NxPxW, kind: str) -> np.ndarray:
    return np.asarray(conditions_lib.notes_per_bar(rolls_NxPxW, kind))


def pearson(x, y) -> float | None:
    x, y = np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def score_of(notes, num_steps: int) -> midi.Score:
    """A generated roll's notes as a Score in 4/4 (as generate.py writes them)."""
    return midi.Score(
        notes=notes, num_steps=num_steps, seconds=0.0, tempo_bpm=120.0, resolution=4, capped=False
    )


def mean_oa(
    rolls_NxPxW, kind: str, reference: music_stats.SetStats, bootstrap: int, seed: int
) -> float | None:
    """Mean OA of the rolls' notes against the reference set (`evaluate music`)."""
    scores = [score_of(roll_lib.roll_to_notes(roll, kind), roll.shape[-1]) for roll in rolls_NxPxW]
    named = [(f"sample_{i}", score) for i, score in enumerate(scores) if len(score.notes)]
    if not named:
        return None
    return music_stats.compare(music_stats.set_stats(named), reference, bootstrap, seed)["mean_oa"]


def control_row(asked_chroma, asked_notes, rolls, kind: str) -> dict:
    """Chroma cosine and density correlation of the rolls' bars against the asked ones."""
    sounding = np.linalg.norm(asked_chroma, axis=-1) > 0
    notes = bar_notes(rolls, kind)
    return {
        "chroma_cosine": float(cosine(asked_chroma, bar_chroma(rolls, kind))[sounding].mean()),
        "density_pearson": pearson(asked_notes, notes),
        "notes_per_bar": float(notes.mean()),
    }


def bar_statistics(pieces_NxPxT, kind: str) -> dict[str, np.ndarray]:
    """Per bar (N x Bars): notes, sounding cells, mean sounding pitch, chroma cosine to the bar before."""
    sounding_NxPxBars = np.asarray(conditions_lib.bar_sums(pieces_NxPxT > 0))
    cells = sounding_NxPxBars.sum(axis=1)
    pitch_mean = (np.arange(roll_lib.NUM_PITCHES)[None, :, None] * sounding_NxPxBars).sum(
        axis=1
    ) / np.maximum(cells, 1)
    chroma = bar_chroma(pieces_NxPxT, kind)
    to_previous = np.full(cells.shape, np.nan)
    to_previous[:, 1:] = cosine(chroma[:, 1:], chroma[:, :-1])
    return {
        "notes": bar_notes(pieces_NxPxT, kind).astype(np.float64),
        "sounding_cells": cells.astype(np.float64),
        "pitch_mean": np.where(cells > 0, pitch_mean, np.nan),
        "chroma_cosine_to_previous_bar": to_previous,
    }


def seam_report(pieces_NxPxT, window_starts, window: int, kind: str) -> dict:
    """Each statistic's mean over the seam bars and its mean and std over the others."""
    seams = sorted({(start + window) // BAR_STEPS for start in window_starts[:-1]})
    is_seam = np.zeros(pieces_NxPxT.shape[-1] // BAR_STEPS, bool)
    is_seam[seams] = True
    report = {"seam_bars": seams}
    for name, values in bar_statistics(pieces_NxPxT, kind).items():
        seam, other = values[:, is_seam], values[:, ~is_seam]
        report[name] = {
            "seam_mean": float(np.nanmean(seam)),
            "other_mean": float(np.nanmean(other)),
            "other_std": float(np.nanstd(other)),
        }
    return report


def measure(args) -> dict:
    model = generation.Generator(args.checkpoint)
    config, kind = model.config, model.config.roll
    if not {"chords", "density"} <= set(config.conditions):
        raise generation.GenerationError(
            f"{model.path} was trained with conditions {','.join(config.conditions) or 'none'}; this "
            "measurement needs a model trained with --conditions chords,density"
        )
    width = config.crop_length
    num_iter = tuple(args.num_iter_list or config.num_iter_list)
    library = rolls_lib.RollLibrary(args.data, kind=kind, cache_dir=args.cache_dir or None)
    per_file = -(-args.num_crops // len(library))
    crops = data.fixed_crops(library, width, per_file, args.seed, config.crop_alignment)
    picked = np.sort(np.random.default_rng(args.seed).permutation(len(crops))[: args.num_crops])
    crops = crops[picked]
    reference = music_stats.set_stats(*music_stats.load_scores(music_stats.midi_paths(args.data)))
    key = jax.random.key(args.seed)
    sampling = Sampling.of(config, args.temperature, args.min_p)

    def sample(cells, known, features, given, cfg, stream):
        guidance = None if cfg == 1.0 else jnp.float32(cfg)
        return model.sample_batches(
            cells,
            known,
            features,
            given,
            jax.random.fold_in(key, stream),
            args.batch_size,
            sampling,
            num_iter,
            guidance,
        )[0]

    empty = np.zeros(crops.shape, np.uint8), np.zeros(crops.shape, bool)
    num_bars = -(-width // BAR_STEPS)
    asked = {
        name: np.asarray(f) for name, f in conditions_lib.from_roll(config.conditions, crops, kind).items()
    }
    all_given = np.ones((len(crops), len(config.conditions)), bool)
    nothing = conditions_lib.nothing_given(config.conditions, len(crops), num_bars)
    asked_chroma, asked_notes = bar_chroma(crops, kind), bar_notes(crops, kind)
    oa = lambda rolls: mean_oa(rolls, kind, reference, args.bootstrap, args.seed)

    control = {"real, other crop": control_row(asked_chroma, asked_notes, np.roll(crops, 1, axis=0), kind)}
    control["real, other crop"]["mean_oa"] = None
    unconditional = sample(*empty, *nothing, 1.0, UNCONDITIONAL_STREAM)
    control["unconditional"] = dict(
        control_row(asked_chroma, asked_notes, unconditional, kind), mean_oa=oa(unconditional)
    )
    for cfg in args.cfg:
        rolls = sample(*empty, asked, all_given, cfg, UNCONDITIONAL_STREAM)
        control[f"cfg {cfg:g}"] = dict(control_row(asked_chroma, asked_notes, rolls, kind), mean_oa=oa(rolls))

    piece_requests = {"chords": args.piece_chords} if args.piece_chords else {}
    pieces = model.sample(
        *generation.empty_canvas(width),
        args.num_pieces,
        args.batch_size,
        args.seed,
        args.temperature,
        num_iter,
        args.piece_bars,
        conditions=piece_requests,
        min_p=args.min_p,
    )
    window_oa = [
        oa(pieces.rolls_NxPxW[:, :, start : start + music_stats.WINDOW_STEPS])
        for start in range(
            0, pieces.rolls_NxPxW.shape[-1] - music_stats.WINDOW_STEPS + 1, music_stats.WINDOW_STEPS
        )
    ]
    piece = {
        "bars": args.piece_bars,
        "pieces": args.num_pieces,
        "chords": args.piece_chords,
        "window_starts": list(pieces.window_starts),
        "mean_oa_per_8_bar_window": window_oa,
        "seams": seam_report(pieces.rolls_NxPxW, pieces.window_starts, width, kind),
    }

    return {
        "checkpoint": str(model.path),
        "data": str(args.data),
        "crops": len(crops),
        "width": width,
        "num_iter_list": list(num_iter),
        "temperature": float(sampling.temperature),
        "min_p": float(sampling.min_p),
        "seed": args.seed,
        "control": control,
        "piece": piece,
    }


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_report(report: dict) -> None:
    print(f"\ncontrol: {report['crops']} crops of {report['width']} steps, asked bars vs generated bars")
    print(f"{'':18s} {'chroma cos':>10s} {'density r':>10s} {'notes/bar':>10s} {'mean OA':>10s}")
    for name, row in report["control"].items():
        cells = [row["chroma_cosine"], row["density_pearson"], row["notes_per_bar"], row["mean_oa"]]
        print(f"{name:18s} " + " ".join(f"{fmt(v):>10s}" for v in cells))
    piece = report["piece"]
    print(f"\n{piece['pieces']} pieces of {piece['bars']} bars in {len(piece['window_starts'])} windows")
    print("mean OA per 8-bar window: " + " ".join(fmt(v) for v in piece["mean_oa_per_8_bar_window"]))
    print(f"{'bar statistic':30s} {'seam bars':>10s} {'other bars':>16s}")
    for name, row in piece["seams"].items():
        if name != "seam_bars":
            other = f"{row['other_mean']:.3f} +- {row['other_std']:.3f}"
            print(f"{name:30s} {row['seam_mean']:10.3f} {other:>16s}")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        report = measure(args)
    except (generation.GenerationError, ckpt.CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    print_report(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
