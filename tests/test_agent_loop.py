"""The VimRAG agent loop: scripted expert and noisy policies, invalid actions of every kind, a tiny
random Qwen3 through the embedded sampler, records, and batching independence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vimrag_jax.agent import graph_ops, prompts
from vimrag_jax.agent.config import RolloutConfig
from vimrag_jax.agent.graph_ops import ActionKind
from vimrag_jax.agent.loop import VimRAGAgent
from vimrag_jax.agent.protocol import format_tool_call, parse_action
from vimrag_jax.agent.tokenizer import build_tokenizer
from vimrag_jax.envs import scripted
from vimrag_jax.envs.scripted_sampler import (
    ScriptedSampler,
    expert_factory,
    labelled,
    noisy_factory,
)
from vimrag_jax.envs.synthetic import SyntheticConfig, build, entity_kinds
from vimrag_jax.experiment import tokenizer_texts
from vimrag_jax.memory.energy import smart_resize
from vimrag_jax.memory.graph import GraphError
from vimrag_jax.models.presets import init_model, preset_config
from vimrag_jax.retrieval.corpus import CorpusStore
from vimrag_jax.rl.ggpo import node_keep_mask
from vimrag_jax.rollout.records import ShardWriter, read_shard, validate_record
from vimrag_jax.rollout.render import memory_frames, render_record
from vimrag_jax.rollout.trajectory import record_dims, run_records
from vimrag_jax.sampling.sampler import Completion, Sampler

CONFIG = RolloutConfig(max_segment_tokens=2048, max_new_tokens=320, group_size=1)


@dataclasses.dataclass
class Run:
    """One ``run_records`` call: the records beside the agent's episodes and stats."""

    records: list
    episodes: list
    stats: object


def _run(agent, questions, **kwargs) -> Run:
    records, rollouts = run_records(agent, questions, **kwargs)
    return Run(records, rollouts.episodes, rollouts.stats)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    items, questions = build(SyntheticConfig(num_entities=24, num_questions=16, seed=3))
    store = CorpusStore.build(items, str(tmp_path_factory.mktemp("corpus")))
    tokenizer = build_tokenizer(tokenizer_texts(items, questions))
    return items, questions, store, tokenizer


@pytest.fixture(scope="module")
def expert_run(world):
    _, questions, store, tokenizer = world
    agent = VimRAGAgent(store, tokenizer, ScriptedSampler(tokenizer, expert_factory()), CONFIG)
    return _run(agent, questions[:4], seed=5)


def _without_time(record):
    return {k: v for k, v in record.items() if k != "created_at"}


def _assert_records_equal(a, b):
    a, b = _without_time(a), _without_time(b)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


