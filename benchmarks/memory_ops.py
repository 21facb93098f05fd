"""Times the memory-graph hot path: energy + pixel allocation + GGPO keep masks.

Ours: one ``jax.jit(jax.vmap(...))`` over a batch of padded graphs.
Baseline: a straightforward per-graph Python implementation of the same formulas
(loops over nodes, NumPy inside a node), the way a non-JAX codebase writes it.
Both run on the same random graphs in the same process; results are checked to
agree before the times are printed.

    python benchmarks/memory_ops.py [--graphs 1024] [--nodes 32] [--items 8]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from vimrag_jax.memory.energy import TOTAL_PIXELS, allocate_pixels, memory_energy
from vimrag_jax.rl.ggpo import node_keep_mask

# Argument order of `ours` and `baseline_one`.
ARGS = ("adjacency", "node_valid", "priority", "item_valid", "answer_node", "reward", "relevant")


def random_batch(rng: np.random.Generator, graphs: int, nodes: int, items: int) -> dict:
    """Random DAGs (parents before children), answers, rewards and relevance."""
    adjacency = np.zeros((graphs, nodes, nodes), bool)
    node_valid = np.zeros((graphs, nodes), bool)
    answer = np.full(graphs, -1, np.int32)
    for b in range(graphs):
        n = int(rng.integers(2, nodes + 1))
        node_valid[b, :n] = True
        for j in range(1, n):
            parents = rng.choice(j, int(rng.integers(1, min(j, 3) + 1)), replace=False)
            adjacency[b, parents, j] = True
        if rng.random() < 0.9:
            answer[b] = n - 1
    item_valid = (rng.random((graphs, nodes, items)) < 0.5) & node_valid[..., None]
    item_valid[:, 0] = False
    return {
        "adjacency": adjacency,
        "node_valid": node_valid,
        "priority": rng.integers(1, 6, (graphs, nodes, items)).astype(np.float32),
        "item_valid": item_valid,
        "answer_node": answer,
        "reward": (rng.random(graphs) < 0.5).astype(np.float32),
        "relevant": (rng.random((graphs, nodes)) < 0.3) & node_valid,
    }


def ours(adjacency, node_valid, priority, item_valid, answer_node, reward, relevant):
    omega = memory_energy(adjacency, node_valid, priority, item_valid)
    pixels = allocate_pixels(omega, item_valid)
    keep = node_keep_mask(adjacency, node_valid, answer_node, reward, relevant)
    return pixels, keep


# --- the per-graph baseline ---------------------------------------------------------


def baseline_one(
    adjacency,
    node_valid,
    priority,
    item_valid,
    answer_node,
    reward,
    relevant,
    lam=0.1,
    gamma=0.3,
    total_pixels=TOTAL_PIXELS,
    top_k=5,
):
    nodes = np.flatnonzero(node_valid)
    n = len(nodes)
    children = {i: [j for j in nodes if j > i and adjacency[i, j]] for i in nodes}
    parents = {j: [i for i in nodes if i < j and adjacency[i, j]] for j in nodes}
    omega = np.zeros(priority.shape)
    node_mean = {}
    for i in reversed(nodes):
        feedback = sum(node_mean.get(j, 0.0) for j in children[i])
        decay = math.exp(-lam * ((n - 1) - i))
        row = (priority[i] / 5.0) * (1 + len(children[i])) * decay + gamma * feedback
        omega[i] = np.where(item_valid[i], row, 0.0)
        if item_valid[i].any():
            node_mean[i] = omega[i][item_valid[i]].mean()
    flat = [
        (-omega[i, k], i * omega.shape[1] + k) for i, k in zip(*np.nonzero(item_valid), strict=True)
    ]
    chosen = sorted(flat)[:top_k]
    total = sum(-v for v, _ in chosen)
    pixels = np.zeros(priority.shape, np.int64)
    for v, f in chosen:
        pixels.flat[f] = math.floor(total_pixels * (-v) / total)
    keep = np.zeros(node_valid.shape, bool)
    if reward >= 1.0:
        if answer_node >= 0:
            stack, seen = [answer_node], {answer_node}
            while stack:
                for p in parents[stack.pop()]:
                    if p not in seen:
                        seen.add(p)
                        stack.append(p)
            keep[list(seen)] = True
    else:
        keep = node_valid & ~relevant
    return pixels, keep


def baseline(batch: dict):
    out = [baseline_one(*(batch[k][b] for k in ARGS)) for b in range(len(batch["reward"]))]
    return np.stack([p for p, _ in out]), np.stack([k for _, k in out])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=1024)
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7, help="baseline runs, interleaved")
    parser.add_argument("--repeats", type=int, default=20, help="our runs per round")
    args = parser.parse_args()

    batch = random_batch(np.random.default_rng(0), args.graphs, args.nodes, args.items)
    fn = jax.jit(jax.vmap(ours))
    inputs = [jnp.asarray(batch[k]) for k in ARGS]

    start = time.perf_counter()
    pixels, keep = jax.block_until_ready(fn(*inputs))
    compile_s = time.perf_counter() - start
    ref_pixels, ref_keep = baseline(batch)

    # Interleave the two sides so machine noise (a shared VM) hits both alike.
    ours_times, base_times = [], []
    for _ in range(args.rounds):
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        baseline(batch)
        base_times.append(time.perf_counter() - start)
    ours_s, base_s = float(np.median(ours_times)), float(np.median(base_times))

    assert np.array_equal(np.asarray(keep), ref_keep), "keep masks disagree"
    assert np.max(np.abs(np.asarray(pixels) - ref_pixels)) <= 1, "pixel budgets disagree"

    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} x {jax.devices()[0].platform}, jax {jax.__version__}"
    )
    print(f"batch: {args.graphs} graphs, N={args.nodes} nodes, K={args.items} items")
    print(
        f"jax jit+vmap : {ours_s * 1e3:8.3f} ms/batch (median of {len(ours_times)}; "
        f"first call incl. compile {compile_s:.2f} s)"
    )
    print(f"python loop  : {base_s * 1e3:8.1f} ms/batch (median of {len(base_times)})")
    print(f"speed-up     : {base_s / ours_s:8.1f}x")


if __name__ == "__main__":
    main()
