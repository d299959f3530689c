"""Per-bar conditions, guidance and whole pieces: chord and density parsing, conditions computed
from a roll, the condition path at level 0, classifier-free guidance in the sampler, windows and
their seams, refusals, the API and generate.py, and the control measurement (CPU, tiny models)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import generation_error, tiny, tiny_training, untrained_checkpoint, write_song

import fractalmidi_jax
from fractalmidi_jax import conditions as conditions_lib
from fractalmidi_jax import control, generation
from fractalmidi_jax import grid as grid_lib
from fractalmidi_jax import sampler as sampler_lib
from fractalmidi_jax.config import ConfigError
from fractalmidi_jax.fractal import build_model
from fractalmidi_jax.head import Sampling
from fractalmidi_jax.level import ConditionedColumns

pytestmark = pytest.mark.usefixtures("compilation_cache")
CONDITIONS = ("chords", "density")
NUM_ITER = (2, 2, 2, 1)
BATCH, WIDTH = 2, 32  # the tiny model's crop: two bars


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """songs/ (three MIDI files) and two untrained checkpoints, with and without conditions."""
    folder = tmp_path_factory.mktemp("conditions")
    for k in range(3):
        write_song(folder / "songs" / f"song_{k}.mid", seed=20 + k)
    untrained_checkpoint(folder / "conditional", conditions=CONDITIONS)
    untrained_checkpoint(folder / "unconditional")
    return folder


@pytest.fixture(scope="module")
def model(folder):
    return fractalmidi_jax.load(folder / "conditional" / "checkpoints" / "latest")


# --- reading what a user asks for ---


def test_chord_names_give_their_pitch_classes():
    expected = {
        "C": [0, 4, 7],
        "Am": [9, 0, 4],
        "F#m": [6, 9, 1],
        "Bb7": [10, 2, 5, 8],
        "Ebmaj7": [3, 7, 10, 2],
        "Dm7": [2, 5, 9, 0],
        "Bdim": [11, 2, 5],
        "Caug": [0, 4, 8],
        "Gsus2": [7, 9, 2],
        "Dsus4": [2, 7, 9],
    }
    for name, classes in expected.items():
        chroma = conditions_lib.chord_chroma(name)
        assert sorted(np.flatnonzero(chroma)) == sorted(classes), name
        np.testing.assert_allclose(np.linalg.norm(chroma), 1.0, rtol=1e-6)
    assert conditions_lib.parse_chords("C G, Am F").shape == (4, 12)


@pytest.mark.parametrize("bad", ["H", "Cmaj9", "c", "C#m#", "Amin"])
def test_unknown_chord_names_get_one_clear_line(bad):
    with pytest.raises(conditions_lib.ConditionError) as error:
        conditions_lib.parse_chords(f"C {bad} G")
    assert f"unknown chord {bad!r}" in str(error.value) and "\n" not in str(error.value)


def test_density_is_one_number_or_one_per_bar_repeated_to_fill():
    features, given = conditions_lib.asked(CONDITIONS, {"density": "4 8", "chords": None}, 5)
    np.testing.assert_allclose(np.expm1(features["density"][:, 0]), [4, 8, 4, 8, 4], rtol=1e-5)
    assert given.tolist() == [False, True] and not features["chords"].any()
    for bad in ("many", "-1", ""):
        with pytest.raises(conditions_lib.ConditionError, match="notes per bar"):
            conditions_lib.parse_density(bad)


def test_conditions_are_refused_by_models_not_trained_with_them():
    with pytest.raises(conditions_lib.ConditionError, match="trained without conditions"):
        conditions_lib.asked((), {"chords": "C"}, 2)
    with pytest.raises(conditions_lib.ConditionError, match="chords only, so it cannot follow --density"):
        conditions_lib.asked(("chords",), {"density": 8}, 2)
    with pytest.raises(ConfigError, match="not a condition"):
        tiny(conditions=("tempo",))
    with pytest.raises(ConfigError, match="MAR level 0"):
        tiny(conditions=("chords",), generator_types=("ar", "mar", "mar"))


def test_conditions_from_a_roll():
    """A C major triad held through bar 0 with a repeated E, nothing in bar 1: bar 0's chroma is
    the chord's and its density counts onsets (4), not sustains."""
    roll = np.zeros((1, 128, 32), np.uint8)
    for pitch in (48, 64, 67):
        roll[0, pitch, 0], roll[0, pitch, 1:16] = 80, 128
    roll[0, 64, 8] = 70
    chroma = np.asarray(conditions_lib.chroma_from_roll(roll, "note"))
    np.testing.assert_allclose(chroma[0, 0] @ conditions_lib.chord_chroma("C"), 1.0, rtol=1e-5)
    assert not chroma[0, 1].any()
    np.testing.assert_array_equal(conditions_lib.notes_per_bar(roll, "note"), [[4, 0]])


# --- the condition path ---


