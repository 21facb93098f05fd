"""Tests for the scripted policies: schema-valid actions, a clean expert graph with the right
answer, the expert's retry, and the noisy policy's dead ends, redundant searches, wrong answers."""

import numpy as np
import pytest

from vimrag_jax.envs import scripted
from vimrag_jax.envs.scripted import (
    ANSWER,
    MEMORIZE,
    SEARCH,
    EpisodeView,
    ExpertPolicy,
    NoiseConfig,
    NoisyPolicy,
    RetrievedItem,
    check_action,
    run_episode,
    store_searcher,
)
from vimrag_jax.envs.synthetic import SyntheticConfig, build, entity_kinds
from vimrag_jax.retrieval.corpus import CorpusStore


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    items, questions = build(SyntheticConfig(num_entities=30, num_questions=48, seed=11))
    store = CorpusStore.build(items, str(tmp_path_factory.mktemp("corpus")))
    return items, questions, store, store_searcher(store, k=3)


def _ancestors(episode, node: str) -> set[str]:
    parents = dict(zip(episode.views[-1].node_ids, episode.views[-1].node_parents, strict=True))
    seen, stack = set(), [node]
    while stack:
        for parent in parents[stack.pop()]:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _critical(episode) -> set[str]:
    found = set(episode.answer_parents)
    for parent in episode.answer_parents:
        found |= _ancestors(episode, parent)
    return found


def test_expert_is_schema_valid_clean_and_correct(env):
    _, questions, _, search = env
    for question in questions:
        policy = ExpertPolicy(question)
        episode = run_episode(policy, search)  # check_action runs on every action
        tools = [tool for tool, _ in episode.actions]
        assert tools == [SEARCH, MEMORIZE] * question.hops + [ANSWER]
        assert episode.answer == question.answer and policy.evidence_found
        searches = [args for tool, args in episode.actions if tool == SEARCH]
        assert [s["parent_ids"] for s in searches] == [["root"]] + [
            [s["id"]] for s in searches[:-1]
        ]
        assert list(episode.answer_parents) == [s["id"] for s in searches]
        # Clean graph: every search node lies on the answer's critical path.
        assert _critical(episode) == set(episode.views[-1].node_ids)
        for (tool, args), view, hop in zip(
            episode.actions[1::2], episode.views[1::2], question.chain, strict=False
        ):
            assert tool == MEMORIZE
            useful = {e["information_id"]: e for e in args["memorize"] if e["is_useful"]}
            # Gold of another hop retrieved early is useful too; nothing else is.
            gold_ids = {str(e) for e in question.evidence_ids}
            assert str(hop.evidence_id) in useful and set(useful) <= gold_ids
            gold = useful[str(hop.evidence_id)]
            assert gold["priority_score"] == 5
            assert gold["key_timestamp"] == list(hop.key_timestamps)
            assert all(e["priority_score"] == 1 for e in args["memorize"] if not e["is_useful"])
            assert len(args["memorize"]) == len(view.pending) == 3


def test_expert_retries_a_missed_hop_from_the_same_parent(env):
    _, questions, store, search = env
    question = next(q for q in questions if q.hops == 3)
    gold = question.chain[1].evidence_id
    calls = {"hop2": 0}

    def unlucky(query):
        results = tuple(r for r in search(query) if r.item_id != gold)[:2]
        if question.chain[1].subject not in query:
            return search(query)
        calls["hop2"] += 1  # the first search for hop 2 misses its gold item, the retry finds it
        if calls["hop2"] == 1:
            return results
        info = store.item(gold)
        return (RetrievedItem(gold, info.modality, info.text, info.timestamps),) + results

    episode = run_episode(ExpertPolicy(question), unlucky)
    searches = [args for tool, args in episode.actions if tool == SEARCH]
    first, second, third = (f"h{i + 1}-{hop.relation}" for i, hop in enumerate(question.chain))
    assert [s["id"] for s in searches] == [first, second, f"{second}-retry", third]
    assert searches[1]["parent_ids"] == searches[2]["parent_ids"] == [first]
    assert searches[1]["query"] != searches[2]["query"]
    assert searches[3]["parent_ids"] == [f"{second}-retry"]
    assert episode.answer_parents == (first, f"{second}-retry", third)
    assert second not in _critical(episode)  # the miss is a dead end
    assert episode.answer == question.answer


