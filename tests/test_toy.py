"""The toy reproduction: its MDP against a loop reference, GGPO masks, training and JSON."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimrag_jax.memory.graph import NodeKind
from vimrag_jax.rl.ggpo import batch_segment_keep
from vimrag_jax.rl.losses import group_advantages
from vimrag_jax.toy import env as toy_env
from vimrag_jax.toy.__main__ import emit, run_experiment
from vimrag_jax.toy.env import CHAIN, DISTRACTOR, OFF_CHAIN, EnvConfig
from vimrag_jax.toy.memories import MEMORIES, encode
from vimrag_jax.toy.train import (
    TrainConfig,
    compiled_train,
    group_advantages_jnp,
    segment_keep,
    setting,
)

ENV = EnvConfig()
TINY = TrainConfig(questions=2, rollouts=4, minibatches=2, updates=3, eval_episodes=8)
EPISODES = 48


# --- a loop reference of the MDP ---------------------------------------------------------


def reference_episode(question, actions, config=ENV):
    """Plain-Python rules of ``toy.env``: per node (parent, kind, hop, relevant, query)."""
    q, a_count = config.num_queries, config.num_answers
    nodes = [dict(parent=None, kind=NodeKind.ROOT, hop=-1, relevant=False, query=0, token=0)]
    created, done, reward = [], False, 0.0
    for t, action in enumerate(actions):
        if done:
            created.append(-1)
            continue
        created.append(len(nodes))
        if action < q:
            hop, role = int(question["query_hop"][action]), int(question["query_role"][action])
            holders = [i for i, n in enumerate(nodes) if n["hop"] == hop - 1]
            bridge = 0 if hop <= 0 else (holders[-1] if holders else None)
            found = role == CHAIN and bridge is not None
            parent = bridge if hop >= 0 and bridge is not None else 0
            token = 1 + hop if found else config.max_hops + (1 if role == OFF_CHAIN else 2)
            nodes.append(
                dict(
                    parent=parent,
                    kind=NodeKind.SEARCH,
                    hop=hop if found else -1,
                    relevant=found or role == OFF_CHAIN,
                    query=action,
                    token=token,
                )
            )
        else:
            chain = [(n["hop"], i) for i, n in enumerate(nodes) if n["hop"] >= 0]
            parent = max(chain)[1] if chain else 0
            nodes.append(
                dict(parent=parent, kind=NodeKind.ANSWER, hop=-1, relevant=False, query=0, token=0)
            )
            reward = float(action - q == int(question["answer"]))
            done = True
        done = done or t + 1 >= config.max_steps
        assert a_count > 0
    return nodes, created, reward, done


def scripted_actions(question, rng, config=ENV):
    """Random actions that often follow the chain, so long chains and right answers occur."""
    actions, depth = [], -1
    hops, roles = question["query_hop"], question["query_role"]
    for _ in range(config.max_steps):
        u = rng.random()
        chain = np.flatnonzero((hops == depth + 1) & (roles == CHAIN))
        if u < 0.15 or (depth == question["num_hops"] - 1 and u < 0.6):
            right = rng.random() < 0.6
            guess = question["answer"] if right else rng.integers(config.num_answers)
            actions.append(config.num_queries + int(guess))
        elif u < 0.6 and chain.size:
            actions.append(int(chain[0]))
            depth += 1
        else:
            actions.append(int(rng.integers(config.num_queries)))
    return np.asarray(actions, np.int32)


@jax.jit
def play(questions, actions):
    """Replays action sequences ``[E, T]`` in the JAX MDP: final states and created nodes."""

    def one(question, actions_t):
        def call(state, action):
            return toy_env.step(ENV, question, state, action)

        return jax.lax.scan(call, toy_env.reset(ENV), actions_t)

    return jax.vmap(one)(questions, actions)


@pytest.fixture(scope="module")
def episodes():
    questions = jax.vmap(toy_env.sample_question, (0, None))(
        jax.random.split(jax.random.key(3), EPISODES), ENV
    )
    host = jax.tree.map(np.asarray, questions)
    rng = np.random.default_rng(0)
    rows = [{k: v[e] for k, v in host._asdict().items()} for e in range(EPISODES)]
    actions = np.stack([scripted_actions(row, rng) for row in rows])
    final, created = play(questions, jnp.asarray(actions))
    references = [reference_episode(row, a) for row, a in zip(rows, actions, strict=True)]
    return (
        questions,
        rows,
        actions,
        jax.tree.map(np.asarray, final),
        np.asarray(created),
        references,
    )


def test_questions_have_one_chain_query_per_hop():
    questions = jax.vmap(toy_env.sample_question, (0, None))(
        jax.random.split(jax.random.key(1), 64), ENV
    )
    questions = jax.tree.map(np.asarray, questions)
    for hop, role, length in zip(
        questions.query_hop, questions.query_role, questions.num_hops, strict=True
    ):
        assert 1 <= length <= ENV.max_hops
        for k in range(length):
            roles = sorted(role[hop == k])
            assert roles == [CHAIN, OFF_CHAIN] + [DISTRACTOR] * (ENV.candidates - 2)
        assert np.all(role[hop < 0] == DISTRACTOR) and np.all(hop < length)


def test_transitions_and_rewards_match_the_loop_reference(episodes):
    _, _, _, final, created, references = episodes
    kinds = set()
    for e, (nodes, ref_created, reward, done) in enumerate(references):
        n = len(nodes)
        graph = jax.tree.map(lambda x, e=e: x[e], final.graph)
        assert list(created[e]) == ref_created
        assert int(graph.num_nodes) == n and int(graph.error) == 0
        adjacency = np.zeros((ENV.max_nodes,) * 2, bool)
        for i, node in enumerate(nodes[1:], 1):
            adjacency[node["parent"], i] = True
        np.testing.assert_array_equal(graph.adjacency, adjacency)
        np.testing.assert_array_equal(graph.node_kind[:n], [x["kind"] for x in nodes])
        np.testing.assert_array_equal(final.relevant[e][:n], [x["relevant"] for x in nodes])
        np.testing.assert_array_equal(final.node_hop[e][:n], [x["hop"] for x in nodes])
        np.testing.assert_array_equal(graph.query_tokens[1:n, 0], [x["query"] for x in nodes[1:]])
        searches = [i for i, x in enumerate(nodes) if x["kind"] == NodeKind.SEARCH]
        np.testing.assert_array_equal(
            graph.summary_tokens[searches, 0], [nodes[i]["token"] for i in searches]
        )
        answered = [i for i, x in enumerate(nodes) if x["kind"] == NodeKind.ANSWER]
        assert int(graph.answer_node) == (answered[0] if answered else -1)
        assert float(final.reward[e]) == reward and bool(final.done[e]) == done
        kinds.add((reward, max(x["hop"] for x in nodes)))
    # The scripted actions reach right and wrong answers after long and short chains.
    assert {r for r, _ in kinds} == {0.0, 1.0} and max(h for _, h in kinds) >= 2


def reference_keep(nodes, created, reward):
    """GGPO's rule of SPEC §4 by walking parents: per step, does its segment keep a gradient."""
    answer = [i for i, x in enumerate(nodes) if x["kind"] == NodeKind.ANSWER]
    on_path = set()
    node = answer[0] if answer else None
    while node is not None:
        on_path.add(node)
        node = nodes[node]["parent"]
    keep = [(i in on_path) if reward >= 1 else not x["relevant"] for i, x in enumerate(nodes)]
    return [c >= 0 and keep[c] for c in created]


