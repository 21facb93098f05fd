"""Baseline agents (ReAct, iterative summary, Mem1-style state): chain graphs, what each prompt
keeps, and valid records on the shared loop machinery."""

import dataclasses
import types

import numpy as np
import pytest

from vimrag_jax.agent.baselines import make_agent, system_prompt
from vimrag_jax.agent.config import RolloutConfig
from vimrag_jax.agent.protocol import format_tool_call
from vimrag_jax.agent.tokenizer import build_tokenizer
from vimrag_jax.envs.synthetic import SyntheticConfig, build
from vimrag_jax.experiment import tokenizer_texts
from vimrag_jax.retrieval.corpus import CorpusStore
from vimrag_jax.rollout.records import validate_record
from vimrag_jax.rollout.trajectory import run_records
from vimrag_jax.sampling.sampler import Completion

CONFIG = RolloutConfig(max_segment_tokens=2048, max_new_tokens=256, group_size=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    items, questions = build(SyntheticConfig(num_entities=12, num_questions=4, seed=2))
    store = CorpusStore.build(items, str(tmp_path_factory.mktemp("corpus")))
    return questions, store, build_tokenizer(tokenizer_texts(items, questions))


class Script:
    """Plays a fixed list of turns per episode; ``"MEMORIZE"`` lists every pending item."""

    wants_contexts = True

    def __init__(self, tokenizer, scripts):
        self.tokenizer, self.scripts = tokenizer, scripts

    def generate(self, prompts, *, contexts, **_):
        out = []
        for context in contexts:
            script = self.scripts[context.key.split("/")[0]]
            text = script[min(context.view.step, len(script) - 1)]
            if text == "MEMORIZE":
                entries = [
                    {"information_id": label, "is_useful": True, "priority_score": 4}
                    for label in context.labels.values()
                ]
                notes = f"notes after step {context.view.step}"
                text = format_tool_call(
                    "summarize_and_memorize", {"summarize": notes, "memorize": entries}
                )
            tokens = self.tokenizer.encode(text + "<|im_end|>", add_special_tokens=False)
            out.append(Completion(tokens, [0.0] * len(tokens), "stop"))
        return out


def _search(node_id, query, parents=("root",), think=""):
    call = format_tool_call(
        "add_search_node", {"id": node_id, "parent_ids": list(parents), "query": query}
    )
    return f"<think>{think}</think>{call}" if think else call


def _answer(parents=("root",), think=""):
    call = format_tool_call("add_answer_node", {"parent_ids": list(parents), "answer": "x"})
    return f"<think>{think}</think>{call}" if think else call


def _run(world, agent, scripts, **settings):
    questions, store, tokenizer = world
    config = dataclasses.replace(CONFIG, agent=agent, **settings)
    batch = [dataclasses.replace(questions[0], question_id=name) for name in scripts]
    agent = make_agent(config, store, tokenizer, Script(tokenizer, scripts))
    records, rollouts = run_records(agent, batch, group_ids=list(scripts))
    out = types.SimpleNamespace(records=records, episodes=rollouts.episodes)
    for record in out.records:
        validate_record(record)
    prompts = [[tokenizer.decode(s.prompt) for s in e.segments] for e in out.episodes]
    return out, prompts


def _assert_chain(record, n):
    assert record["node_valid"].sum() == n
    expected = np.zeros_like(record["adjacency"])
    for j in range(1, n):
        expected[j - 1, j] = True
    np.testing.assert_array_equal(record["adjacency"], expected)


def test_react_keeps_a_linear_history_and_a_chain_graph(world):
    scripts = {
        # parent_ids are ignored: the chain decides.
        "chain": [_search("a", "the badge"), _search("b", "the logo"), _answer(("a",))],
        "memorize": ["MEMORIZE", _answer()],
    }
    out, prompts = _run(world, "react", scripts)
    chain, memorize = out.episodes
    _assert_chain(out.records[0], 4)
    assert out.records[0]["answer_node"] == 3 and chain.end_reason == "answered"
    assert system_prompt("react") in prompts[0][0]
    assert "summarize_and_memorize" not in system_prompt("react")
    # The third prompt still holds both earlier calls and both observations.
    assert prompts[0][2].count("<tool_response>") == 2 and '"the badge"' in prompts[0][2]
    assert "not available" in memorize.turns[0].error
    assert "not available" in prompts[1][1]


def test_summary_agent_rewrites_one_running_memory(world):
    scripts = {
        "s": [
            _search("a", "the badge"),
            "MEMORIZE",
            _search("b", "the logo"),
            "MEMORIZE",
            _answer(),
        ],  # fmt: skip
        "t": [_search("a", "the badge"), _search("b", "again")],
    }
    out, prompts = _run(world, "summary", scripts)
    summary, twice = out.episodes
    _assert_chain(out.records[0], 4)
    assert "notes after step 1" in prompts[0][2] and "<tool_response>" not in prompts[0][2]
    assert "notes after step 3" in prompts[0][4] and "notes after step 1" not in prompts[0][4]
    assert out.records[0]["item_valid"][1:3].any()
    assert "must be followed" in twice.turns[1].error


def test_mem1_carries_only_its_state_and_the_last_observation(world):
    scripts = {
        "m": [
            _search("a", "the badge", think="state one"),
            _search("b", "the logo", think="state two"),
            _answer(think="done"),
        ],
        "n": [_answer()],
    }
    out, prompts = _run(world, "mem1", scripts)
    _assert_chain(out.records[0], 4)
    second, third = prompts[0][1], prompts[0][2]
    assert "state one" in second and second.count("<tool_response>") == 1
    assert "state two" in third and "state one" not in third
    assert third.count("<tool_response>") == 1 and '"the logo"' in third
    assert out.episodes[1].end_reason == "answered"


def test_mem1_keeps_state_and_observation_when_the_graph_rejects_a_search(world):
    # Three slots: root, "a", and the one kept for the answer, so the graph refuses "b".
    scripts = {
        "m": [
            _search("a", "the badge", think="state one"),
            _search("b", "the logo", think="state two"),
            _answer(("a",), think="done"),
        ]
    }
    out, prompts = _run(world, "mem1", scripts, max_nodes=3)
    (episode,) = out.episodes
    assert "memory graph is full" in episode.turns[1].error
    third = prompts[0][2]
    # The state and observation stay the last accepted call's; the refused call follows them
    # with its error (two tool responses: the results, the error).
    state = third.split("Your internal state: ")[1].split("<|im_end|>")[0]
    assert "state one" in state and '"the badge"' in third
    assert third.count("<tool_response>") == 2 and "Error: the memory graph is full" in third
    _assert_chain(out.records[0], 3)
    assert episode.end_reason == "answered" and episode.node_ids == ["root", "a", "answer"]
