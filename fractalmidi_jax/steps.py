"""The training state and the jitted steps, built once per run with explicit shardings.

State (a dict, so orbax and optax see plain pytrees): params (float32), ema (if on),
opt_state, step (micro-batches consumed: the data position), nonfinite (a NaN or inf loss
was seen since the start; checked on the host at every logged step; a checkpoint checks the
state's own arrays, checkpoint.is_finite).
Random keys: step s uses fold_in(key(seed), s), so a resumed run draws the same masks.
Batches: the loader's dict (data.py), split over the mesh's data axis and handed whole to the loss.
The steps trace under their mesh (`use_abstract_mesh`), so code that must split work by the batch
itself (short_attention's kernels, under shard_map) finds the data axis.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fractalmidi_jax import optim
from fractalmidi_jax.config import Config
from fractalmidi_jax.fractal import build_model, fractal_loss
from fractalmidi_jax.sharding import batch_sharding, replicated

LOSS_SCALE = {"16": 2.0**10}  # float16 gradients underflow without a (static) loss scale
# cuBLAS for every matrix product of the steps instead of XLA's Triton GEMMs: on one H200 the
# 128 x 512 train step ran 37.5 ms instead of 40.3 ms and compiled in 29 s instead of 53 s
# (BENCHMARKS.md). The sampler keeps Triton GEMMs, which sample 17% faster. Ignored off GPU.
STEP_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def init_state(config: Config):
    """Returns (graphdef, state) on the host; `place_state` puts it on the mesh."""
    graphdef, params = nnx.split(build_model(config, config.seed))
    params = nnx.to_pure_dict(params)
    state = {
        "params": params,
        "opt_state": optim.make_optimizer(config).init(params),
        "step": jnp.zeros((), jnp.int32),
        "nonfinite": jnp.zeros((), bool),
    }
    if config.ema_decay > 0:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return graphdef, state


def abstract_state(config: Config):
    """Shapes and dtypes of the state, without allocating it (for restoring checkpoints)."""
    return jax.eval_shape(lambda: init_state(config)[1])


def restore_target(config: Config, mesh):
    """The state's shapes and dtypes, replicated over `mesh`: what a checkpoint restores into."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state(config)
    )


def place_state(state, mesh):
    return jax.device_put(state, replicated(mesh))


def eval_params(state):
    return state.get("ema", state["params"])


def make_train_step(graphdef, config: Config, mesh, steps_per_call: int = 1):
    """(state, batch, key) -> (state, metrics): one micro-batch's update. With `steps_per_call`
    K > 1 the batch's arrays have a leading axis of K micro-batches, one call makes their K
    updates in a `lax.scan` (the host dispatches once; `bench --steps_per_call`) and the metrics
    have that leading axis too."""
    optimizer = optim.make_optimizer(config)
    schedule = optim.learning_rate(config)
    scale = LOSS_SCALE.get(config.precision, 1.0)
    accumulate = config.accumulate_grad_batches

    def train_step(state, batch, key):
        rng = jax.random.fold_in(key, state["step"])

        def scaled_loss(params):
            loss, stats = fractal_loss(nnx.merge(graphdef, params), config, batch, rng, train=True)
            return loss * scale, stats

        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            grads, stats = jax.grad(scaled_loss, has_aux=True)(state["params"])
        grads = jax.tree.map(lambda g: g / scale, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        update_step = state["step"] // accumulate
        new_state = dict(
            state,
            params=params,
            opt_state=opt_state,
            step=state["step"] + 1,
            nonfinite=state["nonfinite"] | ~jnp.isfinite(stats["loss"]),
        )
        if "ema" in state:
            updated = (state["step"] + 1) % accumulate == 0
            ema = optim.ema_update(state["ema"], params, update_step, config.ema_decay)
            new_state["ema"] = jax.tree.map(lambda new, old: jnp.where(updated, new, old), ema, state["ema"])
        metrics = dict(stats, grad_norm=optax.tree.norm(grads), lr=schedule(update_step))
        return new_state, metrics

    def train_steps(state, batches, key):
        return jax.lax.scan(lambda state, batch: train_step(state, batch, key), state, batches)

    return jax.jit(
        train_step if steps_per_call == 1 else train_steps,
        in_shardings=(replicated(mesh), batch_sharding(mesh, stacked=steps_per_call > 1), replicated(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=STEP_COMPILER_OPTIONS,
    )


def make_eval_step(graphdef, config: Config, mesh):
    """(params, batch, key) -> (sum of cell losses, cells reached): the NLL estimator (uniform
    masks), so batches (their padding weighted 0) combine into one exact average."""

    def eval_step(params, batch, key):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            loss, stats = fractal_loss(nnx.merge(graphdef, params), config, batch, key, False)
        return loss * stats["reached_cells"], stats["reached_cells"]

    return jax.jit(
        eval_step,
        in_shardings=(replicated(mesh), batch_sharding(mesh), replicated(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        compiler_options=STEP_COMPILER_OPTIONS,
    )