def test_expert_through_the_loop_is_correct_and_clean(world, expert_run, tmp_path):
    _, questions, store, tokenizer = world
    searcher = scripted.store_searcher(store, k=CONFIG.retrieval_top_k)
    labeller = VimRAGAgent(store, tokenizer, None, CONFIG)
    assert expert_run.stats.invalid_actions == 0
    for question, episode, record in zip(
        questions[:4], expert_run.episodes, expert_run.records, strict=True
    ):
        intended = scripted.run_episode(scripted.ExpertPolicy(question), searcher)
        assert record["reward"] == 1.0 and episode.end_reason == "answered"
        assert record["prediction"] == question.answer
        # The loop's graph is the one the expert meant: same nodes, parents and answer parents.
        final = intended.views[-1]
        assert episode.node_ids[:-1] == list(final.node_ids)
        n = len(episode.node_ids)
        assert record["node_valid"].sum() == n and record["answer_node"] == n - 1
        assert list(record["node_kind"][:n]) == [0] + [1] * (n - 2) + [2]
        meant = [*final.node_parents, intended.answer_parents]
        for j, parents in enumerate(meant):
            rows = np.flatnonzero(record["adjacency"][:, j])
            assert [episode.node_ids[i] for i in rows] == sorted(
                parents, key=episode.node_ids.index
            )
        # Every node whose retrieval found gold evidence is relevant (the expert finds all).
        assert record["relevant"][1 : n - 1].all()
        # Segments: loss only on sampled tokens, which decode to the scripted action.
        assert record["num_segments"] == len(intended.actions)
        for s, ((tool, arguments), view) in enumerate(
            zip(intended.actions, intended.views, strict=True)
        ):
            tokens, mask = record["tokens"][s], record["loss_mask"][s]
            segment = episode.segments[s]
            p, g = len(segment.prompt), len(segment.sampled)
            assert mask.sum() == g and mask[p : p + g].all()
            np.testing.assert_array_equal(tokens[:p], segment.prompt)
            action = parse_action(tokenizer.decode(tokens[mask].tolist()))
            assert action.tool_name == tool
            pending = [store.item(item.item_id) for item in view.pending]
            labels = prompts.item_labels(labeller.observation_items(pending))
            mapping = {str(i.item_id): lab for i, lab in zip(pending, labels, strict=True)}
            expected = labelled(tool, arguments, mapping)
            assert action.arguments == parse_action(format_tool_call(tool, expected)).arguments
            assert np.all(record["behavior_logprobs"][s][~mask] == 0)
        assert np.all(record["segment_node"][: n * 2] < n)
        # Node texts and memory slot ids, for pictures of the rollout.
        pad = [""] * (CONFIG.max_nodes - n)
        assert record["node_title"] == [*episode.node_ids, *pad]
        assert record["node_query"] == [*episode.queries, *pad]
        assert record["node_summary"] == [*episode.summaries, *pad]
        kept = {(i, m.slot): m.info for i, slots in enumerate(episode.memory) for m in slots}
        assert {tuple(ix) for ix in np.argwhere(record["item_valid"])} == set(kept)
        assert {tuple(ix) for ix in np.argwhere(record["item_id"] >= 0)} == set(kept)
        for (i, k), info in kept.items():
            assert record["item_id"][i, k] == info.item_id
            assert record["item_modality"][i, k] == {"image": 0, "video": 1}[info.modality]
    # Records validate and round-trip through a shard.
    with ShardWriter(tmp_path, name="expert-00000000", dims=record_dims(CONFIG)) as writer:
        for record in expert_run.records:
            writer.write(record)
    (path,) = list(tmp_path.glob("*.array_record"))
    for original, decoded in zip(expert_run.records, read_shard(path), strict=True):
        _assert_records_equal(validate_record(original), decoded)


def test_visual_memory_is_shown_and_referenced(expert_run):
    # A question whose chain has a picture: the memorize prompt shows it and the records say so.
    rows = [
        (s, r)
        for r in expert_run.records
        for s in range(r["num_segments"])
        if r["segment_visual_valid"][s].any()
    ]
    assert rows
    for s, record in rows:
        refs = record["segment_visuals"][s][record["segment_visual_valid"][s]]
        assert np.all(refs[:, 2:] % 32 == 0) and np.all(refs[:, 2:] > 0)


@pytest.fixture(scope="module")
def noisy_runs(world):
    items, questions, store, tokenizer = world
    kinds = entity_kinds(items)
    noise = scripted.NoiseConfig(redundant_prob=0.5, dead_end_prob=0.6, wrong_answer_prob=0.3)

    def run(batch):
        backend = ScriptedSampler(tokenizer, noisy_factory(kinds, noise=noise))
        agent = VimRAGAgent(store, tokenizer, backend, CONFIG)
        return _run(agent, batch, seed=1, group_ids=[q.question_id for q in batch])

    together = run(questions[:8])
    apart = run(questions[:4]).records + run(questions[4:8]).records
    return together, apart


def test_noisy_dead_ends_are_masked_by_ggpo_on_positive_trajectories(noisy_runs):
    together, _ = noisy_runs
    assert together.stats.invalid_actions == 0
    masked_dead_ends = 0
    for record in together.records:
        keep = np.asarray(
            node_keep_mask(
                jnp.asarray(record["adjacency"]),
                jnp.asarray(record["node_valid"]),
                record["answer_node"],
                record["reward"],
                jnp.asarray(record["relevant"]),
            )
        )
        if record["reward"] == 1.0:
            assert keep[record["answer_node"]] and keep[0]
            masked_dead_ends += int((record["node_valid"] & ~keep).sum())
    assert masked_dead_ends > 0
    assert any(r["reward"] == 0.0 for r in together.records)  # some wrong answers too


