"""The learner's update: one pure function, run as a pjit (mesh) step or a pmap step.

`update` computes the policy objective on a batch of segments and applies one optax step. The
pjit step runs it on the global batch under a mesh (GSPMD inserts the collectives); the pmap step
runs it per device on a slice of the batch with `axis_name` set, so the loss denominator, the
gradients and the metrics are summed explicitly. Both wrap the same function so they cannot drift.

A Qwen3-VL policy's batch also carries each segment's vision inputs (`VISUAL_KEYS`, built on
the host by `vimrag_jax.data.vision.VisualInputs`); the loss forward then runs the policy on
the segments' images and videos (`visual_sequence_logprobs`). Every such array has the segment
axis first, so both steps split it like the rest of the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vimrag_jax.parallel.sharding import (
    DEFAULT_RULES,
    Rules,
    param_shardings,
    replicated,
    under_mesh,
)
from vimrag_jax.rl.ggpo import num_valid_segments, policy_objective
from vimrag_jax.rl.losses import LossConfig
from vimrag_jax.rl.stats import merge_stats, reduce_stats, to_scalars
from vimrag_jax.sampling.logprobs import VISUAL_KEYS, sequence_logprobs, visual_sequence_logprobs
from vimrag_jax.schema import SegmentBatch

Batch = SegmentBatch  # on the devices: the loss keys (and a VL policy's vision inputs)
PMAP_AXIS = "data"


@struct.dataclass
class TrainState:
    """Everything the update changes: step counter, policy parameters, optimizer state."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def policy_logprobs(
    policy: nnx.Module, tokens_bl: jax.Array, visual: dict[str, jax.Array] | None = None
) -> jax.Array:
    """`float32[B, L]` per-token log-probs of `tokens` under `policy` (0 at t = 0).

    With `visual` (the `VISUAL_KEYS` arrays of the segments), a Qwen3-VL policy sees each
    segment's images and videos (`visual_sequence_logprobs`, memory-lean). Otherwise models
    with `hidden_states` / `head_weight` (Qwen3) go through the sampler's memory-lean
    `sequence_logprobs` (no `[B, L, V]` logits); others through their logits.
    """
    if visual is not None:
        if not hasattr(policy, "visual"):
            raise ValueError(
                f"visual inputs were given for a {type(policy).__name__}, which has no vision "
                "tower; leave the visual stage out of a text-only policy's pipeline"
            )
        return visual_sequence_logprobs(policy, tokens_bl, visual)
    if hasattr(policy, "hidden_states") and hasattr(policy, "head_weight"):
        return sequence_logprobs(policy, tokens_bl)
    return token_logprobs(policy(tokens_bl), tokens_bl)


def visual_inputs(batch: Batch) -> dict[str, jax.Array] | None:
    """The batch's `VISUAL_KEYS` arrays, or None when it has none (a text-only policy).

    Raises KeyError when only some are present (a half-built visual batch would silently
    drop the images)."""
    present = [key for key in VISUAL_KEYS if key in batch]
    if not present:
        return None
    if len(present) != len(VISUAL_KEYS):
        missing = [key for key in VISUAL_KEYS if key not in batch]
        raise KeyError(f"the batch has visual inputs {present} but lacks {missing}")
    return {key: batch[key] for key in VISUAL_KEYS}


def token_logprobs(logits_blv: jax.Array, tokens_bl: jax.Array) -> jax.Array:
    """`float32[B, L]`: log-prob of `tokens[b, t]` under the logits at position t-1; 0 at t=0."""
    logits_blv = logits_blv[:, :-1].astype(jnp.float32)
    next_tokens_bl = tokens_bl[:, 1:]
    picked_bl = jnp.take_along_axis(logits_blv, next_tokens_bl[..., None], axis=-1)[..., 0]
    # logit - logsumexp avoids materialising a second [B, L, V] log_softmax array.
    logp_bl = picked_bl - jax.nn.logsumexp(logits_blv, axis=-1)
    return jnp.pad(logp_bl, ((0, 0), (1, 0)))


