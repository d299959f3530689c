"""One measured run of a recipe: train, sample, judge the music, score the held-out NLL and time
the sampler, then print one table (and write it as JSON).

    python -m fractalmidi_jax.quality --config configs/pop909_128.yaml --out outputs/quality \\
        [--reference DIR] [--num_samples 256] [--width 128] [--num_iter_list 12 8 4 1] [flags...]

Any further flag is a training flag (config.py). `--reference` defaults to the config's
val_data; the NLL is scored on it too (the original's estimator, evaluate nll). The sampling
time is of 16 pieces of 128 x 512 with the trained model's architecture, as
`python -m fractalmidi_jax.bench` measures it.
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
    parser.add_argument("--temperature", type=float, default=1.0)
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
    samples = Path(args.out) / "samples"
    width = args.width or config.crop_length
    generated = generation.generate(
        generation.build_parser().parse_args(
            ["--checkpoint", checkpoint, "--num_samples", str(args.num_samples)]
            + ["--batch_size", str(args.batch_size), "--target_width", str(width)]
            + ["--num_iter_list", *map(str, config.num_iter_list), "--temperature", str(args.temperature)]
            + ["--output_dir", str(samples)]
        )
    )
    reference = args.reference or trainer.resolve_data(config.val_data, "valid")
    music = music_stats.compare(
        music_stats.set_stats(*music_stats.load_scores(music_stats.midi_paths(samples))),
        music_stats.set_stats(*music_stats.load_scores(music_stats.midi_paths(reference))),
    )
    nll = evaluate.nll(checkpoint, reference, crop_length=width, cache_dir=config.cache_dir)
    timing = None if args.no_timing else bench.bench_sample(config, 16, 512, config.num_iter_list, 5)

    gen, ref = music["sets"]["generated"], music["sets"]["reference"]
    rows = [(name, gen["features"][name]["mean"], ref["features"][name]["mean"]) for name in SHOWN]
    rows += [(name, gen["continuity"][name], ref["continuity"][name]) for name in gen["continuity"]]
    print(f"\n{config.roll} roll, levels {'/'.join(config.generator_types)}, rounds {config.num_iter_list}")
    print(f"training {train_minutes:.1f} min; {args.num_samples} samples of {width} steps vs {reference}")
    print(f"{'statistic':28s} {'generated':>10s} {'real':>10s}")
    for name, ours, real in rows:
        print(f"{name:28s} {ours:10.3f} {real:10.3f}")
    print(f"{'mean OA (11 features)':28s} {music['mean_oa']:10.3f}")
    print(f"held-out NLL: {nll['nats_per_cell']:.4f} nats per cell, {nll['bits_per_note']:.2f} bits per note")
    print(
        f"sampling {args.batch_size} x 128 x {width}: {sorted(generated['seconds_per_batch'])[0]:.3f} s per batch"
    )
    if timing:
        print(f"sampling 16 x 128 x 512: {timing['seconds']:.3f} s (compile {timing['compile_s']:.0f} s)")
    report = {
        "config": config.to_dict(),
        "train_minutes": train_minutes,
        "generation_seconds_per_batch": generated["seconds_per_batch"],
        "music": {name: {"generated": ours, "real": real} for name, ours, real in rows},
        "mean_oa": music["mean_oa"],
        "oa": {name: f["oa"] for name, f in music["features"].items()},
        "nll": {
            k: nll[k] for k in ("nats_per_cell", "bits_per_cell", "bits_per_note", "nats_per_cell_stderr")
        },
        "sample_16x128x512_seconds": timing and timing["seconds"],
    }
    (Path(args.out) / "quality.json").write_text(json.dumps(report, indent=1))


SHOWN = ("notes_per_bar", "note_length", "pitch_range", "ioi", "polyphony", "sounding_share")


if __name__ == "__main__":
    main()
