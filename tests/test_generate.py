"""generate.py's modes, outputs and errors, with a checkpoint of a tiny 2-step training run (CPU)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import TINY, generation_error, tiny_run, write_song

from fractalmidi_jax import data, generation, midi, render
from fractalmidi_jax import roll as roll_lib

WIDTH = TINY.crop_length  # the default --target_width
BATCH = 4  # samples per sampler call, as for the trainer's images (the same compiled sampler)

pytestmark = pytest.mark.usefixtures("compilation_cache")


POP909_VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "pop909" / "valid"


def roll_of(path, width=WIDTH) -> np.ndarray:
    """The model tokens of a file's first `width` steps (what generation's canvas holds)."""
    return data.crop_roll(roll_lib.read_roll(path, TINY.roll)[0], 0, width, TINY.roll)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """songs/ (four MIDI files) and run/: a tiny model trained for 2 steps (stopped by SIGTERM,
    with test_train.py's tiny_training config, so that the compiled program is shared)."""
    folder = tmp_path_factory.mktemp("generate")
    tiny_run(folder)
    return folder


@pytest.fixture
def checkpoint(folder):
    return folder / "run" / "checkpoints" / "latest"


@pytest.fixture
def rolls(monkeypatch) -> list[np.ndarray]:
    """The rolls generation writes, in order (generation._write_sample is spied on)."""
    captured = []
    real = generation._write_sample

    def spy(args, kind, out, index, roll, *rest):
        captured.append(np.array(roll))
        return real(args, kind, out, index, roll, *rest)

    monkeypatch.setattr(generation, "_write_sample", spy)
    return captured


def generate(checkpoint, out, *flags) -> dict:
    """generation.main with 2 samples (unless flags say otherwise) written into `out`; its generation.json."""
    argv = ["--checkpoint", checkpoint, "--output_dir", out, "--reuse_output_dir", "--num_samples", 2]
    argv += ["--batch_size", BATCH]
    generation.main([str(a) for a in [*argv, *flags]])
    return json.loads((out / "generation.json").read_text())


def test_unconditional_writes_midi_pictures_and_report(checkpoint, tmp_path, rolls, capsys):
    """Unconditional: one MIDI (+ PNG, GIF) per sample, in batches, and generation.json whose
    note counts are the notes of the written files."""
    out = tmp_path / "out"
    report = generate(checkpoint, out, "--num_samples", 5, "--save_png", "--save_gif", "--seed", 1)
    assert "wrote 5 samples" in capsys.readouterr().out
    assert report["checkpoint"] == str(checkpoint.resolve())
    assert report["mode"] == "unconditional" and report["seed"] == 1 and report["num_samples"] == 5
    assert report["target_width"] == WIDTH
    assert report["num_iter_list"] == [2, 2, 2, 1] and report["weights"] == "ema"
    assert len(report["seconds_per_batch"]) == 2
    assert [len(r) for r in (rolls, report["samples"])] == [5, 5]
    for index, (sample, roll) in enumerate(zip(report["samples"], rolls)):
        stem = f"sample_{index:03d}"
        assert sample["files"] == [f"{stem}.mid", f"{stem}.png", f"{stem}.gif"]
        assert roll.shape == (128, WIDTH)
        written = midi.read_score(out / f"{stem}.mid")
        assert sample["notes"] == len(written.notes) == len(roll_lib.roll_to_notes(roll, TINY.roll)) > 0
        assert sample["sounding_cells"] == pytest.approx((roll > 0).mean())
        with Image.open(out / f"{stem}.png") as png:  # with the note-name and bar-number axes
            assert png.size == (render.NOTE_AXIS_PIXELS + 2 * WIDTH, render.BAR_AXIS_PIXELS + 2 * 128)
        with Image.open(out / f"{stem}.gif") as gif:
            assert gif.size == (2 * WIDTH, 2 * 128) and gif.n_frames == 2  # one per level-0 round


def test_continuation_keeps_the_prompt(folder, checkpoint, tmp_path, rolls):
    """Continuation: the first prompt_steps of the output are the prompt file's, cell for cell.
    That the rest depends on the prompt is test_sampler's (with amplified weights: after two
    training steps a prompt moves the near-uniform head too little to change a draw)."""
    prompts = [folder / "songs" / "song_0.mid", folder / "songs" / "song_1.mid"]
    outputs = []
    for k, prompt in enumerate(prompts):
        flags = ["--mode", "continuation", "--prompt_midi", prompt, "--prompt_steps", 16]
        report = generate(checkpoint, tmp_path / f"out{k}", *flags)
        assert report["mode"] == "continuation"
        outputs.append(rolls[-2:])
    first = [roll_of(p)[:, :16] for p in prompts]
    assert not np.array_equal(*first)
    for prompt_roll, generated in zip(first, outputs):
        for roll in generated:
            np.testing.assert_array_equal(roll[:, :16], prompt_roll)


def test_inpainting_changes_only_the_region(folder, checkpoint, tmp_path, rolls):
    """Inpainting: outside [mask_start, mask_end) x [low, high] the output is the input, cell for
    cell; inside it is regenerated."""
    source = folder / "songs" / "song_2.mid"
    flags = ["--mode", "inpainting", "--input_midi", source, "--mask_start", 8, "--mask_end", 24]
    report = generate(checkpoint, tmp_path, *flags, "--mask_pitch_low", 40, "--mask_pitch_high", 80)
    assert report["mode"] == "inpainting"
    original = roll_of(source)
    region = np.zeros((128, WIDTH), bool)
    region[40:81, 8:24] = True
    for roll in rolls:
        np.testing.assert_array_equal(roll[~region], original[~region])
        assert not np.array_equal(roll[region], original[region])


def test_notes_outside_the_region_come_back_note_for_note(folder, checkpoint, tmp_path):
    """Inpainting steps 64..96 of 128 (POP909 valid songs where ../shared has them): every note of the
    input that is not wholly inside the region comes back with its onset, pitch, velocity and length,
    including notes that cross the region's border (kept whole) and notes that end where generated
    cells begin."""
    crossing = tmp_path / "crossing.mid"
    midi.write_midi(crossing, [[56, 72, 60, 90], [90, 100, 62, 70], [60, 64, 64, 50], [64, 70, 64, 80]])
    sources = sorted(POP909_VALID.glob("*.mid"))[:3] + [crossing]
    crossed = 0
    for k, source in enumerate(sources):
        flags = ["--mode", "inpainting", "--input_midi", source, "--mask_start", 64, "--mask_end", 96]
        generate(checkpoint, tmp_path / str(k), *flags, "--target_width", 128, "--batch_size", 2)
        notes = roll_lib.roll_to_notes(roll_of(source, 128), TINY.roll)
        outside = (notes[:, 0] < 64) | (notes[:, 1] > 96)
        for name in ("sample_000.mid", "sample_001.mid"):
            written = {tuple(n) for n in midi.read_score(tmp_path / str(k) / name).notes.tolist()}
            missing = [tuple(n) for n in notes[outside].tolist() if tuple(n) not in written]
            assert not missing, (source.name, missing[:5])
        crossed += int(
            ((notes[:, 0] < 64) & (notes[:, 1] > 64)).sum() + ((notes[:, 0] < 96) & (notes[:, 1] > 96)).sum()
        )
    assert crossed >= 2


def test_border_notes_are_kept_whole():
    """A note that lies partly in the region is taken out of it, for both roll kinds."""
    for kind in roll_lib.KINDS:
        tokens = roll_lib.crop_tokens(roll_lib.notes_to_roll([[2, 6, 60, 80], [5, 7, 61, 70]], 8, kind), kind)
        region = np.zeros((128, 8), bool)
        region[:, 4:6] = True
        kept = generation.keep_border_notes_whole(tokens, region, kind)
        assert not kept[60].any() and kept[61].tolist() == [False] * 4 + [True] + [False] * 3


def test_same_seed_same_music(checkpoint, tmp_path, rolls):
    """A seed reproduces its samples (rolls and MIDI bytes); another seed gives others."""
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate(checkpoint, tmp_path / name, "--seed", seed)
    a, b, c = rolls[0:2], rolls[2:4], rolls[4:6]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for name in ("sample_000.mid", "sample_001.mid"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], a[1])


