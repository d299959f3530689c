"""Helpers shared by the test modules: the tiny model and its training settings, random songs, and
a SIGTERM at a chosen step.

The training settings are one config on purpose: test_train.py, test_generate.py and
test_distributed.py share their compiled programs through the persistent compilation cache only
while everything that shapes the program (batch, widths, schedule, dtypes) is the same.
"""

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pretty_midi
import pytest

from fractalmidi_jax import data, generation, trainer
from fractalmidi_jax.config import Config

REAL_LOADER = data.Loader
REPO = Path(__file__).resolve().parents[1]
TWO_PROCESS_TIMEOUT_S = 300

TINY = Config(
    img_size_list=(128, 16, 4, 1),
    embed_dim_list=(32, 16, 16, 8),
    num_blocks_list=(1, 1, 1, 1),
    num_heads_list=(2, 2, 2, 2),
    generator_types=("mar", "mar", "mar"),
    crop_length=32,
    attn_dropout=0.0,
    proj_dropout=0.0,
    skip_empty=0,  # the model tests' base case; tiny_training takes the default
)


def tiny(**changes) -> Config:
    return TINY.replace(**changes).validate()


def tiny_training(folder: Path | None = None, **changes) -> Config:
    """The tiny model with one device, a global batch of 8 and max_steps large enough that the
    learning-rate schedule, and with it the compiled program, is the same in every run; with a
    folder, its songs/ is the data and its cache/ the roll cache."""
    values = dict(
        generator_types=Config.generator_types,  # the default model, as the training tests always had
        skip_empty=Config.skip_empty,
        devices="1",
        train_batch_size=8,
        val_batch_size=8,
        val_crops_per_file=1,
        max_steps=1000,
        warmup_steps=2,
        lr=1e-3,
        num_workers=0,
        log_every_n_steps=1,
        val_check_interval_steps=2,
        checkpoint_every_n_steps=2,
        log_images_every_n_steps=0,
        num_iter_list=(2, 2, 2, 1),
        save_top_k=2,
    )
    if folder is not None:
        songs = str(folder / "songs")
        values.update(train_data=songs, val_data=songs, cache_dir=str(folder / "cache"))
    return tiny(**dict(values, **changes))


def sparse_rolls(rng: np.random.Generator, shape) -> np.ndarray:
    """Token rolls with about 5% of cells sounding at random velocities (uint8)."""
    return ((rng.random(shape) < 0.05) * rng.integers(1, 128, shape)).astype(np.uint8)


def empty_bias(model, logit: float):
    """Every skipping level says `logit` for every patch (> 0: empty)."""
    for level in model.levels:
        if level.trunk.skips_empty:
            head = level.trunk.empty_head.proj
            head.kernel[...] = jnp.zeros_like(head.kernel[...])
            head.bias[...] = jnp.full_like(head.bias[...], logit)
    return model


def write_song(path: Path, seed: int, num_steps: int = 128) -> Path:
    """A random piano piece of `num_steps` sixteenths at 120 bpm."""
    rng = np.random.default_rng(seed)
    song = pretty_midi.PrettyMIDI(resolution=480, initial_tempo=120.0)
    piano = pretty_midi.Instrument(program=0)
    for onset in rng.integers(0, num_steps - 4, 40):
        end = onset + rng.integers(1, 4)
        piano.notes.append(
            pretty_midi.Note(int(rng.integers(20, 128)), int(rng.integers(40, 90)), onset / 8, end / 8)
        )
    piano.notes.append(pretty_midi.Note(90, 60, (num_steps - 1) / 8, num_steps / 8))
    song.instruments.append(piano)
    path.parent.mkdir(parents=True, exist_ok=True)
    song.write(str(path))
    return path


def tiny_run(folder: Path) -> Path:
    """folder/songs (four random songs) and folder/run: the tiny model trained for 2 steps
    (stopped by a SIGTERM, with tiny_training's config so the compiled programs are shared);
    returns the run's latest checkpoint."""
    import pytest

    for k in range(4):
        write_song(folder / "songs" / f"song_{k}.mid", seed=10 + k)
    with pytest.MonkeyPatch.context() as monkeypatch:
        stop_at(monkeypatch, 2)
        trainer.train(tiny_training(folder, output_dir=str(folder / "run")))
    return folder / "run" / "checkpoints" / "latest"


def stop_at(monkeypatch, micro_step: int) -> None:
    """The next trainer.train gets a SIGTERM while it takes the batch of `micro_step` (1-based),
    as a preemption would: it finishes that step, saves a checkpoint and returns."""

    class Loader(REAL_LOADER):
        def __next__(self):
            if self.step == micro_step - 1:
                handler = signal.getsignal(signal.SIGTERM)
                assert isinstance(getattr(handler, "__self__", None), trainer.StopRequest), handler
                signal.raise_signal(signal.SIGTERM)
            return super().__next__()

    monkeypatch.setattr(data, "Loader", Loader)


def untrained_checkpoint(folder: Path, **changes) -> Path:
    """A checkpoint of the tiny model at initialisation (no training compile: cheap), with the
    tiny_training config and `changes`; returns its folder."""
    from fractalmidi_jax import checkpoint, steps

    config = tiny_training(**changes)
    manager = checkpoint.CheckpointManager(folder / "checkpoints", save_top_k=1)
    path = manager.save(0, steps.init_state(config)[1], None, {"config": config.to_dict()})
    manager.close()
    return path


def run_two_processes(
    args: list[str], extra_env: dict | None = None, xla_flags=()
) -> tuple[list[int], list[str]]:
    """Runs `python args...` from the repository as processes 0 and 1 of one JAX job (2 CPU
    devices each, gloo collectives, a fresh coordinator port); returns (return codes, outputs).
    Both are killed when they end or after TWO_PROCESS_TIMEOUT_S (subprocess.TimeoutExpired)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    flags += ["--xla_force_host_platform_device_count=2", *xla_flags]
    processes = []
    for index in range(2):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=" ".join(flags),
            JAX_COORDINATOR_ADDRESS=address,
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(index),
            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
            **(extra_env or {}),
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [process.communicate(timeout=TWO_PROCESS_TIMEOUT_S)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    return [process.returncode for process in processes], outputs


def generation_error(*argv) -> str:
    """What generation.main writes to stderr before it exits with code 2."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as stopped, contextlib.redirect_stderr(stderr):
        generation.main([str(a) for a in argv])
    assert stopped.value.code == 2
    return stderr.getvalue().strip()
