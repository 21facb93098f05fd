"""Loop-level NumPy references for the memory graph and its energy budget.

Written the way a non-JAX codebase would: Python loops over nodes and items,
float64 arithmetic, straight from the formulas in SPEC §2. Tests compare the
vectorized JAX code against these on many random graphs.
"""

from __future__ import annotations

import math

import numpy as np


def children_of(adjacency: np.ndarray, node_valid: np.ndarray, i: int) -> list[int]:
    n_nodes = len(node_valid)
    if not node_valid[i]:
        return []
    return [j for j in range(i + 1, n_nodes) if node_valid[j] and adjacency[i, j]]


def parents_of(adjacency: np.ndarray, node_valid: np.ndarray, j: int) -> list[int]:
    if not node_valid[j]:
        return []
    return [i for i in range(j) if node_valid[i] and adjacency[i, j]]


def _reachable(step, adjacency, node_valid, node) -> set[int]:
    """Nodes reachable from ``node`` by repeated ``step`` (parents or children), by DFS."""
    seen: set[int] = set()
    stack = step(adjacency, node_valid, node)
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack.extend(step(adjacency, node_valid, i))
    return seen


def ancestors(adjacency: np.ndarray, node_valid: np.ndarray, node: int) -> set[int]:
    """Strict ancestors by depth-first search over parent lists."""
    if node < 0:
        return set()
    return _reachable(parents_of, adjacency, node_valid, node)


def descendants(adjacency: np.ndarray, node_valid: np.ndarray, node: int) -> set[int]:
    return _reachable(children_of, adjacency, node_valid, node)


def critical_path(adjacency, node_valid, answer_node) -> np.ndarray:
    out = np.zeros(len(node_valid), bool)
    if 0 <= answer_node < len(node_valid) and node_valid[answer_node]:
        out[answer_node] = True
        for i in ancestors(adjacency, node_valid, answer_node):
            out[i] = True
    return out


def memory_energy(adjacency, node_valid, priority, item_valid, lam=0.1, gamma=0.3) -> np.ndarray:
    n_nodes, n_items = priority.shape
    n = int(sum(node_valid))
    omega = np.zeros((n_nodes, n_items))
    # Reverse creation order: every child is finished before its parents.
    for i in reversed(range(n_nodes)):
        if not node_valid[i]:
            continue
        kids = children_of(adjacency, node_valid, i)
        feedback = 0.0
        for j in kids:
            valid_j = [k for k in range(n_items) if item_valid[j, k]]
            if valid_j:
                feedback += sum(omega[j, k] for k in valid_j) / len(valid_j)
        for k in range(n_items):
            if item_valid[i, k]:
                intrinsic = (
                    (priority[i, k] / 5.0) * (1 + len(kids)) * math.exp(-lam * ((n - 1) - i))
                )
                omega[i, k] = intrinsic + gamma * feedback
    return omega


def top_k_items(omega, item_valid, top_k=5) -> np.ndarray:
    n_nodes, n_items = omega.shape
    candidates = [
        (-float(omega[i, k]), i * n_items + k)
        for i in range(n_nodes)
        for k in range(n_items)
        if item_valid[i, k]
    ]
    chosen = np.zeros(n_nodes * n_items, bool)
    for _, flat in sorted(candidates)[:top_k]:
        chosen[flat] = True
    return chosen.reshape(n_nodes, n_items)


def allocate_pixels(omega, item_valid, total_pixels=1310720, top_k=5) -> np.ndarray:
    chosen = top_k_items(omega, item_valid, top_k)
    denom = sum(float(omega[i, k]) for i, k in zip(*np.nonzero(chosen), strict=True))
    out = np.zeros(omega.shape, np.int64)
    for i, k in zip(*np.nonzero(chosen), strict=True):
        out[i, k] = math.floor(total_pixels * float(omega[i, k]) / denom) if denom > 0 else 0
    return out


def random_graph(rng: np.random.Generator, n_nodes: int, n_items: int, *, junk: bool = True):
    """A random padded DAG: parents before children, optional junk in padding slots."""
    n = int(rng.integers(1, n_nodes + 1))
    node_valid = np.arange(n_nodes) < n
    adjacency = np.zeros((n_nodes, n_nodes), bool)
    for j in range(1, n):
        n_parents = int(rng.integers(1, min(j, 3) + 1))
        adjacency[rng.choice(j, n_parents, replace=False), j] = True
    priority = rng.integers(1, 6, (n_nodes, n_items)).astype(np.float32)
    item_valid = rng.random((n_nodes, n_items)) < 0.6
    item_valid[0] = False  # the root holds no memory
    if junk:  # padding may hold anything; it must be ignored
        adjacency |= np.triu(rng.random((n_nodes, n_nodes)) < 0.2, 1) & ~node_valid[None, :]
        item_valid |= ~node_valid[:, None] & (rng.random((n_nodes, n_items)) < 0.5)
    else:
        item_valid &= node_valid[:, None]
    return adjacency, node_valid, priority, item_valid
