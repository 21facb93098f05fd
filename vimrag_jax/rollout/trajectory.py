"""Trajectory records from agent episodes: one record per rollout (SPEC §6), with its reward.

``VimRAGAgent.run`` returns episodes and the final batched ``MemoryGraph``; ``trajectory_record``
turns one episode and its row of the graph into the record the learner reads:

- graph structure as the graph stores it: ``adjacency``, ``node_valid``, ``node_kind``
  (``NodeKind``; padding is ``NodeKind.EMPTY``), ``answer_node``; the memory bank's
  ``priority``, ``item_valid``, and each kept slot's corpus ``item_id`` and ``item_modality``
  (``Modality.EMPTY`` and -1 in unused slots);
- ``relevant``: the nodes whose retrieval found one of the question's gold evidence items;
- ``reward``: the outcome reward of the prediction against every accepted answer of the
  question (``envs.rewards.gold_answers``): ``rollout.reward_metric`` ``"em"`` or ``"f1"`` (with
  its pass mark ``rollout.reward_threshold``) by ``envs.rewards.outcome_reward``, or ``"judge"``
  by an ``envs.judge.Judge`` asked once for the whole batch (``episode_rewards``; a judge
  failure scores 0);
- one segment per model call: ``tokens`` = prompt ids + sampled ids, ``loss_mask`` on the sampled
  ids only, ``behavior_logprobs`` the backend's log-probs there, ``segment_node`` the node the
  call created or wrote (-1 for an invalid turn), ``segment_visuals`` the prompt's visual
  references;
- node texts for pictures of rollouts: ``node_title`` (the ids the policy chose, ``"root"`` and
  ``"answer"`` for the root and answer nodes), ``node_query``, ``node_summary``.

``run_records`` runs an agent and builds every record in one call (with the judge, if any).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vimrag_jax.agent.config import RolloutConfig
from vimrag_jax.agent.episode import Episode, QuestionLike, Rollouts
from vimrag_jax.agent.loop import VimRAGAgent
from vimrag_jax.envs.judge import Judge, JudgeRequest
from vimrag_jax.envs.rewards import gold_answers, outcome_reward
from vimrag_jax.memory.graph import MemoryGraph, Modality
from vimrag_jax.rollout.records import RecordDims, blank_record


def record_dims(config: RolloutConfig) -> RecordDims:
    """Record maxima: N nodes, K items, S = max model calls, L tokens, V visuals."""
    return RecordDims(
        nodes=config.max_nodes,
        items=config.max_items,
        segments=config.max_model_calls,
        tokens=config.max_segment_tokens,
        visuals=config.max_visuals,
    )


def episode_reward(episode: Episode, config: RolloutConfig) -> float:
    """The string-metric outcome reward of the episode's prediction (0 without an answer);
    ``reward_metric="judge"`` needs the batch call `episode_rewards`."""
    return outcome_reward(
        episode.prediction,
        gold_answers(episode.question),
        metric=config.reward_metric,
        threshold=config.reward_threshold,
    )


def episode_rewards(
    episodes: Sequence[Episode], config: RolloutConfig, judge: Judge | None = None
) -> list[float]:
    """The outcome reward of each episode. With ``reward_metric="judge"`` the ``judge`` grades
    the whole batch at once (concurrent, cached requests); an episode it could not grade
    (``None``: a failed request or a reply without a verdict, counted by the judge) scores 0,
    never 1."""
    if config.reward_metric != "judge":
        return [episode_reward(episode, config) for episode in episodes]
    if judge is None:
        raise ValueError(
            "rollout.reward_metric='judge' needs a judge (envs.judge.Judge.from_config: "
            "rollout.judge_url, rollout.judge_model)"
        )
    verdicts = judge.verdicts(
        [JudgeRequest(e.question.text, gold_answers(e.question), e.prediction) for e in episodes]
    )
    return [1.0 if verdict is True else 0.0 for verdict in verdicts]


def relevant_nodes(episode: Episode, nodes: int) -> np.ndarray:
    """[nodes] bool: whether each node's retrieval found a gold evidence item of the question."""
    gold = {int(i) for i in episode.question.evidence_ids}
    relevant = np.zeros((nodes,), bool)
    for i, found in enumerate(episode.retrieved):
        relevant[i] = bool(gold & set(found))
    return relevant