batch_keep = jax.jit(jax.vmap(segment_keep, (None, 0, 0, 0)))
GGPO, GSPO = setting("ggpo", "graph"), setting("gspo", "graph")


def test_toy_masks_equal_the_graph_masks(episodes):
    _, _, _, final, created, references = episodes
    valid = created >= 0
    keep = batch_keep(GGPO, final, created, valid)
    expected = [reference_keep(n, c, r) for n, c, r, _ in references]
    np.testing.assert_array_equal(keep, expected)
    # The learner's segment-major path over the same graphs gives the same mask.
    rows = lambda x: np.repeat(x, ENV.max_steps, axis=0)  # noqa: E731
    learner = jax.jit(batch_segment_keep)(
        rows(final.graph.adjacency),
        rows(final.graph.node_valid),
        rows(final.graph.answer_node),
        rows(final.reward),
        rows(final.relevant),
        created.reshape(-1),
        valid.reshape(-1),
    )
    np.testing.assert_array_equal(learner.reshape(keep.shape), keep)
    assert 0 < np.mean(keep[valid]) < 1
    np.testing.assert_array_equal(batch_keep(GSPO, final, created, valid), valid)
    positive = (final.reward >= 1)[:, None]
    for name, rows_masked in (("ggpo_positive_only", positive), ("ggpo_negative_only", ~positive)):
        ablation = batch_keep(setting(name, "graph"), final, created, valid)
        np.testing.assert_array_equal(ablation, np.where(rows_masked, keep, valid))


