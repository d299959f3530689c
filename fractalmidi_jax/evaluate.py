"""Evaluation command line: judge MIDI files from any generator.

    python -m fractalmidi_jax.evaluate music --generated DIR --reference LIST_OR_DIR \\
        [--out OUT.json] [--png OUT.png] [--bootstrap 500] [--seed 0]
    python -m fractalmidi_jax.evaluate copying --generated DIR --train LIST_OR_DIR \\
        [--threshold 0.8] [--max_shift 12] [--out OUT.json]
    python -m fractalmidi_jax.evaluate nll --checkpoint C --data LIST_OR_DIR --crop_length W \\
        [--crops_per_file 8] [--draws 4] [--batch_size 64] [--seed 0] [--out OUT.json]
    python -m fractalmidi_jax.evaluate prompts --checkpoint C --data LIST_OR_DIR [--crops 32] \
        [--prompt_steps 40] [--mask_start 32 --mask_end 96 --mask_pitch_low 60 --mask_pitch_high 84] \
        [--samples_per_crop 4] [--width W] [--seed 0] [--out OUT.json]

A folder argument means every *.mid / *.midi under it (recursively); a .txt argument is
a list of paths, one per line, relative ones resolved against the list's folder.
Unreadable files are skipped with a one-line reason on stderr. Bars are each file's own, in
the meter of its time signatures (a generated file's: the one it was written with; 4/4 where
a file has none). The statistics and the algorithms are described in
fractalmidi_jax/music_stats.py.

Each subcommand is an `_add_<name>(subparsers)` function that declares its arguments
and sets `func` to the `_run_<name>(args)` function that carries it out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from fractalmidi_jax import music_stats, progress
from fractalmidi_jax.cli import Parser

GENERATED_COLOUR = (230, 120, 30)
REFERENCE_COLOUR = (40, 100, 190)


def _load(source: str, what: str):
    """(name, Score) pairs of the files named by a folder or list, reporting skips."""
    paths = music_stats.midi_paths(source)
    loaded, skipped = music_stats.load_scores(progress.track(paths, f"reading --{what}", len(paths)))
    for path, reason in skipped:
        print(f"skip {path}: {reason}", file=sys.stderr)
    if not loaded:
        raise SystemExit(f"error: no readable MIDI file in --{what} {source}")
    return loaded, skipped


def _write_json(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


def _fmt(x, ci=None, digits: str = ".3g") -> str:
    """'x [lo, hi]', or '-' when x is undefined."""
    if x is None:
        return "-"
    text = format(x, digits)
    if ci is not None and ci[0] is not None:
        text += f" [{ci[0]:{digits}}, {ci[1]:{digits}}]"
    return text


def music_table(result: dict) -> str:
    """The comparison as a fixed-width text table."""
    gen = result["sets"]["generated"]["features"]
    ref = result["sets"]["reference"]["features"]
    rows = [("feature", "generated mean [95% CI]", "reference mean [95% CI]", "OA [95% CI]")]
    for name, cmp in result["features"].items():
        rows.append(
            (
                name,
                _fmt(gen[name]["mean"], gen[name]["mean_ci"]),
                _fmt(ref[name]["mean"], ref[name]["mean_ci"]),
                _fmt(cmp["oa"], cmp["oa_ci"], ".3f"),
            )
        )
    rows.append(("mean OA", "", "", _fmt(result["mean_oa"], result["mean_oa_ci"], ".3f")))
    gen_cont = result["sets"]["generated"]["continuity"]
    ref_cont = result["sets"]["reference"]["continuity"]
    for name in gen_cont:
        rows.append((name, _fmt(gen_cont[name]), _fmt(ref_cont[name]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def draw_histograms(result: dict, path: str, columns: int = 3, panel=(440, 230)) -> None:
    """One PNG: a panel per feature with the generated and reference histograms side by side."""
    font = ImageFont.load_default()
    names = list(result["features"])
    rows = -(-len(names) // columns)
    width, height = panel
    header = 36
    image = Image.new("RGB", (columns * width, header + rows * height), "white")
    draw = ImageDraw.Draw(image)
    sets = result["sets"]
    draw.rectangle((10, 12, 22, 24), fill=GENERATED_COLOUR)
    draw.text((28, 12), f"generated ({sets['generated']['files']} files)", fill="black", font=font)
    draw.rectangle((230, 12, 242, 24), fill=REFERENCE_COLOUR)
    draw.text((248, 12), f"reference ({sets['reference']['files']} files)", fill="black", font=font)
    draw.text((470, 12), f"mean OA {_fmt(result['mean_oa'], digits='.3f')}", fill="black", font=font)
    for index, name in enumerate(names):
        left = (index % columns) * width
        top = header + (index // columns) * height
        cmp = result["features"][name]
        draw.text(
            (left + 10, top + 4),
            f"{name}   OA {_fmt(cmp['oa'], cmp['oa_ci'], '.3f')}",
            fill="black",
            font=font,
        )
        _draw_panel(
            draw,
            font,
            (left + 30, top + 22, left + width - 14, top + height - 30),
            sets["generated"]["features"][name]["histogram"],
            sets["reference"]["features"][name]["histogram"],
            cmp["bins"],
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    print(f"wrote {path}")


def _draw_panel(draw, font, box, gen_hist, ref_hist, labels) -> None:
    """Paired bars per bin, scaled to the tallest bar; the first, middle and last bin labelled."""
    x0, y0, x1, y1 = box
    draw.line((x0, y1, x1, y1), fill="black")
    draw.line((x0, y0, x0, y1), fill="black")
    peak = max(max(gen_hist), max(ref_hist)) or 1.0
    draw.text((x0 - 26, y0 - 2), f"{peak:.2f}", fill="gray", font=font)
    slot = (x1 - x0) / len(labels)
    bar = max(slot / 2 - 1, 1)
    for i, (g, r) in enumerate(zip(gen_hist, ref_hist)):
        left = x0 + i * slot + 1
        for offset, value, colour in ((0, g, GENERATED_COLOUR), (bar, r, REFERENCE_COLOUR)):
            if value > 0:
                top = min(y1 - (y1 - y0) * value / peak, y1 - 1)
                draw.rectangle((left + offset, top, left + offset + bar - 1, y1 - 1), fill=colour)
    for i in sorted({0, len(labels) // 2, len(labels) - 1}):
        draw.text((x0 + i * slot, y1 + 4), labels[i], fill="black", font=font)


def _add_music(subparsers) -> None:
    p = subparsers.add_parser("music", help="music statistics of two sets of MIDI files and their overlap")
    p.add_argument("--generated", required=True, help="folder or .txt list of generated MIDI files")
    p.add_argument("--reference", required=True, help="folder or .txt list of reference MIDI files")
    p.add_argument("--out", help="write the full result as JSON here")
    p.add_argument("--png", help="write the histograms of both sets here")
    p.add_argument(
        "--bootstrap", type=int, default=500, help="bootstrap draws (files resampled with replacement)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_music)


def _run_music(args) -> None:
    generated = music_stats.set_stats(*_load(args.generated, "generated"))
    reference = music_stats.set_stats(*_load(args.reference, "reference"))
    result = music_stats.compare(generated, reference, bootstrap=args.bootstrap, seed=args.seed)
    result["sets"]["generated"]["source"] = args.generated
    result["sets"]["reference"]["source"] = args.reference
    meters = lambda which: ", ".join(f"{n} in {m}" for m, n in result["sets"][which]["meters"].items())
    print(
        f"generated: {len(generated.files)} files ({meters('generated')}; {len(generated.skipped)} skipped), "
        f"reference: {len(reference.files)} files ({meters('reference')}; {len(reference.skipped)} skipped), "
        f"{args.bootstrap} bootstrap draws"
    )
    print(music_table(result))
    if args.out:
        _write_json(args.out, result)
    if args.png:
        draw_histograms(result, args.png)


def _add_copying(subparsers) -> None:
    p = subparsers.add_parser("copying", help="near copies of training bars among generated bars")
    p.add_argument("--generated", required=True, help="folder or .txt list of generated MIDI files")
    p.add_argument("--train", required=True, help="folder or .txt list of the training MIDI files")
    p.add_argument("--threshold", type=float, default=0.8, help="IoU at or above which a bar is a near copy")
    p.add_argument("--max_shift", type=int, default=12, help="pitch shifts -max..max semitones are tried")
    p.add_argument(
        "--min_cells", type=int, default=1, help="generated bars with fewer sounding cells are not checked"
    )
    p.add_argument("--out", help="write the full result (every bar's best match) as JSON here")
    p.set_defaults(func=_run_copying)


def _run_copying(args) -> None:
    start = time.perf_counter()
    generated, _ = _load(args.generated, "generated")
    train, _ = _load(args.train, "train")
    loaded = time.perf_counter()
    result = music_stats.copying_check(
        generated, train, threshold=args.threshold, max_shift=args.max_shift, min_cells=args.min_cells
    )
    result["seconds_reading"] = loaded - start
    result["seconds_search"] = time.perf_counter() - loaded
    print(
        f"{result['checked_bars']} of {result['generated_bars']} generated bars checked (>= {args.min_cells} cells) "
        f"vs {result['train_bars']} training bars ({result['distinct_train_bars']} distinct), "
        f"shifts +-{args.max_shift}: "
        f"{result['near_copies']} near copies (IoU >= {args.threshold}), "
        f"fraction {_fmt(result['near_copy_fraction'])}, mean best IoU {_fmt(result['mean_best_iou'])}; "
        f"read {result['seconds_reading']:.1f} s, search {result['seconds_search']:.1f} s"
    )
    for bar in sorted(result["bars"], key=lambda b: -b["best_iou"])[:5]:
        print(
            f"  IoU {bar['best_iou']:.3f}: {bar['file']} bar {bar['bar']} ({bar['cells']} cells) ~ "
            f"{bar['train_file']} bar {bar['train_bar']} shifted {bar['shift']:+d}"
        )
    if args.out:
        _write_json(args.out, result)


def _add_nll(subparsers) -> None:
    p = subparsers.add_parser("nll", help="negative log-likelihood of held-out music under a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or <output_dir>/checkpoints/best")
    p.add_argument("--data", required=True, help="folder or .txt list of held-out MIDI files")
    p.add_argument("--crop_length", type=int, default=0, help="crop width in steps (default: the model's)")
    p.add_argument("--crops_per_file", type=int, default=8, help="fixed, seeded crops taken from each file")
    p.add_argument(
        "--draws", type=int, default=4, help="masking draws per crop (their spread gives the error)"
    )
    p.add_argument("--batch_size", type=int, default=64, help="crops per evaluation step")
    p.add_argument("--seed", type=int, default=0, help="chooses the crops and the masks")
    p.add_argument(
        "--cache_dir", default="", help="parsed-roll cache (default: ~/.cache/fractalmidi_jax/rolls)"
    )
    p.add_argument("--no_ema", action="store_true", help="score the raw weights instead of their average")
    p.add_argument("--out", help="write the result as JSON here")
    p.set_defaults(func=_run_nll)


def nll(
    checkpoint,
    data_source,
    crop_length=0,
    crops_per_file=8,
    draws=4,
    batch_size=64,
    seed=0,
    cache_dir="",
    use_ema=True,
) -> dict:
    """The original's NLL estimator (uniform number of hidden tokens per level, mean over the
    cells reached), averaged over fixed seeded crops and `draws` seeded masking draws, so two
    runs give the same figure. Per note: the per-cell figure times the cells of the crops over
    the notes starting in them."""
    import jax
    import numpy as np

    from fractalmidi_jax import data, sharding, steps
    from fractalmidi_jax import library as rolls
    from fractalmidi_jax import roll as roll_lib
    from fractalmidi_jax.generation import check_width, load_model

    config, graphdef, params, path = load_model(checkpoint, use_ema)
    width = crop_length or config.crop_length
    check_width(config, width)
    config = config.replace(crop_length=width)
    library = rolls.RollLibrary(data_source, kind=config.roll, cache_dir=cache_dir or None)
    crops = data.fixed_crops(library, width, crops_per_file, seed, config.crop_alignment)
    mesh = sharding.make_mesh("all")
    global_batch = -(-batch_size // mesh.devices.size) * mesh.devices.size
    batches = data.eval_batches(crops, global_batch, jax.process_index(), jax.process_count())
    eval_step = steps.make_eval_step(graphdef, config, mesh)
    per_draw = []
    for draw in progress.track(range(draws), "scoring masking draws", draws):
        key = jax.random.fold_in(jax.random.key(seed), draw)
        total = cells = 0.0
        for i, batch in enumerate(batches):
            placed = sharding.global_batch(mesh, batch)
            loss_sum, reached = eval_step(params, placed, jax.random.fold_in(key, i))
            total, cells = total + float(loss_sum), cells + float(reached)
        per_draw.append(total / cells)
    nats = float(np.mean(per_draw))
    error = float(np.std(per_draw, ddof=1) / np.sqrt(draws)) if draws > 1 else float("nan")
    num_notes = sum(len(roll_lib.roll_to_notes(crop, config.roll)) for crop in crops)
    cells_per_note = crops.shape[0] * crops.shape[1] * crops.shape[2] / max(num_notes, 1)
    return {
        "checkpoint": str(path),
        "data": str(data_source),
        "roll": config.roll,
        "crop_length": width,
        "crops": int(crops.shape[0]),
        "notes": int(num_notes),
        "draws": draws,
        "seed": seed,
        "weights": "ema" if use_ema else "raw",
        "nats_per_cell": nats,
        "nats_per_cell_stderr": error,
        "bits_per_cell": nats / np.log(2),
        "nats_per_note": nats * cells_per_note,
        "bits_per_note": nats * cells_per_note / np.log(2),
        "per_draw_nats_per_cell": per_draw,
    }


def _run_nll(args) -> None:
    from fractalmidi_jax.checkpoint import CheckpointError
    from fractalmidi_jax.generation import GenerationError

    try:
        result = nll(
            args.checkpoint,
            args.data,
            args.crop_length,
            args.crops_per_file,
            args.draws,
            args.batch_size,
            args.seed,
            args.cache_dir,
            not args.no_ema,
        )
    except (CheckpointError, GenerationError, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    print(
        f"{result['crops']} crops of {result['crop_length']} steps ({result['notes']} notes), {result['draws']} draws: "
        f"{result['nats_per_cell']:.4f} +- {result['nats_per_cell_stderr']:.4f} nats per cell "
        f"({result['bits_per_cell']:.4f} bits), {result['nats_per_note']:.2f} nats per note "
        f"({result['bits_per_note']:.2f} bits)"
    )
    if args.out:
        _write_json(args.out, result)


def _add_prompts(subparsers) -> None:
    p = subparsers.add_parser(
        "prompts", help="how closely continuation and inpainting follow the music they are given"
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or <output_dir>/checkpoints/best")
    p.add_argument("--data", required=True, help="folder or .txt list of held-out MIDI files")
    p.add_argument(
        "--width", type=int, default=0, help="crop and sample width in steps (default: the model's)"
    )
    p.add_argument("--crops", type=int, default=32, help="held-out crops (one fixed, seeded crop per file)")
    p.add_argument("--samples_per_crop", type=int, default=4, help="samples per crop and mode (one batch)")
    p.add_argument(
        "--prompt_steps", type=int, default=40, help="continuation: steps given (40 ends inside a bar)"
    )
    p.add_argument("--mask_start", type=int, default=32, help="inpainting: first step to regenerate")
    p.add_argument(
        "--mask_end", type=int, default=96, help="inpainting: step after the last one to regenerate"
    )
    p.add_argument("--mask_pitch_low", type=int, default=60, help="inpainting: lowest pitch to regenerate")
    p.add_argument("--mask_pitch_high", type=int, default=84, help="inpainting: highest pitch to regenerate")
    p.add_argument(
        "--num_iter_list", type=int, nargs="+", help="rounds per level (default: the checkpoint's)"
    )
    p.add_argument("--seed", type=int, default=0, help="chooses the crops and the samples")
    p.add_argument(
        "--cache_dir", default="", help="parsed-roll cache (default: ~/.cache/fractalmidi_jax/rolls)"
    )
    p.add_argument("--no_ema", action="store_true", help="use the raw weights instead of their average")
    p.add_argument("--out", help="write the result as JSON here")
    p.set_defaults(func=_run_prompts)


def prompts(
    checkpoint,
    data_source,
    width=0,
    crops=32,
    samples_per_crop=4,
    prompt_steps=40,
    mask=(32, 96, 60, 84),
    num_iter_list=None,
    seed=0,
    cache_dir="",
    use_ema=True,
) -> dict:
    """Does generation follow the music it is given? On fixed crops of held-out songs, continuation
    from the first `prompt_steps` (40 by default: the prompt ends inside a bar) and inpainting of
    `mask` = (start, end, pitch low, pitch high), each region cut as generate.py cuts it (notes that
    cross its border are kept whole, as context). For each: the pitch-class similarity
    (music_stats.pitch_class_similarity) of the notes starting inside the region to those starting
    outside it, for the model's samples, for unconditional samples against the same context (the
    floor: nothing given) and for the real music (the ceiling); means over the (crop, sample) pairs
    with notes on both sides (`pairs` counts them)."""
    import numpy as np

    from fractalmidi_jax import data, generation
    from fractalmidi_jax import library as rolls
    from fractalmidi_jax.roll import NUM_PITCHES

    model = generation.Generator(checkpoint, use_ema)
    kind = model.config.roll
    width = model.width(width)
    mask_start, mask_end, low, high = mask
    if not 0 < prompt_steps < width:
        raise generation.GenerationError(f"--prompt_steps {prompt_steps} must be between 1 and {width - 1}")
    if not (0 <= mask_start < mask_end <= width and 0 <= low <= high < NUM_PITCHES):
        raise generation.GenerationError(
            f"the inpainting region [{mask_start}, {mask_end}) x [{low}, {high}] must lie within "
            f"{width} steps x pitches 0..127"
        )
    library = rolls.RollLibrary(data_source, kind=kind, cache_dir=cache_dir or None)
    real_NxPxW = data.fixed_crops(library, width, 1, seed, model.config.crop_alignment)[:crops]
    regions = {"continuation": np.zeros((NUM_PITCHES, width), bool)}
    regions["continuation"][:, prompt_steps:] = True
    regions["inpainting"] = np.zeros_like(regions["continuation"])
    regions["inpainting"][low : high + 1, mask_start:mask_end] = True
    options = dict(batch_size=samples_per_crop, num_iter_list=num_iter_list)
    empty_cells, empty_known = generation.empty_canvas(width)
    unconditional = model.sample(
        empty_cells, empty_known, len(real_NxPxW) * samples_per_crop, seed=seed, **options
    ).rolls_NxPxW.reshape(len(real_NxPxW), samples_per_crop, NUM_PITCHES, width)

    def similarity(roll_PxW, known_PxW, context_notes):
        """Of the notes of `roll` that start in the region to the given context's."""
        notes = generation.decode(roll_PxW, known_PxW, kind)
        written = notes[~known_PxW[notes[:, 2], notes[:, 0]]]
        return music_stats.pitch_class_similarity(written, context_notes)

    result = {
        "checkpoint": str(model.path),
        "data": str(data_source),
        "width": width,
        "crops": len(real_NxPxW),
    }
    result.update(samples_per_crop=samples_per_crop, seed=seed, weights=model.weights)
    for mode, region in regions.items():
        found = {"model": [], "unconditional": [], "real": []}
        for index, real in enumerate(
            progress.track(real_NxPxW, f"{mode} of held-out crops", len(real_NxPxW))
        ):
            known = ~generation.keep_border_notes_whole(real, region, kind)
            notes = generation.decode(real, known, kind)
            context = notes[known[notes[:, 2], notes[:, 0]]]
            cells = np.where(known, real, 0).astype(np.uint8)
            samples = model.sample(cells, known, samples_per_crop, seed=seed + 1 + index, **options)
            found["real"].append(similarity(real, known, context))
            for sample, free in zip(samples.rolls_NxPxW, unconditional[index]):
                found["model"].append(similarity(sample, known, context))
                found["unconditional"].append(similarity(free, known, context))
        kept = {name: [x for x in values if x is not None] for name, values in found.items()}
        result[mode] = {name: float(np.mean(values)) if values else None for name, values in kept.items()}
        result[mode]["pairs"] = {name: len(values) for name, values in kept.items()}
    result["continuation"]["prompt_steps"] = prompt_steps
    result["inpainting"]["region"] = {"steps": [mask_start, mask_end], "pitches": [low, high]}
    return result


