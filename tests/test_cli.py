"""The commands: console scripts that exist, help written from the config schema (comments,
sections, choices, defaults), "did you mean" for a misspelt flag, underscores everywhere, and
progress bars only on a terminal."""

import io
import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import pytest

from fractalmidi_jax import config, evaluate, generation, progress

REPO = Path(__file__).resolve().parents[1]


def help_of(main, *argv) -> str:
    out = io.StringIO()
    with pytest.raises(SystemExit) as stopped, pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "stdout", out)
        main([*argv, "--help"])
    assert stopped.value.code == 0
    return out.getvalue()


def test_console_scripts_point_at_mains():
    """Each console script names a main that exists, and each is also python -m <module>."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {f"fractalmidi-{n}" for n in ("train", "generate", "evaluate", "data", "bench")}
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(import_module(module), function)), name
    for module in ("train", "generate", "evaluate", "data", "bench"):
        assert (REPO / "fractalmidi_jax" / f"{module}.py").is_file()


def test_python_m_generation_is_not_silent():
    done = subprocess.run(
        [sys.executable, "-m", "fractalmidi_jax.generation"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "--checkpoint" in done.stderr


def test_train_help_is_the_schema():
    """Every field's comment is its help, under its section, with its default and choices."""
    text = help_of(config.parse_flags)
    for section in ("data:", "model:", "optimisation:", "hardware:", "logging and checkpoints:"):
        assert f"\n{section}\n" in text
    assert text.index("\ndata:") < text.index("--crop_length") < text.index("\nmodel:")
    flat = " ".join(text.split())
    assert (
        "--crop_length INT training crop width in sixteenth-note steps (a multiple of 4) (default: 128)"
        in flat
    )
    assert "--precision {32,16,bf16}" in flat and "--scan_order {row_major,column_major}" in flat
    assert "--generator_types {mar,ar,column}" in flat and "(default: mar column column column)" in flat
    assert "--roll {note,velocity}" in flat
    assert "(default: on; --no_cache_in_memory turns it off)" in flat
    assert set(config.field_help()) == set(config.Config.__dataclass_fields__)
    assert all(comment for _, comment in config.field_help().values())


def test_generate_help_shows_defaults():
    flat = " ".join(help_of(generation.main).split())
    assert "pieces to write (default: 4)" in flat and "(default: outputs/generated)" in flat
    assert "--prompt_bars" in flat and "--mask_start_bar" in flat and "--mask_end_bar" in flat


@pytest.mark.parametrize(
    ("main", "argv", "hint"),
    [
        (config.parse_flags, ["--lerning_rate", "1"], None),
        (config.parse_flags, ["--max_step", "3"], "--max_step: did you mean --max_steps?"),
        (
            generation.main,
            ["--checkpoint", "x", "--num_sample", "2"],
            "--num_sample: did you mean --num_samples?",
        ),
        (
            evaluate.main,
            ["copying", "--generated", "a", "--train", "b", "--max-shift", "3"],
            "did you mean --max_shift?",
        ),
    ],
)
def test_misspelt_flags_get_a_suggestion(capsys, main, argv, hint):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err
    assert (hint in err) if hint else "(--help lists every flag)" in err


def test_no_dashed_flags():
    """Flags use underscores, as in the guide."""
    for main, argv in ((config.parse_flags, []), (generation.main, []), (evaluate.main, ["copying"])):
        assert "--max-" not in help_of(main, *argv)
        assert not [w for w in help_of(main, *argv).split() if w.startswith("--") and "-" in w[2:]]


def test_progress_only_on_a_terminal(monkeypatch, capsys):
    """Off the terminal track() passes items through silently; on one it draws a bar."""
    assert list(progress.track(range(3), "counting")) == [0, 1, 2]
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(progress, "enabled", lambda: True)
    assert list(progress.track(range(3), "counting")) == [0, 1, 2]
    with progress.status("compiling"):
        pass
    assert "counting" in capsys.readouterr().out
