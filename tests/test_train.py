"""Training end to end on a tiny model (CPU): sharded steps on 8 devices against 1, exact resume,
fine-tuning, refusals, NaN and signal stops, TensorBoard logs and the optimizer.

The training runs share one config (one device, a global batch of 8, max_steps large so that
the learning-rate schedule, and with it the compiled program, is always the same) and are
stopped by a SIGTERM at a chosen step, the preemption path. A persistent compilation cache
shares the compiled programs between runs, test modules and subprocesses.
"""

import os
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from tiny import sparse_rolls, stop_at, tiny_training, write_song

from fractalmidi_jax import checkpoint as ckpt
from fractalmidi_jax import optim, sharding, steps, trainer
from fractalmidi_jax.config import Config, save_yaml

REPO = Path(__file__).resolve().parents[1]
N = 3  # optimizer steps before the resume

pytestmark = pytest.mark.usefixtures("compilation_cache")


# --- helpers ---


def saved_state(path, config: Config) -> dict:
    """The state of a checkpoint (folder, latest, best...) as numpy arrays."""
    target = steps.restore_target(config, sharding.make_mesh("1"))
    return jax.device_get(ckpt.restore(ckpt.resolve(path), target))


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def assert_states_close(a, b, lr: float) -> None:
    """Train states alike to float rounding. AdamW's first steps move a weight by about lr
    whatever its gradient's size, so a gradient at rounding level, summed in another order (over
    8 devices, or in a scan), moves it by a different fraction of that (one of 48 entries was
    1.1e-6 off in CI): weights are compared to 1% of lr."""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=0.01 * lr, err_msg=jax.tree_util.keystr(path))


def read_events(log_dir: Path) -> tuple[dict[str, dict[int, float]], set[str]]:
    """(scalars by tag and step, image and audio tags) of a TensorBoard log folder (TFRecord
    framing); text and HParams entries are left out (tests/test_writer.py reads those)."""
    from tensorboardX.proto import event_pb2

    scalars, images = {}, set()
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        raw, pos = path.read_bytes(), 0
        while pos < len(raw):
            (length,) = struct.unpack_from("<Q", raw, pos)
            event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.WhichOneof("value") in ("image", "audio"):
                    images.add(value.tag)
                elif value.WhichOneof("value") == "simple_value":
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars, images


