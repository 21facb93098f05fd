"""Plain NumPy references for the RL losses and GGPO masks, written as explicit loops.

They follow SPEC §4 literally, one node / segment / token at a time in float64, so the
vectorized JAX code in ``vimrag_jax.rl`` can be checked against something obviously
right. Slow by design; only for tests.
"""

from __future__ import annotations

import math

import memory_reference
import numpy as np


def node_keep(adjacency, node_valid, answer_node, reward, relevant, positive_threshold=1.0):
    """bool[N]: keep = P_ans for positive trajectories, valid & ~relevant for negative ones."""
    if reward >= positive_threshold:
        return memory_reference.critical_path(adjacency, node_valid, int(answer_node))
    return np.array([bool(v) and not bool(r) for v, r in zip(node_valid, relevant, strict=True)])


def segment_keep(node_keep_n, segment_node, segment_valid, positive=False):
    """bool[S]: valid and (node kept; a segment of no node, an invalid turn, only when the
    trajectory is negative)."""
    n = len(node_keep_n)
    out = np.zeros(len(segment_node), bool)
    for s, (node, valid) in enumerate(zip(segment_node, segment_valid, strict=True)):
        if not valid:
            continue
        out[s] = bool(node_keep_n[node]) if 0 <= node < n else not positive
    return out


def _tokens(token_mask, s):
    return [t for t in range(len(token_mask[s])) if token_mask[s][t]]


def _denominator(token_mask, num_segments):
    if num_segments is None:
        num_segments = sum(1 for s in range(len(token_mask)) if _tokens(token_mask, s))
    return max(float(num_segments), 1.0)


def _clipped(ratio, adv, clip_low, clip_high):
    return min(ratio * adv, min(max(ratio, 1 - clip_low), 1 + clip_high) * adv)


def _outside(ratio, clip_low, clip_high):
    return ratio < 1 - clip_low or ratio > 1 + clip_high


def seq_ratios(logp, old_logp, token_mask):
    """float64[S]: GSPO ratio ``exp(mean over tokens of logp - old)`` (nan when no tokens)."""
    out = np.full(len(token_mask), np.nan)
    for s in range(len(token_mask)):
        toks = _tokens(token_mask, s)
        if toks:
            out[s] = math.exp(
                sum(float(logp[s][t]) - float(old_logp[s][t]) for t in toks) / len(toks)
            )
    return out


def policy_loss(
    name, logp, old_logp, token_mask, adv, keep, clip_low, clip_high, num_segments=None
):
    """(loss, metrics, grad): ``name`` in gspo / gspo_token / grpo; grad is dloss/dlogp."""
    denom = _denominator(token_mask, num_segments)
    num_s, num_l = np.shape(token_mask)
    ratios = seq_ratios(logp, old_logp, token_mask)
    total = 0.0
    grad = np.zeros((num_s, num_l))
    clip_hits, clip_count = 0, 0
    ratio_values = []
    kept, valid_count = 0, 0
    for s in range(num_s):
        toks = _tokens(token_mask, s)
        if not toks:
            continue
        valid_count += 1
        if name == "gspo":
            ratio_values.append(ratios[s])
        if not keep[s]:
            continue
        kept += 1
        a = float(adv[s])
        if name == "gspo":
            r = ratios[s]
            total += _clipped(r, a, clip_low, clip_high)
            clip_hits += _outside(r, clip_low, clip_high)
            clip_count += 1
            if r * a <= _clipped(r, a, clip_low, clip_high):  # unclipped branch is active
                for t in toks:
                    grad[s, t] = -a * r / len(toks) / denom
            continue
        segment = 0.0
        for t in toks:
            if name == "gspo_token":
                r = ratios[s]  # the value of sg[s_i]·π/sg[π]; its gradient is s_i·∇logp_t
            else:
                r = math.exp(float(logp[s][t]) - float(old_logp[s][t]))
            segment += _clipped(r, a, clip_low, clip_high)
            clip_hits += _outside(r, clip_low, clip_high)
            clip_count += 1
            ratio_values.append(r)
            if r * a <= _clipped(r, a, clip_low, clip_high):
                grad[s, t] = -a * r / len(toks) / denom
        total += segment / len(toks)
    metrics = {
        "clip_fraction": clip_hits / max(clip_count, 1),
        "kept_fraction": kept / max(valid_count, 1),
        "ratio_mean": sum(ratio_values) / max(len(ratio_values), 1),
        "ratio_min": min(ratio_values, default=math.inf),
        "ratio_max": max(ratio_values, default=-math.inf),
    }
    return -total / denom, metrics, grad


def kl_k3(logp, ref_logp, token_mask, num_segments=None):
    """Scalar: per-segment mean of ``exp(ref-logp) - (ref-logp) - 1``, summed, over S."""
    total = 0.0
    for s in range(len(token_mask)):
        toks = _tokens(token_mask, s)
        if toks:
            d = [float(ref_logp[s][t]) - float(logp[s][t]) for t in toks]
            total += sum(math.exp(x) - x - 1 for x in d) / len(toks)
    return total / _denominator(token_mask, num_segments)


def kl_token_max(logp, ref_logp, token_mask):
    """The largest per-token k3 term over the masked tokens."""
    terms = [
        math.expm1(float(ref_logp[s][t]) - float(logp[s][t]))
        - (float(ref_logp[s][t]) - float(logp[s][t]))
        for s in range(len(token_mask))
        for t in _tokens(token_mask, s)
    ]
    return max(terms)


def group_advantages(rewards, group_ids, valid, eps=1e-6):
    """float64[B]: (r - group mean) / (population std + eps) over valid members."""
    out = np.zeros(len(rewards))
    for b in range(len(rewards)):
        if not valid[b]:
            continue
        members = [
            float(rewards[c])
            for c in range(len(rewards))
            if valid[c] and group_ids[c] == group_ids[b]
        ]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / len(members))
        out[b] = (float(rewards[b]) - mean) / (std + eps)
    return out


# --- random cases (hypothesis strategies shared by the RL tests) ---------------------

MAX_NODES = 12


def random_graph(draw, st, *, num_nodes=MAX_NODES, noise=True):
    """A random padded DAG drawn with hypothesis: ``dict`` of the node_keep_mask inputs.

    Parents of node j are any subset of 0..j-1 (possibly empty); with ``noise``, edges
    that the convention says to ignore (backward, or touching padding nodes) are
    sprinkled in so that a leak through them shows up.
    """
    n = draw(st.integers(1, num_nodes))
    adjacency = np.zeros((num_nodes, num_nodes), bool)
    for j in range(1, n):
        adjacency[:j, j] = draw(st.lists(st.booleans(), min_size=j, max_size=j))
    if noise and draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        node_valid = np.arange(num_nodes) < n
        counted = np.triu(np.ones_like(adjacency), 1) & node_valid[:, None] & node_valid[None, :]
        adjacency |= (rng.random(adjacency.shape) < 0.3) & ~counted
    answer = draw(st.one_of(st.integers(-1, n - 1), st.integers(-1, num_nodes)))
    threshold = draw(st.sampled_from([1.0, 0.5, 0.75]))
    reward = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0, width=32)))
    relevant = np.array(draw(st.lists(st.booleans(), min_size=num_nodes, max_size=num_nodes)))
    return {
        "adjacency": adjacency,
        "node_valid": np.arange(num_nodes) < n,
        "answer_node": np.int32(answer),
        "reward": np.float32(reward),
        "relevant": relevant,
        "positive_threshold": np.float32(threshold),
    }