def test_batched_equals_smaller_batches(noisy_runs):
    together, apart = noisy_runs
    assert len(together.records) == len(apart) == 8
    for a, b in zip(together.records, apart, strict=True):
        _assert_records_equal(a, b)


# --- invalid actions -------------------------------------------------------------------------


class Puppet:
    """A backend that plays a fixed script per episode key; ``"MEMORIZE_ALL"`` memorizes every
    pending item, ``"MEMORIZE_FIRST"`` only the first, ``"MEMORIZE_EXTRA"`` one that was not
    retrieved too."""

    wants_contexts = True

    def __init__(self, tokenizer, scripts):
        self.tokenizer, self.scripts = tokenizer, scripts

    def _text(self, context):
        script = self.scripts[context.key.split("/")[0]]
        text = script[min(context.view.step, len(script) - 1)]
        if text.startswith("MEMORIZE"):
            labels = list(context.labels.values())
            keep = {"MEMORIZE_ALL": labels, "MEMORIZE_FIRST": labels[:1]}.get(
                text, [*labels, "Video 9"]
            )
            entries = [
                {"information_id": label, "is_useful": True, "priority_score": 3} for label in keep
            ]
            text = format_tool_call(
                "summarize_and_memorize", {"summarize": "notes", "memorize": entries}
            )
        return text + "<|im_end|>"

    def generate(self, prompts_, *, contexts, **_):
        out = []
        for context in contexts:
            tokens = self.tokenizer.encode(self._text(context), add_special_tokens=False)
            out.append(Completion(tokens, [-0.5] * len(tokens), "stop"))
        return out


def _search(node_id, parents=("root",), query="badge"):
    return format_tool_call(
        "add_search_node", {"id": node_id, "parent_ids": list(parents), "query": query}
    )


_ANSWER = format_tool_call("add_answer_node", {"parent_ids": ["root"], "answer": "red"})
# name -> (script, error message)
_CASES = {
    "bad_json": (['<tool_call>{"name": oops</tool_call>', _ANSWER], "not valid JSON"),
    "unknown_parent": ([_search("a", ["nope"]), _ANSWER], 'unknown parent id "nope"'),
    "answer_parent": (
        [format_tool_call("add_answer_node", {"parent_ids": ["a"], "answer": "red"}), _ANSWER],
        'unknown parent id "a"; the nodes are "root"',
    ),
    "search_twice": ([_search("a"), _search("b"), "MEMORIZE_ALL", _ANSWER], "must be followed"),
    "memorize_first": (["MEMORIZE_ALL", _ANSWER], "no search results to memorize"),
    "missing_items": ([_search("a"), "MEMORIZE_FIRST", "MEMORIZE_ALL", _ANSWER], "missing"),
    "root_id": ([_search("root"), _ANSWER], 'node id "root" already exists'),
    "unknown_item": (
        [_search("a"), "MEMORIZE_EXTRA", "MEMORIZE_ALL", _ANSWER],
        'unknown information_id "Video 9"',
    ),
    "answer_pending": ([_search("a"), _ANSWER, "MEMORIZE_ALL", _ANSWER], "before answering"),
}


def _run_puppet(world, scripts, config):
    _, questions, store, tokenizer = world
    batch = [dataclasses.replace(questions[0], question_id=name) for name in scripts]
    agent = VimRAGAgent(store, tokenizer, Puppet(tokenizer, scripts), config)
    return _run(agent, batch, group_ids=list(scripts))


