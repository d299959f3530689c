"""Runs that fail safe (issue 14), on the tiny model (CPU): a NaN state is never saved, one run
owns an output folder, a fresh run never overwrites another's checkpoints by accident, names carry
their own step's validation loss, and every bad input to train.py and generate.py ends with one
line and exit code 2 before anything is compiled.

The training runs use test_train.py's config (tiny.tiny_training), so that the compiled programs
come from the shared persistent compilation cache.
"""

import contextlib
import errno
import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from tiny import stop_at, tiny_training, write_song

from fractalmidi_jax import checkpoint as ckpt
from fractalmidi_jax import generation, sharding, steps, trainer
from fractalmidi_jax import sampler as sampler_lib
from fractalmidi_jax.config import parse_flags
from fractalmidi_jax.output_dir import RunLock

pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("failsafe")
    for k in range(4):
        write_song(folder / "songs" / f"song_{k}.mid", seed=k)
    return folder


@pytest.fixture(scope="module")
def config(corpus):
    return tiny_training(corpus)


@pytest.fixture(scope="module")
def run(config, corpus):
    """An output folder of a run stopped after 2 steps (a checkpoint at step 2, validated)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        stop_at(monkeypatch, 2)
        trainer.train(config.replace(output_dir=str(corpus / "run")))
    return corpus / "run"


@pytest.fixture
def copied(run, tmp_path):
    """A copy of the run's latest checkpoint, alone in <tmp>/checkpoints, to damage."""
    source = ckpt.resolve(run / "checkpoints" / "latest")
    target = tmp_path / "checkpoints" / source.name
    shutil.copytree(source, target)
    return target


@pytest.fixture
def no_compiling(monkeypatch):
    """Fails a test that compiles a train step or a sampler."""
    monkeypatch.setattr(steps, "make_train_step", lambda *a: pytest.fail("compiled a train step"))
    monkeypatch.setattr(sampler_lib, "make_sampler", lambda *a: pytest.fail("compiled a sampler"))


@pytest.fixture
def no_data(monkeypatch):
    """Fails a test that loads data (for refusals that must come before it)."""
    monkeypatch.setattr(trainer, "load_library", lambda *a: pytest.fail("loaded the data"))