def trajectory_record(
    episode: Episode,
    graph: MemoryGraph,
    row: int,
    config: RolloutConfig,
    *,
    policy_version: int = 0,
    group_size: int = 1,
    env_name: str = "",
    worker_id: str = "",
    reward: float | None = None,
) -> dict[str, Any]:
    """The record of one episode; ``graph`` is the batched host graph, ``row`` the episode's.
    ``reward``: the episode's reward when already computed for the batch (`episode_rewards`),
    else it is computed here with the string metric (`episode_reward`)."""
    dims = record_dims(config)
    node_valid = np.asarray(graph.node_valid[row])
    bank = graph.bank
    item_valid = np.asarray(bank.valid[row])

    def pad(texts: list[str]) -> list[str]:  # one string per node slot, "" for padding
        return [*texts, *[""] * (dims.nodes - len(texts))]

    record = blank_record(
        dims,
        question_id=str(episode.question.question_id),
        group_id=episode.group_id,
        question=episode.question.text,
        gold_answer=episode.question.answer,
        prediction=episode.prediction or "",
        env=env_name,
        worker_id=worker_id,
        policy_version=int(policy_version),
        group_size=int(group_size),
        answer_node=int(graph.answer_node[row]),
        num_invalid_actions=int(episode.num_invalid),
        num_segments=len(episode.segments),
        reward=episode_reward(episode, config) if reward is None else float(reward),
        adjacency=np.asarray(graph.adjacency[row]),
        node_valid=node_valid,
        node_kind=np.asarray(graph.node_kind[row]),
        relevant=relevant_nodes(episode, dims.nodes),
        priority=np.asarray(bank.priority[row]),
        item_valid=item_valid,
        item_id=np.where(item_valid, np.asarray(bank.item_id[row]), -1),
        item_modality=np.where(item_valid, np.asarray(bank.modality[row]), Modality.EMPTY),
        node_title=pad(episode.node_ids),
        node_query=pad(episode.queries),
        node_summary=pad(episode.summaries),
    )
    for s, segment in enumerate(episode.segments):
        p, g = len(segment.prompt), len(segment.sampled)
        record["tokens"][s, :p] = segment.prompt
        record["tokens"][s, p : p + g] = segment.sampled
        record["loss_mask"][s, p : p + g] = True
        record["behavior_logprobs"][s, p : p + g] = segment.logprobs
        record["segment_node"][s] = segment.node
        record["segment_valid"][s] = True
        for v, ref in enumerate(segment.visuals):
            record["segment_visuals"][s, v] = ref.as_row()
            record["segment_visual_valid"][s, v] = True
    return record


def run_records(
    agent: VimRAGAgent,
    questions: Sequence[QuestionLike],
    *,
    group_size: int | None = None,
    policy_version: int = 0,
    seed: int = 0,
    group_ids: Sequence[str] | None = None,
    greedy: bool = False,
    env_name: str = "",
    worker_id: str = "",
    judge: Judge | None = None,
) -> tuple[list[dict[str, Any]], Rollouts]:
    """Runs the agent (``VimRAGAgent.run``) and returns the records with the rollouts; the
    rewards come from `episode_rewards` (``judge``: needed by ``reward_metric="judge"``)."""
    g = agent.config.group_size if group_size is None else int(group_size)
    rollouts = agent.run(questions, group_size=g, seed=seed, group_ids=group_ids, greedy=greedy)
    meta = dict(policy_version=policy_version, group_size=g, env_name=env_name, worker_id=worker_id)
    rewards = episode_rewards(rollouts.episodes, agent.config, judge)
    records = [
        trajectory_record(episode, rollouts.graph, row, agent.config, reward=reward, **meta)
        for row, (episode, reward) in enumerate(zip(rollouts.episodes, rewards, strict=True))
    ]
    return records, rollouts


def mean_reward(records: Sequence[dict[str, Any]]) -> float:
    """The mean ``reward`` of the records (0 for none)."""
    return sum(float(r["reward"]) for r in records) / max(len(records), 1)


__all__ = [
    "episode_reward",
    "episode_rewards",
    "mean_reward",
    "record_dims",
    "relevant_nodes",
    "run_records",
    "trajectory_record",
]