def test_missing_checkpoint(tmp_path):
    """A path with no checkpoint stops with a message naming it."""
    message = generation_error("--checkpoint", tmp_path / "nowhere", "--output_dir", tmp_path / "out")
    assert message.startswith(f"error: no checkpoint at {tmp_path / 'nowhere'}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["continuation", "inpainting"])
def test_unreadable_input_midi(checkpoint, tmp_path, mode):
    """A prompt or input file of random bytes stops with 'cannot read' and the parser's reason."""
    junk = tmp_path / "junk.mid"
    junk.write_bytes(np.random.default_rng(0).bytes(300))
    flag = "--prompt_midi" if mode == "continuation" else "--input_midi"
    flags = ["--mode", mode, flag, junk, "--prompt_steps", 8, "--mask_start", 0, "--mask_end", 8]
    message = generation_error("--checkpoint", checkpoint, *flags)
    assert message.startswith(f"error: cannot read {junk}: ")


@pytest.mark.parametrize(
    ("num_steps", "mask", "length"), [(128, (8, WIDTH + 8), WIDTH), (20, (8, 24), 20), (128, (16, 16), WIDTH)]
)
def test_mask_outside_the_input(folder, checkpoint, tmp_path, num_steps, mask, length):
    """An inpainting region past the end of the input (or of the canvas), or empty, is refused."""
    source = write_song(tmp_path / "input.mid", seed=5, num_steps=num_steps)
    flags = ["--mode", "inpainting", "--input_midi", source, "--mask_start", mask[0], "--mask_end", mask[1]]
    message = generation_error("--checkpoint", checkpoint, *flags)
    assert message.startswith(f"error: mask [{mask[0]}, {mask[1]}) is outside the input")
    assert f"within [0, {length}) steps" in message


@pytest.mark.parametrize("width", [30, -4, 1024])
def test_bad_target_width(checkpoint, width):
    """A width that is not a positive multiple of 4 up to max_crop_length is refused."""
    message = generation_error("--checkpoint", checkpoint, "--target_width", width)
    assert message.startswith(
        f"error: --target_width {width}: this model generates widths that are multiples of 4"
    )


def test_save_wav_without_fluidsynth(checkpoint, tmp_path, monkeypatch, capsys):
    """--save_wav without the fluidsynth command writes pretty_midi's audio and says so, with the
    install hint; generation.json records it."""
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    report = generate(checkpoint, tmp_path, "--num_samples", 1, "--save_wav")
    assert report["samples"][0]["files"] == ["sample_000.mid", "sample_000.wav"]
    assert report["audio"].startswith("pretty_midi's own synthesiser")
    printed = capsys.readouterr().out
    assert "audio: pretty_midi's own synthesiser" in printed and "apt install fluidsynth" in printed


def test_each_run_gets_a_fresh_folder(checkpoint, tmp_path):
    """Without --reuse_output_dir, runs go to run_0, run_1, ... inside --output_dir, each with an
    index.html."""
    for _ in range(2):
        generation.main(
            ["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path), "--num_samples", "1"]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_0", "run_1"]
    for run in ("run_0", "run_1"):
        assert (tmp_path / run / "sample_000.mid").is_file() and (tmp_path / run / "index.html").is_file()
        assert json.loads((tmp_path / run / "generation.json").read_text())["output_dir"] == str(
            tmp_path / run
        )


def test_bad_counts_are_usage_errors(checkpoint):
    """--num_samples 0 is an argparse usage error (exit code 2)."""
    with pytest.raises(SystemExit) as stopped:
        generation.main(["--checkpoint", str(checkpoint), "--num_samples", "0"])
    assert stopped.value.code == 2


def test_evaluate_nll_is_reproducible_and_consistent(folder, checkpoint, tmp_path, capsys):
    """`python -m fractalmidi_jax.evaluate nll`: the same seed gives the same figure (fixed crops
    and masks), another seed another one; bits are nats / ln 2; per note is the per-cell figure
    scaled by the cells per note of the crops; the JSON carries it all."""
    from fractalmidi_jax import evaluate

    args = dict(crop_length=WIDTH, crops_per_file=2, draws=2, batch_size=8, cache_dir=str(folder / "cache"))
    first = evaluate.nll(checkpoint, folder / "songs", seed=0, **args)
    again = evaluate.nll(checkpoint, folder / "songs", seed=0, **args)
    other = evaluate.nll(checkpoint, folder / "songs", seed=1, **args)
    assert first["per_draw_nats_per_cell"] == again["per_draw_nats_per_cell"]
    assert first["nats_per_cell"] != other["nats_per_cell"]
    assert 0 < first["nats_per_cell"] < np.log(128) + 0.5
    assert first["bits_per_cell"] == pytest.approx(first["nats_per_cell"] / np.log(2))
    assert first["crops"] == 8 and first["notes"] > 0
    cells_per_note = first["crops"] * 128 * WIDTH / first["notes"]
    assert first["nats_per_note"] == pytest.approx(first["nats_per_cell"] * cells_per_note)

    out = tmp_path / "nll.json"
    flags = ["--crop_length", WIDTH, "--crops_per_file", 2, "--draws", 2, "--batch_size", 8]
    evaluate.main(
        ["nll", "--checkpoint", str(checkpoint), "--data", str(folder / "songs"), "--out", str(out)]
        + ["--cache_dir", str(folder / "cache")]
        + [str(f) for f in flags]
    )
    assert json.loads(out.read_text())["per_draw_nats_per_cell"] == first["per_draw_nats_per_cell"]
    assert "nats per cell" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no checkpoint"):
        evaluate.main(["nll", "--checkpoint", str(tmp_path / "nothing"), "--data", str(folder / "songs")])


def test_evaluate_prompts_measures_how_generation_follows_its_context(folder, checkpoint, tmp_path, capsys):
    """`python -m fractalmidi_jax.evaluate prompts`: continuation from a prompt that ends inside a bar
    and inpainting inside pitch bounds, on fixed crops; similarities of the model's samples, of
    unconditional ones and of the real music, each a cosine in [0, 1] over the pairs with notes on
    both sides; the JSON carries them."""
    from fractalmidi_jax import evaluate

    flags = ["--width", WIDTH, "--crops", 3, "--samples_per_crop", BATCH, "--prompt_steps", 10]
    flags += ["--mask_start", 8, "--mask_end", 24, "--mask_pitch_low", 30, "--mask_pitch_high", 110]
    out = tmp_path / "prompts.json"
    argv = ["prompts", "--checkpoint", checkpoint, "--data", folder / "songs", "--out", out]
    evaluate.main([str(a) for a in argv + ["--cache_dir", folder / "cache"] + flags])
    printed = capsys.readouterr().out
    assert "continuation from 10 steps" in printed and "inpainting 8..24 x 30..110" in printed
    result = json.loads(out.read_text())
    assert result["crops"] == 3 and result["continuation"]["prompt_steps"] == 10
    for mode in ("continuation", "inpainting"):
        pairs = result[mode]["pairs"]
        assert 0 < pairs["model"] <= 3 * BATCH and 0 < pairs["real"] <= 3
        for name in ("model", "unconditional", "real"):
            assert 0.0 <= result[mode][name] <= 1.0