def cache_env(directory: Path) -> dict:
    return {"JAX_COMPILATION_CACHE_DIR": str(directory), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


# --- fixtures ---


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder with songs/ (four small MIDI files) and cache/."""
    folder = tmp_path_factory.mktemp("corpus")
    for k in range(4):
        write_song(folder / "songs" / f"song_{k}.mid", seed=k)
    return folder


@pytest.fixture(scope="module")
def config(corpus) -> Config:
    return tiny_training(corpus)


@pytest.fixture(scope="module")
def runs(config, tmp_path_factory) -> Path:
    """full/: 2N steps in one run (with images); split/: N steps, stopped, then resumed for N more."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        stop_at(monkeypatch, 2 * N)
        trainer.train(config.replace(output_dir=str(root / "full"), log_images_every_n_steps=2 * N))
        stop_at(monkeypatch, N)
        trainer.train(config.replace(output_dir=str(root / "split")))
        stop_at(monkeypatch, 2 * N)
        latest = root / "split" / "checkpoints" / "latest"
        trainer.train(config.replace(output_dir=str(root / "split"), resume_from_checkpoint=str(latest)))
    return root


# --- sharding ---


# With fused_attention levels 0 and 1 run their attention in short_attention's kernels (level 2's
# heads of 8 run XLA's: a cheaper test), split over the devices by shard_map (with dropout on, so
# its masks must agree too).
FUSED = dict(fused_attention="always", embed_dim_list=(32, 32, 16, 16), attn_dropout=0.1)


@pytest.mark.parametrize("changes", [{}, FUSED], ids=["xla_attention", "fused_attention"])
def test_train_and_eval_steps_agree_on_8_devices_and_1(config, changes):
    """The same global batch, state and key give the same losses, metrics, updated weights,
    optimizer state and validation sums on a mesh of 8 devices as on one device."""
    config = config.replace(**changes).validate()
    graphdef, fresh = steps.init_state(config)
    fresh = jax.device_get(fresh)
    rng = np.random.default_rng(0)
    shape = (config.train_batch_size, 128, config.crop_length)
    roll = sparse_rolls(rng, shape)
    weight = (np.arange(len(roll)) < 6).astype(np.float32)  # the last two are padding
    key = jax.random.key(7)
    results = {}
    for spec in ("all", "1"):
        mesh = sharding.make_mesh(spec)
        train_step = steps.make_train_step(graphdef, config, mesh)
        eval_step = steps.make_eval_step(graphdef, config, mesh)
        batch = sharding.global_batch(mesh, {"roll": roll, "weight": weight})
        state, metrics = steps.place_state(fresh, mesh), []
        for _ in range(2):  # the first update has learning rate 0 (warmup), the second does not
            state, step_metrics = train_step(state, {"roll": batch["roll"]}, key)
            metrics.append(step_metrics)
        sums = eval_step(steps.eval_params(state), batch, key)
        results[mesh.devices.size] = jax.device_get((state, metrics, sums))
    assert set(results) == {8, 1}
    (state8, metrics8, sums8), (state1, metrics1, sums1) = results[8], results[1]
    assert metrics8[1]["lr"] > 0
    for m8, m1 in zip(metrics8, metrics1):
        assert m8.keys() == m1.keys()
        for name in m8:
            np.testing.assert_allclose(m8[name], m1[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(state8["params"]["head"]["bias"], fresh["params"]["head"]["bias"])
    assert_states_close(state8, state1, config.lr)
    np.testing.assert_allclose(sums8, sums1, rtol=1e-5)


def test_several_steps_per_call_update_as_single_steps_do(config):
    """With steps_per_call 2 one call (a lax.scan over 2 stacked micro-batches, split over 8
    devices) gives the states and metrics of 2 single-step calls."""
    graphdef, fresh = steps.init_state(config)
    fresh = jax.device_get(fresh)
    rng = np.random.default_rng(1)
    shape = (2, config.train_batch_size, 128, config.crop_length)
    rolls = sparse_rolls(rng, shape)
    key = jax.random.key(3)
    mesh = sharding.make_mesh("all")
    single = steps.make_train_step(graphdef, config, mesh)
    state, metrics = steps.place_state(fresh, mesh), []
    for roll in rolls:
        state, step_metrics = single(state, sharding.global_batch(mesh, {"roll": roll}), key)
        metrics.append(step_metrics)
    want = jax.device_get((state, metrics))
    scanned = steps.make_train_step(graphdef, config, mesh, steps_per_call=2)
    stacked = jax.device_put({"roll": rolls}, sharding.batch_sharding(mesh, stacked=True))
    state2, metrics2 = jax.device_get(scanned(steps.place_state(fresh, mesh), stacked, key))
    assert int(state2["step"]) == 2
    for name, values in metrics2.items():
        np.testing.assert_allclose(values, [m[name] for m in want[1]], rtol=1e-5, atol=1e-6, err_msg=name)
    assert_states_close(state2, want[0], config.lr)


def test_a_new_batch_key_reaches_the_loss_through_the_sharded_train_step(config, monkeypatch):
    """A new per-sample input needs the loader and the loss only: a batch with an extra key goes
    through the 8-device train step as it is, the loss sees the key's global values, and the
    roll's loss is the same as without the key."""
    real_loss = steps.fractal_loss

    def loss_reading_an_instrument(model, config, batch, rng, train):
        loss, stats = real_loss(model, config, batch, rng, train)
        if "instrument" in batch:
            stats = dict(stats, instrument_sum=jnp.sum(batch["instrument"]))
        return loss, stats

    monkeypatch.setattr(steps, "fractal_loss", loss_reading_an_instrument)
    graphdef, fresh = steps.init_state(config)
    fresh = jax.device_get(fresh)
    mesh = sharding.make_mesh("all")
    train_step = steps.make_train_step(graphdef, config, mesh)
    rng = np.random.default_rng(1)
    shape = (config.train_batch_size, 128, config.crop_length)
    roll = sparse_rolls(rng, shape)
    instrument = rng.integers(0, 128, config.train_batch_size).astype(np.int32)
    metrics = {}
    for local in ({"roll": roll}, {"roll": roll, "instrument": instrument}):
        batch = sharding.global_batch(mesh, local)
        _, step_metrics = train_step(steps.place_state(fresh, mesh), batch, jax.random.key(7))
        metrics[len(local)] = jax.device_get(step_metrics)
    without, with_instrument = metrics[1], metrics[2]
    assert with_instrument.pop("instrument_sum") == instrument.sum()
    assert with_instrument.keys() == without.keys()
    for name in without:
        np.testing.assert_array_equal(with_instrument[name], without[name], err_msg=name)


# --- resume, fine-tune, refusals ---


def test_resume_is_exact(runs, config):
    """N steps, a stop and a resume for N more end with the same weights, EMA, optimizer state
    and data position as 2N steps in one run, after logging the same losses."""
    full, split = runs / "full", runs / "split"
    latest_full = ckpt.resolve(full / "checkpoints" / "latest")
    latest_split = ckpt.resolve(split / "checkpoints" / "latest")
    assert latest_full.name.startswith(f"step_{2 * N:08d}")
    assert latest_split.name.startswith(f"step_{2 * N:08d}")
    resumed_from = Path(ckpt.read_meta(latest_split)["resumed_from"]).name
    assert resumed_from.startswith(f"step_{N:08d}"), resumed_from
    state_full, state_split = saved_state(latest_full, config), saved_state(latest_split, config)
    assert int(state_full["step"]) == 2 * N
    assert {"params", "ema", "opt_state", "step", "nonfinite"} <= state_full.keys()
    assert_trees_equal(state_full, state_split)

    (full_scalars, _), first, second = (
        read_events(full / "logs" / "version_0"),
        read_events(split / "logs" / "version_0")[0],
        read_events(split / "logs" / "version_1")[0],
    )
    assert sorted(first["train/loss"]) == list(range(1, N + 1))
    assert sorted(second["train/loss"]) == list(range(N + 1, 2 * N + 1))
    for tag in ("train/loss", "train/grad_norm", "train/lr"):
        assert full_scalars[tag] == {**first[tag], **second[tag]}, tag
    split_val = {**first["val/loss"], **second["val/loss"]}  # plus step N's, validated for its checkpoint
    assert sorted(split_val) == sorted([*full_scalars["val/loss"], N])
    assert full_scalars["val/loss"] == {s: v for s, v in split_val.items() if s != N}


def test_resume_is_exact_with_gradient_accumulation(config, tmp_path, monkeypatch):
    """With accumulate_grad_batches=2 (optax.MultiSteps) a stop asked for in the middle of an
    update takes effect at its end, and resuming from there ends exactly like one run."""
    accumulating = config.replace(accumulate_grad_batches=2, train_batch_size=4)
    stop_at(monkeypatch, 6)  # micro-batch 6 ends update 3
    trainer.train(accumulating.replace(output_dir=str(tmp_path / "full")))
    stop_at(monkeypatch, 3)  # micro-batch 3 starts update 2: the run stops after micro-batch 4
    trainer.train(accumulating.replace(output_dir=str(tmp_path / "split")))
    stopped = ckpt.read_meta(ckpt.resolve(tmp_path / "split" / "checkpoints" / "latest"))
    assert (stopped["micro_step"], stopped["step"]) == (4, 2)
    stop_at(monkeypatch, 6)
    latest = tmp_path / "split" / "checkpoints" / "latest"
    trainer.train(
        accumulating.replace(output_dir=str(tmp_path / "split"), resume_from_checkpoint=str(latest))
    )

    state_full = saved_state(tmp_path / "full" / "checkpoints" / "latest", accumulating)
    state_split = saved_state(latest, accumulating)
    assert int(state_full["step"]) == 6
    assert_trees_equal(state_full, state_split)
    full = read_events(tmp_path / "full" / "logs" / "version_0")[0]["train/loss"]
    first = read_events(tmp_path / "split" / "logs" / "version_0")[0]["train/loss"]
    second = read_events(tmp_path / "split" / "logs" / "version_1")[0]["train/loss"]
    assert sorted(full) == [1, 2, 3] and sorted(first) == [1, 2]
    assert full == {**first, **second}


def test_tensorboard_logs(runs, config):
    """Each run logs to a new logs/version_N with its hparams.yaml, training scalars, the
    validation loss, and piano-roll images only when log_images_every_n_steps asks."""
    logs = runs / "split" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["version_0", "version_1"]
    for version in ("version_0", "version_1"):
        hparams = yaml.safe_load((logs / version / "hparams.yaml").read_text())
        assert hparams["embed_dim_list"] == list(config.embed_dim_list)
    assert yaml.safe_load((logs / "version_1" / "hparams.yaml").read_text())["resume_from_checkpoint"]
    scalars, images = read_events(logs / "version_0")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "val/loss"} <= scalars.keys()
    assert sorted(scalars["val/loss"]) == [2, 3]  # every 2 steps, and at the stop's checkpoint
    assert all(np.isfinite(v) for v in scalars["train/loss"].values())
    assert images == set()
    _, images = read_events(runs / "full" / "logs" / "version_0")
    sounds = {f"samples/generated_{k}" for k in range(trainer.NUM_IMAGE_SAMPLES)}
    assert images == {"samples/generated", "samples/validation"} | sounds


def test_fine_tune_at_another_crop_length(runs, config, capsys):
    """Resuming a crop_length 32 checkpoint at crop_length 64 restores weights and EMA only
    (optimizer, schedule and data stream start at step 0), says so, and trains."""
    source = runs / "full" / "checkpoints" / "latest"
    saved = saved_state(source, config)
    tuned = config.replace(
        crop_length=64,
        resume_from_checkpoint=str(source),
        output_dir=str(runs / "tuned"),
        max_steps=1,
        val_data="",
    )
    _, state, restored_from = trainer.initial_state(tuned, sharding.make_mesh("1"))
    state = jax.device_get(state)
    assert restored_from == ckpt.resolve(source)
    assert int(state["step"]) == 0
    assert_trees_equal(state["params"], saved["params"])
    assert_trees_equal(state["ema"], saved["ema"])
    assert not np.array_equal(saved["ema"]["head"]["bias"], saved["params"]["head"]["bias"])
    fresh_opt_state = jax.device_get(steps.init_state(tuned)[1]["opt_state"])
    assert_trees_equal(state["opt_state"], fresh_opt_state)
    capsys.readouterr()

    trainer.train(tuned)
    out = capsys.readouterr().out
    assert "fine-tuning from" in out and "restored weights and EMA" in out
    assert "step 1/1 " in out
    (only,) = ckpt.list_checkpoints(runs / "tuned" / "checkpoints")
    assert only.name == "step_00000001"
    assert ckpt.read_meta(only)["config"]["crop_length"] == 64


@pytest.mark.parametrize("crop_length", [32, 64])
def test_resume_without_ema_into_a_run_with_ema(config, tmp_path, monkeypatch, crop_length):
    """A checkpoint saved with the EMA off resumes (exactly, or as a fine-tune) into a run with it
    on: the EMA starts as a copy of the weights, not the same buffers (the donating step would
    refuse those), and training goes on."""
    stop_at(monkeypatch, 1)
    trainer.train(config.replace(output_dir=str(tmp_path / "plain"), ema_decay=0.0, val_data=""))
    latest = tmp_path / "plain" / "checkpoints" / "latest"
    resumed = config.replace(
        output_dir=str(tmp_path / "ema"),
        crop_length=crop_length,
        resume_from_checkpoint=str(latest),
        val_data="",
    )
    stop_at(monkeypatch, 2)
    trainer.train(resumed)
    state = saved_state(tmp_path / "ema" / "checkpoints" / "latest", resumed)
    assert int(state["step"]) == 2
    assert not np.array_equal(state["ema"]["head"]["bias"], state["params"]["head"]["bias"])


@pytest.mark.parametrize(
    ("field", "value"), [("embed_dim_list", (48, 16, 16, 8)), ("scan_order", "column_major")]
)
def test_resume_with_another_architecture_is_refused(runs, config, monkeypatch, field, value):
    """A checkpoint of another architecture is refused before compiling, naming the field."""
    monkeypatch.setattr(steps, "make_train_step", lambda *a: pytest.fail("compiled a train step"))
    source = runs / "full" / "checkpoints" / "latest"
    changed = config.replace(
        **{field: value}, resume_from_checkpoint=str(source), output_dir=str(runs / "refused")
    )
    with pytest.raises(ckpt.CheckpointError, match=f"another architecture: {field} is"):
        trainer.train(changed)
    assert not (runs / "refused" / "checkpoints").exists()


def test_no_usable_training_file_stops_before_compiling(tmp_path, monkeypatch):
    """A training folder of broken MIDI files stops with an error naming the problem before a
    model is built or compiled."""
    for k in range(2):
        (tmp_path / "songs").mkdir(exist_ok=True)
        (tmp_path / "songs" / f"broken_{k}.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01")
    monkeypatch.setattr(steps, "init_state", lambda *a: pytest.fail("built a model"))
    monkeypatch.setattr(steps, "make_train_step", lambda *a: pytest.fail("compiled a train step"))
    config = tiny_training(tmp_path, output_dir=str(tmp_path / "out"))
    with pytest.raises(
        ValueError, match=r"no usable MIDI file in .*songs.*2 files listed: 0 loaded.*2 skipped"
    ):
        trainer.train(config)
    assert not (tmp_path / "out" / "checkpoints").exists()


# --- stops ---


def test_nan_loss_stops_without_saving(config, tmp_path, monkeypatch):
    """Weights poisoned before step 2 (as an overflow would) stop the run with the advice message
    when the checkpoint due at step 2 finds them non-finite; it is not written, so `latest` stays
    at the last good one (step 1)."""
    real = steps.make_train_step

    def make_train_step(graphdef, config, mesh):
        train_step, calls = real(graphdef, config, mesh), []

        def poisoned(state, batch, key):
            calls.append(1)
            if len(calls) == 2:
                state = dict(state, params=jax.tree.map(lambda p: p * jnp.nan, state["params"]))
            return train_step(state, batch, key)

        return poisoned

    monkeypatch.setattr(steps, "make_train_step", make_train_step)
    out = tmp_path / "out"
    changes = dict(log_every_n_steps=3, checkpoint_every_n_steps=1, val_check_interval_steps=0)
    with pytest.raises(SystemExit) as stopped:
        trainer.train(config.replace(output_dir=str(out), **changes))
    message = str(stopped.value.code)
    assert "the weights or optimizer state became NaN or inf by step 2" in message
    assert "the latest checkpoint is the last good one" in message and "--lr" in message
    assert [ckpt.read_meta(p)["step"] for p in ckpt.list_checkpoints(out / "checkpoints")] == [1]
    assert ckpt.resolve(out / "checkpoints" / "latest").name == "step_00000001"
    assert not bool(saved_state(out / "checkpoints" / "latest", config)["nonfinite"])


def test_sigterm_saves_a_checkpoint_and_exits_0(config, tmp_path, compilation_cache):
    """train.py in a subprocess: a SIGTERM after the first logged step makes it finish the step,
    save a checkpoint (meta.json, `latest`) and exit with code 0."""
    out = tmp_path / "out"
    config_file = tmp_path / "tiny.yaml"
    save_yaml(config.replace(output_dir=str(out)), config_file)
    command = [sys.executable, "train.py", "--config", str(config_file)]
    env = {**os.environ, **cache_env(compilation_cache)}
    lines = []
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        watchdog = threading.Timer(300, process.kill)  # a hang fails the test instead of blocking it
        watchdog.start()
        try:
            for line in process.stdout:
                lines.append(line)
                if line.startswith("step 1/1000 "):
                    process.send_signal(signal.SIGTERM)
            code = process.wait()
        finally:
            watchdog.cancel()
            process.kill()
    output = "".join(lines)
    assert code == 0, output[-3000:]
    assert "stopping at step" in output and "SIGTERM" in output, output[-3000:]
    latest = ckpt.resolve(out / "checkpoints" / "latest")
    meta = ckpt.read_meta(latest)
    assert 1 <= meta["step"] < 1000
    assert latest.name.startswith(f"step_{meta['step']:08d}")


def test_second_signal_interrupts_at_once():
    """A first SIGINT only asks the loop to stop; a second signal raises KeyboardInterrupt at
    once and gives the previous handlers back."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop = trainer.StopRequest()
    try:
        assert getattr(signal.getsignal(signal.SIGINT), "__self__", None) is stop
        signal.raise_signal(signal.SIGINT)
        assert stop.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        stop.restore()


# --- optimizer ---


def test_weight_decay_only_on_dense_kernels(config):
    """decay_mask is True exactly for dense kernels; with zero gradients, AdamW moves only them."""
    params = jax.device_get(steps.init_state(config)[1]["params"])
    mask = optim.decay_mask(params)
    decayed = []
    for (path, leaf), masked in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(mask)):
        is_kernel = path[-1].key == "kernel"
        assert masked == is_kernel, jax.tree_util.keystr(path)
        assert not is_kernel or leaf.ndim >= 2
        decayed.append(masked)
    assert 0 < sum(decayed) < len(decayed)

    optimizer = optim.make_optimizer(config.replace(warmup_steps=0, weight_decay=0.5))
    ones, zeros = jax.tree.map(np.ones_like, params), jax.tree.map(np.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(ones), ones)
    for (path, update), masked in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(mask)):
        assert bool(np.any(np.asarray(update) != 0)) == masked, jax.tree_util.keystr(path)


def test_learning_rate_schedule(config):
    """Linear warmup from 0 to lr at warmup_steps, then a cosine down to 0 at max_steps."""
    schedule = optim.learning_rate(config.replace(lr=2e-3, warmup_steps=10, max_steps=100))
    values = np.array([float(schedule(s)) for s in range(101)])
    assert values[0] == 0.0
    np.testing.assert_allclose(values[5], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(values[10], 2e-3, rtol=1e-6)
    assert values.max() == values[10]
    assert np.all(np.diff(values[10:]) < 0)
    np.testing.assert_allclose(values[55], 1e-3, rtol=1e-4)
    assert values[100] == pytest.approx(0.0, abs=1e-12)
