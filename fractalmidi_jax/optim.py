"""The optax chain and the weight EMA.

Schedule: the learning rate rises linearly from 0 to `lr` over `warmup_steps` optimizer
steps, then follows a cosine down to 0 at `max_steps`. AdamW (betas `beta1`, `beta2`)
decays only dense kernels: biases, norms, embeddings, position tables and the mask token
are left alone. Gradients are clipped to a global norm of `grad_clip` first. With
`accumulate_grad_batches` = k, optax.MultiSteps averages k micro-batch gradients into one
update (the schedule counts updates, not micro-batches).
"""

import jax
import jax.numpy as jnp
import optax

from fractalmidi_jax.config import Config

EMA_WARMUP = 10.0  # the EMA decay ramps as (1 + t) / (EMA_WARMUP + t) until it reaches ema_decay


def learning_rate(config: Config) -> optax.Schedule:
    warmup = min(config.warmup_steps, config.max_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=max(config.max_steps, warmup + 1),
        end_value=0.0,
    )


def decay_mask(params):
    """True for dense kernels, the only weights AdamW decays."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def make_optimizer(config: Config) -> optax.GradientTransformation:
    chain = []
    if config.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(config.grad_clip))
    chain.append(
        optax.adamw(
            learning_rate(config),
            b1=config.beta1,
            b2=config.beta2,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        )
    )
    optimizer = optax.chain(*chain)
    if config.accumulate_grad_batches > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.accumulate_grad_batches)
    return optimizer


def ema_update(ema, params, update_step, decay: float):
    """One EMA step after optimizer update number `update_step` (0-based)."""
    t = update_step.astype(jnp.float32)
    rate = jnp.minimum(decay, (1.0 + t) / (EMA_WARMUP + t))
    return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)
