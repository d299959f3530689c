"""The training loop, top to bottom:

1. Data: parse (or load from cache) the training and validation files; a list with no usable
   file stops here, before anything compiles.
2. Mesh and state: a mesh over the chosen devices; a fresh state, an exact resume, or a
   fine-tune (another crop_length: weights and EMA only).
3. Jitted steps, the TensorBoard writer and the checkpoint manager.
4. The loop: dispatch step s + 1 before reading step s's metrics; pull scalars only when
   logging; validate, log images and checkpoint on their schedules; stop cleanly on
   SIGINT/SIGTERM or the time limit (saving a checkpoint), or with a clear message on a
   non-finite loss or state (saving nothing, so the last good checkpoint stays the latest).
   Several processes decide to stop together, at logging and checkpoint steps, so all of
   them stop at one step and save one checkpoint.

Before any of it, on process 0: the output folder is checked (writable, not a file), locked
for this run, and a fresh run into a folder that already has checkpoints is refused unless
--overwrite. `main` turns every such refusal into one line and exit code 2.
"""

import contextlib
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from fractalmidi_jax import checkpoint as ckpt
from fractalmidi_jax import data, midi, progress, render, sharding, steps
from fractalmidi_jax import library as rolls
from fractalmidi_jax import roll as roll_lib
from fractalmidi_jax import sampler as sampler_lib
from fractalmidi_jax.config import Config, save_yaml
from fractalmidi_jax.fractal import train_flops_per_sample
from fractalmidi_jax.head import Sampling
from fractalmidi_jax.output_dir import OutputDirError, RunLock, check_writable
from fractalmidi_jax.writer import Writer

ARCHITECTURE_FIELDS = (
    "roll",
    "border_context",
    "partial_known",
    "skip_empty",
    "img_size_list",
    "embed_dim_list",
    "num_blocks_list",
    "num_heads_list",
    "generator_types",
    "scan_order",
    "max_crop_length",
    "conditions",
)
NUM_IMAGE_SAMPLES = 4
NONFINITE_ADVICE = (
    "nothing was saved after it, so the latest checkpoint is the last good one. Try a lower --lr, a "
    "longer --warmup_steps, --grad_clip, or --precision 32."
)
IMAGE_SCALE = 2  # pixels per cell in TensorBoard pictures: a 128 x 128 crop is 256 x 256
AUDIO_SAMPLE_RATE = 16000  # enough for piano, small in the event file
OOM_ADVICE = (
    "out of device memory. Remedies (the guide's): a smaller --train_batch_size (with "
    "--accumulate_grad_batches to keep the effective batch), --grad_checkpoint, --precision bf16, "
    "or a shorter --crop_length."
)


class RunError(ValueError):
    """A run that cannot start as configured; the message says what to change."""


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def resolve_data(spec: str, split: str) -> str:
    """'bach' -> the built-in corpus' list (prepared on first use); anything else as given."""
    if spec != "bach":
        return spec
    from fractalmidi_jax.corpus import prepare_bach_corpus

    return str(prepare_bach_corpus() / f"{split}.txt")


def load_library(spec: str, split: str, config: Config) -> rolls.RollLibrary:
    options = midi.ReadOptions(include_drums=config.include_drums, sustain_pedal=config.sustain_pedal)
    try:
        library = rolls.RollLibrary(
            resolve_data(spec, split),
            options,
            config.roll,
            cache_dir=config.cache_dir or None,
            cache_in_memory=config.cache_in_memory,
            num_workers=min(os.cpu_count() or 1, 8),
        )
    except (OSError, ValueError) as error:
        raise RunError(f"{split} data: {error}") from None
    log(f"{split} data: {library.summary()}")
    return library


def _check_architecture(saved: dict, config: Config, path: Path) -> None:
    for name in ARCHITECTURE_FIELDS:
        here = config.to_dict()[name]
        if saved.get(name) != here:
            raise ckpt.CheckpointError(
                f"checkpoint {path} has another architecture: {name} is {saved.get(name)} there and {here} "
                "here. Pass the checkpoint's model settings (its hparams are in meta.json) or train anew."
            )


def resume_source(config: Config) -> tuple[Path, dict, dict] | None:
    """(path, meta, saved config) of the checkpoint to resume from, checked to fit this model;
    None for a fresh run. Cheap: the arrays are checked when they are restored."""
    if not config.resume_from_checkpoint:
        return None
    path = ckpt.resolve(config.resume_from_checkpoint)
    meta, saved_config = ckpt.read_meta(path), ckpt.read_config(path)
    _check_architecture(saved_config, config, path)
    return path, meta, saved_config


