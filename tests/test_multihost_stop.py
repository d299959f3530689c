"""Several processes stop together: two local CPU processes joined by jax.distributed train the tiny
model; a SIGTERM reaches only process 1, and both stop at the same step and save one checkpoint
(each used to decide alone, so one stopped and saved while the other waited in a collective)."""

import subprocess
import textwrap

import pytest
from tiny import run_two_processes, tiny_training, write_song

from fractalmidi_jax import checkpoint as ckpt
from fractalmidi_jax import library as rolls
from fractalmidi_jax import midi
from fractalmidi_jax.config import save_yaml

STOP_STEP = 3

pytestmark = pytest.mark.usefixtures("compilation_cache")

# One process: join the others, then train; process 1 gets a SIGTERM while it takes the batch of
# STOP_STEP. argv: the config file, the step.
WORKER = textwrap.dedent(
    """
    import signal, sys
    import jax
    from fractalmidi_jax import data, sharding, trainer
    from fractalmidi_jax.config import load_yaml

    sharding.maybe_initialize_distributed()
    stop_step = int(sys.argv[2])

    class Loader(data.Loader):
        def __next__(self):
            if jax.process_index() == 1 and self.step == stop_step - 1:
                signal.raise_signal(signal.SIGTERM)
            return super().__next__()

    data.Loader = Loader
    trainer.train(load_yaml(sys.argv[1]))
    print(f"process {jax.process_index()} done", flush=True)
    """
)


def test_a_signal_to_one_process_stops_all_at_one_step(tmp_path, compilation_cache):
    for k in range(4):
        write_song(tmp_path / "songs" / f"song_{k}.mid", seed=k)
    config = tiny_training(
        tmp_path,
        devices="all",
        train_batch_size=2,  # 2 devices in each of 2 processes: the global batch of 8 stays
        val_data="",
        checkpoint_every_n_steps=0,
        output_dir=str(tmp_path / "out"),
    )
    options = midi.ReadOptions(include_drums=config.include_drums, sustain_pedal=config.sustain_pedal)
    rolls.RollLibrary(
        config.train_data, options, config.roll, config.cache_dir, num_workers=0
    )  # warm the roll cache
    save_yaml(config, tmp_path / "config.yaml")
    (tmp_path / "worker.py").write_text(WORKER)
    try:
        codes, outputs = run_two_processes(
            [str(tmp_path / "worker.py"), str(tmp_path / "config.yaml"), str(STOP_STEP)],
            dict(
                JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            ),
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the processes did not stop together (one waited for the other)")
    for index, (code, output) in enumerate(zip(codes, outputs)):
        assert code == 0, output[-3000:]
        assert f"process {index} done" in output
    assert f"stopping at step {STOP_STEP}: another process is stopping" in outputs[0], outputs[0][-3000:]
    (only,) = ckpt.list_checkpoints(tmp_path / "out" / "checkpoints")
    assert only.name == f"step_{STOP_STEP:08d}"
    assert ckpt.read_meta(only)["step"] == STOP_STEP
