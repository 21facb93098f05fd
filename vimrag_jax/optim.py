"""The learner's optimizer: AdamW, warmup + cosine schedule, clipping, gradient accumulation.

Built from the ``config.optim`` block:

- ``learning_rate`` (the peak), ``warmup_steps``, ``total_steps``, ``final_lr_ratio``,
  ``schedule`` ("warmup_cosine" | "warmup_constant"): see ``learning_rate_schedule``.
- ``b1``, ``b2``, ``eps``, ``weight_decay``: AdamW. Weight decay applies to parameters with two
  or more dimensions only (kernels, embeddings); norm scales and biases are not decayed, because
  pulling a norm scale towards 0 fights the normalisation instead of regularising it.
- ``grad_clip``: the global gradient norm is clipped to this value (0 disables clipping).
- ``accumulate_steps``: k > 1 wraps everything in ``optax.MultiSteps``: gradients of k calls are
  averaged, and clipping and the AdamW step act once on that average.

Units. ``total_steps`` and ``warmup_steps`` count optimizer updates. With accumulation the
update of ``vimrag_jax.parallel.step`` still runs once per micro-batch: calls 1..k-1 of each
group return zero updates (the parameters do not move) and call k applies the step, so a run of
``total_steps`` updates is ``micro_steps(cfg) = total_steps * accumulate_steps`` step calls, and
``TrainState.step`` counts calls. The mean of k micro-batch gradients equals the gradient of
the k-times-larger batch when the micro-batches hold the same number of valid segments (the
loss divides by the segments of its own micro-batch).

The learning rate is not stored in the optimizer state (no ``inject_hyperparams``), so the
update's ``learning_rate`` metric is absent; log ``learning_rate_at(cfg, state.step)`` instead.
``train_state_shardings`` handles the MultiSteps state as it is: its accumulated gradients and
Adam moments mirror the parameters and are sharded like them, the counters are replicated.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vimrag_jax.models.params import cast_floats

SCHEDULES = ("warmup_cosine", "warmup_constant")


def learning_rate_schedule(optim_config: ml_collections.ConfigDict) -> optax.Schedule:
    """``lr(update)`` for update index 0, 1, ...: linear warmup, then cosine (or constant).

    During warmup ``lr(t) = peak * (t + 1) / warmup_steps``, so the first update already moves
    the parameters (reaching the peak at ``t = warmup_steps - 1``). After it, "warmup_cosine"
    follows ``final + (peak - final) * (1 + cos(pi * p)) / 2`` with
    ``p = (t - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1] and
    ``final = peak * final_lr_ratio``; "warmup_constant" stays at the peak.
    """
    peak = float(optim_config.learning_rate)
    warmup = int(optim_config.warmup_steps)
    total = int(optim_config.total_steps)
    kind = optim_config.schedule
    if kind not in SCHEDULES:
        raise ValueError(f"config.optim.schedule must be one of {SCHEDULES}, got {kind!r}")
    final = peak * float(optim_config.final_lr_ratio)
    decay_steps = max(total - warmup, 1)

    def schedule(count: jax.Array | int) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        warm = peak * jnp.minimum((t + 1.0) / max(warmup, 1), 1.0)
        if kind == "warmup_constant":
            after = jnp.asarray(peak, jnp.float32)
        else:
            progress = jnp.clip((t - warmup) / decay_steps, 0.0, 1.0)
            after = final + (peak - final) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(t < warmup, warm, after)

    return schedule


def micro_steps(optim_config: ml_collections.ConfigDict) -> int:
    """Calls of the step function for a whole run: ``total_steps * accumulate_steps``."""
    return int(optim_config.total_steps) * int(optim_config.accumulate_steps)


def learning_rate_at(optim_config: ml_collections.ConfigDict, train_step: int) -> float:
    """The learning rate the update at step call ``train_step`` (0-based) uses or will use."""
    update = int(train_step) // int(optim_config.accumulate_steps)
    return float(learning_rate_schedule(optim_config)(update))


def sft_optim_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``cfg.optim`` for the supervised phase: ``sft.learning_rate``, ``warmup_steps``, ``steps``.

    Keeping one optim block (clipping, AdamW moments, accumulation) and overriding only the
    three SFT keys means the warm start and the RL run cannot silently differ elsewhere.
    """
    optim = ml_collections.ConfigDict(cfg.optim.to_dict())
    optim.learning_rate = cfg.sft.learning_rate
    optim.warmup_steps = cfg.sft.warmup_steps
    optim.total_steps = cfg.sft.steps
    return optim


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: those with two or more dimensions."""
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def float32_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` computed in float32 for parameters stored in a narrower dtype (bfloat16):
    its state (Adam's moments) is built from and updated with float32 copies of the
    parameters and gradients, so only the stored parameters are narrow; `optax.apply_updates`
    casts each float32 update to its parameter's dtype."""

    def init(params: Any) -> optax.OptState:
        return inner.init(cast_floats(params, jnp.float32))

    def update(updates: Any, state: optax.OptState, params: Any = None) -> tuple[Any, Any]:
        wide = None if params is None else cast_floats(params, jnp.float32)
        return inner.update(cast_floats(updates, jnp.float32), state, wide)

    return optax.GradientTransformation(init, update)


def make_optimizer(
    optim_config: ml_collections.ConfigDict, *, param_dtype: str = "float32"
) -> optax.GradientTransformation:
    """The optimizer described by ``config.optim`` (see the module docstring); for parameters
    stored in ``param_dtype`` narrower than float32, its state stays float32 (`float32_state`).
    """
    accumulate = optim_config.accumulate_steps
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(
            f"config.optim.accumulate_steps must be a positive integer, got {accumulate!r}"
        )
    if optim_config.grad_clip < 0:
        raise ValueError(f"config.optim.grad_clip must be >= 0, got {optim_config.grad_clip}")
    parts = []
    if optim_config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip)))
    parts.append(
        optax.adamw(
            learning_rate=learning_rate_schedule(optim_config),
            b1=float(optim_config.b1),
            b2=float(optim_config.b2),
            eps=float(optim_config.eps),
            weight_decay=float(optim_config.weight_decay),
            mask=decay_mask,
        )
    )
    optimizer = optax.chain(*parts)
    if jnp.dtype(param_dtype) != jnp.float32:
        optimizer = float32_state(optimizer)
    if accumulate == 1:
        return optimizer
    return optax.MultiSteps(optimizer, every_k_schedule=accumulate).gradient_transformation()
