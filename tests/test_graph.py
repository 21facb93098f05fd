"""Memory-graph operations and queries against a plain Python model of the DAG."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import memory_reference as ref
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import N_ITEMS, N_NODES, padded_dags

from vimrag_jax.memory import graph as G

KEYFRAMES = 2
search_jit = jax.jit(G.add_search_node)
answer_jit = jax.jit(G.add_answer_node)
memorize_jit = jax.jit(G.memorize)
closure_jit = jax.jit(G.transitive_closure)
ancestors_jit = jax.jit(G.ancestors)
descendants_jit = jax.jit(G.descendants)
critical_jit = jax.jit(G.critical_path)
dead_ends_jit = jax.jit(G.dead_ends)


def mask(n: int, indices) -> jnp.ndarray:
    out = np.zeros(n, bool)
    out[list(indices)] = True
    return jnp.asarray(out)


def bank_of(priority, useful, item_id) -> G.VisualBank:
    k = len(priority)
    return G.VisualBank(
        valid=jnp.ones(k, bool),
        priority=jnp.asarray(priority, jnp.float32),
        saliency=jnp.asarray(useful, bool),
        modality=jnp.zeros(k, jnp.int32),
        item_id=jnp.asarray(item_id, jnp.int32),
        timestamps=jnp.zeros((k, KEYFRAMES)),
        keyframe_valid=jnp.zeros((k, KEYFRAMES), bool),
    )


ops = st.lists(
    st.one_of(
        st.tuples(st.just("search"), st.sets(st.integers(0, N_NODES + 1), max_size=3)),
        st.tuples(st.just("answer"), st.sets(st.integers(0, N_NODES + 1), max_size=3)),
        st.tuples(
            st.just("memorize"),
            st.integers(-1, N_NODES),
            st.lists(st.integers(1, 5), min_size=N_ITEMS, max_size=N_ITEMS),
            st.lists(st.booleans(), min_size=N_ITEMS, max_size=N_ITEMS),
        ),
    ),
    max_size=N_NODES + 3,
)


@given(ops)
def test_operations_follow_python_model(sequence):
    g = G.empty_graph(N_NODES, N_ITEMS, max_keyframes=KEYFRAMES)
    parents: list[list[int]] = [[]]  # the model: parent lists, kinds, answer, memories
    kinds = [G.NodeKind.ROOT]
    answer = -1
    memory: dict[int, list[tuple[int, float]]] = {}
    for step, op in enumerate(sequence, start=1):
        if op[0] in ("search", "answer"):
            wanted = sorted(p for p in op[1] if p < N_NODES)
            if answer >= 0:
                code = G.GraphError.ALREADY_ANSWERED
            elif len(kinds) >= N_NODES:
                code = G.GraphError.GRAPH_FULL
            elif not wanted:
                code = G.GraphError.NO_PARENT
            elif any(p >= len(kinds) for p in wanted):
                code = G.GraphError.UNKNOWN_PARENT
            else:
                code = G.GraphError.OK
            fn = search_jit if op[0] == "search" else answer_jit
            args = (jnp.array([step, step + 1, 0]),) if op[0] == "search" else ()
            g, index = fn(g, mask(N_NODES, wanted), *args, step=step)
            assert int(g.error) == code
            if code == G.GraphError.OK:
                assert int(index) == len(kinds)
                parents.append(wanted)
                kinds.append(G.NodeKind.SEARCH if op[0] == "search" else G.NodeKind.ANSWER)
                if op[0] == "answer":
                    answer = int(index)
            else:
                assert int(index) == -1
        else:
            _, node, priority, useful = op
            ok = 0 <= node < len(kinds) and kinds[node] == G.NodeKind.SEARCH
            items = bank_of(priority, useful, np.arange(N_ITEMS) + 100 * step)
            g = memorize_jit(g, node, items, jnp.array([1, 2]))
            assert int(g.error) == (G.GraphError.OK if ok else G.GraphError.NOT_A_SEARCH_NODE)
            if ok:
                memory[node] = [
                    (100 * step + k, p)
                    for k, (p, u) in enumerate(zip(priority, useful, strict=True))
                    if u
                ]
    n = len(kinds)
    assert int(g.num_nodes) == n and int(g.answer_node) == answer
    np.testing.assert_array_equal(g.node_valid, np.arange(N_NODES) < n)
    np.testing.assert_array_equal(g.node_kind[:n], kinds)
    assert np.all(np.asarray(g.node_kind[n:]) == G.NodeKind.EMPTY)
    for j in range(N_NODES):
        want = parents[j] if j < n else []
        assert np.flatnonzero(np.asarray(g.adjacency[:, j])).tolist() == want
    for i in range(N_NODES):
        kept = np.asarray(g.bank.valid[i])
        got = list(
            zip(
                np.asarray(g.bank.item_id[i])[kept].tolist(),
                np.asarray(g.bank.priority[i])[kept].tolist(),
                strict=True,
            )
        )
        assert got == memory.get(i, [])


@given(padded_dags())
def test_queries_match_reference(dag):
    adjacency, node_valid, _, _ = dag
    adjacency = G.valid_adjacency(jnp.asarray(adjacency), jnp.asarray(node_valid))
    adjacency_np = np.asarray(adjacency)
    closure = np.asarray(closure_jit(adjacency))
    n = int(node_valid.sum())
    for i in range(N_NODES):
        want_desc = ref.descendants(adjacency_np, node_valid, i)
        assert set(np.flatnonzero(closure[i])) == want_desc
        assert set(np.flatnonzero(np.asarray(descendants_jit(adjacency, i)))) == want_desc
        want_anc = ref.ancestors(adjacency_np, node_valid, i)
        assert set(np.flatnonzero(np.asarray(ancestors_jit(adjacency, i)))) == want_anc
    for answer in (-1, 0, n - 1):
        got = np.asarray(critical_jit(adjacency, node_valid, answer))
        np.testing.assert_array_equal(got, ref.critical_path(adjacency_np, node_valid, answer))
        dead = np.asarray(dead_ends_jit(adjacency, node_valid, answer))
        np.testing.assert_array_equal(dead, node_valid & ~got)
    degree = np.asarray(G.out_degree(adjacency, node_valid))
    assert degree.tolist() == [
        len(ref.children_of(adjacency_np, node_valid, i)) for i in range(N_NODES)
    ]


def test_vmap_over_a_batch_of_graphs():
    batch = jax.vmap(lambda _: G.empty_graph(5, 2))(jnp.arange(3))
    parent = jnp.stack([mask(5, [0]), mask(5, []), mask(5, [3])])
    batch, index = jax.vmap(G.add_search_node)(batch, parent, jnp.ones((3, 2), jnp.int32))
    assert index.tolist() == [1, -1, -1]
    assert batch.error.tolist() == [
        G.GraphError.OK,
        G.GraphError.NO_PARENT,
        G.GraphError.UNKNOWN_PARENT,
    ]
    path = jax.vmap(G.critical_path)(batch.adjacency, batch.node_valid, jnp.array([1, -1, 0]))
    assert path.tolist() == [
        [True, True, False, False, False],
        [False] * 5,
        [True, False, False, False, False],
    ]


def test_edge_cases_and_eager_errors():
    g = G.empty_graph(3, 1)
    assert G.critical_path(g.adjacency, g.node_valid, -1).tolist() == [False] * 3
    assert G.dead_ends(g.adjacency, g.node_valid, -1).tolist() == [True, False, False]
    # An answer node listing no parents is refused by the ops...
    g2, index = G.add_answer_node(g, mask(3, []))
    assert int(index) == -1
    with pytest.raises(G.MemoryGraphError, match="NO_PARENT"):
        G.check(g2)
    # ...but arrays from elsewhere may hold one: its critical path is itself.
    valid = jnp.array([True, True, False])
    assert G.critical_path(jnp.zeros((3, 3), bool), valid, 1).tolist() == [False, True, False]
    g, _ = G.add_search_node(g, mask(3, [0]), jnp.arange(40))  # long query is truncated
    assert int(g.query_len[1]) == g.query_tokens.shape[-1]
    g, _ = G.add_search_node(g, mask(3, [1]), jnp.array([1]))
    with pytest.raises(G.MemoryGraphError, match="GRAPH_FULL"):
        G.check(G.add_search_node(g, mask(3, [1]), jnp.array([1]))[0])
    with pytest.raises(G.MemoryGraphError, match="NOT_A_SEARCH_NODE"):
        G.check(
            G.memorize(
                g,
                0,
                bank_of([3], [True], [1]).replace(
                    timestamps=jnp.zeros((1, 4)), keyframe_valid=jnp.zeros((1, 4), bool)
                ),
                jnp.array([1]),
            )
        )
    with pytest.raises(ValueError, match="max_nodes"):
        G.empty_graph(1, 1)
