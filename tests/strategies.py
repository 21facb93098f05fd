"""Hypothesis strategies for padded memory graphs of fixed capacity."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

N_NODES = 12
N_ITEMS = 4


@st.composite
def padded_dags(draw, n_nodes: int = N_NODES, n_items: int = N_ITEMS, junk: bool = True):
    """(adjacency, node_valid, priority, item_valid) of a random DAG in padded form.

    Parents are drawn among earlier nodes, so every edge goes lower → higher. With
    ``junk`` the padding slots get random edges and items that must be ignored.
    """
    n = draw(st.integers(1, n_nodes))
    node_valid = np.arange(n_nodes) < n
    adjacency = np.zeros((n_nodes, n_nodes), bool)
    for j in range(1, n):
        parents = draw(st.sets(st.integers(0, j - 1), min_size=1, max_size=min(j, 3)))
        adjacency[sorted(parents), j] = True
    flat_bools = st.lists(st.booleans(), min_size=n_nodes * n_items, max_size=n_nodes * n_items)
    priority = np.array(
        draw(st.lists(st.integers(1, 5), min_size=n_nodes * n_items, max_size=n_nodes * n_items)),
        np.float32,
    ).reshape(n_nodes, n_items)
    item_valid = np.array(draw(flat_bools), bool).reshape(n_nodes, n_items)
    if not draw(st.booleans()):
        item_valid[0] = False  # usually the root holds no memory; sometimes test that it may
    if junk and draw(st.booleans()):
        junk_edges = np.array(
            draw(st.lists(st.booleans(), min_size=n_nodes**2, max_size=n_nodes**2))
        )
        adjacency |= np.triu(junk_edges.reshape(n_nodes, n_nodes), 1) & ~node_valid[None, :]
    else:
        item_valid &= node_valid[:, None]
    return adjacency, node_valid, priority, item_valid
