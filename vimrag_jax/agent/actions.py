"""Checking a parsed action and applying it to an episode: search, memorize, answer.

One set of checks, split by who can make them. The host checks what the graph cannot see: ids are
new, searches and memorizes alternate, every retrieved item is memorized exactly once, keyframes
lie in their video (``pack_action``; a failure raises ``InvalidAction``). A passing action is
written into its row of the step's ``StepActions`` (the buffers ``graph_ops`` packs into one
``TurnActions``, the queries and summaries to tokenize) and returned as a ``Proposal``. The graph
then checks the structure (parents exist, room for the node, one answer) in the jitted update;
its ``GraphError`` becomes the message (``graph_error_message``), and only an accepted action
reaches the episode's texts (``commit``). The message of a rejected action goes back to the model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from vimrag_jax.agent import graph_ops, prompts
from vimrag_jax.agent.config import RolloutConfig
from vimrag_jax.agent.episode import Episode, MemorySlot
from vimrag_jax.agent.graph_ops import ActionKind
from vimrag_jax.agent.protocol import ROOT_ID, Action
from vimrag_jax.memory.energy import smart_resize
from vimrag_jax.memory.graph import GraphError, MemoryGraphError, Modality
from vimrag_jax.retrieval.corpus import ItemInfo


class InvalidAction(Exception):
    """A rejected action; the message goes to the model as the turn's error observation."""


@dataclasses.dataclass
class StepActions:
    """The host-checked actions of one step, all rows: graph buffers, queries and summaries.

    ``buffers`` are ``graph_ops.blank_actions`` arrays (one row per episode); ``searches`` and
    ``summaries`` are ``(row, text)`` pairs to tokenize (a search runs only once the graph has
    accepted it).
    """

    buffers: dict[str, np.ndarray]
    searches: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    summaries: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    @classmethod
    def blank(cls, graphs: Any) -> StepActions:
        return cls(graph_ops.blank_actions(graphs))


def json_quote(text: str, limit: int = 40) -> str:
    """A short JSON-quoted rendering of untrusted text for error messages."""
    short = text if len(text) <= limit else text[:limit] + "…"
    return json.dumps(short)


def frame_size(info: ItemInfo) -> tuple[int, int]:
    """(height, width) of an image or of each video frame."""
    return int(info.shape[-3]), int(info.shape[-2])