def _run_prompts(args) -> None:
    from fractalmidi_jax.checkpoint import CheckpointError
    from fractalmidi_jax.generation import GenerationError

    mask = (args.mask_start, args.mask_end, args.mask_pitch_low, args.mask_pitch_high)
    try:
        result = prompts(
            args.checkpoint,
            args.data,
            args.width,
            args.crops,
            args.samples_per_crop,
            args.prompt_steps,
            mask,
            args.num_iter_list,
            args.seed,
            args.cache_dir,
            not args.no_ema,
        )
    except (CheckpointError, GenerationError, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    (start, end), (low, high) = result["inpainting"]["region"].values()
    print(
        f"pitch-class similarity of the generated part to its context, {result['crops']} crops of "
        f"{result['width']} steps x {result['samples_per_crop']} samples"
    )
    continuation = f"continuation from {result['continuation']['prompt_steps']} steps"
    inpainting = f"inpainting {start}..{end} x {low}..{high}"
    print(f"{'':14s}  {continuation:>28s}  {inpainting:>28s}")
    for name in ("model", "unconditional", "real"):
        values = [_fmt(result[mode][name], digits=".3f") for mode in ("continuation", "inpainting")]
        print(f"{name:14s}  {values[0]:>28s}  {values[1]:>28s}")
    if args.out:
        _write_json(args.out, result)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_music(subparsers)
    _add_copying(subparsers)
    _add_nll(subparsers)
    _add_prompts(subparsers)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
