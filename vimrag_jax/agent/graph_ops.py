"""Batched memory-graph updates for the agent loop: one jitted call per turn for every episode.

The loop keeps all episodes' graphs in one batched ``MemoryGraph`` (leading axis B). Each turn it
packs what every row did into a ``TurnActions`` of padded arrays (a kind per row, parent masks,
query tokens, the memorize bank and summary) and ``TurnUpdater`` applies them with a single
``jax.jit(jax.vmap(...))`` call that also returns the next step's per-frame pixel budgets. Rows that
did nothing this turn (finished, invalid action) carry ``NONE`` and are left unchanged. No
per-episode JAX dispatch happens on the host.

The host checks every action before packing it (``agent.actions``), so the graph ops here see only
valid actions; their ``error`` codes still guard the arrays.
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vimrag_jax.memory import energy
from vimrag_jax.memory.graph import (
    MemoryGraph,
    VisualBank,
    add_answer_node,
    add_search_node,
    empty_graph,
    memorize,
)


class ActionKind(enum.IntEnum):
    """What a row does to its graph this turn."""

    NONE = 0
    SEARCH = 1
    MEMORIZE = 2
    ANSWER = 3


@struct.dataclass
class TurnActions:
    """One turn's actions for B rows (host-built numpy or device arrays)."""

    kind: jax.Array  # int32[B], ActionKind
    parent_mask: jax.Array  # bool[B, N], search / answer parents
    query_tokens: jax.Array  # int32[B, Q], search sub-query (0-padded)
    query_len: jax.Array  # int32[B]
    node: jax.Array  # int32[B], memorize target
    bank: VisualBank  # [B, K] retrieved items with the policy's judgement
    summary_tokens: jax.Array  # int32[B, T]
    summary_len: jax.Array  # int32[B]
    step: jax.Array  # int32[B], the model call that produced the action


def blank_actions(graphs: MemoryGraph) -> dict[str, np.ndarray]:
    """Writable numpy buffers for a ``TurnActions`` matching ``graphs`` (all rows ``NONE``)."""
    b, n = graphs.node_valid.shape
    k = graphs.bank.valid.shape[-1]
    f = graphs.bank.timestamps.shape[-1]
    return {
        "kind": np.zeros((b,), np.int32),
        "parent_mask": np.zeros((b, n), bool),
        "query_tokens": np.zeros((b, graphs.query_tokens.shape[-1]), np.int32),
        "query_len": np.zeros((b,), np.int32),
        "node": np.zeros((b,), np.int32),
        "bank_valid": np.zeros((b, k), bool),
        "bank_priority": np.ones((b, k), np.float32),
        "bank_saliency": np.zeros((b, k), bool),
        "bank_modality": np.zeros((b, k), np.int32),
        "bank_item_id": np.full((b, k), -1, np.int32),
        "bank_timestamps": np.zeros((b, k, f), np.float32),
        "bank_keyframe_valid": np.zeros((b, k, f), bool),
        "summary_tokens": np.zeros((b, graphs.summary_tokens.shape[-1]), np.int32),
        "summary_len": np.zeros((b,), np.int32),
        "step": np.zeros((b,), np.int32),
    }


def pack_actions(buffers: dict[str, np.ndarray]) -> TurnActions:
    """The ``TurnActions`` of ``blank_actions`` buffers filled in by the host."""
    bank = VisualBank(
        valid=buffers["bank_valid"],
        priority=buffers["bank_priority"],
        saliency=buffers["bank_saliency"],
        modality=buffers["bank_modality"],
        item_id=buffers["bank_item_id"],
        timestamps=buffers["bank_timestamps"],
        keyframe_valid=buffers["bank_keyframe_valid"],
    )
    fields = ("kind", "parent_mask", "query_tokens", "query_len", "node")
    rest = ("summary_tokens", "summary_len", "step")
    return TurnActions(
        **{name: buffers[name] for name in fields + rest},
        bank=bank,
    )