def test_noisy_policy_dead_ends_redundancy_and_wrong_answers(env):
    items, questions, _, search = env
    kinds = entity_kinds(items)
    noise = NoiseConfig(redundant_prob=0.4, dead_end_prob=0.5, wrong_answer_prob=0.3)
    dead_ends = redundant = wrong = 0
    for seed, question in enumerate(questions):
        policy = NoisyPolicy(question, kinds, noise=noise, seed=seed)
        episode = run_episode(policy, search)
        assert len(episode.actions) <= 20
        assert (episode.answer != question.answer) == policy.answers_wrongly
        wrong += policy.answers_wrongly
        nodes = set(episode.views[-1].node_ids)
        dead = nodes - _critical(episode)
        dead_ends += any(node.startswith("d") for node in dead)
        queries = [args["query"] for tool, args in episode.actions if tool == SEARCH]
        redundant += any(node.endswith("-again") for node in dead)
        chain = {hop.subject for hop in question.chain}
        for node in dead:
            if node.startswith("d"):
                query = next(
                    a["query"] for t, a in episode.actions if t == SEARCH and a["id"] == node
                )
                assert not any(name in query for name in chain)
        assert len(queries) >= question.hops
    assert dead_ends >= 10 and redundant >= 5
    assert 5 <= wrong <= 25


def test_noisy_policy_is_deterministic_in_its_seed(env):
    items, questions, _, search = env
    kinds = entity_kinds(items)
    question = next(q for q in questions if q.hops == 4)
    play = lambda seed: run_episode(NoisyPolicy(question, kinds, seed=seed), search).actions  # noqa: E731
    assert play(1) == play(1)
    assert any(play(1) != play(seed) for seed in range(2, 6))


def test_noisy_policy_respects_the_call_budget(env):
    items, questions, _, search = env
    kinds = entity_kinds(items)
    noise = NoiseConfig(redundant_prob=1.0, dead_end_prob=1.0, wrong_answer_prob=0.0)
    for question in questions[:12]:
        episode = run_episode(NoisyPolicy(question, kinds, noise=noise, max_calls=12), search)
        assert len(episode.actions) <= 12 and episode.answer == question.answer


def test_check_action_rejects_schema_violations():
    item = RetrievedItem(7, "video", "A parade video of Zorn.", (0.0, 1.0, 2.0))
    view = EpisodeView("q?", ("root", "a"), ((), ("root",)), (item,), 1)
    good = {
        "summarize": "s",
        "memorize": [
            {"information_id": "7", "is_useful": True, "key_timestamp": [1.0], "priority_score": 5}
        ],
    }
    check_action(view, MEMORIZE, good)
    entry = good["memorize"][0]

    def memorize_with(**change):
        return {"summarize": "s", "memorize": [{**entry, **change}]}

    bad_cases = [
        (SEARCH, {"id": "b", "parent_ids": ["root"], "query": "x"}, "followed by a memorize"),
        (MEMORIZE, {**good, "memorize": []}, "retrieved items"),
        (MEMORIZE, memorize_with(priority_score=6), "priority_score"),
        (MEMORIZE, memorize_with(key_timestamp=[9.0]), "key_timestamp"),
        (MEMORIZE, memorize_with(is_useful=1), "is_useful"),
        ("search", {}, "unknown tool"),
    ]
    for tool, args, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            check_action(view, tool, args)
    idle = EpisodeView("q?", ("root", "a"), ((), ("root",)), (), 2)
    with pytest.raises(ValueError, match="unknown parent id 'zz'"):
        check_action(idle, ANSWER, {"parent_ids": ["zz"], "answer": "x"})
    with pytest.raises(ValueError, match="new non-empty"):
        check_action(idle, SEARCH, {"id": "a", "parent_ids": ["root"], "query": "x"})
    with pytest.raises(ValueError, match="argument keys"):
        check_action(idle, ANSWER, {"parent_ids": ["a"], "answer": "x", "extra": 1})


def test_information_id_convention_and_bad_budget(env):
    _, questions, _, _ = env
    assert scripted.information_id(np.int32(17)) == "17"
    assert RetrievedItem(3, "text", "t").information_id == "3"
    with pytest.raises(ValueError, match="max_calls=4"):
        ExpertPolicy(next(q for q in questions if q.hops == 4), max_calls=4)
