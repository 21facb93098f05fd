"""What each memory lets the toy agent see, and the small policy network over it.

The three memories are views of the same episode record (the ``MemoryGraph`` the toy builds;
nodes in creation order are the linear history):

- ``graph`` (VimRAG): every node, so every sub-query issued and the deepest fact found;
- ``linear`` (ReAct under a context limit): the question plus the last ``window`` nodes;
  older steps, and the progress they held, fall out of the context;
- ``summary`` (Mem1-style): a fixed-size state that keeps the progress (the deepest fact
  found, so the current cue and the answer once known) and the last step, but not the list of
  sub-queries tried before it.

Each view is encoded the same way, one row per action: for a sub-query whether the known cue
names it, whether the memory shows it was issued, and whether it was the last step's; for an
answer whether the known last fact names it; plus shared features (answer known, step, depth).
The policy scores every row with one small MLP (shared weights) and samples from the softmax.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vimrag_jax.memory.graph import NodeKind
from vimrag_jax.toy.env import EnvConfig, EnvState, Question

MEMORIES = ("graph", "linear", "summary")

Params = dict[str, jax.Array]


class Observation(NamedTuple):
    """What the policy sees at one step (``encode``'s output; batch with leading axes)."""

    items: jax.Array  # float32[Q + A, 4]: one row per action
    shared: jax.Array  # float32[2 + max_hops + 1]: answer known, step / T, depth one-hot


def memory_id(memory: str) -> int:
    """The index of a memory's name in ``MEMORIES`` (what ``encode`` takes, maybe traced)."""
    if memory not in MEMORIES:
        raise ValueError(f"unknown memory {memory!r}; known: {', '.join(MEMORIES)}")
    return MEMORIES.index(memory)


def _visible(memory: jax.Array, state: EnvState, window: int) -> tuple[jax.Array, ...]:
    """bool[N] search nodes whose sub-query, and whose found fact, the memory holds; and the
    newest search node (the last step, which every memory holds)."""
    graph = state.graph
    index = jnp.arange(graph.max_nodes)
    search = graph.node_valid & (graph.node_kind == NodeKind.SEARCH)
    recent = search & (index >= graph.num_nodes - window)
    newest = search & (index == graph.num_nodes - 1)
    issued = jnp.stack([search, recent, newest])[memory]  # graph, linear, summary
    found = jnp.stack([search, recent, search])[memory]
    return issued, found, newest


def encode(
    config: EnvConfig,
    memory: int | jax.Array,
    question: Question,
    state: EnvState,
    window: int = 2,
) -> Observation:
    """One row per action (and the shared features): what memory ``MEMORIES[memory]`` shows of the
    episode (``memory`` may be traced, so one compiled program serves all three)."""
    graph = state.graph
    issued_view, fact_view, newest = _visible(memory, state, window)
    query_n = graph.query_tokens[:, 0]
    hop_n = graph.summary_tokens[:, 0] - 1  # chain fact k is token 1 + k
    is_chain_n = (hop_n >= 0) & (hop_n < config.max_hops)
    depth = jnp.max(jnp.where(fact_view & is_chain_n, hop_n, -1))  # -1: only the question
    answer_known = depth == question.num_hops - 1
    queries = jnp.arange(config.num_queries)
    cue_q = (question.query_hop == depth + 1) & ~answer_known
    issued_q = jnp.any(issued_view[:, None] & (query_n[:, None] == queries), axis=0)
    last_q = jnp.any(newest[:, None] & (query_n[:, None] == queries), axis=0)
    answer_a = answer_known & (jnp.arange(config.num_answers) == question.answer)
    zeros_a = jnp.zeros((config.num_answers,), bool)
    item = jnp.stack(
        [
            jnp.concatenate([cue_q, answer_a]),
            jnp.concatenate([issued_q, zeros_a]),
            jnp.concatenate([last_q, zeros_a]),
            jnp.arange(config.num_actions) >= config.num_queries,
        ],
        axis=-1,
    ).astype(jnp.float32)
    shared = jnp.concatenate(
        [
            jnp.stack([answer_known, state.step / config.max_steps]).astype(jnp.float32),
            jax.nn.one_hot(depth + 1, config.max_hops + 1),
        ]
    )
    return Observation(item, shared)


def init_policy(key: jax.Array, config: EnvConfig, hidden: int = 32) -> Params:
    """One hidden layer; the output starts at zero, so the first policy is uniform."""
    k_item, k_shared = jax.random.split(key)
    width = 4 + 2 + config.max_hops + 1
    return {
        "w_item": jax.random.normal(k_item, (4, hidden)) / jnp.sqrt(width),
        "w_shared": jax.random.normal(k_shared, (2 + config.max_hops + 1, hidden))
        / jnp.sqrt(width),
        "b": jnp.zeros((hidden,)),
        "w_out": jnp.zeros((hidden,)),
    }


def policy_logits(params: Params, obs: Observation) -> jax.Array:
    """float32[..., Q + A]: every action's row scored by the same MLP over (row, shared)."""
    shared = obs.shared @ params["w_shared"] + params["b"]
    hidden = jax.nn.relu(obs.items @ params["w_item"] + shared[..., None, :])
    return hidden @ params["w_out"]
