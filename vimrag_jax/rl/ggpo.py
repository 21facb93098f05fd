"""GGPO masks: which nodes, and so which segments, of a trajectory get a gradient.

Graph-Guided Policy Optimization (SPEC §4) prunes credit along the memory graph:

- a positive trajectory (reward >= ``positive_threshold``) keeps only ``P_ans``, the
  answer node and its ancestors; dead-end branches did not lead to the answer, so
  they should not be reinforced;
- a negative trajectory masks the nodes whose retrieval found gold evidence
  (``relevant``): those steps were right even though the episode failed, so they
  should not be pushed down. Everything else, the wrong answer included, keeps its
  negative gradient.

Masks go node -> segment (one per model call) -> token. Everything is pure JAX on
padded arrays, so it runs inside the jitted update and vmaps over a batch.

The objective: `ggpo_loss` (SPEC §5) is GSPO's clipped sequence-ratio objective over the
segments the mask keeps, divided by the count of all valid segments; `policy_objective` is
what the learner's update minimizes for a segment batch (`vimrag_jax.schema.SEGMENT_FIELDS`):
the mask (or none, for the GSPO / GRPO baselines), the ratio loss of `rl/losses.py`'s
registry, the optional truncated importance weight and k3 KL anchor, and the metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vimrag_jax.memory.graph import critical_path
from vimrag_jax.rl.losses import (
    LossConfig,
    Metrics,
    get_policy_loss,
    kl_k3,
    log_ratio,
    masked_mean,
    segment_kl_k3,
)
from vimrag_jax.rl.stats import Max, Mean
from vimrag_jax.schema import SegmentBatch


def is_positive(reward: jax.Array | float, positive_threshold: float | jax.Array) -> jax.Array:
    """The one rule for a positive (successful) trajectory: ``reward >= positive_threshold``
    (the config's ``loss.positive_threshold``). Works on numbers, NumPy and JAX arrays."""
    return reward >= positive_threshold


def node_keep_mask(
    adjacency: jax.Array,
    node_valid: jax.Array,
    answer_node: jax.Array | int,
    reward: jax.Array | float,
    relevant: jax.Array,
    *,
    positive_threshold: float | jax.Array = 1.0,
) -> jax.Array:
    """bool[N]: ``1 - μ`` of SPEC §4, the nodes whose segments keep their gradient.

    Args:
      adjacency: bool[N, N], ``[i, j]`` iff node j lists node i as a parent (i < j);
        edges touching invalid nodes or pointing backwards are ignored.
      node_valid: bool[N], the nodes of the episode.
      answer_node: int scalar, -1 when the episode never answered. A positive
        trajectory without a (valid) answer node has an empty ``P_ans``, so every
        node is masked: there is no path that earned the reward.
      reward: float scalar; positive iff ``reward >= positive_threshold``.
      relevant: bool[N], the node's retrieval returned gold evidence.
      positive_threshold: float (may be traced).

    Invalid nodes are always False.
    """
    node_valid = jnp.asarray(node_valid, bool)
    positive = is_positive(jnp.asarray(reward), positive_threshold)
    on_path = critical_path(jnp.asarray(adjacency, bool), node_valid, answer_node)
    keep_negative = ~jnp.asarray(relevant, bool)
    return jnp.where(positive, on_path, keep_negative) & node_valid


def segment_keep_mask(
    node_keep: jax.Array,
    segment_node: jax.Array,
    segment_valid: jax.Array,
    *,
    positive: bool | jax.Array = False,
) -> jax.Array:
    """bool[S]: a segment keeps its gradient iff it is valid and its node is kept.

    Args:
      node_keep: bool[N], from ``node_keep_mask``.
      segment_node: int[S], the node each segment (model call) acted on.
      segment_valid: bool[S].
      positive: whether the trajectory is positive (`is_positive`).

    A segment tied to no node (``-1``, or any index outside ``[0, N)``) is an invalid turn
    (SPEC §4): masked in a positive trajectory (nothing wasted is reinforced), kept with its
    negative gradient in a negative one.
    """
    n = node_keep.shape[-1]
    segment_node = jnp.asarray(segment_node, jnp.int32)
    in_range = (segment_node >= 0) & (segment_node < n)
    node_kept = jnp.take(node_keep, jnp.clip(segment_node, 0, n - 1), axis=-1)
    no_node_kept = ~jnp.asarray(positive, bool)
    return jnp.asarray(segment_valid, bool) & jnp.where(in_range, node_kept, no_node_kept)


def batch_segment_keep(
    adjacency: jax.Array,
    node_valid: jax.Array,
    answer_node: jax.Array,
    reward: jax.Array,
    relevant: jax.Array,
    segment_node: jax.Array,
    segment_valid: jax.Array,
    *,
    positive_threshold: float | jax.Array = 1.0,
) -> jax.Array:
    """bool[B]: GGPO keep mask of a segment-major batch (one row per segment).

    Each row carries its trajectory's graph (``adjacency[B, N, N]``, ``node_valid[B, N]``,
    ``relevant[B, N]``), ``answer_node[B]``, ``reward[B]`` and the segment's own
    ``segment_node[B]`` / ``segment_valid[B]``. Rows of the same trajectory recompute
    the same node mask; that costs O(B N^2) and keeps rows independent of each other,
    so any row order and any split across devices gives the same answer.
    """
    node_keep_bn = jax.vmap(
        lambda a, v, ans, r, rel: node_keep_mask(
            a, v, ans, r, rel, positive_threshold=positive_threshold
        )
    )(adjacency, node_valid, answer_node, reward, relevant)
    positive_b = is_positive(jnp.asarray(reward), positive_threshold)
    return jax.vmap(lambda k, s, v, p: segment_keep_mask(k, s, v, positive=p))(
        node_keep_bn, segment_node, segment_valid, positive_b
    )


# --- the objective --------------------------------------------------------------------


def ggpo_terms(
    logp: jax.Array,
    old_logp: jax.Array,
    token_mask: jax.Array,
    advantages: jax.Array,
    segment_keep: jax.Array,
    *,
    ratio: str = "gspo",
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    num_segments: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """−J of SPEC §4 and its metrics: the ``ratio`` loss of the registry (GSPO for GGPO) over
    the segments ``segment_keep`` keeps, ``[S, L]`` / ``[S]`` arrays."""
    return get_policy_loss(ratio)(
        logp,
        old_logp,
        token_mask,
        advantages,
        segment_keep,
        clip_low=clip_low,
        clip_high=clip_high,
        num_segments=num_segments,
    )


def ggpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    token_mask: jax.Array,
    advantages: jax.Array,
    segment_keep: jax.Array,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> jax.Array:
    """Scalar −J of SPEC §4: GSPO over ``[S, L]`` arrays with the GGPO keep mask ``[S]``."""
    args = (logp, old_logp, token_mask, advantages, segment_keep)
    loss, _ = ggpo_terms(*args, clip_low=clip_low, clip_high=clip_high)
    return loss


def _token_mask(batch: SegmentBatch) -> jax.Array:
    """bool[B, L]: policy tokens of valid segments."""
    return (
        jnp.asarray(batch["loss_mask"], bool) & jnp.asarray(batch["segment_valid"], bool)[:, None]
    )


def num_valid_segments(batch: SegmentBatch) -> jax.Array:
    """int32[]: valid segments with at least one policy token (the local ``S``)."""
    return jnp.sum(jnp.any(_token_mask(batch), axis=-1), dtype=jnp.int32)


def policy_objective(
    logp: jax.Array,
    batch: SegmentBatch,
    config: LossConfig,
    *,
    num_segments: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Loss and metrics of one segment-major batch (one row per segment).

    Args:
      logp: float32[B, L], the current policy's log-prob of each token.
      batch: the `vimrag_jax.schema.LOSS_KEYS` of a segment batch (the graph arrays are read
        only when ``config.ggpo_mask``); ``ref_logprobs`` when ``config.kl_coef > 0``;
        optionally ``old_logprobs`` with ``config.old_logprobs == "recompute"`` (default:
        ``stop_gradient(logp)``, see `LossConfig`).
      config: the loss (static under jit).
      num_segments: global ``S`` when the batch is one shard of a larger one.
    """
    token_mask = _token_mask(batch)
    valid = jnp.any(token_mask, axis=-1)
    reward = jnp.asarray(batch["reward"], jnp.float32)
    if config.ggpo_mask:
        keep = batch_segment_keep(
            batch["adjacency"],
            batch["node_valid"],
            batch["answer_node"],
            reward,
            batch["relevant"],
            batch["segment_node"],
            valid,
            positive_threshold=config.positive_threshold,
        )
    else:
        keep = valid
    advantage = jnp.asarray(batch["advantage"], jnp.float32)
    behavior = batch["behavior_logprobs"]
    tis_weight = None
    if config.old_logprobs == "recompute":
        old_logp = jax.lax.stop_gradient(batch.get("old_logprobs", logp))
        # The objective is linear in a positive advantage scale, so the truncated importance
        # weight multiplies the advantage.
        log_w = masked_mean(log_ratio(old_logp, behavior, token_mask), token_mask)
        tis_weight = jnp.minimum(jnp.exp(log_w), config.tis_cap)
        advantage = advantage * tis_weight
    else:
        old_logp = behavior
    loss, metrics = ggpo_terms(
        logp,
        old_logp,
        token_mask,
        advantage,
        keep,
        ratio=config.name,
        clip_low=config.clip_low,
        clip_high=config.clip_high,
        num_segments=num_segments,
    )
    if config.kl_coef > 0:
        if "ref_logprobs" not in batch:
            raise KeyError(
                f"kl_coef = {config.kl_coef} > 0 needs batch['ref_logprobs'] "
                "(reference-policy log-probs); set kl_coef = 0 or provide them"
            )
        ref_logp = batch["ref_logprobs"]
        loss = loss + config.kl_coef * kl_k3(logp, ref_logp, token_mask, num_segments=num_segments)
        kl_s = jax.lax.stop_gradient(segment_kl_k3(logp, ref_logp, token_mask))
        metrics["kl"] = Mean.of(jnp.where(valid, kl_s, 0.0), valid)
        # k3's tail: one token far from the reference can dominate a batch's gradient.
        delta = jax.lax.stop_gradient(log_ratio(ref_logp, logp, token_mask))
        metrics["kl_token_max"] = Max.of(jnp.expm1(delta) - delta, token_mask)
    if tis_weight is not None:
        metrics["tis_weight"] = Mean.of(jnp.where(valid, tis_weight, 0.0), valid)
        metrics["tis_truncated_fraction"] = Mean.of(tis_weight >= config.tis_cap, valid)
    positive = is_positive(reward, config.positive_threshold)
    # The learner-vs-sampler gap: current policy against the sampler's log-probs.
    gap_sl = jnp.abs(log_ratio(jax.lax.stop_gradient(logp), behavior, token_mask))
    metrics.update(
        masked_fraction_positive=Mean.of(~keep, valid & positive),
        masked_fraction_negative=Mean.of(~keep, valid & ~positive),
        reward_mean=Mean.of(jnp.where(valid, reward, 0.0), valid),
        logprob_gap=Mean.of(gap_sl, token_mask),
    )
    return loss, metrics
