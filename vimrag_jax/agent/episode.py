"""Host state of batched episodes: per-episode texts, segments and turns, and run statistics.

The graph of every episode lives in one batched ``MemoryGraph`` (``graph_ops``), the only record
of its structure (parents, answer node, node count). An ``Episode`` keeps what JAX cannot hold, by
node (the ids and texts the policy wrote, the kept items, the retrieved ids), the prompt turns
still to show, and each model call as a ``Segment``.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Protocol

from vimrag_jax.agent import prompts
from vimrag_jax.agent.protocol import ROOT_ID, Action
from vimrag_jax.memory.graph import MemoryGraph
from vimrag_jax.retrieval.corpus import ItemInfo


class QuestionLike(Protocol):
    """What the loop needs of a question (``envs.synthetic.Question`` has it)."""

    question_id: str
    text: str
    answer: str
    evidence_ids: tuple[int, ...]


def information_id(item_id: int) -> str:
    """The ``information_id`` of a corpus item in a memorize action: its id as a decimal string."""
    return str(int(item_id))


@dataclasses.dataclass(frozen=True)
class RetrievedItem:
    """A retrieval result as a scripted policy sees it (``text``: the passage or the caption)."""

    item_id: int
    modality: str
    text: str
    timestamps: tuple[float, ...] = ()

    @property
    def information_id(self) -> str:
        """The id a memorize action uses for this item."""
        return information_id(self.item_id)


@dataclasses.dataclass(frozen=True)
class EpisodeView:
    """What a scripted policy sees before each model call.

    ``node_ids[0]`` is the root (the question); ``node_parents[i]`` lists node i's parent ids (the
    loop reads them off the graph's adjacency, in node order). ``pending`` holds the results of
    the last search until they are memorized. ``step`` counts the model calls made so far in the
    episode.
    """

    question: str
    node_ids: tuple[str, ...] = (ROOT_ID,)
    node_parents: tuple[tuple[str, ...], ...] = ((),)
    pending: tuple[RetrievedItem, ...] = ()
    step: int = 0


@dataclasses.dataclass(frozen=True)
class RowContext:
    """Per-row episode state handed to backends with ``wants_contexts`` (scripted policies).

    ``key`` names the episode (stable across batchings); ``view`` is the scripted policies'
    ``EpisodeView`` (retrieved items named by corpus id); ``labels`` maps a pending item's
    corpus id string to its label in the observation (``"17" -> "Picture 2"``).
    """

    key: str
    question: Any
    view: EpisodeView
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
    """One model call: its prompt ids, the sampled ids with their log-probs, the node it created
    or wrote, and the prompt's visual references."""

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
    """Host state of one rollout; its structure lives in the batched ``MemoryGraph``.

    The per-node lists are indexed like the graph's nodes and grow only when the graph accepts
    an action (``actions.commit``); ``node_ids[i]`` is the id the policy gave node ``i``
    (``"answer"`` for the answer node).
    """

    question: Any
    group_id: str
    index: int
    key: str
    node_ids: list[str] = dataclasses.field(default_factory=lambda: [ROOT_ID])
    queries: list[str] = dataclasses.field(default_factory=lambda: [""])
    summaries: list[str] = dataclasses.field(default_factory=lambda: [""])
    memory: list[list[MemorySlot]] = dataclasses.field(default_factory=lambda: [[]])
    retrieved: list[tuple[int, ...]] = dataclasses.field(default_factory=lambda: [()])
    pending: tuple[ItemInfo, ...] | None = None
    pending_turns: tuple[prompts.Message, ...] = ()
    error_turns: tuple[prompts.Message, ...] = ()
    history: list[prompts.Message] = dataclasses.field(default_factory=list)
    notes: str = ""
    segments: list[Segment] = dataclasses.field(default_factory=list)
    turns: list[Turn] = dataclasses.field(default_factory=list)
    step: int = 0
    num_invalid: int = 0
    prediction: str | None = None
    done: bool = False
    end_reason: str = ""

    def end(self, reason: str) -> None:
        self.done, self.end_reason = True, reason


@dataclasses.dataclass
class RolloutStats:
    """Counts and timings of one ``run`` call."""

    episodes: int = 0
    model_calls: int = 0
    generated_tokens: int = 0
    invalid_actions: int = 0
    end_reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    generate_s: float = 0.0
    total_s: float = 0.0

    @property
    def invalid_rate(self) -> float:
        return self.invalid_actions / max(self.model_calls, 1)

    @property
    def outside_model_share(self) -> float:
        """Share of wall time spent outside ``generate`` (parsing, graph, retrieval, resize)."""
        return 1.0 - self.generate_s / self.total_s if self.total_s > 0 else 0.0


@dataclasses.dataclass
class Rollouts:
    """What ``VimRAGAgent.run`` returns: the episodes, groups consecutive; the final batched
    ``MemoryGraph`` as a host copy (row ``i`` is episode ``i``'s graph; None without episodes);
    the run's statistics."""

    episodes: list[Episode]
    graph: MemoryGraph | None
    stats: RolloutStats


__all__ = [
    "Episode",
    "EpisodeView",
    "MemorySlot",
    "QuestionLike",
    "RetrievedItem",
    "RolloutStats",
    "Rollouts",
    "RowContext",
    "Segment",
    "Turn",
    "information_id",
]
