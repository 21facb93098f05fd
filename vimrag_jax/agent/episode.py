"""Host state of batched episodes: per-episode texts, segments and turns, and run statistics.

The graph arrays of every episode live in one batched ``MemoryGraph`` (``graph_ops``); an
``Episode`` keeps what JAX cannot hold (ids and texts the policy wrote, the retrieved items, the
prompt turns still to show) and each model call as a ``Segment``.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Protocol

from vimrag_jax.agent import prompts
from vimrag_jax.agent.protocol import ROOT_ID, Action
from vimrag_jax.envs import scripted
from vimrag_jax.retrieval.corpus import ItemInfo


class QuestionLike(Protocol):
    """What the loop needs of a question (``envs.synthetic.Question`` has it)."""

    question_id: str
    text: str
    answer: str
    evidence_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class RowContext:
    """Per-row episode state handed to backends with ``wants_contexts`` (scripted policies).

    ``key`` names the episode (stable across batchings); ``view`` is the scripted policies'
    ``EpisodeView`` (retrieved items named by corpus id); ``labels`` maps a pending item's
    corpus id string to its label in the observation (``"17" -> "Picture 2"``).
    """

    key: str
    question: Any
    view: scripted.EpisodeView
    labels: dict[str, str]


@dataclasses.dataclass
class MemorySlot:
    """A kept visual item of a node: its bank slot, corpus info, keyframes and priority."""

    slot: int
    info: ItemInfo
    keyframes: tuple[float, ...]
    priority: int


@dataclasses.dataclass
class Segment:
    prompt: list[int]
    sampled: list[int]
    logprobs: list[float]
    node: int
    visuals: tuple[prompts.VisualRef, ...]


@dataclasses.dataclass
class Turn:
    """One model call as the loop saw it (for tests, debugging and SFT inspection)."""

    text: str
    action: Action
    error: str | None
    observation: str


@dataclasses.dataclass
class Episode:
    """Host state of one rollout; the graph arrays live in the batched ``MemoryGraph``."""

    question: Any
    group_id: str
    index: int
    key: str
    node_ids: list[str] = dataclasses.field(default_factory=lambda: [ROOT_ID])
    node_parents: list[tuple[str, ...]] = dataclasses.field(default_factory=lambda: [()])
    queries: list[str] = dataclasses.field(default_factory=lambda: [""])
    summaries: list[str] = dataclasses.field(default_factory=lambda: [""])
    memory: list[list[MemorySlot]] = dataclasses.field(default_factory=lambda: [[]])
    retrieved: list[tuple[int, ...]] = dataclasses.field(default_factory=lambda: [()])
    pending: tuple[ItemInfo, ...] | None = None
    pending_node: int = -1
    pending_turns: tuple[prompts.Message, ...] = ()
    error_turns: tuple[prompts.Message, ...] = ()
    history: list[prompts.Message] = dataclasses.field(default_factory=list)
    notes: str = ""
    segments: list[Segment] = dataclasses.field(default_factory=list)
    turns: list[Turn] = dataclasses.field(default_factory=list)
    step: int = 0
    num_invalid: int = 0
    answer_node: int = -1
    prediction: str | None = None
    done: bool = False
    end_reason: str = ""

    @property
    def num_nodes(self) -> int:
        return len(self.node_ids)

    def end(self, reason: str) -> None:
        self.done, self.end_reason = True, reason


@dataclasses.dataclass
class RolloutStats:
    """Counts and timings of one ``run`` call."""

    episodes: int = 0
    model_calls: int = 0
    generated_tokens: int = 0
    invalid_actions: int = 0
    reward_sum: float = 0.0
    end_reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    generate_s: float = 0.0
    total_s: float = 0.0

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / max(self.episodes, 1)

    @property
    def invalid_rate(self) -> float:
        return self.invalid_actions / max(self.model_calls, 1)

    @property
    def outside_model_share(self) -> float:
        """Share of wall time spent outside ``generate`` (parsing, graph, retrieval, resize)."""
        return 1.0 - self.generate_s / self.total_s if self.total_s > 0 else 0.0


@dataclasses.dataclass
class Rollouts:
    records: list[dict[str, Any]]
    episodes: list[Episode]
    stats: RolloutStats


__all__ = [
    "Episode",
    "MemorySlot",
    "QuestionLike",
    "RolloutStats",
    "Rollouts",
    "RowContext",
    "Segment",
    "Turn",
]