def test_unconditional_model_keeps_its_parameters():
    """conditions only add their own parameters, created last: every other one is as before."""
    plain = nnx.to_pure_dict(nnx.state(build_model(tiny()), nnx.Param))
    conditional = nnx.to_pure_dict(nnx.state(build_model(tiny(conditions=CONDITIONS)), nnx.Param))
    assert set(conditional) - set(plain) == {"conditions"}
    jax.tree.map(np.testing.assert_array_equal, plain, {k: conditional[k] for k in plain})


def test_a_condition_changes_level0_and_a_dropped_one_is_unconditional():
    config = tiny(conditions=CONDITIONS)
    model = build_model(config)
    rs = np.random.default_rng(0)
    cells = grid_lib.patchify(
        jnp.asarray(rs.integers(0, 129, (2, 128, WIDTH)) * (rs.random((2, 128, WIDTH)) < 0.05)), 16
    )
    hidden = jnp.asarray(rs.random((2, cells.shape[1])) < 0.5)

    def level0(chords, given):
        features, _ = conditions_lib.asked(CONDITIONS, {"chords": chords, "density": 6}, WIDTH // 16)
        batched = {name: np.repeat(f[None], 2, 0) for name, f in features.items()}
        vectors = model.conditions(batched, np.asarray(given, bool)[None].repeat(2, 0))
        return np.asarray(
            model.levels[0].predict(cells, hidden, None, None, ConditionedColumns(None, vectors))
        )

    assert np.abs(level0("C G", [True, True]) - level0("F#m Bb", [True, True])).max() > 1e-3
    dropped = level0("C G", [False, False])
    np.testing.assert_array_equal(dropped, level0("F#m Bb", [False, False]))
    nothing = conditions_lib.nothing_given(CONDITIONS, 2, WIDTH // 16)
    unconditional = ConditionedColumns(None, model.conditions(*nothing))
    np.testing.assert_array_equal(dropped, model.levels[0].predict(cells, hidden, None, None, unconditional))


@pytest.mark.parametrize("skip_empty", [0, 2])
def test_guidance_at_scale_one_is_conditional_and_at_zero_unconditional(skip_empty):
    """Sampling: cfg 1 draws the conditional rolls, cfg 0 the unconditional ones, cell for cell
    (the condition embedding and the head are amplified so that conditions visibly matter); with
    skip_empty the patches' emptiness is guided alike."""
    config = tiny_training(conditions=CONDITIONS, skip_empty=skip_empty)
    model = build_model(config)
    for embed in model.conditions.embed:
        embed.kernel[...] = embed.kernel[...] * 30
    model.head.codebook[...] = model.head.codebook[...] * 30
    params = nnx.to_pure_dict(nnx.split(model)[1])
    run = sampler_lib.make_sampler(config, NUM_ITER)
    cells, known = sampler_lib.unconditional_inputs(BATCH, WIDTH)
    features, given = conditions_lib.asked(CONDITIONS, {"chords": "C F#", "density": 12}, WIDTH // 16)
    asked = (
        {name: np.repeat(f[None], BATCH, 0) for name, f in features.items()},
        np.repeat(given[None], BATCH, 0),
    )
    key, one = jax.random.key(3), Sampling.of(config, 1.0, 0.0)
    sample = lambda conditions, cfg=None: np.asarray(run(params, cells, known, key, one, conditions, cfg)[0])
    nothing = conditions_lib.nothing_given(CONDITIONS, BATCH, WIDTH // 16)
    conditional, unconditional = sample(asked), sample(nothing)
    assert (conditional != unconditional).any()
    np.testing.assert_array_equal(sample(asked, jnp.float32(1.0)), conditional)
    np.testing.assert_array_equal(sample(asked, jnp.float32(0.0)), unconditional)
    assert (sample(asked, jnp.float32(3.0)) != conditional).any()


# --- whole pieces ---


def test_windows_cover_the_piece_and_each_keeps_the_last_bars_of_the_one_before(model, monkeypatch):
    """64 bars from a 2-bar model in one call: 63 windows, each after the first starting with the
    bar its predecessor wrote last as known cells (a carried note's sustain made its onset, as in
    training crops), that the sampler gives back unchanged; a 3-chord list runs through the whole
    piece, each window reading its own bars."""
    calls = []
    real = generation.Generator.sample_batches

    def spy(self, cells, known, features, *rest):
        rolls, frames, seconds = real(self, cells, known, features, *rest)
        calls.append((cells.copy(), known.copy(), features["chords"].copy(), rolls))
        return rolls, frames, seconds

    monkeypatch.setattr(generation.Generator, "sample_batches", spy)
    songs, pieces = model.generate(
        num_samples=1,
        batch_size=1,
        num_bars=64,
        overlap_bars=1,
        chords="C F G",
        cfg=1.0,
        return_rolls=True,
        num_iter_list=(1, 1, 1, 1),
    )
    assert pieces.shape == (1, 128, 64 * 16) and len(songs) == 1 and len(calls) == 63
    chords = conditions_lib.parse_chords("C F G")
    for index, (cells, known, chroma, rolls) in enumerate(calls):
        start = 16 * index
        np.testing.assert_allclose(chroma[:, :, :], np.resize(chords, (64, 12))[None, index : index + 2])
        np.testing.assert_array_equal(
            pieces[:, :, start + 16 * (index > 0) : start + 32], rolls[:, :, 16 * (index > 0) :]
        )
        if index:
            assert known[:, :, :16].all() and not known[:, :, 16:].any()
            np.testing.assert_array_equal(rolls[:, :, :16], cells[:, :, :16])
            np.testing.assert_array_equal(cells[:, :, 1:16], pieces[:, :, start + 1 : start + 16])
            carried = pieces[:, :, start] == 128
            assert (cells[:, :, 0][carried] < 128).all()
            np.testing.assert_array_equal(cells[:, :, 0][~carried], pieces[:, :, start][~carried])


def test_generate_writes_whole_pieces_and_records_the_conditions(model, tmp_path):
    out = tmp_path / "out"
    generation.main(
        [
            "--checkpoint",
            str(model.path),
            "--output_dir",
            str(out),
            "--reuse_output_dir",
            "--num_samples",
            "2",
        ]
        + ["--batch_size", str(BATCH), "--num_iter_list", "2", "2", "2", "1", "--num_bars", "3"]
        + ["--chords", "C G Am F", "--density", "8", "--cfg", "2", "--save_png"]
    )
    report = json.loads((out / "generation.json").read_text())
    assert report["conditions"] == {"chords": "C G Am F", "density": "8"} and report["cfg"] == 2.0
    assert report["piece_steps"] == 48 and report["window_starts"] == [0, 16]
    assert (out / "sample_000.png").is_file()


def test_asked_conditions_are_guided_at_the_measured_scale_unless_told(folder, model, monkeypatch):
    """No --cfg: CFG_WHEN_ASKED when a condition is asked, no guidance when none is (or for a
    model without conditions); an explicit scale is kept."""
    guidance = []

    def spy(self, cells, known, features, given, key, batch_size, sampling, num_iter, cfg):
        guidance.append(None if cfg is None else float(cfg))
        return np.zeros(cells.shape, np.uint8), np.zeros((1,) + cells.shape, np.uint8), (0.0, [0.0])

    monkeypatch.setattr(generation.Generator, "sample_batches", spy)
    canvas = generation.empty_canvas(WIDTH)
    assert model.sample(*canvas, 1, conditions={"chords": "C G"}).cfg == generation.CFG_WHEN_ASKED
    assert model.sample(*canvas, 1, conditions={"density": "8"}, cfg=2.0).cfg == 2.0
    assert model.sample(*canvas, 1).cfg == 1.0
    unconditional = fractalmidi_jax.load(folder / "unconditional" / "checkpoints" / "latest")
    assert unconditional.sample(*canvas, 1).cfg == 1.0
    assert guidance == [generation.CFG_WHEN_ASKED, 2.0, None, None]


def test_bad_requests_get_one_line(folder, model, tmp_path):
    unconditional = folder / "unconditional" / "checkpoints" / "latest"
    common = ["--output_dir", tmp_path, "--num_iter_list", 2, 2, 2, 1]
    assert "trained without conditions" in generation_error(
        "--checkpoint", unconditional, "--chords", "C G", *common
    )
    assert "trained without them" in generation_error("--checkpoint", unconditional, "--cfg", 2, *common)
    message = generation_error("--checkpoint", model.path, "--chords", "C", "Hm", *common)
    assert message.startswith("error: unknown chord 'Hm'") and "\n" not in message
    assert "inpainting" in generation_error(
        "--checkpoint", model.path, "--mode", "inpainting", "--num_bars", 4, *common
    )
    with pytest.raises(TypeError, match="chord"):
        model.generate(chord="C")


def test_control_measurement_runs_and_writes_its_numbers(folder, model, tmp_path, capsys):
    out = tmp_path / "control.json"
    flags = (
        f"--num_crops 2 --cfg 2 --piece_bars 8 --num_pieces 1 --batch_size {BATCH} --num_iter_list 2 2 2 1"
    )
    control.main(
        ["--checkpoint", str(model.path), "--data", str(folder / "songs"), "--out", str(out)]
        + flags.split()
        + ["--bootstrap", "10", "--cache_dir", str(tmp_path / "cache")]
    )
    report = json.loads(out.read_text())
    assert set(report["control"]) == {"real, other crop", "unconditional", "cfg 2"}
    for row in report["control"].values():
        assert -1.0 <= row["chroma_cosine"] <= 1.0
    assert len(report["piece"]["mean_oa_per_8_bar_window"]) == 1 and report["piece"]["seams"]["seam_bars"]
    assert "chroma cos" in capsys.readouterr().out