def initial_state(config: Config, mesh):
    """(graphdef, state placed on the mesh, restored-from path or None)."""
    graphdef, fresh = steps.init_state(config)
    source = resume_source(config)
    if source is None:
        return graphdef, steps.place_state(fresh, mesh), None
    path, meta, saved_config = source
    saved_ema = saved_config.get("ema_decay", 0) > 0
    target = steps.restore_target(config.replace(ema_decay=config.ema_decay if saved_ema else 0.0), mesh)
    restored = ckpt.restore(path, target)
    if saved_config.get("crop_length") == config.crop_length:
        if "ema" not in fresh:
            restored.pop("ema", None)
        elif "ema" not in restored:
            restored["ema"] = jax.tree.map(jnp.copy, restored["params"])
        log(f"resuming exactly from {path} (step {meta['step']}): weights, EMA, optimizer, data position")
        return graphdef, restored, path
    fresh = steps.place_state(fresh, mesh)
    fresh["params"] = restored["params"]
    if "ema" in fresh:
        fresh["ema"] = jax.tree.map(jnp.copy, restored.get("ema", restored["params"]))
    log(
        f"fine-tuning from {path} (step {meta['step']}, trained on crop_length {saved_config.get('crop_length')}) "
        f"at crop_length {config.crop_length}: restored weights and EMA; optimizer, learning-rate schedule and "
        "data stream start at step 0"
    )
    return graphdef, fresh, path


