"""Multi-process start-up: two local CPU processes joined by jax.distributed train the tiny model on
halves of a global batch and agree with a single process training on the whole batch."""

import json
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny import run_two_processes, sparse_rolls, tiny_training

from fractalmidi_jax import sharding, steps

CONFIG = tiny_training()  # test_train.py's settings, so that the single-process program is shared
GLOBAL_BATCH = CONFIG.train_batch_size
NUM_STEPS = 2  # the first update has learning rate 0 (warmup); the second moves the weights

pytestmark = pytest.mark.usefixtures("compilation_cache")

# One process: start jax.distributed from the JAX_* variables (sharding.maybe_initialize_distributed),
# build the mesh over both processes' devices, feed its own half of the global batch, train, and
# report the losses and the weights. argv: tests folder, output folder.
WORKER = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from fractalmidi_jax import sharding
    sys.path.insert(0, sys.argv[1])
    from test_distributed import global_batch, load_initial_state, run_steps

    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh("all")
    index, count = jax.process_index(), jax.process_count()
    batch = global_batch()
    rows = batch[index * len(batch) // count : (index + 1) * len(batch) // count]
    losses, params = run_steps(mesh, rows, load_initial_state(f"{sys.argv[2]}/initial.npz"))
    np.savez(f"{sys.argv[2]}/params_{index}.npz", *params)
    print("RESULT " + json.dumps({
        "process": index, "processes": count, "devices": int(mesh.devices.size),
        "local_devices": sum(d.process_index == index for d in mesh.devices.flat), "local_rows": len(rows), "losses": losses,
    }), flush=True)
    """
)


def global_batch() -> np.ndarray:
    return sparse_rolls(np.random.default_rng(1), (GLOBAL_BATCH, 128, 32))


def load_initial_state(path) -> dict:
    """The state saved by the test (leaves in tree order): what steps.init_state returns, without
    building the model op by op in each process."""
    with np.load(path) as saved:
        leaves = [saved[f"arr_{k}"] for k in range(len(saved.files))]
    return jax.tree.unflatten(jax.tree.structure(steps.abstract_state(CONFIG)), leaves)


def run_steps(mesh, local_rows: np.ndarray, state: dict) -> tuple[list[float], list[np.ndarray]]:
    """NUM_STEPS train steps from `state` (host arrays): (losses, the weights' leaves)."""
    from flax import nnx

    from fractalmidi_jax.fractal import build_model

    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(CONFIG)))[0]
    state = steps.place_state(state, mesh)
    train_step = steps.make_train_step(graphdef, CONFIG, mesh)
    batch = sharding.global_batch(mesh, {"roll": local_rows})
    losses = []
    for _ in range(NUM_STEPS):
        state, metrics = train_step(state, batch, jax.random.key(3))
        losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
    return losses, [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state["params"])]


def test_two_processes_train_like_one(tmp_path):
    """Two processes (2 CPU devices each) started with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID form one 4-device mesh, each feeds its half of the batch, and both end
    with the losses and weights of one process training on the whole batch."""
    initial = jax.device_get(steps.init_state(CONFIG)[1])
    np.savez(tmp_path / "initial.npz", *jax.tree.leaves(initial))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    codes, outputs = run_two_processes(
        [str(script), str(Path(__file__).parent), str(tmp_path)],
        xla_flags=["--xla_cpu_use_fusion_emitters=false"],  # 3x faster compile
    )
    results = []
    for code, output in zip(codes, outputs):
        assert code == 0, output[-3000:]
        (line,) = [line for line in output.splitlines() if line.startswith("RESULT ")]
        results.append(json.loads(line.removeprefix("RESULT ")))
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        assert (r["processes"], r["devices"], r["local_devices"], r["local_rows"]) == (
            2,
            4,
            2,
            GLOBAL_BATCH // 2,
        )
    assert results[0]["losses"] == results[1]["losses"]

    losses, params = run_steps(sharding.make_mesh("1"), global_batch(), initial)
    np.testing.assert_allclose(results[0]["losses"], losses, rtol=1e-5)
    assert losses[0] != losses[1]
    for index in range(2):
        with np.load(tmp_path / f"params_{index}.npz") as saved:
            leaves = [saved[f"arr_{k}"] for k in range(len(saved.files))]
        assert len(leaves) == len(params)
        # AdamW's first steps move a weight by about lr whatever its gradient's size, so a
        # gradient at rounding level (summed in another order over 4 devices) may move it by
        # a different fraction of that: compare to 1% of lr.
        for leaf, expected in zip(leaves, params):
            np.testing.assert_allclose(leaf, expected, rtol=1e-5, atol=0.01 * CONFIG.lr)
    assert any(not np.allclose(a, b) for a, b in zip(params, jax.tree.leaves(initial["params"])))
