"""One measured run of a recipe: train, sample, judge the music, score the held-out NLL and time
the sampler, then print one table (and write it as JSON).

    python -m fractalmidi_jax.quality --config configs/pop909_128.yaml --out outputs/quality \\
        [--reference DIR] [--num_samples 256] [--width 128] [--temperature 1.0 0.9] [flags...]

Any further flag is a training flag (config.py); the samples use its num_iter_list. Each
temperature gets its own samples and column in the table (the sampling temperature is tuned here,
on val_data, never on a test set). `--reference` defaults to the config's
val_data; the NLL is scored on it too (the original's estimator, evaluate nll). The sampling
time is of 16 pieces of 128 x 512 with the trained weights, as `python -m fractalmidi_jax.bench`
measures it.
"""

import argparse
import json
import time
from pathlib import Path

from fractalmidi_jax import config as config_lib


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the run, the samples and quality.json")
    parser.add_argument("--reference", default="", help="real music to compare with (default: val_data)")
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64, help="samples per sampler call")
    parser.add_argument("--width", type=int, default=0, help="sample width (default: crop_length)")
    parser.add_argument(
        "--temperature", type=float, nargs="+", default=[], help="one or more (default: the config's)"
    )
    parser.add_argument("--skip_training", action="store_true", help="judge the checkpoint already in --out")
    parser.add_argument("--no_timing", action="store_true", help="skip timing the 16 x 128 x 512 sampler")
    args, training_flags = parser.parse_known_args(argv)
    config = config_lib.parse_flags(training_flags + ["--output_dir", str(Path(args.out) / "run")])

    from fractalmidi_jax import bench, evaluate, generation, music_stats, trainer

    config_lib.use_compilation_cache()
    started = time.perf_counter()
    if not args.skip_training:
        trainer.train(config)
    train_minutes = (time.perf_counter() - started) / 60
    checkpoint = str(Path(config.output_dir) / "checkpoints" / "latest")
    width = args.width or config.crop_length
    reference = args.reference or trainer.resolve_data(config.val_data, "valid")
    real = music_stats.set_stats(*music_stats.load_scores(music_stats.midi_paths(reference)))
    by_temperature = {}
    for temperature in args.temperature or [config.temperature]:
        samples = Path(args.out) / f"samples_t{temperature:g}"
        generated = generation.generate(
            generation.build_parser().parse_args(
                ["--checkpoint", checkpoint, "--num_samples", str(args.num_samples)]
                + ["--batch_size", str(args.batch_size), "--target_width", str(width)]
                + ["--num_iter_list", *map(str, config.num_iter_list), "--temperature", str(temperature)]
                + ["--output_dir", str(samples), "--reuse_output_dir"]
            )
        )
        music = music_stats.compare(
            music_stats.set_stats(*music_stats.load_scores(music_stats.midi_paths(samples))), real
        )
        by_temperature[temperature] = (music, generated)
    nll = evaluate.nll(checkpoint, reference, crop_length=width, cache_dir=config.cache_dir)
    timing = None
    if not args.no_timing:
        trained = generation.load_model(checkpoint)
        timing = bench.bench_sample(trained[0], 16, 512, config.num_iter_list, 5, params=trained[2])

    print(f"\n{config.roll} roll, levels {'/'.join(config.generator_types)}, rounds {config.num_iter_list}")
    print(f"training {train_minutes:.1f} min; {args.num_samples} samples of {width} steps vs {reference}")
    print(f"{'statistic':28s} " + " ".join(f"{f'T={t:g}':>10s}" for t in by_temperature) + f" {'real':>10s}")
    sets = [music["sets"] for music, _ in by_temperature.values()]
    rows = {}
    for name in SHOWN + tuple(sets[0]["generated"]["continuity"]):
        ours = [statistic(s["generated"], name) for s in sets]
        real_value = statistic(sets[0]["reference"], name)
        rows[name] = {"generated": dict(zip(map(str, by_temperature), ours)), "real": real_value}
        print(f"{name:28s} " + " ".join(f"{x:10.3f}" for x in ours) + f" {real_value:10.3f}")
    mean_oa = {str(t): music["mean_oa"] for t, (music, _) in by_temperature.items()}
    print(f"{'mean OA (11 features)':28s} " + " ".join(f"{x:10.3f}" for x in mean_oa.values()))
    print(f"held-out NLL: {nll['nats_per_cell']:.4f} nats per cell, {nll['bits_per_note']:.2f} bits per note")
    fastest = min(min(generated["seconds_per_batch"]) for _, generated in by_temperature.values())
    print(f"sampling {args.batch_size} x 128 x {width}: {fastest:.3f} s per batch")
    if timing:
        print(f"sampling 16 x 128 x 512: {timing['seconds']:.3f} s (compile {timing['compile_s']:.0f} s)")
    report = {
        "config": config.to_dict(),
        "train_minutes": train_minutes,
        "generation_seconds_per_batch": {
            str(t): g["seconds_per_batch"] for t, (_, g) in by_temperature.items()
        },
        "music": rows,
        "mean_oa": mean_oa,
        "oa": {
            str(t): {n: f["oa"] for n, f in m["features"].items()} for t, (m, _) in by_temperature.items()
        },
        "nll": {
            k: nll[k] for k in ("nats_per_cell", "bits_per_cell", "bits_per_note", "nats_per_cell_stderr")
        },
        "sample_16x128x512_seconds": timing and timing["seconds"],
    }
    (Path(args.out) / "quality.json").write_text(json.dumps(report, indent=1))


def statistic(set_summary: dict, name: str) -> float:
    """A feature's mean (SHOWN) or a continuity statistic of one set of `music_stats.compare`."""
    return set_summary["features"][name]["mean"] if name in SHOWN else set_summary["continuity"][name]


SHOWN = ("notes_per_bar", "note_length", "pitch_range", "ioi", "polyphony", "sounding_share")


if __name__ == "__main__":
    main()