def one_line_exit(function, *args) -> str:
    """The one line `function(*args)` writes to stderr before exiting with code 2."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as stopped, contextlib.redirect_stderr(stderr):
        function(*args)
    lines = stderr.getvalue().strip().splitlines()
    assert stopped.value.code == 2, stderr.getvalue()
    assert len(lines) == 1, lines
    return lines[-1]


def train_refusal(config) -> str:
    return one_line_exit(trainer.main, config)


def flag_refusal(*argv) -> str:
    return one_line_exit(parse_flags, [str(a) for a in argv])


def generate_refusal(*argv) -> str:
    return one_line_exit(generation.main, [str(a) for a in argv])


def read_only(monkeypatch, folder):
    """Makes `folder` (created here) read-only; as root, whom permissions do not stop, writes into
    it fail as they would for anyone else."""
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):
        path_type = type(folder)

        def refuse(real):
            def write(self, *args, **kwargs):
                if folder in self.parents:
                    raise PermissionError(errno.EACCES, "Permission denied")
                return real(self, *args, **kwargs)

            return write

        monkeypatch.setattr(path_type, "mkdir", refuse(path_type.mkdir))
        monkeypatch.setattr(path_type, "write_bytes", refuse(path_type.write_bytes))


def damage_largest_file(checkpoint):
    victim = max(
        (p for p in (checkpoint / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return victim


# --- data loss: 1. NaN state, 3. two runs in one folder ---


def test_nan_weights_after_a_finite_loss_are_never_saved(config, tmp_path, monkeypatch):
    """The issue's case: an update that makes the weights non-finite while its loss (computed
    before the update) is finite. That state used to be saved as `latest`; now the save refuses
    it, the run stops with the advice, and latest and best restore to finite weights."""
    real = steps.make_train_step

    def make_train_step(graphdef, config, mesh):
        train_step, calls = real(graphdef, config, mesh), []

        def diverging(state, batch, key):
            calls.append(1)
            state, metrics = train_step(state, batch, key)
            if len(calls) == 2:
                state = dict(state, params=jax.tree.map(lambda p: p * jnp.inf, state["params"]))
            return state, metrics

        return diverging

    monkeypatch.setattr(steps, "make_train_step", make_train_step)
    out = tmp_path / "out"
    changes = dict(output_dir=str(out), checkpoint_every_n_steps=1, val_check_interval_steps=0)
    with pytest.raises(SystemExit) as stopped:
        trainer.train(config.replace(**changes))
    message = str(stopped.value.code)
    assert "the weights or optimizer state became NaN or inf by step 2" in message
    assert "the latest checkpoint is the last good one" in message
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_00000001"]
    target = steps.restore_target(config, sharding.make_mesh("1"))
    for pointer in ("latest", "best"):
        assert ckpt.is_finite(ckpt.restore(ckpt.resolve(out / "checkpoints" / pointer), target))


def test_generate_refuses_non_finite_weights(config, copied, tmp_path, no_compiling):
    """A checkpoint whose weights are NaN (as an older version could write) is refused by
    generate.py instead of writing empty MIDI."""
    state = ckpt.restore(copied, steps.restore_target(config, sharding.make_mesh("1")))
    poisoned = dict(state, ema=jax.tree.map(lambda p: p * jnp.nan, state["ema"]))
    shutil.rmtree(copied / "state")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(copied.absolute() / "state", poisoned)
    meta = json.loads((copied / "meta.json").read_text())
    (copied / "meta.json").write_text(json.dumps(dict(meta, files=ckpt.file_checksums(copied / "state"))))
    message = generate_refusal("--checkpoint", copied, "--output_dir", tmp_path / "out")
    assert message == (
        f"error: checkpoint {copied} holds NaN or inf weights (its training diverged): generate from an "
        "earlier one"
    )


def test_a_second_run_into_a_locked_folder_is_refused(config, tmp_path, no_data):
    """While a run holds the output folder, another is refused naming the holder's PID, before it
    loads anything; once the lock is released (as the OS does when a run dies), a run may start."""
    out = tmp_path / "out"
    out.mkdir()
    lock = RunLock(out)
    try:
        message = train_refusal(config.replace(output_dir=str(out)))
    finally:
        lock.release()
    assert message == (
        f"error: --output_dir {out} is in use by another training run (PID {os.getpid()}): wait for it to "
        "finish, or choose another --output_dir"
    )
    RunLock(out).release()


def test_fresh_run_into_a_folder_with_checkpoints_needs_overwrite(run, config, tmp_path, monkeypatch):
    """A fresh run into a folder with another run's checkpoints is refused with the three choices,
    before any data loads; --overwrite deletes them and starts afresh."""
    out = tmp_path / "out"
    shutil.copytree(run, out, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    latest = ckpt.resolve(out / "checkpoints" / "latest")
    with monkeypatch.context() as patched:
        patched.setattr(trainer, "load_library", lambda *a: pytest.fail("loaded the data"))
        message = train_refusal(config.replace(output_dir=str(out)))
    assert message == (
        f"error: --output_dir {out} already has checkpoints (latest {latest.name}): resume them with "
        f"--resume_from_checkpoint {out / 'checkpoints' / 'latest'}, choose another --output_dir, or pass "
        "--overwrite to delete them and start afresh"
    )
    assert latest.is_dir()
    stop_at(monkeypatch, 1)
    trainer.train(config.replace(output_dir=str(out), overwrite=True))
    assert [ckpt.read_meta(p)["step"] for p in ckpt.list_checkpoints(out / "checkpoints")] == [1]
    assert not latest.exists()


# --- also: a checkpoint's name carries its own step's validation loss ---


def test_checkpoint_name_carries_its_own_steps_validation_loss(config, tmp_path, monkeypatch, capsys):
    """Validation every 2 steps, a stop at step 3: the checkpoint of step 3 is validated at step 3
    (it used to carry step 2's loss, and top-k ranked on it)."""
    stop_at(monkeypatch, 3)
    trainer.train(config.replace(output_dir=str(tmp_path / "out"), checkpoint_every_n_steps=0))
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("validation at step 3:")]
    loss = float(line.split("loss ")[1].split()[0])
    latest = ckpt.resolve(tmp_path / "out" / "checkpoints" / "latest")
    assert latest.name == ckpt.checkpoint_name(3, loss)
    assert ckpt.read_meta(latest)["val_loss"] == pytest.approx(loss, abs=1e-4)


