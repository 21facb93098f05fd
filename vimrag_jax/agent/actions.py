"""Checking a parsed action against an episode and applying it: search, memorize, answer.

Each completion is parsed (``protocol.parse_action``) and checked against the episode's graph:
parents exist, ids are new, searches and memorizes alternate, every retrieved item is memorized
exactly once, and the graph has room. A rejected action raises ``InvalidAction`` whose message
goes back to the model. A valid one updates the host mirror (ids and text, which JAX cannot hold)
and writes its row of the step's ``StepActions``: the action buffers that ``graph_ops`` packs
into one ``TurnActions`` for the jitted graph update, plus the queries to search and the
summaries to tokenize.
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
from vimrag_jax.memory.graph import Modality
from vimrag_jax.retrieval.corpus import ItemInfo


class InvalidAction(Exception):
    """A rejected action; the message goes to the model as the turn's error observation."""


@dataclasses.dataclass
class StepActions:
    """The valid actions of one step, all rows: graph buffers, searches and summaries to run.

    ``buffers`` are ``graph_ops.blank_actions`` arrays (one row per episode); ``searches`` and
    ``summaries`` are ``(row, text)`` pairs.
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


def parent_indices(episode: Episode, parent_ids: Sequence[str]) -> list[int]:
    """Node indices of ``parent_ids``; InvalidAction naming an unknown id."""
    index = {node_id: i for i, node_id in enumerate(episode.node_ids)}
    out = []
    for parent in parent_ids:
        if parent not in index or index[parent] == episode.answer_node:
            known = ", ".join(json_quote(n) for n in episode.node_ids)
            raise InvalidAction(f"unknown parent id {json_quote(parent)}; the nodes are {known}")
        out.append(index[parent])
    return out


def _add_node(episode: Episode, node_id: str, parent_ids: Sequence[str], query: str) -> int:
    """Appends a node to the host mirror; returns its index."""
    episode.node_ids.append(node_id)
    episode.node_parents.append(tuple(parent_ids))
    episode.queries.append(query)
    episode.summaries.append("")
    episode.memory.append([])
    episode.retrieved.append(())
    return episode.num_nodes - 1


def apply_action(
    episode: Episode,
    row: int,
    action: Action,
    text: str,
    step: StepActions,
    config: RolloutConfig,
) -> int:
    """Checks a parsed valid action against the episode and applies it; returns its node."""
    args = action.arguments
    buffers = step.buffers
    if action.kind == "search":
        if episode.pending is not None:
            raise InvalidAction(
                "a search must be followed by summarize_and_memorize; record the results "
                "of the last search before searching again"
            )
        node_id = args["id"].strip()
        if node_id == ROOT_ID or node_id in episode.node_ids:
            raise InvalidAction(f"node id {json_quote(node_id)} already exists; choose a new id")
        parents = parent_indices(episode, args["parent_ids"])
        if episode.num_nodes >= config.max_nodes - 1:
            raise InvalidAction(
                "the memory graph is full (no room for another search); answer now with "
                "add_answer_node"
            )
        node = _add_node(episode, node_id, args["parent_ids"], args["query"])
        episode.pending, episode.pending_node = (), node
        episode.pending_turns = (prompts.Message("assistant", text),)
        episode.error_turns = ()
        buffers["kind"][row] = ActionKind.SEARCH
        buffers["parent_mask"][row, parents] = True
        buffers["step"][row] = episode.step
        step.searches.append((row, args["query"]))
        return node
    if action.kind == "memorize":
        if episode.pending is None:
            raise InvalidAction("there are no search results to memorize; search first")
        views = observation_items(episode.pending, config.observation_pixels)
        slots = check_memorize(episode.pending, views, args["memorize"], config.max_keyframes)
        node = episode.pending_node
        episode.summaries[node] = args["summarize"]
        episode.memory[node] = [s for s in slots if s is not None]
        fill_bank(buffers, row, episode.pending, slots)
        buffers["kind"][row] = ActionKind.MEMORIZE
        buffers["node"][row] = node
        buffers["step"][row] = episode.step
        step.summaries.append((row, args["summarize"]))
        episode.pending, episode.pending_node = None, -1
        episode.pending_turns = episode.error_turns = ()
        return node
    if action.kind == "answer":
        if episode.pending is not None:
            raise InvalidAction(
                "record the last search results with summarize_and_memorize before answering"
            )
        parents = parent_indices(episode, args["parent_ids"])
        if episode.num_nodes >= config.max_nodes:
            raise InvalidAction("the memory graph is full; no room for the answer node")
        node = _add_node(episode, "answer", args["parent_ids"], "")
        episode.answer_node, episode.prediction = node, args["answer"]
        buffers["kind"][row] = ActionKind.ANSWER
        buffers["parent_mask"][row, parents] = True
        buffers["step"][row] = episode.step
        episode.end("answered")
        return node
    raise InvalidAction(action.error or "invalid action")


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
    "StepActions",
    "apply_action",
    "check_memorize",
    "fill_bank",
    "frame_size",
    "json_quote",
    "keyframes",
    "observation_items",
    "parent_indices",
]