def _select(kind: jax.Array, options: dict[int, MemoryGraph], default: MemoryGraph):
    out = default
    for code, graph in options.items():
        out = jax.tree.map(lambda new, old, c=code: jnp.where(kind == c, new, old), graph, out)
    return out


def apply_one(graph: MemoryGraph, action: TurnActions) -> MemoryGraph:
    """Applies one row's action (unbatched); rows with ``NONE`` come back unchanged."""
    searched, new = add_search_node(
        graph, action.parent_mask, action.query_tokens, step=action.step
    )
    slot = jnp.clip(new, 0, graph.max_nodes - 1)
    width = graph.query_tokens.shape[-1]
    searched = searched.replace(
        query_len=jnp.where(
            new >= 0,
            searched.query_len.at[slot].set(jnp.minimum(action.query_len, width)),
            searched.query_len,
        )
    )
    memorized = memorize(graph, action.node, action.bank, action.summary_tokens)
    node = jnp.clip(action.node, 0, graph.max_nodes - 1)
    width = graph.summary_tokens.shape[-1]
    memorized = memorized.replace(
        summary_len=jnp.where(
            memorized.error == 0,
            memorized.summary_len.at[node].set(jnp.minimum(action.summary_len, width)),
            memorized.summary_len,
        )
    )
    answered, _ = add_answer_node(graph, action.parent_mask, step=action.step)
    options = {
        int(ActionKind.SEARCH): searched,
        int(ActionKind.MEMORIZE): memorized,
        int(ActionKind.ANSWER): answered,
    }
    return _select(action.kind, options, graph)


class TurnUpdater:
    """Jitted ``(graphs, actions) -> (graphs, frame budgets int32[B, N, K])`` for a batch.

    ``mode`` is the visual budget rule (``"averaged"`` for training rollouts, ``"energy"`` for
    evaluation); the remaining arguments are the SPEC §2 constants. Compiles once per batch size.
    """

    def __init__(
        self,
        *,
        mode: energy.BudgetMode,
        lam: float = 0.1,
        gamma: float = 0.3,
        total_pixels: int = energy.TOTAL_PIXELS,
        top_k: int = 5,
    ):
        if mode not in ("averaged", "energy"):
            raise ValueError(f"budget mode must be 'averaged' or 'energy', got {mode!r}")
        budget = functools.partial(
            energy.frame_pixel_budget,
            mode=mode,
            lam=lam,
            gamma=gamma,
            total_pixels=total_pixels,
            top_k=top_k,
        )

        def update(graphs: MemoryGraph, actions: TurnActions):
            graphs = jax.vmap(apply_one)(graphs, actions)
            return graphs, jax.vmap(budget)(graphs)

        self._update = jax.jit(update, donate_argnums=(0,))

    def __call__(self, graphs: MemoryGraph, actions: TurnActions) -> tuple[MemoryGraph, jax.Array]:
        return self._update(graphs, actions)


@functools.lru_cache(maxsize=16)
def turn_updater(
    mode: energy.BudgetMode,
    lam: float = 0.1,
    gamma: float = 0.3,
    total_pixels: int = energy.TOTAL_PIXELS,
    top_k: int = 5,
) -> TurnUpdater:
    """A shared ``TurnUpdater`` per setting, so agents with equal settings share compilations."""
    return TurnUpdater(mode=mode, lam=lam, gamma=gamma, total_pixels=total_pixels, top_k=top_k)


def batched_empty_graph(
    batch: int,
    max_nodes: int,
    max_items: int,
    *,
    max_query_tokens: int,
    max_summary_tokens: int,
    max_keyframes: int,
) -> MemoryGraph:
    """B root-only graphs stacked on a leading axis."""
    one = empty_graph(
        max_nodes,
        max_items,
        max_query_tokens=max_query_tokens,
        max_summary_tokens=max_summary_tokens,
        max_keyframes=max_keyframes,
    )
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch, *x.shape)).copy(), one)


__all__ = [
    "ActionKind",
    "TurnActions",
    "TurnUpdater",
    "apply_one",
    "batched_empty_graph",
    "blank_actions",
    "pack_actions",
    "turn_updater",
]