# --- one line, not a traceback: train.py ---


def resume_config(config, tmp_path, checkpoint):
    return config.replace(output_dir=str(tmp_path / "new"), resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize("kind", ["missing", "empty folder", "not a checkpoint"])
def test_resume_from_no_checkpoint(config, tmp_path, no_data, no_compiling, kind):
    """A missing folder, an empty one or one without a checkpoint: one line, nothing written."""
    path = tmp_path / "given"
    if kind != "missing":
        path.mkdir()
    if kind == "not a checkpoint":
        (path / "notes.txt").write_text("hello")
    message = train_refusal(resume_config(config, tmp_path, path))
    assert message.startswith(f"error: no checkpoint at {path}: expected a folder with state/ and meta.json")
    assert not (tmp_path / "new").exists()


def test_resume_with_another_architecture(run, config, tmp_path, no_data, no_compiling):
    """Another architecture: one line naming the field, before the data loads."""
    latest = run / "checkpoints" / "latest"
    message = train_refusal(resume_config(config, tmp_path, latest).replace(embed_dim_list=(48, 16, 16, 8)))
    assert "has another architecture: embed_dim_list is [32, 16, 16, 8] there" in message
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("content", ["", "{garbage", '{"step": 2}'])
def test_resume_with_garbage_or_empty_meta_json(config, copied, tmp_path, no_data, no_compiling, content):
    """An empty, garbage or step-only meta.json: one line naming it, before the data loads."""
    (copied / "meta.json").write_text(content)
    message = train_refusal(resume_config(config, tmp_path, copied))
    assert message.startswith(f"error: {copied / 'meta.json'} ") and "damaged" in message
    assert not (tmp_path / "new").exists()


def test_resume_with_truncated_arrays(config, copied, tmp_path, no_compiling):
    """A truncated array file is refused on restore, naming it (no intact checkpoint beside it)."""
    victim = damage_largest_file(copied)
    message = train_refusal(resume_config(config, tmp_path, copied))
    assert message == (
        f"error: checkpoint {copied} is damaged: {victim} does not match the checksum it was saved with "
        f"(changed or truncated since); no intact checkpoint is left in {copied.parent}"
    )
    assert not (tmp_path / "new" / "checkpoints").exists()


@pytest.mark.parametrize("devices", ["9", "0,8"])
def test_devices_that_do_not_exist(config, tmp_path, no_data, no_compiling, devices):
    """8 simulated devices here: --devices 9 or index 8 is refused before the data loads."""
    message = train_refusal(config.replace(devices=devices, output_dir=str(tmp_path / "out")))
    assert message == f"error: --devices {devices}: only 8 device(s) here (cpu)"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--devices", "0,0"], "devices='0,0'; use 'all', a count like 2, or distinct indices like 0,1"),
        (["--seed", "-1"], "seed=-1 must not be negative"),
        (["--pitch_shift_max", "200"], "pitch_shift_max=200 shifts every note off the 128 pitches"),
        (["--pitch_shift_min", "-128"], "pitch_shift_min=-128 shifts every note off the 128 pitches"),
        (["--lr", "nan"], "lr=nan must be a finite number"),
        (["--lr", "inf"], "lr=inf must be a finite number"),
        (["--grad_clip", "nan"], "grad_clip=nan must be a finite number"),
        (["--mask_ratio_loc", "5"], "mask_ratio_loc=5.0 must be in (0, 1]"),
    ],
)
def test_values_that_mean_nothing_are_refused(flags, named):
    """Values accepted before and meaningless: one line naming the field and the range."""
    assert f"invalid config: {named}" in flag_refusal(*flags)


