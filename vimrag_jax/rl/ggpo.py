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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vimrag_jax.memory.graph import critical_path


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
    positive = jnp.asarray(reward) >= positive_threshold
    on_path = critical_path(jnp.asarray(adjacency, bool), node_valid, answer_node)
    keep_negative = ~jnp.asarray(relevant, bool)
    return jnp.where(positive, on_path, keep_negative) & node_valid


def segment_keep_mask(
    node_keep: jax.Array, segment_node: jax.Array, segment_valid: jax.Array
) -> jax.Array:
    """bool[S]: a segment keeps its gradient iff it is valid and its node is kept.

    Args:
      node_keep: bool[N], from ``node_keep_mask``.
      segment_node: int[S], the node each segment (model call) acted on.
      segment_valid: bool[S].

    A segment whose node index is out of range (``-1`` or ``>= N``: a model call
    tied to no node, e.g. an invalid action that created nothing) is not subject to
    GGPO: it is kept iff it is valid, and so trains with the trajectory's advantage.
    """
    n = node_keep.shape[-1]
    segment_node = jnp.asarray(segment_node, jnp.int32)
    in_range = (segment_node >= 0) & (segment_node < n)
    node_kept = jnp.take(node_keep, jnp.clip(segment_node, 0, n - 1), axis=-1)
    return jnp.asarray(segment_valid, bool) & (node_kept | ~in_range)


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
    return jax.vmap(segment_keep_mask)(node_keep_bn, segment_node, segment_valid)