class StopRequest:
    """SIGINT/SIGTERM set a flag: the loop saves a checkpoint and exits. A second signal stops at once."""

    def __init__(self):
        self.reason = ""
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.reason:
            self.restore()
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Progress:
    """One line, rewritten in place on a terminal: optimizer step (as TensorBoard counts them, so
    with --accumulate_grad_batches k one step is k batches), loss, steps/s, time left."""

    def __init__(self, total: int, start: int):
        self.total, self.start_step, self.start_time = total, start, time.perf_counter()
        self.interactive = sys.stdout.isatty()

    def update(self, step: int, loss: float) -> None:
        elapsed = time.perf_counter() - self.start_time
        rate = (step - self.start_step) / max(elapsed, 1e-9)
        left = (self.total - step) / rate if rate > 0 else float("inf")
        line = f"step {step}/{self.total}  loss {loss:.4f}  {rate:.2f} steps/s  {_duration(left)} left"
        if jax.process_index() == 0:
            print(
                f"\r{line}   " if self.interactive else line, end="" if self.interactive else "\n", flush=True
            )

    def newline(self) -> None:
        if self.interactive and jax.process_index() == 0:
            print(flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def _mean_metrics(pending: list[dict]) -> dict:
    fetched = jax.device_get(pending)
    return {name: float(np.mean([m[name] for m in fetched])) for name in fetched[0]}


def validate(eval_step, params, batches, mesh, seed: int, limit: int) -> float:
    """NLL estimate in nats per cell over the fixed validation crops (the same masks every time)."""
    total = cells = 0.0
    key = jax.random.key(seed + 1)
    chosen = batches[:limit] if limit else batches
    for i, batch in enumerate(progress.track(chosen, "validating", len(chosen))):
        placed = sharding.global_batch(mesh, batch)
        loss_sum, reached = eval_step(params, placed, jax.random.fold_in(key, i))
        total, cells = total + float(loss_sum), cells + float(reached)
    return total / cells


def log_images(writer: Writer, step: int, config: Config, params, val_crops, val_bar_lines) -> None:
    """Pictures of generated samples (4/4) and validation crops (their pieces' bar lines), two
    pixels a cell, and each generated sample's sound (FluidSynth if installed, else pretty_midi's
    synthesiser)."""
    run = sampler_lib.make_sampler(config, config.num_iter_list)
    cells, known = sampler_lib.unconditional_inputs(NUM_IMAGE_SAMPLES, config.crop_length)
    rolls, _ = run(params, cells, known, jax.random.key(config.seed + step), Sampling.of(config))
    rolls = np.asarray(rolls)
    pictures = lambda tokens, bar_lines=None: render.grid_image(
        [roll_lib.velocity_cells(t, config.roll) for t in tokens], scale=IMAGE_SCALE, bar_lines=bar_lines
    )
    writer.image(step, "samples/generated", pictures(rolls))
    if val_crops is not None:
        writer.image(step, "samples/validation", pictures(val_crops[:NUM_IMAGE_SAMPLES], val_bar_lines))
    with tempfile.TemporaryDirectory() as folder:
        for k, roll in enumerate(rolls):
            path = Path(folder) / f"sample_{k}.mid"
            midi.write_midi(path, roll_lib.roll_to_notes(roll, config.roll))
            sound, _ = render.audio(path, sample_rate=AUDIO_SAMPLE_RATE)
            writer.audio(step, f"samples/generated_{k}", sound, AUDIO_SAMPLE_RATE)


def claim_output_dir(config: Config) -> RunLock:
    """Checks and locks the output folder for this run (process 0); refuses a fresh run into a
    folder with another run's checkpoints unless --overwrite, which deletes them."""
    source = resume_source(config)  # a checkpoint that cannot be resumed fails before anything is written
    output_dir = check_writable(config.output_dir, create=True)
    lock = RunLock(output_dir)
    try:
        checkpoints = output_dir / "checkpoints"
        existing = ckpt.list_checkpoints(checkpoints)
        if existing and not (source and source[0].parent == checkpoints.resolve()):
            if not config.overwrite:
                raise OutputDirError(
                    f"--output_dir {output_dir} already has checkpoints (latest {existing[-1].name}): resume "
                    f"them with --resume_from_checkpoint {checkpoints / 'latest'}, choose another --output_dir, "
                    "or pass --overwrite to delete them and start afresh"
                )
            shutil.rmtree(checkpoints)
            log(f"--overwrite: deleted {len(existing)} checkpoint(s) of an earlier run in {checkpoints}")
    except BaseException:
        lock.release()
        raise
    return lock


def agreed_stop(reason: str) -> str:
    """The stop decision of all processes together: every process stops if one of them wants to
    (a signal or its clock). One tiny all-gather; single-process runs decide alone."""
    if jax.process_count() == 1:
        return reason
    wants = multihost_utils.process_allgather(np.int32(bool(reason)))
    return reason or ("another process is stopping" if np.any(wants) else "")


def train(config: Config) -> Path:
    """Runs training as configured; returns the output folder."""
    sharding.maybe_initialize_distributed()
    lock = claim_output_dir(config) if jax.process_index() == 0 else None
    try:
        return _train(config, Path(config.output_dir))
    finally:
        if lock is not None:
            lock.release()


def main(config: Config) -> None:
    """train.py: a run that cannot start, or a checkpoint that cannot be read or written, ends
    with one line naming the problem and the fix, and exit code 2."""
    try:
        train(config)
    except (RunError, OutputDirError, ckpt.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


def _train(config: Config, output_dir: Path) -> Path:
    try:
        mesh = sharding.make_mesh(config.devices)  # before the data: a bad --devices fails at once
    except ValueError as error:
        raise RunError(str(error)) from None
    train_library = load_library(config.train_data, "train", config)
    val_library = load_library(config.val_data, "valid", config) if config.val_data else None

    num_devices = mesh.devices.size
    global_batch = config.train_batch_size * num_devices
    graphdef, state, restored_from = initial_state(config, mesh)
    model_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    log(
        f"model: {model_params / 1e6:.2f}M parameters, levels {'/'.join(config.generator_types)}; "
        f"{num_devices} {jax.devices()[0].platform} device(s), global batch {global_batch}; "
        f"{train_flops_per_sample(config, config.crop_length) / 1e9:.1f} GFLOP per training sample"
    )
    if jax.process_index() == 0:
        save_yaml(config, output_dir / "config.yaml")
    log("config:\n  " + "\n  ".join(f"{k}: {v}" for k, v in config.to_dict().items()))

    train_step = steps.make_train_step(graphdef, config, mesh)
    eval_step = steps.make_eval_step(graphdef, config, mesh)
    val_crops, val_bar_lines, val_batches = None, None, []
    if val_library is not None:
        val_starts = data.fixed_crop_starts(
            val_library, config.crop_length, config.val_crops_per_file, config.seed, config.crop_alignment
        )
        val_crops = data.crops_at(val_library, val_starts, config.crop_length)
        val_bar_lines = [
            data.bar_lines_in_crop(val_library, k, s, config.crop_length)
            for k, s in val_starts[:NUM_IMAGE_SAMPLES]
        ]
        val_batches = data.eval_batches(
            val_crops, config.val_batch_size * num_devices, jax.process_index(), jax.process_count()
        )
    spec = data.CropSpec(
        config.crop_length,
        config.augment_factor,
        config.pitch_shift_min,
        config.pitch_shift_max,
        config.crop_alignment,
    )
    stream = data.BatchStream(
        train_library, spec, global_batch, config.seed, jax.process_index(), jax.process_count()
    )
    writer = Writer(output_dir, config)
    manager = ckpt.CheckpointManager(output_dir / "checkpoints", config.save_top_k)
    if manager.orphans_removed:
        log(f"removed {len(manager.orphans_removed)} unfinished save(s) an earlier run left behind")
    stop = StopRequest()
    key = jax.random.key(config.seed)
    micro_steps = config.max_steps * config.accumulate_grad_batches
    start_step = int(jax.device_get(state["step"]))
    meta = {"config": config.to_dict(), "resumed_from": str(restored_from or "")}
    val_loss = None

    def optimizer_step(micro_step: int) -> int:
        return micro_step // config.accumulate_grad_batches

    def save(micro_step: int) -> None:
        opt_step = optimizer_step(micro_step)
        try:
            path = manager.save(opt_step, state, val_loss, dict(meta, micro_step=micro_step))
        except ckpt.NonFiniteState:
            raise SystemExit(
                f"error: the weights or optimizer state became NaN or inf by step {opt_step}; {NONFINITE_ADVICE}"
            ) from None
        log(f"\ncheckpoint {path.name} saving")

    status_line = Progress(config.max_steps, optimizer_step(start_step))
    pending, last_log = [], time.perf_counter()
    started = time.perf_counter()
    step = start_step
    with data.Loader(stream, start_step, config.num_workers) as loader:
        try:
            while step < micro_steps:
                batch = sharding.global_batch(mesh, next(loader))
                compiling = progress.status("compiling the training step") if step == start_step else None
                with compiling or contextlib.nullcontext():
                    state, metrics = train_step(state, batch, key)
                pending.append(metrics)
                step += 1
                done = step == micro_steps
                if step % config.accumulate_grad_batches and not done:
                    continue
                opt_step = optimizer_step(step)
                due = lambda every, at=opt_step: every and at % every == 0
                if due(config.log_every_n_steps) or done:
                    values = _mean_metrics(pending)
                    if not math.isfinite(values["loss"]) or bool(jax.device_get(state["nonfinite"])):
                        raise SystemExit(
                            f"error: the training loss became {values['loss']} by step {opt_step}; {NONFINITE_ADVICE}"
                        )
                    now = time.perf_counter()
                    values["samples_per_s"] = len(pending) * global_batch / (now - last_log)
                    writer.scalars(opt_step, {f"train/{k}": v for k, v in values.items()})
                    status_line.update(opt_step, values["loss"])
                    pending, last_log = [], now
                over_time = (
                    config.max_train_minutes and time.perf_counter() - started > 60 * config.max_train_minutes
                )
                stop_reason = stop.reason or ("max_train_minutes reached" if over_time else "")
                if jax.process_count() > 1:  # processes agree where they meet anyway: logs, checkpoints
                    meeting = due(config.log_every_n_steps) or due(config.checkpoint_every_n_steps) or done
                    stop_reason = agreed_stop(stop_reason) if meeting else ""
                checkpoint_due = due(config.checkpoint_every_n_steps) or done or stop_reason
                validating = config.val_check_interval_steps and checkpoint_due  # names carry their own loss
                if val_batches and (due(config.val_check_interval_steps) or done or validating):
                    val_loss = validate(
                        eval_step,
                        steps.eval_params(state),
                        val_batches,
                        mesh,
                        config.seed,
                        config.num_val_batches,
                    )
                    writer.scalars(opt_step, {"val/loss": val_loss})
                    status_line.newline()
                    log(f"validation at step {opt_step}: loss {val_loss:.4f} nats per cell")
                if due(config.log_images_every_n_steps):
                    log_images(writer, opt_step, config, steps.eval_params(state), val_crops, val_bar_lines)
                if checkpoint_due:
                    save(step)
                if stop_reason:
                    log(f"stopping at step {opt_step}: {stop_reason}")
                    break
        except jax.errors.JaxRuntimeError as error:
            if "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower():
                raise SystemExit(f"error: {OOM_ADVICE}\n({str(error).splitlines()[0][:200]})") from None
            raise
        finally:
            status_line.newline()
            stop.restore()
            manager.close()
            writer.close()
    log(f"done: {output_dir}")
    return output_dir