def test_memories_show_what_they_hold(episodes):
    """After searching hop 0's set (the chain query third, then only off-chain and distractor
    queries), the graph shows every query and the fact, the summary the fact and the last
    query, the linear window the last two queries and no fact."""
    questions = episodes[0]
    hop, role = np.asarray(questions.query_hop), np.asarray(questions.query_role)
    first = lambda r: np.argmax((hop == 0) & (role == r), axis=1)  # noqa: E731
    chain, off, distractor = first(CHAIN), first(OFF_CHAIN), first(DISTRACTOR)
    actions = np.stack([distractor, off, chain] + [distractor, off] * 4, axis=1)
    actions = actions[:, : ENV.max_steps]
    final, _ = play(questions, jnp.asarray(actions, jnp.int32))
    obs = jax.vmap(
        lambda m, q, s: encode(ENV, m, q, s, 2), (0, None, None)
    )  # all memories of one episode
    for e in range(0, EPISODES, 7):
        episode = jax.tree.map(lambda x, e=e: x[e], (questions, final))
        seen = jax.tree.map(np.asarray, obs(jnp.arange(3), *episode))
        issued = {
            m: set(np.flatnonzero(seen.items[i, : ENV.num_queries, 1]))
            for i, m in enumerate(MEMORIES)
        }
        assert issued == {
            "graph": {distractor[e], off[e], chain[e]},
            "linear": {distractor[e], off[e]},
            "summary": {actions[e, -1]},
        }
        depth = {m: int(np.argmax(seen.shared[i, 2:])) - 1 for i, m in enumerate(MEMORIES)}
        assert depth == {"graph": 0, "linear": -1, "summary": 0}


def test_group_advantages_match_the_numpy_ones():
    rewards = np.asarray([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
    expected = np.stack([group_advantages(r) for r in rewards])
    np.testing.assert_allclose(group_advantages_jnp(jnp.asarray(rewards)), expected, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_result():
    return run_experiment(TINY, seeds=1, quick_compile=True)


def test_one_seed_of_training_is_deterministic(tiny_result):
    train = compiled_train(TINY, True)  # run_experiment's, compiled once
    keys = jax.random.split(jax.random.key(7), 1)
    first = train(keys, setting("ggpo", "summary"))
    second = train(keys, setting("ggpo", "summary"))
    jax.tree.map(np.testing.assert_array_equal, first, second)


def test_the_command_json_has_every_field(tiny_result, tmp_path, capsys):
    emit(tiny_result, str(tmp_path), as_json=True)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["seeds"] == 1
    for name in ("ggpo", "gspo"):
        algorithm = result["algorithms"][name]
        assert len(algorithm["reward_curve"]) == TINY.updates
        assert "steps_to_target" in algorithm and "curve_variance" in algorithm
    for name in ("graph", "linear", "summary"):
        memory = result["memories"][name]
        for field in ("accuracy", "searches", "repeated_searches"):
            assert np.isfinite(memory[field])
    assert (tmp_path / "toy.png").stat().st_size > 0
    assert json.loads((tmp_path / "toy.json").read_text())["seeds"] == 1
