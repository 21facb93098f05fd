"""GGPO node and segment keep masks against the loop reference and hand-checked graphs."""

import jax
import jax.numpy as jnp
import numpy as np
import rl_reference as ref
from hypothesis import given
from hypothesis import strategies as st

from vimrag_jax.rl.ggpo import batch_segment_keep, node_keep_mask, segment_keep_mask

N = ref.MAX_NODES
GRAPH_KEYS = ("adjacency", "node_valid", "answer_node", "reward", "relevant")


def _keep(adjacency, node_valid, answer_node, reward, relevant, threshold):
    return node_keep_mask(
        adjacency, node_valid, answer_node, reward, relevant, positive_threshold=threshold
    )


# Thresholds are traced so that one compile serves every example.
keep_jit = jax.jit(_keep)
keep_vmap = jax.jit(jax.vmap(_keep))
segment_keep_jit = jax.jit(segment_keep_mask)
batch_keep_jit = jax.jit(batch_segment_keep)


@st.composite
def graphs(draw, noise=True):
    return ref.random_graph(draw, st, noise=noise)


def _ref_keep(g):
    return ref.node_keep(
        g["adjacency"],
        g["node_valid"],
        int(g["answer_node"]),
        float(g["reward"]),
        g["relevant"],
        float(g["positive_threshold"]),
    )


def _args(g):
    return [g[k] for k in GRAPH_KEYS] + [g["positive_threshold"]]


@given(graphs())
def test_node_keep_matches_reference_under_jit(g):
    keep = np.asarray(keep_jit(*_args(g)))
    np.testing.assert_array_equal(keep, _ref_keep(g))
    assert not keep[~g["node_valid"]].any()


@given(st.lists(graphs(), min_size=4, max_size=4))
def test_node_keep_matches_reference_under_vmap(batch):
    stacked = [np.stack(column) for column in zip(*map(_args, batch), strict=True)]
    keep = np.asarray(keep_vmap(*stacked))
    np.testing.assert_array_equal(keep, np.stack([_ref_keep(g) for g in batch]))


@given(graphs(noise=False))
def test_positive_keep_is_closed_under_parents(g):
    """P_ans is an ancestor-closed set holding the answer node (or empty)."""
    g["reward"], g["positive_threshold"] = np.float32(1.0), np.float32(1.0)
    keep = np.asarray(keep_jit(*_args(g)))
    parents_of_kept = (g["adjacency"] & keep[None, :]).any(axis=1)
    assert not (parents_of_kept & ~keep).any()
    a = int(g["answer_node"])
    answered = 0 <= a < N and g["node_valid"][a]
    assert keep.any() == answered
    if answered:
        assert keep[a] and not keep[a + 1 :].any()


@given(
    st.lists(st.booleans(), min_size=N, max_size=N),
    st.lists(st.integers(-3, N + 3), min_size=9, max_size=9),
    st.lists(st.booleans(), min_size=9, max_size=9),
    st.booleans(),
)
def test_segment_keep_matches_reference(node_keep, segment_node, segment_valid, positive):
    node_keep, segment_node = np.array(node_keep), np.array(segment_node, np.int32)
    segment_valid = np.array(segment_valid)
    keep = segment_keep_jit(node_keep, segment_node, segment_valid, positive=np.bool_(positive))
    want = ref.segment_keep(node_keep, segment_node, segment_valid, positive)
    np.testing.assert_array_equal(keep, want)


@given(
    st.lists(graphs(), min_size=3, max_size=3),
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(-1, N), st.booleans()), min_size=8, max_size=8
    ),
)
def test_batch_segment_keep_matches_reference(trajectories, segments):
    """Segment-major rows: each row repeats its trajectory's graph."""
    rows = [trajectories[t] for t, _, _ in segments]
    columns = {k: np.stack([r[k] for r in rows]) for k in GRAPH_KEYS}
    segment_node = np.array([s for _, s, _ in segments], np.int32)
    segment_valid = np.array([v for _, _, v in segments])
    threshold = np.float32(0.75)
    keep = batch_keep_jit(
        *(columns[k] for k in GRAPH_KEYS),
        segment_node,
        segment_valid,
        positive_threshold=threshold,
    )
    for b, row in enumerate(rows):
        node_keep = _ref_keep({**row, "positive_threshold": threshold})
        positive = row["reward"] >= threshold
        expected = ref.segment_keep(
            node_keep, segment_node[b : b + 1], segment_valid[b : b + 1], positive
        )
        assert bool(keep[b]) == bool(expected[0]), b


