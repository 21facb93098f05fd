"""The VimRAG agent loop: many episodes in lockstep, one batched generate call per step.

``VimRAGAgent.run`` plays G rollouts of each question against a corpus store and a sampler
backend and returns one trajectory record per rollout (SPEC §6), groups consecutive.

One step, for every live episode at once:

1. **Prompt.** The context is rebuilt from the episode's state (``prompts.step_prompt``): the
   system prompt, a user turn with the question and the linearized memory graph (search nodes
   with parents, query, summary, and the visual memory at this step's budgeted resolution),
   then the extra turns below. Exactly these turns follow the graph turn:

   - after a valid search, until it is memorized: the search turn as the model wrote it
     (assistant) and ``retrieval_observation`` of the results (user, a tool response);
   - after an invalid action: that turn as written (assistant) and ``error_observation``
     (user). Only the latest invalid turn is shown; it is dropped after the next valid action.
     When a search is pending, the error turns come after the retrieval turns.

   Raw results are never shown again once memorized: they live on as the node's summary and
   visual memory. A prompt whose tokens plus the new-token budget exceed
   ``max_segment_tokens``, or whose visual inputs exceed ``max_visuals``, ends the episode
   (``end_reason`` says which): the learner must see exactly the context that was sampled,
   so nothing is ever truncated.
2. **Generate.** All prompts go to ``backend.generate`` in one call. Backends that declare
   ``wants_contexts = True`` (the scripted policies) also receive one ``RowContext`` per prompt.
   Backends with ``takes_prefill_inputs`` true (the KV-cache sampler over a Qwen3-VL policy)
   also receive each prompt's images and videos as ``prefill_inputs``: the processor-style
   arrays ``data.vision.VisualPatches`` builds from the prompt's visual references, the very
   references the record stores as ``segment_visuals``, so the learner rebuilds the same
   pixels. Text-only backends get token ids only.
3. **Act.** Each completion is parsed (``protocol.parse_action``) and checked against the graph
   (parents exist, ids new, search/memorize alternation, every retrieved item memorized, room
   left). Valid actions update the host mirror (ids and text, which JAX cannot hold) and are
   packed into one ``TurnActions``; the batched ``MemoryGraph`` and the next step's visual
   budgets come from one jitted call (``graph_ops.TurnUpdater``). Searches of all rows go to
   the store in one batched query.

Each model call is a segment: ``tokens`` = prompt ids + sampled ids, ``loss_mask`` on the
sampled ids only, ``behavior_logprobs`` the backend's log-probs there, ``segment_node`` the node
the call created or wrote (search: the new node; memorize: the node memorized; answer: the
answer node; invalid: the newest node, the root if none), ``segment_visuals`` the prompt's
visual references. An episode ends at its answer, after ``max_model_calls`` calls, after
``max_invalid_actions`` invalid actions (or the first one with ``invalid_action_policy="end"``),
or when a prompt does not fit.

Records also carry the node texts (``node_title``: the ids the policy chose, ``"root"`` and
``"answer"`` for the root and answer nodes; ``node_query``; ``node_summary``) and each kept memory
slot's corpus ``item_id`` and ``item_modality`` (-1 for empty slots), for pictures of rollouts.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np

from vimrag_jax.agent import graph_ops, prompts
from vimrag_jax.agent.graph_ops import ActionKind
from vimrag_jax.agent.protocol import ROOT_ID, Action, parse_action
from vimrag_jax.data.vision import VisualPatches
from vimrag_jax.envs import scripted
from vimrag_jax.envs.rewards import outcome_reward
from vimrag_jax.memory.energy import PIXELS_PER_TOKEN, TOTAL_PIXELS, smart_resize
from vimrag_jax.memory.graph import Modality
from vimrag_jax.retrieval.corpus import CorpusStore, ItemInfo
from vimrag_jax.rollout.records import RecordDims, blank_record

INVALID_POLICIES = ("continue", "end")
AGENTS = ("vimrag", "react", "summary", "mem1")


def _get(block: Any, key: str, default: Any) -> Any:
    """``block[key]`` when the config block has it, else ``default`` (keys may not exist yet)."""
    if block is None:
        return default
    try:
        return block[key] if key in block else default
    except TypeError:
        return default


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Typed rollout settings, read from the experiment config with defaults.

    Keys (config path → field): ``rollout.agent``, ``rollout.group_size``,
    ``rollout.questions_per_batch``, ``rollout.max_model_calls``, ``rollout.retrieval_top_k``,
    ``rollout.max_new_tokens``, ``rollout.temperature``, ``rollout.top_p``,
    ``rollout.invalid_action_policy``, ``rollout.max_invalid_actions``,
    ``rollout.max_visuals``, ``rollout.reward_metric``, ``rollout.reward_threshold``,
    ``rollout.prompt_style`` (``"full"`` or ``"compact"``, see ``prompts.system_prompt``),
    ``data.max_segment_tokens``, ``graph.*``, ``memory.*`` (``rollout_budget`` or, for
    evaluation, ``eval_budget``).
    """

    agent: str = "vimrag"
    group_size: int = 4
    questions_per_batch: int = 4
    max_model_calls: int = 20
    retrieval_top_k: int = 3
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    invalid_action_policy: str = "continue"
    max_invalid_actions: int = 5
    max_visuals: int = 64
    reward_metric: str = "em"
    reward_threshold: float = 0.5
    prompt_style: str = "full"
    max_segment_tokens: int = 2048
    max_nodes: int = 16
    max_items: int = 3
    max_keyframes: int = 4
    max_query_tokens: int = 32
    max_summary_tokens: int = 64
    budget: str = "averaged"
    lam: float = 0.1
    gamma: float = 0.3
    top_k: int = 5
    total_pixels: int = TOTAL_PIXELS

    def __post_init__(self):
        if self.agent not in AGENTS:
            raise ValueError(f"rollout.agent must be one of {AGENTS}, got {self.agent!r}")
        if self.invalid_action_policy not in INVALID_POLICIES:
            raise ValueError(
                f"rollout.invalid_action_policy must be one of {INVALID_POLICIES}, "
                f"got {self.invalid_action_policy!r}"
            )
        if self.prompt_style not in prompts.PROMPT_STYLES:
            raise ValueError(
                f"rollout.prompt_style must be one of {prompts.PROMPT_STYLES}, "
                f"got {self.prompt_style!r}"
            )
        if self.budget not in ("averaged", "energy"):
            raise ValueError(f"memory budget must be 'averaged' or 'energy', got {self.budget!r}")
        if self.retrieval_top_k > self.max_items:
            raise ValueError(
                f"rollout.retrieval_top_k={self.retrieval_top_k} exceeds graph.max_items="
                f"{self.max_items}: every retrieved item needs a memory slot"
            )
        if self.max_new_tokens >= self.max_segment_tokens:
            raise ValueError(
                f"rollout.max_new_tokens={self.max_new_tokens} leaves no room for a prompt in "
                f"data.max_segment_tokens={self.max_segment_tokens}"
            )
        for name in ("group_size", "questions_per_batch", "max_model_calls", "max_visuals"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, cfg: Any, *, evaluation: bool = False) -> RolloutConfig:
        """From an experiment ConfigDict; missing keys take the defaults above."""
        rollout, graph, memory = cfg.get("rollout"), cfg.get("graph"), cfg.get("memory")
        d = cls()
        fields = {
            name: _get(rollout, name, getattr(d, name))
            for name in (
                "agent",
                "group_size",
                "questions_per_batch",
                "max_model_calls",
                "retrieval_top_k",
                "max_new_tokens",
                "temperature",
                "top_p",
                "invalid_action_policy",
                "max_invalid_actions",
                "max_visuals",
                "reward_metric",
                "reward_threshold",
                "prompt_style",
            )
        }
        fields["max_segment_tokens"] = _get(cfg.get("data"), "max_segment_tokens", 2048)
        for name in (
            "max_nodes",
            "max_items",
            "max_keyframes",
            "max_query_tokens",
            "max_summary_tokens",
        ):
            fields[name] = _get(graph, name, getattr(d, name))
        for name in ("lam", "gamma", "top_k", "total_pixels"):
            fields[name] = _get(memory, name, getattr(d, name))
        budget_key = "eval_budget" if evaluation else "rollout_budget"
        fields["budget"] = _get(memory, budget_key, "energy" if evaluation else "averaged")
        return cls(**fields)

    @property
    def dims(self) -> RecordDims:
        """Record maxima: N nodes, K items, S = max model calls, L tokens, V visuals."""
        return RecordDims(
            nodes=self.max_nodes,
            items=self.max_items,
            segments=self.max_model_calls,
            tokens=self.max_segment_tokens,
            visuals=self.max_visuals,
        )

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_segment_tokens - self.max_new_tokens

    @property
    def observation_pixels(self) -> int:
        """The pixel budget of one retrieved image (a video splits it over its frames)."""
        return max(self.total_pixels // max(self.top_k, 1), PIXELS_PER_TOKEN)

    @property
    def max_visual_patches(self) -> int:
        """An upper bound on the patch rows (16-px patches of a 2-frame temporal patch; a
        merged visual token is 4) of one prompt's images and videos: the learner's
        ``data.vision.VisualInputs`` cap when the config sets no ``data.max_patches``.

        VimRAG shows its visual memory (at most ``total_pixels`` in all) plus one retrieval
        observation (``retrieval_top_k`` items of ``observation_pixels`` each); a video's
        frames pair up, so its patches are at most its pixels / 256 as an image's are. The
        slack covers the one-token minimum of small items and odd frame counts. The
        baselines may show up to ``max_visuals`` references of any budget.
        """
        minimum = 4 * (self.max_nodes * self.max_items * (self.max_keyframes + 1))
        minimum += 4 * self.retrieval_top_k * prompts.MAX_VIDEO_FRAMES
        if self.agent == "vimrag":
            pixels = self.total_pixels + self.retrieval_top_k * self.observation_pixels
        else:
            pixels = self.max_visuals * max(self.total_pixels, self.observation_pixels)
        return -(-(pixels // 256 + minimum) // 4) * 4


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


class _Invalid(Exception):
    """Internal: a graph-level rejection of a parsed action; the message goes to the model."""


def _stable_seed(*parts: Any) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _frame_size(info: ItemInfo) -> tuple[int, int]:
    """(height, width) of an image or of each video frame."""
    return int(info.shape[-3]), int(info.shape[-2])


class VimRAGAgent:
    """Runs batched VimRAG episodes; see the module docstring for the step and the records.

    Args:
      store: the corpus (search + item metadata).
      tokenizer: a Hugging Face tokenizer (``__call__`` and ``decode``).
      backend: ``generate(prompts, *, temperature, top_p, greedy, max_new_tokens,
        stop_token_ids, seed[, contexts]) -> list[Completion]``.
      config: the rollout settings.
      stop_token_ids: tokens that end a turn (default: the tokenizer's eos).
    """

    def __init__(
        self,
        store: CorpusStore,
        tokenizer: Any,
        backend: Any,
        config: RolloutConfig,
        *,
        stop_token_ids: Sequence[int] | None = None,
    ):
        self.store = store
        self.tokenizer = tokenizer
        self.backend = backend
        self.config = config
        if stop_token_ids is None:
            stop_token_ids = [tokenizer.eos_token_id]
        self.stop_token_ids = [int(t) for t in stop_token_ids if t is not None]
        self._updater = graph_ops.turn_updater(
            config.budget, config.lam, config.gamma, config.total_pixels, config.top_k
        )
        self._observation_pixels = config.observation_pixels
        # Pixels for a backend whose model sees images and videos (None: token ids only).
        self.visual_patches: VisualPatches | None = None
        if getattr(backend, "takes_prefill_inputs", False):
            self.visual_patches = VisualPatches.from_store(store)

    # -- public ----------------------------------------------------------------------------------

    def run(
        self,
        questions: Sequence[QuestionLike],
        *,
        group_size: int | None = None,
        policy_version: int = 0,
        seed: int = 0,
        group_ids: Sequence[str] | None = None,
        greedy: bool = False,
        env_name: str = "",
        worker_id: str = "",
    ) -> Rollouts:
        """G rollouts of every question; records in question order, each group consecutive."""
        started = time.perf_counter()
        cfg = self.config
        g = cfg.group_size if group_size is None else int(group_size)
        if group_ids is None:
            group_ids = [f"{q.question_id}@s{seed}" for q in questions]
        if len(group_ids) != len(questions):
            raise ValueError(f"{len(group_ids)} group ids for {len(questions)} questions")
        episodes = [
            Episode(q, gid, i, f"{gid}/{i}")
            for q, gid in zip(questions, group_ids, strict=True)
            for i in range(g)
        ]
        stats = RolloutStats(episodes=len(episodes))
        if not episodes:
            return Rollouts([], [], stats)
        graphs = graph_ops.batched_empty_graph(
            len(episodes),
            cfg.max_nodes,
            cfg.max_items,
            max_query_tokens=cfg.max_query_tokens,
            max_summary_tokens=cfg.max_summary_tokens,
            max_keyframes=cfg.max_keyframes,
        )
        budgets = np.zeros((len(episodes), cfg.max_nodes, cfg.max_items), np.int64)
        for step in range(cfg.max_model_calls):
            rows = [r for r, e in enumerate(episodes) if not e.done]
            if not rows:
                break
            graphs, budgets = self._step(
                episodes, rows, graphs, budgets, stats, seed=_stable_seed(seed, step), greedy=greedy
            )
        for episode in episodes:
            if not episode.done:
                episode.end("max_model_calls")
        host = jax.device_get(graphs)
        records = [
            self._record(e, row, host, policy_version, g, env_name, worker_id)
            for row, e in enumerate(episodes)
        ]
        for episode, record in zip(episodes, records, strict=True):
            stats.reward_sum += record["reward"]
            stats.end_reasons[episode.end_reason] += 1
        stats.total_s = time.perf_counter() - started
        return Rollouts(records, episodes, stats)

    # -- one step --------------------------------------------------------------------------------

    def _step(self, episodes, rows, graphs, budgets, stats, *, seed: int, greedy: bool):
        cfg = self.config
        rendered = [self.render(episodes[r], budgets[r]) for r in rows]
        ids = self.tokenizer([x.text for x in rendered], add_special_tokens=False)["input_ids"]
        ready = []
        for r, x, prompt in zip(rows, rendered, ids, strict=True):
            if len(prompt) > cfg.max_prompt_tokens:
                episodes[r].end("prompt_too_long")
            elif len(x.visuals) > cfg.max_visuals:
                episodes[r].end("too_many_visuals")
            else:
                ready.append((r, x, list(prompt)))
        if not ready:
            return graphs, budgets
        kwargs = dict(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            greedy=greedy,
            max_new_tokens=cfg.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
            seed=seed,
        )
        if getattr(self.backend, "wants_contexts", False):
            kwargs["contexts"] = [self.context(episodes[r]) for r, _, _ in ready]
        if self.visual_patches is not None:
            kwargs["prefill_inputs"] = [self.prefill_inputs(x.visuals) for _, x, _ in ready]
        began = time.perf_counter()
        completions = self.backend.generate([p for _, _, p in ready], **kwargs)
        stats.generate_s += time.perf_counter() - began
        if len(completions) != len(ready):
            raise RuntimeError(f"backend returned {len(completions)} completions for {len(ready)}")

        buffers = graph_ops.blank_actions(graphs)
        searches: list[tuple[int, str]] = []
        summaries: list[tuple[int, str]] = []
        for (r, x, prompt), completion in zip(ready, completions, strict=True):
            episode = episodes[r]
            sampled = [int(t) for t in completion.tokens]
            # The turn as the history replays it: without the stop token that ended it (the
            # chat template closes the turn itself; kept, it would be replayed as text).
            said = sampled[:-1] if sampled and sampled[-1] in self.stop_token_ids else sampled
            text = self.tokenizer.decode(said, skip_special_tokens=False)
            action = parse_action(text)
            stats.model_calls += 1
            stats.generated_tokens += len(sampled)
            try:
                if not action.valid:
                    raise _Invalid(action.error)
                node = self.act(episode, r, action, text, buffers, searches, summaries)
                error = None
            except _Invalid as exc:
                error = str(exc)
                node = episode.num_nodes - 1
                episode.num_invalid += 1
                stats.invalid_actions += 1
                self.on_invalid(episode, text, error)
            episode.segments.append(
                Segment(prompt, sampled, [float(v) for v in completion.logprobs], node, x.visuals)
            )
            observation = "" if error is None else prompts.error_observation(error)
            episode.turns.append(Turn(text, action, error, observation))
            episode.step += 1
            if error is not None and (
                cfg.invalid_action_policy == "end" or episode.num_invalid >= cfg.max_invalid_actions
            ):
                episode.end("invalid_action")
            elif not episode.done and episode.step >= cfg.max_model_calls:
                episode.end("max_model_calls")
        self._run_searches(episodes, searches)
        self._fill_tokens(buffers, searches, summaries)
        graphs, new_budgets = self._updater(graphs, graph_ops.pack_actions(buffers))
        return graphs, np.asarray(new_budgets)

    def prefill_inputs(self, visuals: Sequence[prompts.VisualRef]) -> dict[str, np.ndarray] | None:
        """A prompt's images and videos for the backend (None for a text-only prompt), built
        from the references the record keeps as the segment's ``segment_visuals``."""
        if not visuals or self.visual_patches is None:
            return None
        refs = np.array([ref.as_row() for ref in visuals], np.int64)
        return self.visual_patches.prompt_inputs(refs)

    # -- prompts ---------------------------------------------------------------------------------

    def render(self, episode: Episode, budget: np.ndarray) -> prompts.Rendered:
        """The prompt of the episode's next model call (see the module docstring)."""
        nodes = []
        for i in range(1, episode.num_nodes):
            if i == episode.answer_node:
                continue
            nodes.append(
                prompts.NodeView(
                    episode.node_ids[i],
                    episode.node_parents[i],
                    episode.queries[i],
                    episode.summaries[i],
                    self._memory_views(episode.memory[i], budget[i]),
                )
            )
        turns = episode.pending_turns + episode.error_turns
        return prompts.step_prompt(
            episode.question.text, nodes, turns, style=self.config.prompt_style
        )

    def _memory_views(self, slots: list[MemorySlot], budget: np.ndarray):
        if not slots:
            return ()
        heights, widths = zip(*(_frame_size(s.info) for s in slots), strict=True)
        pixels = [int(budget[s.slot]) for s in slots]
        out_h, out_w = smart_resize(np.array(heights), np.array(widths), np.array(pixels))
        return tuple(
            prompts.MemoryItemView(
                s.info.item_id,
                "video" if s.info.modality == "video" else "image",
                int(h),
                int(w),
                s.keyframes,
                s.priority,
            )
            for s, h, w in zip(slots, out_h, out_w, strict=True)
        )

    def observation_items(self, items: Sequence[ItemInfo]) -> list[prompts.RetrievedItem]:
        """Retrieved items for ``retrieval_observation``: an image gets one image's share of the
        total budget (``total_pixels / top_k``), a video splits that share over its frames."""
        out = []
        for info in items:
            if info.modality == "text":
                out.append(prompts.RetrievedItem(info.item_id, "text", info.text))
                continue
            frames = len(prompts.select_frames(info.timestamps)) if info.modality == "video" else 1
            h, w = _frame_size(info)
            rh, rw = smart_resize(h, w, max(self._observation_pixels // max(frames, 1), 1024))
            out.append(
                prompts.RetrievedItem(
                    info.item_id, info.modality, info.text, int(rh), int(rw), info.timestamps
                )
            )
        return out

    def context(self, episode: Episode) -> RowContext:
        """The scripted-policy view of an episode (see ``RowContext``)."""
        pending = episode.pending or ()
        items = tuple(
            scripted.RetrievedItem(i.item_id, i.modality, i.text, i.timestamps) for i in pending
        )
        labels = prompts.item_labels(self.observation_items(pending))
        view = scripted.EpisodeView(
            episode.question.text,
            tuple(episode.node_ids[: episode.num_nodes]),
            tuple(episode.node_parents),
            items,
            episode.step,
        )
        mapping = {str(i.item_id): label for i, label in zip(pending, labels, strict=True)}
        return RowContext(episode.key, episode.question, view, mapping)

    # -- actions ---------------------------------------------------------------------------------

    def on_invalid(self, episode: Episode, text: str, error: str) -> None:
        """Shows the invalid turn and its error in the next prompt (only the latest one)."""
        episode.error_turns = (
            prompts.Message("assistant", text),
            prompts.Message("user", prompts.error_observation(error)),
        )

    def parents(self, episode: Episode, parent_ids: Sequence[str]) -> list[int]:
        """Node indices of ``parent_ids``; _Invalid naming an unknown id."""
        index = {node_id: i for i, node_id in enumerate(episode.node_ids)}
        out = []
        for parent in parent_ids:
            if parent not in index or index[parent] == episode.answer_node:
                known = ", ".join(json_quote(n) for n in episode.node_ids)
                raise _Invalid(f"unknown parent id {json_quote(parent)}; the nodes are {known}")
            out.append(index[parent])
        return out

    def act(self, episode, row, action, text, buffers, searches, summaries) -> int:
        """Checks a parsed valid action against the episode, applies it; returns its node."""
        cfg = self.config
        args = action.arguments
        if action.kind == "search":
            if episode.pending is not None:
                raise _Invalid(
                    "a search must be followed by summarize_and_memorize; record the results "
                    "of the last search before searching again"
                )
            node_id = args["id"].strip()
            if node_id == ROOT_ID or node_id in episode.node_ids:
                raise _Invalid(f"node id {json_quote(node_id)} already exists; choose a new id")
            parents = self.parents(episode, args["parent_ids"])
            if episode.num_nodes >= cfg.max_nodes - 1:
                raise _Invalid(
                    "the memory graph is full (no room for another search); answer now with "
                    "add_answer_node"
                )
            node = episode.num_nodes
            episode.node_ids.append(node_id)
            episode.node_parents.append(tuple(args["parent_ids"]))
            episode.queries.append(args["query"])
            episode.summaries.append("")
            episode.memory.append([])
            episode.retrieved.append(())
            episode.pending, episode.pending_node = (), node
            episode.pending_turns = (prompts.Message("assistant", text),)
            episode.error_turns = ()
            buffers["kind"][row] = ActionKind.SEARCH
            buffers["parent_mask"][row, parents] = True
            buffers["step"][row] = episode.step
            searches.append((row, args["query"]))
            return node
        if action.kind == "memorize":
            if episode.pending is None:
                raise _Invalid("there are no search results to memorize; search first")
            slots = self._check_memorize(episode, args["memorize"])
            node = episode.pending_node
            episode.summaries[node] = args["summarize"]
            episode.memory[node] = [s for s in slots if s is not None]
            self._fill_bank(buffers, row, episode.pending, args["memorize"], slots)
            buffers["kind"][row] = ActionKind.MEMORIZE
            buffers["node"][row] = node
            buffers["step"][row] = episode.step
            summaries.append((row, args["summarize"]))
            episode.pending, episode.pending_node = None, -1
            episode.pending_turns = episode.error_turns = ()
            return node
        if action.kind == "answer":
            if episode.pending is not None:
                raise _Invalid(
                    "record the last search results with summarize_and_memorize before answering"
                )
            parents = self.parents(episode, args["parent_ids"])
            if episode.num_nodes >= cfg.max_nodes:
                raise _Invalid("the memory graph is full; no room for the answer node")
            node = episode.num_nodes
            episode.node_ids.append("answer")
            episode.node_parents.append(tuple(args["parent_ids"]))
            episode.queries.append("")
            episode.summaries.append("")
            episode.memory.append([])
            episode.retrieved.append(())
            episode.answer_node, episode.prediction = node, args["answer"]
            buffers["kind"][row] = ActionKind.ANSWER
            buffers["parent_mask"][row, parents] = True
            buffers["step"][row] = episode.step
            episode.end("answered")
            return node
        raise _Invalid(action.error or "invalid action")

    def _check_memorize(self, episode: Episode, entries: list[dict]) -> list[MemorySlot | None]:
        """One slot per pending item (None when not kept); _Invalid on a bad listing."""
        pending = episode.pending or ()
        views = self.observation_items(pending)
        labels = prompts.item_labels(views)
        chosen: dict[int, dict] = {}
        for entry in entries:
            index = prompts.resolve_information_id(entry["information_id"], views)
            if index is None:
                raise _Invalid(
                    f"unknown information_id {json_quote(entry['information_id'])}; the "
                    f"retrieved items are {', '.join(labels) or 'none'}"
                )
            if index in chosen:
                raise _Invalid(f"memorize lists {labels[index]} twice")
            chosen[index] = entry
        missing = [labels[i] for i in range(len(pending)) if i not in chosen]
        if missing:
            raise _Invalid("memorize must list every retrieved item; missing " + ", ".join(missing))
        slots: list[MemorySlot | None] = []
        for index, info in enumerate(pending):
            entry = chosen[index]
            if info.modality == "text" or not entry["is_useful"]:
                slots.append(None)
                continue
            keyframes: tuple[float, ...] = ()
            if info.modality == "video":
                keyframes = self._keyframes(info, entry.get("key_timestamp") or [], labels[index])
            slots.append(MemorySlot(index, info, keyframes, int(entry["priority_score"])))
        return slots

    def _keyframes(self, info: ItemInfo, stamps: list[float], label: str) -> tuple[float, ...]:
        """A video's kept frame times: the listed ones (snapped to the 1 fps frames), or evenly
        chosen frames when none are listed; at most ``max_keyframes``."""
        times = info.timestamps
        if not stamps:
            return prompts.select_frames(times, self.config.max_keyframes)
        picked = []
        for t in stamps:
            frame = round(t * prompts.VIDEO_FPS)
            if not 0 <= frame < len(times):
                raise _Invalid(
                    f"key_timestamp {t:g} of {label} is outside the video "
                    f"(0 to {times[-1]:g} seconds)"
                )
            picked.append(float(times[frame]))
        return prompts.select_frames(sorted(set(picked)), self.config.max_keyframes)

    def _fill_bank(self, buffers, row, pending, entries, slots) -> None:
        for index, info in enumerate(pending):
            slot = slots[index]
            buffers["bank_item_id"][row, index] = info.item_id
            buffers["bank_modality"][row, index] = (
                Modality.VIDEO if info.modality == "video" else Modality.IMAGE
            )
            if slot is None:
                continue
            buffers["bank_valid"][row, index] = True
            buffers["bank_saliency"][row, index] = True
            buffers["bank_priority"][row, index] = slot.priority
            for f, t in enumerate(slot.keyframes):
                buffers["bank_timestamps"][row, index, f] = t
                buffers["bank_keyframe_valid"][row, index, f] = True

    def _run_searches(self, episodes: list[Episode], searches: list[tuple[int, str]]) -> None:
        if not searches:
            return
        ids, _ = self.store.search([q for _, q in searches], k=self.config.retrieval_top_k)
        for (row, _), found in zip(searches, ids, strict=True):
            episode = episodes[row]
            items = tuple(self.store.item(int(i)) for i in found)
            episode.retrieved[episode.pending_node] = tuple(int(i) for i in found)
            observation = prompts.retrieval_observation(self.observation_items(items))
            episode.turns[-1].observation = observation.text
            self.on_retrieval(episode, items, observation)

    def on_retrieval(self, episode: Episode, items: tuple[ItemInfo, ...], observation) -> None:
        """Holds the results until memorized and shows them in the next prompt."""
        episode.pending = items
        episode.pending_turns += (prompts.Message("user", observation),)

    def _fill_tokens(self, buffers, searches, summaries) -> None:
        for key, width, pairs in (
            ("query", buffers["query_tokens"].shape[1], searches),
            ("summary", buffers["summary_tokens"].shape[1], summaries),
        ):
            if not pairs:
                continue
            encoded = self.tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
            for (row, _), tokens in zip(pairs, encoded, strict=True):
                n = min(len(tokens), width)
                buffers[f"{key}_tokens"][row, :n] = tokens[:n]
                buffers[f"{key}_len"][row] = n

    # -- records ---------------------------------------------------------------------------------

    def _record(self, episode, row, graphs, policy_version, group_size, env_name, worker_id):
        cfg = self.config
        dims = cfg.dims
        gold = set(int(i) for i in episode.question.evidence_ids)
        n = episode.num_nodes
        node_valid = np.asarray(graphs.node_valid[row])
        if int(node_valid.sum()) != n:
            raise RuntimeError(
                f"episode {episode.key}: host graph has {n} nodes, device graph "
                f"{int(node_valid.sum())}"
            )
        relevant = np.zeros((dims.nodes,), bool)
        for i, found in enumerate(episode.retrieved):
            relevant[i] = bool(gold & set(found))
        kinds = np.where(node_valid, np.asarray(graphs.node_kind[row]), 0).astype(np.int8)
        item_valid = np.asarray(graphs.bank.valid[row])

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
            answer_node=int(episode.answer_node),
            num_invalid_actions=int(episode.num_invalid),
            num_segments=len(episode.segments),
            reward=outcome_reward(
                episode.prediction,
                episode.question.answer,
                metric=cfg.reward_metric,
                threshold=cfg.reward_threshold,
            ),
            adjacency=np.asarray(graphs.adjacency[row]),
            node_valid=node_valid,
            node_kind=kinds,
            relevant=relevant,
            priority=np.asarray(graphs.bank.priority[row]),
            item_valid=item_valid,
            item_id=np.where(item_valid, np.asarray(graphs.bank.item_id[row]), -1),
            item_modality=np.where(item_valid, np.asarray(graphs.bank.modality[row]), -1),
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


def json_quote(text: str, limit: int = 40) -> str:
    """A short JSON-quoted rendering of untrusted text for error messages."""
    short = text if len(text) <= limit else text[:limit] + "…"
    return json.dumps(short)


def run_episodes(
    questions: Sequence[QuestionLike],
    backend: Any,
    store: CorpusStore,
    tokenizer: Any,
    *,
    config: RolloutConfig,
    policy_version: int = 0,
    group_size: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Records of ``group_size`` rollouts per question (see ``VimRAGAgent.run``)."""
    agent = VimRAGAgent(store, tokenizer, backend, config)
    return agent.run(
        questions, group_size=group_size, policy_version=policy_version, seed=seed
    ).records


__all__ = [
    "AGENTS",
    "Episode",
    "QuestionLike",
    "RolloutConfig",
    "RolloutStats",
    "Rollouts",
    "RowContext",
    "Segment",
    "Turn",
    "VimRAGAgent",
    "run_episodes",
]
