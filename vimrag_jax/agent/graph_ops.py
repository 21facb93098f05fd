"""Batched memory-graph updates for the agent loop: one jitted call per turn for every episode.

The loop keeps all episodes' graphs in one batched ``MemoryGraph`` (leading axis B). Each turn it
packs what every row did into a ``TurnActions`` of padded arrays (a kind per row, parent masks,
query tokens, the memorize bank and summary) and ``TurnUpdater`` applies them with a single
``jax.jit(jax.vmap(...))`` call that also returns a ``TurnView``: what the host reads back each
step (every row's structure, the status of its action, the next step's per-frame pixel budgets).
Rows that did nothing this turn (finished, invalid action) carry ``NONE`` and are left unchanged.
No per-episode JAX dispatch happens on the host.

The graph decides whether an action's structure is valid: parents that exist, room for the node
(``apply_one`` keeps the last slot for the answer), no second answer. A rejected action leaves
its row unchanged except ``error``, which ``agent.actions`` turns into the invalid-action message.
The host checks only what the graph cannot see (texts, ids, the search/memorize alternation).
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
    GraphError,
    MemoryGraph,
    NodeKind,
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


def _search_keeping_the_last_slot(graph: MemoryGraph, action: TurnActions):
    """``add_search_node``, except that a search may not take the last free slot: the agent keeps
    it for the answer node, so an episode can always end with an answer. Taking it is
    ``GRAPH_FULL`` (after ``ALREADY_ANSWERED``, as in the graph's own order of checks)."""
    searched, new = add_search_node(
        graph, action.parent_mask, action.query_tokens, step=action.step
    )
    last = (graph.num_nodes >= graph.max_nodes - 1) & (graph.answer_node < 0)
    kept = graph.replace(error=jnp.asarray(GraphError.GRAPH_FULL, jnp.int32))
    searched = jax.tree.map(lambda a, b: jnp.where(last, a, b), kept, searched)
    return searched, jnp.where(last, -1, new)


def apply_one(graph: MemoryGraph, action: TurnActions) -> MemoryGraph:
    """Applies one row's action (unbatched); rows with ``NONE`` come back unchanged, and so do
    rows whose action the graph rejects, except their ``error``."""
    searched, new = _search_keeping_the_last_slot(graph, action)
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


@struct.dataclass
class TurnView:
    """What the host reads back after each turn (one small transfer per step): every row's graph
    structure, the status of the row's action and the next step's frame budgets.

    Batched ``[B, ...]`` as the updater returns it; ``row(r)`` is one episode's host view, whose
    ``num_nodes``, ``parents`` and ``answer_node`` are the structure the prompts show.
    """

    adjacency: jax.Array  # bool[B, N, N]
    node_valid: jax.Array  # bool[B, N]
    node_kind: jax.Array  # int32[B, N], NodeKind
    error: jax.Array  # int32[B], GraphError of this turn's action (OK for rows without one)
    budgets: jax.Array  # int32[B, N, K], frame pixel budgets for the next prompt

    @classmethod
    def of(cls, graphs: MemoryGraph, budgets: jax.Array, error: jax.Array) -> TurnView:
        """The view of (batched) ``graphs`` with these budgets and statuses."""
        return cls(graphs.adjacency, graphs.node_valid, graphs.node_kind, error, budgets)

    def row(self, r: int) -> TurnView:
        """Episode ``r``'s view (unbatched host arrays)."""
        return jax.tree.map(lambda x: np.asarray(x)[r], self)

    @property
    def num_nodes(self) -> int:
        """Nodes in the graph (unbatched view)."""
        return int(np.sum(self.node_valid))

    @property
    def answer_node(self) -> int:
        """The answer node's index, -1 until answered (unbatched view)."""
        found = np.flatnonzero(np.asarray(self.node_kind) == NodeKind.ANSWER)
        return int(found[0]) if found.size else -1

    def parents(self, node: int) -> list[int]:
        """Node ``node``'s parents in index order (unbatched view)."""
        return np.flatnonzero(np.asarray(self.adjacency)[:, node]).tolist()


def initial_view(graphs: MemoryGraph) -> TurnView:
    """The host view of fresh graphs: no action yet, zero budgets (there is no memory)."""
    b, n = graphs.node_valid.shape
    budgets = np.zeros((b, n, graphs.max_items), np.int32)
    structure = jax.device_get((graphs.adjacency, graphs.node_valid, graphs.node_kind))
    return TurnView(*structure, np.zeros((b,), np.int32), budgets)


class TurnUpdater:
    """Jitted ``(graphs, actions) -> (graphs, TurnView)`` for a batch; the view comes back as
    host arrays.

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
            error = jnp.where(actions.kind == ActionKind.NONE, GraphError.OK, graphs.error)
            return graphs, TurnView.of(graphs, jax.vmap(budget)(graphs), error)

        self._update = jax.jit(update, donate_argnums=(0,))

    def __call__(self, graphs: MemoryGraph, actions: TurnActions) -> tuple[MemoryGraph, TurnView]:
        graphs, view = self._update(graphs, actions)
        return graphs, jax.device_get(view)


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
    "TurnView",
    "apply_one",
    "batched_empty_graph",
    "blank_actions",
    "initial_view",
    "pack_actions",
    "turn_updater",
]