@pytest.mark.parametrize("kind", ["a file", "under a file", "not writable"])
def test_unusable_output_dir(config, tmp_path, no_data, no_compiling, monkeypatch, kind):
    """An output folder that is a file, lies under one or cannot be written is refused before the
    data loads."""
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = {"a file": blocker, "under a file": blocker / "out", "not writable": tmp_path / "ro" / "out"}[kind]
    if kind == "not writable":
        read_only(monkeypatch, tmp_path / "ro")
    message = train_refusal(config.replace(output_dir=str(out)))
    assert (
        message
        == {
            "a file": f"error: --output_dir {out} is a file: choose a folder",
            "under a file": f"error: --output_dir {out} lies under {blocker}, which is a file: choose a folder",
            "not writable": f"error: --output_dir {out} is not writable (Permission denied): choose another "
            "folder or fix its permissions",
        }[kind]
    )


def test_full_disk_names_the_folder_and_keeps_the_last_checkpoint(config, tmp_path, monkeypatch):
    """The disk filling up during the second checkpoint ends the run with one line naming the
    folder and the free space; the first checkpoint stays intact and `latest`."""
    real, calls = ckpt.file_checksums, []

    def filling_up(state_dir):
        calls.append(state_dir)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state_dir)

    monkeypatch.setattr(ckpt, "file_checksums", filling_up)
    out = tmp_path / "out"
    changes = dict(output_dir=str(out), checkpoint_every_n_steps=1, val_check_interval_steps=0)
    message = train_refusal(config.replace(**changes))
    checkpoints = out.absolute() / "checkpoints"
    assert message.startswith(f"error: the disk is full writing {checkpoints / 'step_00000002'} (")
    assert message.endswith(
        f" MiB free); the last complete checkpoint {checkpoints / 'step_00000001'} is intact: free space, "
        "then resume"
    )
    assert ckpt.resolve(checkpoints / "latest").name == "step_00000001"
    assert not (checkpoints / "step_00000002").exists()


# --- one line, not a traceback: generate.py ---


@pytest.mark.parametrize("content", ["", "{garbage"])
def test_generate_with_garbage_meta_json(copied, tmp_path, no_compiling, content):
    """generate.py with an empty or garbage meta.json: one line, nothing written."""
    (copied / "meta.json").write_text(content)
    message = generate_refusal("--checkpoint", copied, "--output_dir", tmp_path / "out")
    assert message.startswith(f"error: {copied / 'meta.json'} is unreadable")
    assert not (tmp_path / "out").exists()


def test_generate_with_truncated_arrays(copied, tmp_path, no_compiling):
    """generate.py with a truncated array file: one line naming it."""
    victim = damage_largest_file(copied)
    message = generate_refusal("--checkpoint", copied, "--output_dir", tmp_path / "out")
    assert message.startswith(f"error: checkpoint {copied} is damaged: {victim} does not match the checksum")


@pytest.mark.parametrize("kind", ["a file", "not writable"])
def test_generate_into_an_unusable_output_dir(run, tmp_path, no_compiling, monkeypatch, kind):
    """generate.py into a file or a read-only folder: one line, before compiling."""
    out = tmp_path / "out"
    if kind == "a file":
        out.write_text("x")
    else:
        read_only(monkeypatch, out)
    message = generate_refusal("--checkpoint", run / "checkpoints" / "latest", "--output_dir", out)
    assert (
        message
        == {
            "a file": f"error: --output_dir {out} is a file: choose a folder",
            "not writable": f"error: --output_dir {out} is not writable (Permission denied): choose another "
            "folder or fix its permissions",
        }[kind]
    )


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--temperature", "0"], "--temperature 0.0 must be a positive number"),
        (["--temperature", "-1"], "--temperature -1.0 must be a positive number"),
        (["--temperature", "nan"], "--temperature nan must be a positive number"),
        (["--min_p", "1"], "--min_p 1.0 must be in [0, 1) (0 = off)"),
        (["--min_p", "-0.1"], "--min_p -0.1 must be in [0, 1) (0 = off)"),
        (
            ["--num_iter_list", "0", "8", "4", "1"],
            "--num_iter_list 0 8 4 1: every level needs at least 1 round",
        ),
    ],
)
def test_generate_settings_that_were_clamped_are_refused(run, tmp_path, no_compiling, flags, named):
    """Temperatures <= 0 (or nan) and levels of 0 rounds were silently clamped; now refused."""
    latest = run / "checkpoints" / "latest"
    assert named in generate_refusal("--checkpoint", latest, "--output_dir", tmp_path, *flags)
