"""The toy memory-graph MDP: multi-hop questions answered by searching, in pure JAX.

A hidden question needs a chain of ``L`` facts (1 <= L <= ``max_hops``). The question names
``candidates`` sub-queries for the first hop (its candidate set ``C_0``); chain fact ``k``
names the candidate set ``C_{k+1}`` of the next hop, and the last chain fact names the answer.
In each candidate set one sub-query is the chain query (it retrieves the next chain fact), one
retrieves a fact relevant to the question but off the chain, and the rest retrieve
distractors; which is which is hidden and drawn afresh per question. Sub-queries in no set
retrieve distractors.

A sub-query of ``C_k`` is written from fact ``k - 1`` (the question for ``k = 0``): it is
attached to the node that holds that fact, or to the root when the fact is not known yet, and
the chain query retrieves fact ``k`` only when fact ``k - 1`` is known (a bridge entity one has
not found cannot be searched for). The answer node cites the deepest chain fact found. So the
parent of a node is set by its sub-query, not chosen separately: the action set stays
``Q`` searches + ``A`` answers. Reward is 1 for the right answer, 0 otherwise, also when the
step limit ends the episode unanswered.

Every episode is a ``MemoryGraph`` built with the project's own ``add_search_node``,
``memorize`` (the node's summary token says what the retrieval found) and
``add_answer_node``; ``relevant[i]`` is set by the retrieval (a chain or off-chain fact), as
the real agent's evidence annotations do.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vimrag_jax.memory.graph import (
    MemoryGraph,
    VisualBank,
    add_answer_node,
    add_search_node,
    empty_graph,
    memorize,
)

# Roles of a sub-query within its question (``Question.query_role``).
CHAIN, OFF_CHAIN, DISTRACTOR = 0, 1, 2


class EnvConfig(NamedTuple):
    """Sizes of the MDP (static under jit)."""

    num_queries: int = 16  # Q candidate sub-queries
    num_answers: int = 8  # A candidate answers
    candidates: int = 3  # sub-queries per hop's candidate set (>= 2)
    max_hops: int = 4  # chains have 1..max_hops facts
    max_steps: int = 10  # step limit (model calls per episode)

    @property
    def num_actions(self) -> int:
        return self.num_queries + self.num_answers

    @property
    def max_nodes(self) -> int:
        return self.max_steps + 1  # the root and one node per step: the graph never fills

    def summary_token(self, role: int) -> int:
        """A node's summary token: ``1 + k`` for chain fact k, ``max_hops + 1`` for an
        off-chain fact (``role == OFF_CHAIN``), ``max_hops + 2`` for a distractor."""
        return self.max_hops + 1 + (role == DISTRACTOR)


class Question(NamedTuple):
    """One hidden question (a pytree; batch with a leading axis)."""

    query_hop: jax.Array  # int32[Q], the hop whose candidate set holds the query (-1: none)
    query_role: jax.Array  # int32[Q], CHAIN / OFF_CHAIN / DISTRACTOR
    num_hops: jax.Array  # int32[], L
    answer: jax.Array  # int32[], the right answer


class EnvState(NamedTuple):
    """An episode in progress: the memory graph and what the retrievals found."""

    graph: MemoryGraph
    relevant: jax.Array  # bool[N], the node's retrieval found evidence for the question
    node_hop: jax.Array  # int32[N], chain fact held by the node (-1: none)
    step: jax.Array  # int32[], model calls so far
    done: jax.Array  # bool[]
    reward: jax.Array  # float32[]


def sample_question(key: jax.Array, config: EnvConfig) -> Question:
    """A random question: chain length, hidden roles of the sub-queries and the answer."""
    if config.candidates < 2 or config.candidates * config.max_hops > config.num_queries:
        raise ValueError(f"need 2 <= candidates and candidates * max_hops <= Q: {config}")
    k_len, k_perm, k_ans = jax.random.split(key, 3)
    num_hops = jax.random.randint(k_len, (), 1, config.max_hops + 1)
    slot = jnp.argsort(jax.random.permutation(k_perm, config.num_queries))  # query -> slot
    hop = slot // config.candidates
    in_set = (slot < config.candidates * config.max_hops) & (hop < num_hops)
    position = slot % config.candidates
    role = jnp.where(position == 0, CHAIN, jnp.where(position == 1, OFF_CHAIN, DISTRACTOR))
    return Question(
        query_hop=jnp.where(in_set, hop, -1).astype(jnp.int32),
        query_role=jnp.where(in_set, role, DISTRACTOR).astype(jnp.int32),
        num_hops=num_hops.astype(jnp.int32),
        answer=jax.random.randint(k_ans, (), 0, config.num_answers).astype(jnp.int32),
    )


def reset(config: EnvConfig) -> EnvState:
    """The start of an episode: a graph holding only the root (the question)."""
    n = config.max_nodes
    return EnvState(
        graph=empty_graph(n, 1, max_query_tokens=1, max_summary_tokens=1, max_keyframes=1),
        relevant=jnp.zeros((n,), bool),
        node_hop=jnp.full((n,), -1, jnp.int32),
        step=jnp.asarray(0, jnp.int32),
        done=jnp.asarray(False),
        reward=jnp.asarray(0.0, jnp.float32),
    )


def _latest_node_with_hop(state: EnvState, hop: jax.Array) -> jax.Array:
    """The newest node holding chain fact ``hop`` (the root for hop -1), -1 if none."""
    index = jnp.arange(state.node_hop.shape[0])
    holds = (state.node_hop == hop) & state.graph.node_valid
    return jnp.where(hop < 0, 0, jnp.max(jnp.where(holds, index, -1)))


def _search(config: EnvConfig, question: Question, state: EnvState, query: jax.Array):
    hop = question.query_hop[query]
    role = question.query_role[query]
    bridge = _latest_node_with_hop(state, hop - 1)  # the node the sub-query is written from
    found = (role == CHAIN) & (bridge >= 0)
    parent = jnp.where((hop >= 0) & (bridge >= 0), bridge, 0)
    token = jnp.where(
        found,
        1 + hop,
        jnp.where(
            role == OFF_CHAIN,
            config.summary_token(OFF_CHAIN),
            config.summary_token(DISTRACTOR),
        ),
    )
    n = config.max_nodes
    graph, node = add_search_node(
        state.graph, jnp.arange(n) == parent, query[None], step=state.step
    )
    no_items = VisualBank.empty((1,), 1)
    graph = memorize(graph, node, no_items, token[None])
    at_node = jnp.arange(n) == node
    return state._replace(
        graph=graph,
        relevant=state.relevant | (at_node & (found | (role == OFF_CHAIN))),
        node_hop=jnp.where(at_node & found, hop, state.node_hop),
    )


def _answer(question: Question, state: EnvState, answer: jax.Array):
    deepest = jnp.max(state.node_hop)
    parent = _latest_node_with_hop(state, deepest)  # the root when no chain fact is known
    n = state.node_hop.shape[0]
    graph, _ = add_answer_node(state.graph, jnp.arange(n) == parent, step=state.step)
    reward = (answer == question.answer).astype(jnp.float32)
    return state._replace(graph=graph, done=jnp.asarray(True), reward=reward)


def step(
    config: EnvConfig, question: Question, state: EnvState, action: jax.Array
) -> tuple[EnvState, jax.Array]:
    """One model call: ``action < Q`` searches sub-query ``action``, else answers
    ``action - Q``. Returns ``(state, node)``: the node the call created (-1 once the
    episode is over, when the action is ignored)."""
    action = jnp.asarray(action, jnp.int32)
    is_answer = action >= config.num_queries
    query = jnp.clip(action, 0, config.num_queries - 1)
    searched = _search(config, question, state, query)
    answered = _answer(question, state, action - config.num_queries)
    new = jax.tree.map(lambda a, b: jnp.where(is_answer, a, b), answered, searched)
    new = new._replace(step=state.step + 1)
    new = new._replace(done=new.done | (new.step >= config.max_steps))
    node = jnp.where(state.done, -1, state.graph.num_nodes)
    out = jax.tree.map(lambda a, b: jnp.where(state.done, a, b), state, new)
    return out, node
