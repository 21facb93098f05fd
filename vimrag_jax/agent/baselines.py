"""Baseline agents on the VimRAG loop machinery: ReAct, iterative summarisation, Mem1-style state.

All three run on the same corpus, sampler backends and records as ``VimRAGAgent`` (they subclass
it and change only what the model sees and how nodes link); their graph is a chain: every search
and the answer take the previous node as their only parent, whatever ``parent_ids`` the model
wrote, so GGPO sees a linear trajectory. Selected by ``rollout.agent`` through ``make_agent``.

- ``react``: a linear history. The prompt is the question then every earlier turn as it happened
  (calls, raw retrieval observations, errors); no memorize step.
- ``summary``: iterative summarisation memory. After each search the model must call
  summarize_and_memorize, as in VimRAG; its summary *replaces* a single running memory, and the
  prompt is the question, that memory and the pending results. No graph, no visual memory.
- ``mem1``: a consolidated internal state (Mem1). Each turn starts with the model's reasoning,
  which becomes the whole state carried to the next turn; the prompt is the question, that
  state and only the latest call with its observation. No memorize step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from vimrag_jax.agent import prompts
from vimrag_jax.agent.actions import InvalidAction, Proposal, StepActions
from vimrag_jax.agent.config import RolloutConfig
from vimrag_jax.agent.episode import Episode
from vimrag_jax.agent.loop import PromptVisuals, VimRAGAgent
from vimrag_jax.agent.protocol import ROOT_ID, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOLS, Action

_SYSTEM = """\
You answer questions by searching a corpus of text passages, pictures and video clips.
{how}
Each turn may start with brief reasoning and must end with exactly one tool call, written as \
a JSON object between {open} and {close} tags:
{open}
{{"name": <tool name>, "arguments": <arguments object>}}
{close}
Give parent_ids as ["{root}"] or the id of your previous step. The tools, as JSON schemas:
<tools>
{tools}
</tools>"""

_HOW = {
    "react": "Search step by step; every result stays in the conversation. When you know "
    "enough, answer with add_answer_node. Keep the answer short.",
    "summary": "After each search, rewrite your notes with summarize_and_memorize: the new "
    "summary replaces the old one, so keep every fact you still need in it. Raw results are "
    "not shown again. When your notes are enough, answer with add_answer_node.",
    "mem1": "Start every turn with your internal state: everything you know so far, in a few "
    "sentences. Only that state and the last search result are shown to you at the next turn. "
    "When you know enough, answer with add_answer_node.",
}
_TOOLS = {
    "react": ("add_search_node", "add_answer_node"),
    "summary": ("add_search_node", "summarize_and_memorize", "add_answer_node"),
    "mem1": ("add_search_node", "add_answer_node"),
}


def system_prompt(agent: str) -> str:
    """The baseline's system prompt, listing only the tools it may call."""
    tools = [copy.deepcopy(t) for t in TOOLS if t["function"]["name"] in _TOOLS[agent]]
    if "summarize_and_memorize" not in _TOOLS[agent]:
        tools[0]["function"]["description"] = (
            "Run a retrieval for a search query; the corpus returns a few passages, pictures "
            "or video clips. Give each search a short unique id."
        )
    return _SYSTEM.format(
        how=_HOW[agent],
        open=TOOL_CALL_OPEN,
        close=TOOL_CALL_CLOSE,
        root=ROOT_ID,
        tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools),
    )


class _ChainAgent(VimRAGAgent):
    """Shared: chain parents, the baseline's system prompt, tools it lacks rejected."""

    name = ""

    def act(self, episode, row, action: Action, text, step: StepActions) -> Proposal:
        if action.tool_name not in _TOOLS[self.name]:
            raise InvalidAction(
                f"{action.tool_name} is not available; use {', '.join(_TOOLS[self.name])}"
            )
        if action.kind in ("search", "answer"):
            chain = {**action.arguments, "parent_ids": [episode.node_ids[-1]]}
            action = dataclasses.replace(action, arguments=chain)
        return super().act(episode, row, action, text, step)

    def chat(self, episode: Episode, user: prompts.Rendered | str, turns: Sequence) -> Any:
        messages = [
            prompts.Message("system", system_prompt(self.name)),
            prompts.Message("user", user),
            *turns,
        ]
        return prompts.render_chat(messages)

    def question_turn(self, episode: Episode) -> str:
        return f"Question: {prompts.defuse(episode.question.text)}"


class ReActAgent(_ChainAgent):
    """Linear history of thoughts, actions and observations."""

    name = "react"

    def render(self, episode, graph):
        return self.chat(episode, self.question_turn(episode), episode.history)

    def on_retrieval(self, episode, items, observation) -> None:
        episode.history += [*episode.pending_turns, prompts.Message("user", observation)]
        episode.pending, episode.pending_turns = None, ()

    def on_invalid(self, episode, text, error) -> None:
        episode.history += [
            prompts.Message("assistant", text),
            prompts.Message("user", prompts.error_observation(error)),
        ]


class SummaryAgent(_ChainAgent):
    """One running summary, rewritten by every memorize."""

    name = "summary"

    def render(self, episode, graph):
        notes = prompts.defuse(episode.notes) if episode.notes else "(none yet)"
        user = f"{self.question_turn(episode)}\n\nYour notes: {notes}"
        return self.chat(episode, user, episode.pending_turns + episode.error_turns)

    def commit(self, episode, proposal: Proposal) -> None:
        super().commit(episode, proposal)
        if proposal.action.kind == "memorize":
            episode.notes = proposal.action.arguments["summarize"]


class Mem1Agent(_ChainAgent):
    """The reasoning of the last valid turn is the whole carried state."""

    name = "mem1"

    def render(self, episode, graph):
        state = prompts.defuse(episode.notes) if episode.notes else "(empty)"
        user = f"{self.question_turn(episode)}\n\nYour internal state: {state}"
        return self.chat(episode, user, episode.pending_turns + episode.error_turns)

    def commit(self, episode, proposal: Proposal) -> None:
        episode.pending_turns = ()  # an accepted call replaces the last observation
        super().commit(episode, proposal)
        episode.notes = proposal.action.reasoning.strip()

    def on_retrieval(self, episode, items, observation) -> None:
        episode.pending = None
        episode.pending_turns += (prompts.Message("user", observation),)


AGENT_CLASSES: dict[str, type[VimRAGAgent]] = {
    "vimrag": VimRAGAgent,
    "react": ReActAgent,
    "summary": SummaryAgent,
    "mem1": Mem1Agent,
}


def make_agent(
    config: RolloutConfig,
    store: Any,
    tokenizer: Any,
    backend: Any,
    *,
    stop_token_ids: Sequence[int] | None = None,
    visual_patches: PromptVisuals | None = None,
) -> VimRAGAgent:
    """The agent named by ``config.agent`` (``vimrag``, ``react``, ``summary`` or ``mem1``)."""
    return AGENT_CLASSES[config.agent](
        store,
        tokenizer,
        backend,
        config,
        stop_token_ids=stop_token_ids,
        visual_patches=visual_patches,
    )


__all__ = [
    "AGENT_CLASSES",
    "Mem1Agent",
    "ReActAgent",
    "SummaryAgent",
    "make_agent",
    "system_prompt",
]
