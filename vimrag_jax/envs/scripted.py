"""Scripted VimRAG policies for the synthetic environment: cold-start SFT data and test fixtures.

A policy sees a small host-side ``EpisodeView`` (``agent.episode``: the question, the graph's node
ids and parents, the retrieval results waiting to be memorized, the step) and returns the next
action as ``(tool_name, arguments)`` with exactly the SPEC §3 argument schemas; turning an action
into model text is the protocol module's job.

``information_id`` convention: the decimal string of the corpus item id (``"17"``), so an id the
model writes names one corpus item whatever order the retriever returned it in. The observation
renderer must therefore show each item's id next to its ``Text k:`` / ``Picture k:`` / ``Video k:``
label.

- ``ExpertPolicy`` uses the question's privileged chain: one search per hop (query naming the hop's
  entity and relation — the question itself for a one-hop question — parent = the previous hop's
  node), a memorize marking gold items useful
  (priority 5; videos with the timestamps of the frames showing the fact) and every other item
  not useful (priority 1), then an answer whose parents are the whole hop chain. When a hop's
  search misses its evidence it retries once with a terse query from the same parent; the missed
  node stays in the graph as a dead end.
- ``NoisyPolicy`` follows the same chain but adds redundant searches (a hop searched again),
  dead-end branches (searches about other entities, near-duplicate names first) and, with a set
  probability, a wrong answer.

Both are deterministic given their seed and the sequence of views. ``run_episode`` plays a policy
against a search function on the host, checking every action with ``check_action``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from vimrag_jax.agent import protocol
from vimrag_jax.agent.episode import EpisodeView, RetrievedItem, information_id
from vimrag_jax.envs.synthetic import (
    ATTRIBUTES,
    RELATIONS,
    Hop,
    Question,
    fact_sentence,
    hop_query,
    wrong_answer,
)

SEARCH = "add_search_node"
MEMORIZE = "summarize_and_memorize"
ANSWER = "add_answer_node"
ROOT_ID = protocol.ROOT_ID
Action = tuple[str, dict]


@dataclass
class _Search:
    node_id: str
    query: str
    kind: str  # "hop", "retry", "redundant" or "dead_end"
    hop: int | None = None  # chain index (hop, retry, redundant)
    parent: str | None = None  # set when the search is issued


def _node_title(hop_index: int, hop: Hop) -> str:
    return f"h{hop_index + 1}-{hop.relation}"


def _search_action(node_id: str, parents: list[str], query: str) -> Action:
    return SEARCH, {"id": node_id, "parent_ids": parents, "query": query}


class ScriptedPolicy:
    """Runs a plan of searches along a question's chain, then answers; see the module docstring.

    Subclasses fill ``self._plan`` (the searches in order) and may override ``_answer_text``.
    A policy object plays one episode; make a new one per episode.
    """

    def __init__(self, question: Question, *, seed: int = 0, max_calls: int = 20):
        if max_calls < 2 * question.hops + 1:
            raise ValueError(
                f"max_calls={max_calls} is too small for a {question.hops}-hop question "
                f"(needs at least {2 * question.hops + 1})"
            )
        self.question = question
        self.max_calls = max_calls
        self.rng = np.random.default_rng(seed)
        self._gold = {hop.evidence_id: hop for hop in question.chain}
        self._hop_node: dict[int, str] = {}  # chain index -> node that holds that hop's fact
        self._hop_found: dict[int, bool] = {}
        # A one-hop question is searched as asked (its own words are the best query); a
        # multi-hop one by sub-questions, one per hop.
        self._plan: list[_Search] = [
            _Search(
                _node_title(i, hop),
                question.text if question.hops == 1 else hop_query(hop),
                "hop",
                i,
            )
            for i, hop in enumerate(question.chain)
        ]
        self._issued: dict[str, _Search] = {}

    # -- decisions --------------------------------------------------------------------------------

    def act(self, view: EpisodeView) -> Action:
        """The next action for ``view``."""
        if view.pending:
            return self._memorize(view)
        while True:
            search = next((s for s in self._plan if s.node_id not in self._issued), None)
            if search is None:
                return self._answer()
            if search.kind == "hop" or self._affordable(view):
                return self._issue(search, view)
            self._plan.remove(search)  # an optional search the call budget cannot pay for

    def _affordable(self, view: EpisodeView) -> bool:
        """Whether one optional search (+ memorize) still leaves calls for the rest of the chain."""
        pending = [s for s in self._plan if s.kind == "hop" and s.node_id not in self._issued]
        remaining_hops = len(pending)
        return view.step + 2 + 2 * remaining_hops + 1 <= self.max_calls

    def _issue(self, search: _Search, view: EpisodeView) -> Action:
        if search.kind == "hop":
            parent = self._hop_node.get(search.hop - 1, view.node_ids[0])
        elif search.kind in ("retry", "redundant"):
            parent = self._issued[_node_title(search.hop, self.question.chain[search.hop])].parent
        else:
            parent = view.node_ids[self.rng.integers(len(view.node_ids))]
        search.parent = parent
        self._issued[search.node_id] = search
        if search.kind == "hop":
            self._hop_node[search.hop] = search.node_id
        return _search_action(search.node_id, [parent], search.query)

    def _memorize(self, view: EpisodeView) -> Action:
        node_id = view.node_ids[-1]
        search = self._issued.get(node_id)
        if search is None:
            raise ValueError(f"results are pending for node {node_id!r}, not made by this policy")
        entries, facts = [], []
        for item in view.pending:
            hop = self._gold.get(item.item_id)
            useful = hop is not None
            if useful and fact_sentence(hop) not in facts:
                facts.append(fact_sentence(hop))
            entries.append(
                {
                    "information_id": item.information_id,
                    "is_useful": useful,
                    "key_timestamp": list(hop.key_timestamps) if useful else [],
                    "priority_score": 5 if useful else self._low_priority(),
                }
            )
        if search.kind in ("hop", "retry"):
            hop = self.question.chain[search.hop]
            found = hop.evidence_id in {item.item_id for item in view.pending}
            self._hop_found[search.hop] = found
            if found:
                self._hop_node[search.hop] = node_id
            elif search.kind == "hop":
                retry = _Search(f"{node_id}-retry", hop_query(hop, 1), "retry", search.hop)
                self._plan.insert(self._plan.index(search) + 1, retry)
        if facts:
            summary = " ".join(facts)
        elif search.hop is not None:
            hop = self.question.chain[search.hop]
            summary = f"These results do not state the {hop.relation} of {hop.subject}."
        else:
            summary = "These results do not help answer the question."
        return MEMORIZE, {"summarize": summary, "memorize": entries}

    def _low_priority(self) -> int:
        return 1

    def _answer(self) -> Action:
        parents = [self._hop_node[i] for i in range(self.question.hops)]
        return ANSWER, {"parent_ids": parents, "answer": self._answer_text()}

    def _answer_text(self) -> str:
        return self.question.answer

    @property
    def evidence_found(self) -> bool:
        """Whether every hop's evidence was retrieved (episodes where not are poor SFT data)."""
        return all(self._hop_found.get(i, False) for i in range(self.question.hops))


