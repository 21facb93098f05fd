"""The VimRAG agent loop: many episodes in lockstep, one batched generate call per step.

``VimRAGAgent.run`` plays G rollouts of each question against a corpus store and a sampler
backend and returns the episodes (``agent.episode``: per node the texts, per model call the
prompt and sampled tokens, log-probs, node and visual references), groups consecutive, with the
final batched ``MemoryGraph`` (a host copy) and run statistics. ``rollout.trajectory`` turns an
episode and its row of the graph into a trajectory record (SPEC §6).

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
   arrays the caller's ``visual_patches`` (``data.vision.VisualPatches``) builds from the
   prompt's visual references, the very references a segment keeps, so the learner rebuilds
   the same pixels. Text-only backends get token ids only.
3. **Act.** Each completion is parsed; the host checks what only it can see (``actions``: the
   search/memorize alternation, new ids, memorize listings) and packs what passes into one
   ``TurnActions``. One jitted call (``graph_ops.TurnUpdater``) applies them to the batched
   ``MemoryGraph``, whose ``GraphError`` codes judge the structure (parents, room, one answer),
   and brings back a ``TurnView``: each row's structure, status and next visual budgets. An
   accepted action reaches the episode's texts; a rejected one becomes the invalid-action
   message from its code. Accepted searches go to the store in one batched query.

Each model call is a ``Segment``: the prompt ids, the sampled ids and their log-probs, the node
the call created or wrote (search: the new node; memorize: the node memorized; answer: the
answer node; an invalid turn: none, -1, SPEC §4) and the prompt's visual references.
An episode ends at its answer, after ``max_model_calls`` calls, after ``max_invalid_actions``
invalid actions (or the first one with ``invalid_action_policy="end"``), or when a prompt does
not fit.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np

from vimrag_jax.agent import actions, graph_ops, prompts
from vimrag_jax.agent.actions import InvalidAction, Proposal, StepActions, frame_size
from vimrag_jax.agent.config import RolloutConfig
from vimrag_jax.agent.episode import (
    Episode,
    EpisodeView,
    MemorySlot,
    QuestionLike,
    RetrievedItem,
    Rollouts,
    RolloutStats,
    RowContext,
    Segment,
    Turn,
)
from vimrag_jax.agent.graph_ops import TurnView
from vimrag_jax.agent.protocol import Action, parse_action
from vimrag_jax.memory.energy import smart_resize
from vimrag_jax.memory.graph import GraphError, NodeKind
from vimrag_jax.retrieval.corpus import CorpusStore, ItemInfo


class PromptVisuals(Protocol):
    """Builds a prompt's images and videos from its visual references (``VisualRef.as_row``
    rows); ``data.vision.VisualPatches`` is one."""

    def prompt_inputs(self, refs: np.ndarray) -> dict[str, np.ndarray]: ...


def _stable_seed(*parts: Any) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


class VimRAGAgent:
    """Runs batched VimRAG episodes; see the module docstring for one step.

    Args:
      store: the corpus (search + item metadata).
      tokenizer: a Hugging Face tokenizer (``__call__`` and ``decode``).
      backend: ``generate(prompts, *, temperature, top_p, greedy, max_new_tokens,
        stop_token_ids, seed[, contexts]) -> list[Completion]``.
      config: the rollout settings.
      stop_token_ids: tokens that end a turn (default: the tokenizer's eos).
      visual_patches: builds each prompt's pixels for a backend with ``takes_prefill_inputs``
        (required there, ignored otherwise), e.g. ``data.vision.VisualPatches.from_store``.
    """

    def __init__(
        self,
        store: CorpusStore,
        tokenizer: Any,
        backend: Any,
        config: RolloutConfig,
        *,
        stop_token_ids: Sequence[int] | None = None,
        visual_patches: PromptVisuals | None = None,
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
        # Pixels for a backend whose model sees images and videos (None: token ids only).
        self.visual_patches: PromptVisuals | None = None
        if getattr(backend, "takes_prefill_inputs", False):
            if visual_patches is None:
                raise ValueError(
                    "the backend takes prefill inputs (its model sees pixels): pass "
                    "visual_patches, e.g. data.vision.VisualPatches.from_store(store)"
                )
            self.visual_patches = visual_patches

    # -- public ----------------------------------------------------------------------------------

    def run(
        self,
        questions: Sequence[QuestionLike],
        *,
        group_size: int | None = None,
        seed: int = 0,
        group_ids: Sequence[str] | None = None,
        greedy: bool = False,
    ) -> Rollouts:
        """G rollouts of every question: episodes in question order, each group consecutive,
        row ``i`` of the returned graph being episode ``i``'s."""
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
            return Rollouts([], None, stats)
        graphs = graph_ops.batched_empty_graph(
            len(episodes),
            cfg.max_nodes,
            cfg.max_items,
            max_query_tokens=cfg.max_query_tokens,
            max_summary_tokens=cfg.max_summary_tokens,
            max_keyframes=cfg.max_keyframes,
        )
        view = graph_ops.initial_view(graphs)
        for step in range(cfg.max_model_calls):
            rows = [r for r, e in enumerate(episodes) if not e.done]
            if not rows:
                break
            graphs, view = self._step(
                episodes, rows, graphs, view, stats, seed=_stable_seed(seed, step), greedy=greedy
            )
        for episode in episodes:
            if not episode.done:
                episode.end("max_model_calls")
        for episode in episodes:
            stats.end_reasons[episode.end_reason] += 1
        stats.total_s = time.perf_counter() - started
        return Rollouts(episodes, jax.device_get(graphs), stats)

    # -- one step --------------------------------------------------------------------------------

    def _step(self, episodes, rows, graphs, view, stats, *, seed: int, greedy: bool):
        """One model call for every row in ``rows``; returns the graphs and their new view."""
        cfg = self.config
        rendered = [self.render(episodes[r], view.row(r)) for r in rows]
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
            return graphs, view
        kwargs = dict(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            greedy=greedy,
            max_new_tokens=cfg.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
            seed=seed,
        )
        if getattr(self.backend, "wants_contexts", False):
            kwargs["contexts"] = [self.context(episodes[r], view.row(r)) for r, _, _ in ready]
        if self.visual_patches is not None:
            kwargs["prefill_inputs"] = [self.prefill_inputs(x.visuals) for _, x, _ in ready]
        began = time.perf_counter()
        completions = self.backend.generate([p for _, _, p in ready], **kwargs)
        stats.generate_s += time.perf_counter() - began
        if len(completions) != len(ready):
            raise RuntimeError(f"backend returned {len(completions)} completions for {len(ready)}")

        # The host checks what it alone can; what passes goes to the graph, all rows in one call.
        step = StepActions.blank(graphs)
        calls = []
        for (r, x, prompt), completion in zip(ready, completions, strict=True):
            sampled = [int(t) for t in completion.tokens]
            # The turn as the history replays it: without the stop token that ended it (the
            # chat template closes the turn itself; kept, it would be replayed as text).
            said = sampled[:-1] if sampled and sampled[-1] in self.stop_token_ids else sampled
            text = self.tokenizer.decode(said, skip_special_tokens=False)
            action = parse_action(text)
            stats.model_calls += 1
            stats.generated_tokens += len(sampled)
            try:
                if not action.valid:  # a protocol error never reaches the graph
                    raise InvalidAction(action.error)
                verdict: Proposal | str = self.act(episodes[r], r, action, text, step)
            except InvalidAction as exc:
                verdict = str(exc)
            logprobs = [float(v) for v in completion.logprobs]
            # The segment's node is known once the graph has judged the action.
            segment = Segment(prompt, sampled, logprobs, -1, x.visuals)
            calls.append((r, segment, text, action, verdict))
        self._fill_tokens(step)
        graphs, view = self._updater(graphs, graph_ops.pack_actions(step.buffers))

        # The graph's verdict: accepted actions reach the episode, rejected ones become errors.
        searches = []
        for r, segment, text, action, verdict in calls:
            episode, error = episodes[r], None
            if isinstance(verdict, str):  # the host's own check failed
                error = verdict
            elif view.error[r] != GraphError.OK:
                error = actions.graph_error_message(int(view.error[r]), episode, verdict.action)
            else:
                self.commit(episode, verdict)
                if verdict.action.kind == "search":
                    searches.append((r, verdict.action.arguments["query"]))
            # The node the call created or wrote; an invalid turn belongs to none (SPEC §4).
            segment.node = -1 if error is not None else view.row(r).num_nodes - 1
            self._close_call(episode, segment, Turn(text, action, error, ""), stats)
        self._run_searches(episodes, searches)
        return graphs, view

    def _close_call(self, episode: Episode, segment: Segment, turn: Turn, stats) -> None:
        """Records a model call and, for an invalid action, its error; ends the episode when
        the call limits say so."""
        cfg = self.config
        if turn.error is not None:
            episode.num_invalid += 1
            stats.invalid_actions += 1
            self.on_invalid(episode, turn.text, turn.error)
            turn.observation = prompts.error_observation(turn.error)
        episode.segments.append(segment)
        episode.turns.append(turn)
        episode.step += 1
        if turn.error is not None and (
            cfg.invalid_action_policy == "end" or episode.num_invalid >= cfg.max_invalid_actions
        ):
            episode.end("invalid_action")
        elif not episode.done and episode.step >= cfg.max_model_calls:
            episode.end("max_model_calls")

    def prefill_inputs(self, visuals: Sequence[prompts.VisualRef]) -> dict[str, np.ndarray] | None:
        """A prompt's images and videos for the backend (None for a text-only prompt), built
        from the references its segment keeps (the record's ``segment_visuals``)."""
        if not visuals or self.visual_patches is None:
            return None
        refs = np.array([ref.as_row() for ref in visuals], np.int64)
        return self.visual_patches.prompt_inputs(refs)

    # -- prompts ---------------------------------------------------------------------------------

    def render(self, episode: Episode, graph: TurnView) -> prompts.Rendered:
        """The prompt of the episode's next model call (see the module docstring); ``graph`` is
        the episode's row of the last ``TurnView`` (structure and frame budgets)."""
        nodes = []
        for i in range(1, graph.num_nodes):
            if graph.node_kind[i] != NodeKind.SEARCH:
                continue
            nodes.append(
                prompts.NodeView(
                    episode.node_ids[i],
                    self.parent_ids(episode, graph, i),
                    episode.queries[i],
                    episode.summaries[i],
                    self._memory_views(episode.memory[i], graph.budgets[i]),
                )
            )
        turns = episode.pending_turns + episode.error_turns
        return prompts.step_prompt(
            episode.question.text, nodes, turns, style=self.config.prompt_style
        )

    def _memory_views(self, slots: list[MemorySlot], budget: np.ndarray):
        if not slots:
            return ()
        heights, widths = zip(*(frame_size(s.info) for s in slots), strict=True)
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
        """Retrieved items as the observation shows them (``actions.observation_items``)."""
        return actions.observation_items(items, self.config.observation_pixels)

    @staticmethod
    def parent_ids(episode: Episode, graph: TurnView, node: int) -> tuple[str, ...]:
        """The ids of a node's parents as the graph links them, in node order."""
        return tuple(episode.node_ids[p] for p in graph.parents(node))

    def context(self, episode: Episode, graph: TurnView) -> RowContext:
        """The scripted-policy view of an episode (see ``RowContext``); ``graph`` as in
        ``render``."""
        pending = episode.pending or ()
        items = tuple(RetrievedItem(i.item_id, i.modality, i.text, i.timestamps) for i in pending)
        labels = prompts.item_labels(self.observation_items(pending))
        n = graph.num_nodes
        view = EpisodeView(
            episode.question.text,
            tuple(episode.node_ids[:n]),
            tuple(self.parent_ids(episode, graph, i) for i in range(n)),
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

    def act(
        self, episode: Episode, row: int, action: Action, text: str, step: StepActions
    ) -> Proposal:
        """Checks a parsed action as far as the host can and packs it for the graph
        (``actions.pack_action``); raises ``InvalidAction``."""
        return actions.pack_action(episode, row, action, text, step, self.config)

    def commit(self, episode: Episode, proposal: Proposal) -> None:
        """Applies an action the graph accepted to the episode (``actions.commit``)."""
        actions.commit(episode, proposal)

    def _run_searches(self, episodes: list[Episode], searches: list[tuple[int, str]]) -> None:
        """Runs the accepted searches of a step in one batched query; each row's new (newest)
        node holds the results until memorized."""
        if not searches:
            return
        ids, _ = self.store.search([q for _, q in searches], k=self.config.retrieval_top_k)
        for (row, _), found in zip(searches, ids, strict=True):
            episode = episodes[row]
            items = tuple(self.store.item(int(i)) for i in found)
            episode.retrieved[-1] = tuple(int(i) for i in found)
            observation = prompts.retrieval_observation(self.observation_items(items))
            episode.turns[-1].observation = observation.text
            self.on_retrieval(episode, items, observation)

    def on_retrieval(self, episode: Episode, items: tuple[ItemInfo, ...], observation) -> None:
        """Holds the results until memorized and shows them in the next prompt."""
        episode.pending = items
        episode.pending_turns += (prompts.Message("user", observation),)

    def _fill_tokens(self, step: StepActions) -> None:
        buffers = step.buffers
        for key, width, pairs in (
            ("query", buffers["query_tokens"].shape[1], step.searches),
            ("summary", buffers["summary_tokens"].shape[1], step.summaries),
        ):
            if not pairs:
                continue
            encoded = self.tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
            for (row, _), tokens in zip(pairs, encoded, strict=True):
                n = min(len(tokens), width)
                buffers[f"{key}_tokens"][row, :n] = tokens[:n]
                buffers[f"{key}_len"][row] = n


__all__ = ["PromptVisuals", "VimRAGAgent"]