def observation_items(items: Sequence[ItemInfo], pixels: int) -> list[prompts.RetrievedItem]:
    """Retrieved items for ``retrieval_observation``: an image gets ``pixels`` (one image's share
    of the total budget, ``RolloutConfig.observation_pixels``), a video splits them over its
    frames."""
    out = []
    for info in items:
        if info.modality == "text":
            out.append(prompts.RetrievedItem(info.item_id, "text", info.text))
            continue
        frames = len(prompts.select_frames(info.timestamps)) if info.modality == "video" else 1
        h, w = frame_size(info)
        rh, rw = smart_resize(h, w, max(pixels // max(frames, 1), 1024))
        out.append(
            prompts.RetrievedItem(
                info.item_id, info.modality, info.text, int(rh), int(rw), info.timestamps
            )
        )
    return out


@dataclasses.dataclass
class Proposal:
    """An action that passed the host's checks and is packed for the graph: what the episode
    gains once the graph accepts it (``commit``); dropped when the graph rejects it."""

    action: Action
    text: str
    slots: list[MemorySlot] = dataclasses.field(default_factory=list)  # memorize: kept items


def parent_mask_row(mask: np.ndarray, episode: Episode, parent_ids: Sequence[str]) -> None:
    """Marks ``parent_ids`` in a row of parent masks. An id that names no node marks the new
    node's own slot (``len(node_ids)``, not yet valid), which the graph rejects as
    ``UNKNOWN_PARENT``; with no slot left the graph is full and says so first."""
    index = {node_id: i for i, node_id in enumerate(episode.node_ids)}
    for parent in parent_ids:
        i = index.get(parent, len(episode.node_ids))
        if i < mask.shape[0]:
            mask[i] = True


def graph_error_message(code: int, episode: Episode, action: Action) -> str:
    """The invalid-action message for an action the graph rejected with ``code``."""
    code = GraphError(code)
    if code == GraphError.UNKNOWN_PARENT:
        ids = episode.node_ids
        unknown = [p for p in action.arguments["parent_ids"] if p not in ids]
        known = ", ".join(json_quote(n) for n in ids)
        if unknown:
            return f"unknown parent id {json_quote(unknown[0])}; the nodes are {known}"
    if code == GraphError.GRAPH_FULL and action.kind == "search":
        return (
            "the memory graph is full (no room for another search); answer now with add_answer_node"
        )
    if code == GraphError.GRAPH_FULL:
        return "the memory graph is full; no room for the answer node"
    return str(MemoryGraphError(code))


def pack_action(
    episode: Episode,
    row: int,
    action: Action,
    text: str,
    step: StepActions,
    config: RolloutConfig,
) -> Proposal:
    """Checks what only the host can (searches and memorizes alternate, ids are new, memorize
    listings and keyframes) and packs the action into the step's row; the graph checks the
    structure (parents, room, one answer). Nothing of the episode changes here."""
    args = action.arguments
    buffers = step.buffers
    kept: list[MemorySlot] = []
    if action.kind == "search":
        if episode.pending is not None:
            raise InvalidAction(
                "a search must be followed by summarize_and_memorize; record the results "
                "of the last search before searching again"
            )
        node_id = args["id"].strip()
        if node_id == ROOT_ID or node_id in episode.node_ids:
            raise InvalidAction(f"node id {json_quote(node_id)} already exists; choose a new id")
        buffers["kind"][row] = ActionKind.SEARCH
        parent_mask_row(buffers["parent_mask"][row], episode, args["parent_ids"])
        step.searches.append((row, args["query"]))
    elif action.kind == "memorize":
        if episode.pending is None:
            raise InvalidAction("there are no search results to memorize; search first")
        views = observation_items(episode.pending, config.observation_pixels)
        slots = check_memorize(episode.pending, views, args["memorize"], config.max_keyframes)
        fill_bank(buffers, row, episode.pending, slots)
        buffers["kind"][row] = ActionKind.MEMORIZE
        # Results are pending only right after a search: the node awaiting them is the newest.
        buffers["node"][row] = len(episode.node_ids) - 1
        step.summaries.append((row, args["summarize"]))
        kept = [s for s in slots if s is not None]
    elif action.kind == "answer":
        if episode.pending is not None:
            raise InvalidAction(
                "record the last search results with summarize_and_memorize before answering"
            )
        buffers["kind"][row] = ActionKind.ANSWER
        parent_mask_row(buffers["parent_mask"][row], episode, args["parent_ids"])
    else:
        raise InvalidAction(action.error or "invalid action")
    buffers["step"][row] = episode.step
    return Proposal(action, text, kept)


def _add_node(episode: Episode, node_id: str, query: str) -> None:
    episode.node_ids.append(node_id)
    episode.queries.append(query)
    episode.summaries.append("")
    episode.memory.append([])
    episode.retrieved.append(())


def commit(episode: Episode, proposal: Proposal) -> None:
    """Applies an action the graph accepted to the episode's texts and turn state."""
    args = proposal.action.arguments
    kind = proposal.action.kind
    if kind == "search":
        _add_node(episode, args["id"].strip(), args["query"])
        episode.pending = ()  # results arrive with this step's searches
        episode.pending_turns = (prompts.Message("assistant", proposal.text),)
        episode.error_turns = ()
    elif kind == "memorize":
        node = len(episode.node_ids) - 1
        episode.summaries[node] = args["summarize"]
        episode.memory[node] = proposal.slots
        episode.pending = None
        episode.pending_turns = episode.error_turns = ()
    else:
        _add_node(episode, "answer", "")
        episode.prediction = args["answer"]
        episode.end("answered")


def check_memorize(
    pending: Sequence[ItemInfo],
    views: Sequence[prompts.RetrievedItem],
    entries: list[dict],
    max_keyframes: int,
) -> list[MemorySlot | None]:
    """One slot per pending item (None when not kept); InvalidAction on a bad listing.

    ``views`` are the pending items as the observation showed them (their labels resolve the
    entries' ``information_id``)."""
    labels = prompts.item_labels(views)
    chosen: dict[int, dict] = {}
    for entry in entries:
        index = prompts.resolve_information_id(entry["information_id"], views)
        if index is None:
            raise InvalidAction(
                f"unknown information_id {json_quote(entry['information_id'])}; the "
                f"retrieved items are {', '.join(labels) or 'none'}"
            )
        if index in chosen:
            raise InvalidAction(f"memorize lists {labels[index]} twice")
        chosen[index] = entry
    missing = [labels[i] for i in range(len(pending)) if i not in chosen]
    if missing:
        raise InvalidAction(
            "memorize must list every retrieved item; missing " + ", ".join(missing)
        )
    slots: list[MemorySlot | None] = []
    for index, info in enumerate(pending):
        entry = chosen[index]
        if info.modality == "text" or not entry["is_useful"]:
            slots.append(None)
            continue
        kept: tuple[float, ...] = ()
        if info.modality == "video":
            stamps = entry.get("key_timestamp") or []
            kept = keyframes(info, stamps, labels[index], max_keyframes)
        slots.append(MemorySlot(index, info, kept, int(entry["priority_score"])))
    return slots


def keyframes(
    info: ItemInfo, stamps: Sequence[float], label: str, max_keyframes: int
) -> tuple[float, ...]:
    """A video's kept frame times: the listed ones (snapped to the 1 fps frames), or evenly
    chosen frames when none are listed; at most ``max_keyframes``."""
    times = info.timestamps
    if not stamps:
        return prompts.select_frames(times, max_keyframes)
    picked = []
    for t in stamps:
        frame = round(t * prompts.VIDEO_FPS)
        if not 0 <= frame < len(times):
            raise InvalidAction(
                f"key_timestamp {t:g} of {label} is outside the video (0 to {times[-1]:g} seconds)"
            )
        picked.append(float(times[frame]))
    return prompts.select_frames(sorted(set(picked)), max_keyframes)


def fill_bank(
    buffers: dict[str, np.ndarray],
    row: int,
    pending: Sequence[ItemInfo],
    slots: Sequence[MemorySlot | None],
) -> None:
    """Writes a memorize's bank row: every pending item's id and modality, the kept ones valid
    with their priority and keyframes."""
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


__all__ = [
    "InvalidAction",
    "Proposal",
    "StepActions",
    "check_memorize",
    "commit",
    "fill_bank",
    "frame_size",
    "graph_error_message",
    "json_quote",
    "keyframes",
    "observation_items",
    "pack_action",
    "parent_mask_row",
]