def _split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(
            "The policy holds non-parameter state (e.g. stored Rngs or batch statistics), which "
            f"the train state does not carry: {rest}"
        )
    return graphdef, params


def _init_state(model_fn: Callable[[], nnx.Module], optimizer: optax.GradientTransformation):
    _, params = _split_params(model_fn())
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )


def train_state_shardings(
    abstract_state: TrainState,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
) -> TrainState:
    """Shardings for a train state: params by the rules, optimizer moments like their params.

    Optimizer leaves that do not mirror the parameters (counts, schedules) are replicated.
    """
    params = param_shardings(abstract_state.params, mesh, rules)
    opt_state = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_state.opt_state,
        params,
        transform_non_params=lambda _: replicated(mesh),
    )
    return TrainState(step=replicated(mesh), params=params, opt_state=opt_state)


def create_train_state(
    model_fn: Callable[[], nnx.Module],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Initialises the policy and optimizer directly into their shards.

    `model_fn()` builds the policy (its Rngs seeded inside). The init is traced abstractly first
    to work out shardings, then jitted with them as `out_shardings`, so no device ever holds the
    whole model. Returns `(graphdef, state, state_shardings)`.
    """
    with nnx.use_eager_sharding(False):  # logical names are mapped to the mesh here, not by flax
        graphdef, _ = _split_params(nnx.eval_shape(model_fn))
        init = functools.partial(_init_state, model_fn, optimizer)
        abstract_state = jax.eval_shape(init)
        shardings = train_state_shardings(abstract_state, optimizer, mesh, rules)
        state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings


def update(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    loss_config: LossConfig,
    axis_name: str | None = None,
    micro_batches: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The optimizer steps of one rollout batch; pure, so it can be jitted or pmapped (the pjit
    and the pmap step both wrap it).

    With `axis_name`, `batch` is this device's slice: the loss is normalised by the global number
    of valid segments, so per-device losses and gradients sum to the global ones.

    With `loss_config.num_minibatches` M > 1 (GSPO as published) the log-probs of the policy that
    starts the batch are computed once (`old_logprobs`), then the batch's rows are split into M
    equal minibatches (this device's rows, under pmap), each one optimizer step in turn under
    `lax.scan`: the first minibatch's ratio is exactly 1, the clip binds from the second on. The
    truncated importance weight to the sampler's log-probs applies as for one step
    (`loss.old_logprobs = "recompute"`). Metrics are over the M steps (min / max for ``*_min`` /
    ``*_max``, the mean otherwise), plus ``clip_fraction/mb<m>``.
    With M = 1 it is one step on the whole batch. Minibatch m holds rows m, m + M, m + 2M, ...
    (`take_part`), so each one keeps an equal share of every device's rows.

    With `micro_batches` K > 1 each optimizer step's gradient is accumulated over K sequential
    forward/backward passes (`lax.scan`) of 1/K of its rows, so activations are those of one
    micro-batch; every micro-batch's loss is normalised by the valid segments of the whole
    (mini)batch (SPEC §4's S), so the sum is exactly the one-pass gradient, not a mean of means.
    """
    minibatches = loss_config.num_minibatches
    kwargs = dict(
        graphdef=graphdef,
        optimizer=optimizer,
        loss_config=loss_config,
        axis_name=axis_name,
        micro_batches=micro_batches,
    )
    if minibatches == 1:
        return _update_once(state, batch, **kwargs)
    if micro_batches == 1:
        policy = nnx.merge(graphdef, state.params)
        old = policy_logprobs(policy, batch["tokens"], visual_inputs(batch))
    else:  # the starting policy's log-probs, as many rows at a time as one training pass
        old = _micro_logprobs(graphdef, state.params, batch, minibatches * micro_batches)
    batch = {**batch, "old_logprobs": jax.lax.stop_gradient(old)}
    check_parts(batch, minibatches, what="minibatches")
    state, metrics = jax.lax.scan(
        lambda s, m: _update_once(s, take_part(batch, minibatches, m), **kwargs),
        state,
        jnp.arange(minibatches),
    )
    out = {}
    for key, values in metrics.items():
        reduce = jnp.min if key.endswith("_min") else jnp.max if key.endswith("_max") else jnp.mean
        out[key] = reduce(values)
    for m in range(minibatches if "clip_fraction" in metrics else 0):
        out[f"clip_fraction/mb{m}"] = metrics["clip_fraction"][m]
    return state, out


def check_parts(tree: Any, parts: int, *, what: str = "parts") -> None:
    """Raises ValueError unless the leaves' rows split into ``parts`` equal parts."""
    rows = jax.tree.leaves(tree)[0].shape[0]
    if rows % parts:
        raise ValueError(f"{rows} rows do not split into {parts} {what}")


def take_part(tree: Any, parts: int, index: jax.Array | int) -> Any:
    """Part ``index`` of ``parts`` of every leaf ``[B, ...]``: rows index, index + parts, ...

    Strided rather than contiguous: when the row axis is sharded over devices in contiguous
    blocks, each part is an equal slice of every device's block, so a loop over the parts
    moves no data between devices. Taken as a slice of a free reshape ``[B / parts, parts,
    ...]`` inside the loop, so no transposed copy of the batch (for a vision policy, its
    pixels) is ever made.
    """

    def part(x: jax.Array) -> jax.Array:
        grouped = x.reshape(x.shape[0] // parts, parts, *x.shape[1:])
        return jax.lax.dynamic_index_in_dim(grouped, index, axis=1, keepdims=False)

    return jax.tree.map(part, tree)


def _micro_logprobs(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, parts: int):
    """`policy_logprobs` of the whole batch computed `parts` micro-batches at a time."""

    def one(params, rows):
        # The parameters ride in the carry: a module merged from values closed over from
        # outside the scan could not be used by the layers' nnx.remat inside it.
        policy = nnx.merge(graphdef, params)
        return params, policy_logprobs(policy, rows["tokens"], visual_inputs(rows))

    inputs = {key: batch[key] for key in ("tokens", *VISUAL_KEYS) if key in batch}
    check_parts(inputs, parts, what="micro-batches")
    _, logp = jax.lax.scan(
        lambda params, p: one(params, take_part(inputs, parts, p)), params, jnp.arange(parts)
    )
    # Undo the strided split: [parts, B / parts, L] -> [B, L].
    return logp.swapaxes(0, 1).reshape(-1, *logp.shape[2:])


def _loss_and_grads(
    params: nnx.State,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    loss_config: LossConfig,
    num_segments: jax.Array,
    micro_batches: int,
) -> tuple[tuple[jax.Array, dict], nnx.State]:
    """`((loss, stats), grads)` of the objective, over `micro_batches` sequential passes.

    Each pass normalises by the caller's `num_segments` (the whole batch's S), so losses and
    gradients add up to the one-pass values; statistics are merged (sums, max, min)."""

    def loss_fn(params: nnx.State, rows: Batch):
        policy = nnx.merge(graphdef, params)
        logp_bl = policy_logprobs(policy, rows["tokens"], visual_inputs(rows))
        return policy_objective(logp_bl, rows, loss_config, num_segments=num_segments)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_batches == 1:
        return grad_fn(params, batch)

    def accumulate(carry, index):
        loss, grads = carry
        (rows_loss, stats), rows_grads = grad_fn(params, take_part(batch, micro_batches, index))
        return (loss + rows_loss, jax.tree.map(jnp.add, grads, rows_grads)), stats

    check_parts(batch, micro_batches, what="micro-batches")
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), stats = jax.lax.scan(accumulate, zeros, jnp.arange(micro_batches))
    return (loss, merge_stats(stats)), grads


def _update_once(state: TrainState, batch: Batch, **kwargs) -> tuple[TrainState, dict]:
    """One optimizer step on a batch (or minibatch) of segments (`update`'s keyword args)."""
    graphdef, optimizer = kwargs["graphdef"], kwargs["optimizer"]
    loss_config, axis_name = kwargs["loss_config"], kwargs["axis_name"]
    num_segments = num_valid_segments(batch)
    if axis_name is not None:
        num_segments = jax.lax.psum(num_segments, axis_name)
    (loss, stats), grads = _loss_and_grads(
        state.params,
        batch,
        graphdef=graphdef,
        loss_config=loss_config,
        num_segments=num_segments,
        micro_batches=kwargs["micro_batches"],
    )
    if axis_name is not None:
        loss, grads = jax.lax.psum((loss, grads), axis_name)
        stats = reduce_stats(stats, axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    metrics = to_scalars(stats)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def make_pjit_step(
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    loss_config: LossConfig,
    mesh: Mesh,
    state_shardings: TrainState,
    batch_shardings: Any,
    micro_batches: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, batch) -> (state, metrics)` over the mesh (`update`: one or
    `loss.num_minibatches` optimizer steps); the input state is donated.

    `batch_shardings` comes from `sharding.batch_shardings` on the (abstract) batch; metrics come
    back replicated.
    """
    fn = functools.partial(
        update,
        graphdef=graphdef,
        optimizer=optimizer,
        loss_config=loss_config,
        micro_batches=micro_batches,
    )
    # Traced under the mesh, so the model pins its activations to the batch axes.
    fn = under_mesh(fn, mesh)
    return jax.jit(
        fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


def make_pmap_step(
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    loss_config: LossConfig,
    devices: Sequence[jax.Device] | None = None,
    micro_batches: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Data-parallel `step(state, batch)` over `devices` (default: all local devices).

    Takes a state from `replicate_for_pmap` and a batch from `shard_batch_for_pmap`; returns the
    per-device state and metrics (identical on every device; see `unreplicate`).
    """
    fn = functools.partial(
        update,
        graphdef=graphdef,
        optimizer=optimizer,
        loss_config=loss_config,
        axis_name=PMAP_AXIS,
        micro_batches=micro_batches,
    )
    devices = None if devices is None else tuple(devices)
    return jax.pmap(fn, axis_name=PMAP_AXIS, devices=devices, donate_argnums=(0,))


def _pmap_sharding(devices: Sequence[jax.Device]) -> NamedSharding:
    # The same one-axis mesh pmap builds internally, so inputs need no resharding.
    return NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), PartitionSpec(PMAP_AXIS))


def replicate_for_pmap(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Copies every leaf onto each device, stacked on a new leading axis of size len(devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = _pmap_sharding(devices)

    def replicate(x: Any) -> jax.Array:
        x = jnp.asarray(x)
        copies = [jax.device_put(x[None], device) for device in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *x.shape), sharding, copies)

    return jax.tree.map(replicate, tree)


def shard_batch_for_pmap(batch: Batch, devices: Sequence[jax.Device] | None = None) -> Batch:
    """Reshapes each leaf `[B, ...]` to `[D, B/D, ...]` and places slice d on device d."""
    devices = list(jax.local_devices() if devices is None else devices)
    num_devices = len(devices)
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"Batch leaves disagree on the number of rows: {sorted(sizes)}.")
    (rows,) = sizes
    if rows % num_devices:
        raise ValueError(
            f"The batch has {rows} segment rows, not divisible by the {num_devices} pmap devices; "
            "pad the batch (with segment_valid=False rows) or change the batch size."
        )
    sharding = _pmap_sharding(devices)
    return jax.tree.map(
        lambda x: jax.device_put(
            np.reshape(np.asarray(x), (num_devices, rows // num_devices, *np.shape(x)[1:])),
            sharding,
        ),
        batch,
    )


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a pmap output (all copies are equal after the psums)."""
    return jax.tree.map(lambda x: x[0], tree)