# --- hand-checked graphs ------------------------------------------------------------


def _graph(n, edges, answer=-1, reward=1.0, relevant=()):
    adjacency = np.zeros((N, N), bool)
    for parent, child in edges:
        adjacency[parent, child] = True
    return {
        "adjacency": adjacency,
        "node_valid": np.arange(N) < n,
        "answer_node": np.int32(answer),
        "reward": np.float32(reward),
        "relevant": np.isin(np.arange(N), relevant),
        "positive_threshold": np.float32(1.0),
    }


def _kept_nodes(g):
    keep = np.asarray(keep_jit(*_args(g)))
    np.testing.assert_array_equal(keep, _ref_keep(g))  # the reference agrees on every case
    return set(np.flatnonzero(keep).tolist())


# 0 -> 1 -> 3 -> 5 (answer), 0 -> 2 -> 3, 0 -> 4 (dead end)
DIAMOND = [(0, 1), (0, 2), (1, 3), (2, 3), (0, 4), (3, 5)]


def test_positive_keeps_the_critical_path_only():
    assert _kept_nodes(_graph(6, DIAMOND, answer=5, reward=1.0)) == {0, 1, 2, 3, 5}


def test_negative_masks_relevant_nodes_and_keeps_the_wrong_answer():
    g = _graph(6, DIAMOND, answer=5, reward=0.0, relevant=(1, 4, 8))
    assert _kept_nodes(g) == {0, 2, 3, 5}


def test_fractional_reward_against_threshold():
    g = _graph(6, DIAMOND, answer=5, reward=0.6, relevant=(1,))
    assert _kept_nodes(g) == {0, 2, 3, 4, 5}  # 0.6 < 1.0: negative
    g["positive_threshold"] = np.float32(0.5)
    assert _kept_nodes(g) == {0, 1, 2, 3, 5}  # 0.6 >= 0.5: positive


def test_root_only_graph():
    assert _kept_nodes(_graph(1, [], answer=-1, reward=1.0)) == set()
    assert _kept_nodes(_graph(1, [], answer=-1, reward=0.0)) == {0}
    assert _kept_nodes(_graph(1, [], answer=-1, reward=0.0, relevant=(0,))) == set()


def test_answer_without_parents_keeps_only_itself():
    assert _kept_nodes(_graph(4, [(0, 1), (1, 2)], answer=3, reward=1.0)) == {3}


def test_reward_without_answer_masks_every_node():
    assert _kept_nodes(_graph(6, DIAMOND, answer=-1, reward=1.0)) == set()


def test_answer_on_a_padding_slot_is_no_answer():
    assert _kept_nodes(_graph(6, DIAMOND + [(5, 7)], answer=7, reward=1.0)) == set()


def test_edges_into_padding_do_not_leak():
    g = _graph(3, [(0, 1), (1, 2), (0, 5), (5, 2), (2, 1)], answer=2, reward=1.0)
    assert _kept_nodes(g) == {0, 1, 2}
    g = _graph(3, [(0, 2), (1, 5), (5, 2)], answer=2, reward=1.0)
    assert _kept_nodes(g) == {0, 2}


def test_invalid_turns_are_masked_in_positive_trajectories_only():
    node_keep = np.arange(N) < 2  # nodes 0 and 1 kept
    segment_node = np.array([0, 1, 2, -1, N, -1, 0, N + 5, 5], np.int32)
    segment_valid = np.array([1, 1, 1, 1, 1, 0, 0, 1, 1], bool)
    # Negative: a turn of no node keeps its negative gradient.
    keep = np.asarray(segment_keep_jit(node_keep, segment_node, segment_valid))
    np.testing.assert_array_equal(keep, [1, 1, 0, 1, 1, 0, 0, 1, 0])
    # Positive: nothing wasted is reinforced (SPEC §4).
    keep = np.asarray(segment_keep_jit(node_keep, segment_node, segment_valid, positive=True))
    np.testing.assert_array_equal(keep, [1, 1, 0, 0, 0, 0, 0, 0, 0])


def test_node_keep_runs_eagerly_on_plain_python_scalars():
    g = _graph(6, DIAMOND)
    keep = node_keep_mask(g["adjacency"], g["node_valid"], 5, 1, g["relevant"])
    assert keep.dtype == jnp.bool_ and set(np.flatnonzero(keep).tolist()) == {0, 1, 2, 3, 5}