def test_each_invalid_action_gets_its_error_and_the_episode_continues(world):
    _, _, _, tokenizer = world
    scripts = {name: script for name, (script, _) in _CASES.items()}
    out = _run_puppet(world, scripts, CONFIG)
    for (name, (_, message)), episode, record in zip(
        _CASES.items(), out.episodes, out.records, strict=True
    ):
        validate_record(record)
        errors = [t for t, turn in enumerate(episode.turns) if turn.error]
        assert len(errors) == 1 and message in episode.turns[errors[0]].error, name
        assert record["num_invalid_actions"] == 1
        t = errors[0]
        # The invalid segment belongs to no node (SPEC §4), and the next prompt shows the error.
        assert record["segment_node"][t] == -1, name
        next_prompt = tokenizer.decode(episode.segments[t + 1].prompt)
        assert message.split('"')[0] in next_prompt and "Error:" in next_prompt
        assert episode.end_reason == "answered", name
        np.testing.assert_allclose(
            record["behavior_logprobs"][record["loss_mask"]], -0.5
        )  # the backend's log-probs, on sampled tokens only


def test_rejected_actions_leave_their_rows_unchanged():
    # The graph judges structure: a rejected row keeps every array (bank included) but
    # ``error``, and its next frame budgets are those it had.
    updater = graph_ops.turn_updater("energy")
    graphs = graph_ops.batched_empty_graph(
        3, 3, 2, max_query_tokens=4, max_summary_tokens=4, max_keyframes=2
    )

    def turn(graphs, kinds, parents=(), node=0, keep=False):
        buffers = graph_ops.blank_actions(graphs)
        buffers["kind"][:] = kinds
        for row, parent in parents:
            buffers["parent_mask"][row, parent] = True
        buffers["node"][:] = node
        buffers["bank_valid"][:, 0] = buffers["bank_saliency"][:, 0] = keep
        buffers["bank_item_id"][:, 0] = 7
        return updater(graphs, graph_ops.pack_actions(buffers))

    search, memorize, answer = ActionKind.SEARCH, ActionKind.MEMORIZE, ActionKind.ANSWER
    graphs, _ = turn(graphs, search, [(r, 0) for r in range(3)])
    graphs, before = turn(graphs, memorize, node=1, keep=True)
    kept = jax.device_get(graphs)
    # A search into the slot kept for the answer; an answer whose parent is its own (unknown)
    # slot; a memorize into the root.
    graphs, after = turn(graphs, [search, answer, memorize], [(0, 1), (1, 2)], keep=True)
    full, unknown = GraphError.GRAPH_FULL, GraphError.UNKNOWN_PARENT
    assert after.error.tolist() == [full, unknown, GraphError.NOT_A_SEARCH_NODE]
    got = jax.device_get(graphs)
    assert got.error.tolist() == after.error.tolist()
    jax.tree.map(np.testing.assert_array_equal, got.replace(error=0), kept.replace(error=0))
    np.testing.assert_array_equal(after.budgets, before.budgets)
    assert before.budgets[:, 1, 0].min() > 0
    # The kept slot takes the answer; rows without an action read OK.
    graphs, last = turn(graphs, [answer, 0, 0], [(0, 1)])
    assert last.error.tolist() == [GraphError.OK] * 3
    assert last.row(0).answer_node == 2 and last.row(0).parents(2) == [1]
    assert last.row(1).answer_node == -1 and last.row(1).num_nodes == 2


def test_graph_full_and_max_calls(world):
    config = dataclasses.replace(CONFIG, max_nodes=3, max_model_calls=5, max_invalid_actions=9)
    scripts = {
        "full": [_search("a"), "MEMORIZE_ALL", _search("b", ["a"]), _ANSWER],
        "stubborn": ["no tool call here"],
    }
    full, stubborn = _run_puppet(world, scripts, config).episodes
    assert "memory graph is full" in full.turns[2].error
    assert full.end_reason == "answered" and full.node_ids == ["root", "a", "answer"]
    assert stubborn.end_reason == "max_model_calls" and len(stubborn.segments) == 5
    assert all("no tool call found" in turn.error for turn in stubborn.turns)