class ExpertPolicy(ScriptedPolicy):
    """The clean expert: the hop chain only (plus one retry for a hop whose evidence was missed)."""


@dataclass(frozen=True)
class NoiseConfig:
    """How noisy a ``NoisyPolicy`` is: per-hop chances of a redundant search and of a dead-end
    branch, and the chance of answering wrongly."""

    redundant_prob: float = 0.3
    dead_end_prob: float = 0.4
    wrong_answer_prob: float = 0.3
    near_duplicate_prob: float = 0.5

    def __post_init__(self):
        for name in ("redundant_prob", "dead_end_prob", "wrong_answer_prob", "near_duplicate_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"NoiseConfig.{name} must be a probability, got {value}")


def _near_duplicate(a: str, b: str) -> bool:
    return a != b and len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1


class NoisyPolicy(ScriptedPolicy):
    """The expert's chain with redundant searches, dead-end branches and sometimes a wrong answer.

    ``entities`` maps the names of the world's entities to their kind (``synthetic.entity_kinds``);
    dead ends search about entities off the chain, preferring near-duplicates of chain names.
    """

    def __init__(
        self,
        question: Question,
        entities: dict[str, str],
        *,
        noise: NoiseConfig = NoiseConfig(),
        seed: int = 0,
        max_calls: int = 20,
    ):
        super().__init__(question, seed=seed, max_calls=max_calls)
        self.noise = noise
        chain_names = {hop.subject for hop in question.chain}
        pool = sorted(name for name in entities if name not in chain_names)
        if not pool:
            raise ValueError("NoisyPolicy needs at least one entity off the question's chain")
        near = sorted(n for n in pool if any(_near_duplicate(n, c) for c in chain_names))
        plan: list[_Search] = []
        for search in self._plan:
            if self.rng.random() < noise.dead_end_prob:
                use_near = near and self.rng.random() < noise.near_duplicate_prob
                names = near if use_near else pool
                name = names[self.rng.integers(len(names))]
                kind = entities[name]
                relations = [r for r, (k, _) in RELATIONS.items() if k == kind]
                relations += [a for a, (k, _) in ATTRIBUTES.items() if k == kind]
                relation = relations[self.rng.integers(len(relations))]
                query = hop_query(Hop(name, relation, "", -1, "text"))
                plan.append(_Search(f"d{len(plan) + 1}-{relation}", query, "dead_end"))
            plan.append(search)
            if self.rng.random() < noise.redundant_prob:
                hop = question.chain[search.hop]
                variant = int(self.rng.integers(2))
                again = f"{search.node_id}-again"
                plan.append(_Search(again, hop_query(hop, variant), "redundant", search.hop))
        self._plan = plan
        self._wrong = self.rng.random() < noise.wrong_answer_prob
        self._wrong_text = wrong_answer(question, self.rng)

    def _low_priority(self) -> int:
        return int(self.rng.integers(1, 3))

    def _answer_text(self) -> str:
        return self._wrong_text if self._wrong else self.question.answer

    @property
    def answers_wrongly(self) -> bool:
        """Whether this episode ends with a wrong answer."""
        return self._wrong


# -- checking and playing ---------------------------------------------------------------------


def _fail(tool: str, message: str):
    raise ValueError(f"{tool}: {message}")


def check_action(view: EpisodeView, tool: str, arguments: dict) -> None:
    """Raises ValueError naming the problem unless ``(tool, arguments)`` is a valid next action
    for ``view`` under SPEC §3 (exact argument keys and types, existing parents, every pending
    item memorized exactly once, search and memorize alternating)."""
    if not isinstance(arguments, dict):
        _fail(tool, f"arguments must be a dict, got {type(arguments).__name__}")
    expected = {
        SEARCH: {"id", "parent_ids", "query"},
        MEMORIZE: {"summarize", "memorize"},
        ANSWER: {"parent_ids", "answer"},
    }
    if tool not in expected:
        raise ValueError(f"unknown tool {tool!r}; expected one of {sorted(expected)}")
    if set(arguments) != expected[tool]:
        _fail(tool, f"argument keys {sorted(arguments)} != {sorted(expected[tool])}")
    if (tool == MEMORIZE) != bool(view.pending):
        _fail(tool, "a search must be followed by a memorize, and only then")
    if tool in (SEARCH, ANSWER):
        parents = arguments["parent_ids"]
        if not isinstance(parents, list) or not parents:
            _fail(tool, f"parent_ids must be a non-empty list, got {parents!r}")
        for parent in parents:
            if not isinstance(parent, str) or parent not in view.node_ids:
                _fail(tool, f"unknown parent id {parent!r}")
        text_key = "query" if tool == SEARCH else "answer"
        if not isinstance(arguments[text_key], str) or not arguments[text_key].strip():
            _fail(tool, f"{text_key} must be a non-empty string, got {arguments[text_key]!r}")
    if tool == SEARCH:
        node_id = arguments["id"]
        if not isinstance(node_id, str) or not node_id.strip() or node_id in view.node_ids:
            _fail(tool, f"id must be a new non-empty string, got {node_id!r}")
    if tool == MEMORIZE:
        if not isinstance(arguments["summarize"], str):
            _fail(tool, f"summarize must be a string, got {arguments['summarize']!r}")
        entries = arguments["memorize"]
        if not isinstance(entries, list):
            _fail(tool, f"memorize must be a list, got {type(entries).__name__}")
        pending = {item.information_id: item for item in view.pending}
        listed = [entry.get("information_id") for entry in entries if isinstance(entry, dict)]
        if sorted(listed) != sorted(pending) or len(entries) != len(listed):
            _fail(tool, f"memorize lists {listed}, the retrieved items are {sorted(pending)}")
        keys = {"information_id", "is_useful", "key_timestamp", "priority_score"}
        for entry in entries:
            if set(entry) != keys:
                _fail(tool, f"memorize entry keys {sorted(entry)} != {sorted(keys)}")
            if not isinstance(entry["is_useful"], bool):
                _fail(tool, f"is_useful must be a bool, got {entry['is_useful']!r}")
            score = entry["priority_score"]
            if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
                _fail(tool, f"priority_score must be an int in 1..5, got {score!r}")
            times = entry["key_timestamp"]
            item = pending[entry["information_id"]]
            if not isinstance(times, list) or any(
                isinstance(t, bool) or not isinstance(t, float | int) or t not in item.timestamps
                for t in times
            ):
                _fail(tool, f"key_timestamp {times!r} is not a list of the item's frame times")


@dataclass
class ScriptedEpisode:
    """The actions a policy took, the view before each, and what each search retrieved."""

    actions: list[Action] = field(default_factory=list)
    views: list[EpisodeView] = field(default_factory=list)
    retrieved: dict[str, tuple[int, ...]] = field(default_factory=dict)
    answer: str | None = None
    answer_parents: tuple[str, ...] = ()


def run_episode(
    policy: ScriptedPolicy,
    search: Callable[[str], Sequence[RetrievedItem]],
    *,
    max_calls: int = 20,
) -> ScriptedEpisode:
    """Plays ``policy`` on its question against ``search`` (a query -> results function), on the
    host, checking every action; stops at the answer or after ``max_calls`` model calls."""
    episode = ScriptedEpisode()
    view = EpisodeView(policy.question.text)
    for _ in range(max_calls):
        tool, arguments = policy.act(view)
        check_action(view, tool, arguments)
        episode.views.append(view)
        episode.actions.append((tool, arguments))
        step = view.step + 1
        if tool == SEARCH:
            results = tuple(search(arguments["query"]))
            episode.retrieved[arguments["id"]] = tuple(item.item_id for item in results)
            view = EpisodeView(
                view.question,
                view.node_ids + (arguments["id"],),
                view.node_parents + (tuple(arguments["parent_ids"]),),
                results,
                step,
            )
        elif tool == MEMORIZE:
            view = EpisodeView(view.question, view.node_ids, view.node_parents, (), step)
        else:
            episode.answer = arguments["answer"]
            episode.answer_parents = tuple(arguments["parent_ids"])
            break
    return episode


def store_searcher(store, k: int = 3) -> Callable[[str], tuple[RetrievedItem, ...]]:
    """A ``run_episode`` search function over a ``retrieval.corpus.CorpusStore``."""

    def search(query: str) -> tuple[RetrievedItem, ...]:
        ids, _ = store.search([query], k=k)
        results = []
        for item_id in ids[0]:
            info = store.item(int(item_id))
            results.append(RetrievedItem(info.item_id, info.modality, info.text, info.timestamps))
        return tuple(results)

    return search


__all__ = [
    "ANSWER",
    "MEMORIZE",
    "ROOT_ID",
    "SEARCH",
    "Action",
    "EpisodeView",
    "ExpertPolicy",
    "NoiseConfig",
    "NoisyPolicy",
    "RetrievedItem",
    "ScriptedEpisode",
    "ScriptedPolicy",
    "check_action",
    "information_id",
    "run_episode",
    "store_searcher",
]