def test_invalid_action_policy_end(world):
    config = dataclasses.replace(CONFIG, invalid_action_policy="end")
    scripts = {"bad": ["no tool call here"], "good": [_ANSWER], "g2": [_ANSWER], "g3": [_ANSWER]}
    out = _run_puppet(world, scripts, config)  # 4 rows: the expert test's compiled shapes
    bad, good, _, _ = out.episodes
    assert bad.end_reason == "invalid_action" and len(bad.segments) == 1
    assert out.records[0]["answer_node"] == -1 and out.records[0]["reward"] == 0.0
    assert good.end_reason == "answered"


def test_prompt_that_does_not_fit_ends_the_episode(world):
    config = dataclasses.replace(CONFIG, max_segment_tokens=1024, max_new_tokens=64)
    out = _run_puppet(world, {"long": [_ANSWER]}, config)
    assert out.episodes[0].end_reason == "prompt_too_long"
    assert out.records[0]["num_segments"] == 0
    validate_record(out.records[0])


def test_loop_record_renders_with_node_texts_and_corpus_pixels(world, tmp_path):
    items, _, store, _ = world
    video = next(item for item in items if item.modality == "video")
    scripts = {
        "video": [_search("clip", query=video.text), "MEMORIZE_ALL", _ANSWER],
        "a1": [_ANSWER],
        "a2": [_ANSWER],
        "a3": [_ANSWER],
    }  # 4 rows: the expert test's compiled shapes
    out = _run_puppet(world, scripts, CONFIG)
    record, episode = out.records[0], out.episodes[0]
    slots = {m.info.item_id: m for m in episode.memory[1]}
    assert video.item_id in slots and record["node_title"][:3] == ["root", "clip", "answer"]
    k = slots[video.item_id].slot
    assert record["item_id"][1, k] == video.item_id and record["item_modality"][1, k] == 1
    frames = {i: tuple(round(t) for t in m.keyframes) or (0,) for i, m in slots.items()}
    keyframes = frames[video.item_id]
    assert len(keyframes) > 1
    assert memory_frames(record) == {
        (1, m.slot): frames[i] for i, m in slots.items() if m.info.modality == "video"
    }
    calls = []

    def load_visual(item_id, frame):
        calls.append((item_id, frame))
        return store.load_visual(item_id, frame)

    path = tmp_path / "loop.png"
    layout = render_record(record, path, load_visual=load_visual, budget="averaged")
    box = layout.node(1)
    assert box.lines[:2] == ("#1 search: clip", f"q: {video.text}")
    thumbs = {t.item_id: t for t in box.thumbs}
    assert set(thumbs) == set(slots) and thumbs[video.item_id].frames == keyframes
    # A video's keyframes split its budget: each is drawn at the size of its share.
    share = thumbs[video.item_id].pixels // len(keyframes)
    height, width = video.pixels.shape[1:3]
    expected = tuple(int(v) for v in smart_resize(height, width, share))
    assert (thumbs[video.item_id].height, thumbs[video.item_id].width) == expected
    assert sorted(calls) == sorted((i, f) for i in slots for f in frames[i])
    assert path.stat().st_size > 0


# --- a tiny random model --------------------------------------------------------------------


def test_tiny_random_qwen3_runs_batched_episodes(world):
    _, questions, store, tokenizer = world
    hf = preset_config("tiny")
    model = init_model(hf, rngs=nnx.Rngs(0))
    config = dataclasses.replace(CONFIG, max_new_tokens=16, max_model_calls=2, group_size=2)
    sampler = Sampler(
        model,
        max_prompt_len=config.max_prompt_tokens,
        max_new_tokens=config.max_new_tokens,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        batch_buckets=(4,),
        length_buckets=(config.max_prompt_tokens,),
    )
    out = _run(VimRAGAgent(store, tokenizer, sampler, config), questions[:2], seed=0)
    assert len(out.records) == 4 and out.stats.model_calls >= 4
    assert out.stats.invalid_actions >= 1
    for record in out.records:
        validate_record(record)
        assert record["group_size"] == 2
        mask = record["loss_mask"]
        logprobs = record["behavior_logprobs"]
        assert np.all(logprobs[mask] < 0) and np.all(logprobs[~mask] == 0)
    assert [r["group_id"] for r in out.records][::2] == [r["group_id"] for r in out.records][1::2]
