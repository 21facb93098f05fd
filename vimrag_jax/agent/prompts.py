"""Prompt text of the VimRAG agent, rendered with the Qwen chat template and vision placeholders.

Every step's context is rebuilt (SPEC §1): system prompt (task + tool schemas), a user
turn with the question, the linearized memory graph and its visual memory, and, for
the step that must memorize, the search call plus the retrieval observation. The
functions here are pure string builders over small host-side views
(``NodeView``, ``MemoryItemView``, ``RetrievedItem``); the agent loop converts its
memory graph and retrieval results into them.

Visual inputs are written as Qwen3-VL placeholders and returned alongside the text
as ``VisualRef`` rows in placeholder order (the ``segment_visuals`` of SPEC §6):

- an image: ``<|vision_start|>`` + ``<|image_pad|>`` × (h·w / 32²) + ``<|vision_end|>``;
- a video: frames go in temporal pairs (Qwen3-VL's temporal patch of 2; an odd last
  frame is repeated, as the video processor pads it), each pair written as
  ``<{t:.1f} seconds>`` + ``<|vision_start|>`` + ``<|video_pad|>`` × (h·w / 32²) +
  ``<|vision_end|>`` with ``t`` the mean time of the pair. This is the text the
  Qwen3-VL processor expands a video into (``replace_video_token``; the rope index
  expects one timestamped block per pair). Note that transformers 5.x expands only the
  ``<|video_pad|>`` of a chat template's ``<|vision_start|><|video_pad|><|vision_end|>``;
  we write the expanded form directly, as the original Qwen3-VL processor produced it.
  A video contributes one ``VisualRef`` per frame fed to the vision tower (the
  repeated frame included), so each pair block consumes two consecutive refs.

Sizes given to the views are the already-resized ones (``energy.smart_resize``):
both sides multiples of 32. Items with size 0 got no pixel budget this step and are
listed as text only. Untrusted text (questions, corpus passages, model summaries)
has special-token strings defused so it can never fake a placeholder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from vimrag_jax.agent.protocol import ROOT_ID, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOLS

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
#: Strings the tokenizer maps to single reserved ids (shared with ``agent.tokenizer``).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    IM_START,
    IM_END,
    TOOL_CALL_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_RESPONSE_OPEN,
    TOOL_RESPONSE_CLOSE,
    THINK_OPEN,
    THINK_CLOSE,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
)

#: Pixels per merged visual token (16 px patches, 2×2 merge), as in ``memory.energy``.
PIXELS_PER_TOKEN = 32 * 32
#: Frames a video is sampled at, and the most frames shown for one video.
VIDEO_FPS = 1.0
MAX_VIDEO_FRAMES = 32
#: Frames merged into one temporal patch by the Qwen3-VL vision tower.
TEMPORAL_PATCH = 2

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class VisualRef:
    """One visual input in placeholder order: a corpus item's frame at its resized size."""

    item_id: int
    frame_index: int  # 0 for images; for videos the frame at VIDEO_FPS (round(t · fps))
    height: int
    width: int

    def as_row(self) -> tuple[int, int, int, int]:
        """The ``segment_visuals`` row: (item id, frame index, height, width)."""
        return (self.item_id, self.frame_index, self.height, self.width)


@dataclass(frozen=True)
class Rendered:
    """Prompt text and the visual references of its placeholders, in order."""

    text: str
    visuals: tuple[VisualRef, ...] = ()

    def __add__(self, other: Rendered | str) -> Rendered:
        other = as_rendered(other)
        return Rendered(self.text + other.text, self.visuals + other.visuals)

    def __radd__(self, other: str) -> Rendered:
        return as_rendered(other) + self


def as_rendered(part: Rendered | str) -> Rendered:
    return part if isinstance(part, Rendered) else Rendered(part)


@dataclass(frozen=True)
class MemoryItemView:
    """A kept visual memory item at the resolution its budget allows this step.

    ``height``/``width`` are the resized sides of the image or of each video frame
    (0 when the item got no budget); ``timestamps`` are a video's keyframes in seconds.
    """

    item_id: int
    modality: Literal["image", "video"]
    height: int
    width: int
    timestamps: tuple[float, ...] = ()
    priority: int | None = None


@dataclass(frozen=True)
class NodeView:
    """A search node of the memory graph as the prompt shows it (the root is implicit)."""

    node_id: str
    parents: tuple[str, ...]
    query: str
    summary: str = ""
    memory: tuple[MemoryItemView, ...] = ()


@dataclass(frozen=True)
class RetrievedItem:
    """One retrieval result: a passage, or an image / video at its resized size.

    ``text`` is the passage (or an optional caption of a visual item); ``timestamps``
    are the available frames of a video (at most ``MAX_VIDEO_FRAMES`` are shown).
    """

    item_id: int
    modality: Literal["text", "image", "video"]
    text: str = ""
    height: int = 0
    width: int = 0
    timestamps: tuple[float, ...] = ()


@dataclass(frozen=True)
class Message:
    role: Role
    content: Rendered | str


# --- text hygiene -------------------------------------------------------------------------


def defuse(text: str, tokens: Sequence[str] = SPECIAL_TOKENS) -> str:
    """Breaks special-token strings in untrusted text (``<|im_end|>`` → ``< |im_end|>``)."""
    if "<" not in text:
        return text
    for token in tokens:
        text = text.replace(token, "< " + token[1:])
    return text


#: Tokens plain-string chat contents may not carry: they would fake a turn or a placeholder.
_STRUCTURAL = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)


def _check_size(height: int, width: int, what: str) -> None:
    if height < 0 or width < 0 or height % 32 or width % 32 or (height == 0) != (width == 0):
        raise ValueError(
            f"{what}: resized sides must be multiples of 32 (or both 0), got {height}x{width}"
        )


# --- visual placeholders ------------------------------------------------------------------


def visual_tokens(height: int, width: int) -> int:
    """Merged visual tokens of one resized image or video frame pair."""
    return height * width // PIXELS_PER_TOKEN


def select_frames(
    timestamps: Sequence[float], max_frames: int = MAX_VIDEO_FRAMES
) -> tuple[float, ...]:
    """At most ``max_frames`` of the (sorted) timestamps, evenly spread, first and last kept."""
    times = sorted(float(t) for t in timestamps)
    if len(times) <= max_frames:
        return tuple(times)
    if max_frames == 1:
        return (times[0],)
    last = len(times) - 1
    return tuple(times[i * last // (max_frames - 1)] for i in range(max_frames))


def image_placeholder(item_id: int, height: int, width: int) -> Rendered:
    _check_size(height, width, f"image {item_id}")
    text = VISION_START + IMAGE_PAD * visual_tokens(height, width) + VISION_END
    return Rendered(text, (VisualRef(item_id, 0, height, width),))


def video_placeholder(
    item_id: int, timestamps: Sequence[float], height: int, width: int
) -> Rendered:
    """Qwen3-VL video layout: one timestamped block per temporal pair of frames."""
    _check_size(height, width, f"video {item_id}")
    times = list(select_frames(timestamps))
    if not times:
        raise ValueError(f"video {item_id}: no frames to show")
    if len(times) % TEMPORAL_PATCH:
        times.append(times[-1])  # the processor repeats the last frame to fill the pair
    parts, refs = [], []
    pads = VIDEO_PAD * visual_tokens(height, width)
    for start in range(0, len(times), TEMPORAL_PATCH):
        pair = times[start : start + TEMPORAL_PATCH]
        parts.append(f"<{(pair[0] + pair[-1]) / 2:.1f} seconds>{VISION_START}{pads}{VISION_END}")
        refs += [VisualRef(item_id, round(t * VIDEO_FPS), height, width) for t in pair]
    return Rendered("".join(parts), tuple(refs))


# --- prompts ------------------------------------------------------------------------------

_SYSTEM = """\
You answer questions by searching a corpus of text passages, pictures and video clips. \
You work step by step and record your progress in a memory graph.

The graph starts with one node, "{root}", which stands for the question. Each search adds a \
node: give it a short unique id, the ids of the nodes it builds on (its parents), and a search \
query. The corpus then returns a few items. Your next turn must record them with \
summarize_and_memorize: a summary of what they establish, and for every item whether it is \
useful and how important it is (priority 1 to 5). For a useful video, list the seconds of the \
frames worth keeping in key_timestamp. Useful pictures and video frames stay in your visual \
memory; the more a remembered item matters to the graph, the sharper it is shown. Raw search \
results are not shown again after that turn, so summarize carefully.

Search again when evidence is missing; break a complex question into simpler searches that \
build on earlier nodes. When the memory is enough, answer with add_answer_node, listing the \
nodes the answer rests on. Keep the answer short: a name, a number, a date or a short phrase.

Each turn may start with brief reasoning and must end with exactly one tool call, written as \
a JSON object between {open} and {close} tags:
{open}
{{"name": <tool name>, "arguments": <arguments object>}}
{close}

The tools, as JSON schemas:
<tools>
{tools}
</tools>"""

_NEXT_STEP = (
    "Choose the next step: search for missing evidence with add_search_node, "
    "or answer with add_answer_node."
)
_MEMORIZE_STEP = (
    "Record these results with summarize_and_memorize. List every item above by its label "
    '(for example "{example}") as information_id.'
)


_COMPACT_SYSTEM = """\
Answer the question by searching a corpus of passages, pictures and videos, keeping a memory \
graph that starts at node "{root}". Search with add_search_node, then record the results with \
summarize_and_memorize (every item, by its label), then search again or answer with \
add_answer_node. End each turn with one tool call: {open}{{"name": ..., "arguments": ...}}{close}
Tools:
add_search_node(id: str, parent_ids: [str], query: str)
summarize_and_memorize(summarize: str, memorize: [{{information_id: str, is_useful: bool, \
priority_score: 1-5, key_timestamp: [float]}}])
add_answer_node(parent_ids: [str], answer: str)"""

PROMPT_STYLES = ("full", "compact")


def system_prompt(style: str = "full") -> str:
    """The system prompt: the task, the memory-graph workflow and the three tools.

    ``"full"`` explains the workflow and lists the tools as JSON schemas (for real models);
    ``"compact"`` states the same protocol in a few lines with one-line tool signatures, so a
    tiny model trained from scratch does not spend most of each segment on the system prompt
    (~1,000 vs ~150 tokens with the tiny tokenizer).
    """
    if style == "compact":
        return _COMPACT_SYSTEM.format(root=ROOT_ID, open=TOOL_CALL_OPEN, close=TOOL_CALL_CLOSE)
    if style != "full":
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    tools = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in TOOLS)
    return _SYSTEM.format(root=ROOT_ID, open=TOOL_CALL_OPEN, close=TOOL_CALL_CLOSE, tools=tools)


def _memory_line(item: MemoryItemView) -> Rendered:
    kind = "Picture" if item.modality == "image" else "Video"
    head = f"    {kind}"
    if item.priority is not None:
        head += f", priority {item.priority}"
    if item.modality == "video":
        stamps = ", ".join(f"{t:.1f}" for t in select_frames(item.timestamps))
        head += f", keyframes at {stamps} s" if stamps else ", no keyframes"
    if item.height == 0 or (item.modality == "video" and not item.timestamps):
        _check_size(item.height, item.width, f"memory item {item.item_id}")
        return Rendered(head + ": (not shown at this step)\n")
    if item.modality == "image":
        shown = image_placeholder(item.item_id, item.height, item.width)
    elif item.modality == "video":
        shown = video_placeholder(item.item_id, item.timestamps, item.height, item.width)
    else:
        raise ValueError(f"memory item {item.item_id}: unknown modality {item.modality!r}")
    return Rendered(head + ": ") + shown + "\n"


def graph_prompt(question: str, nodes: Sequence[NodeView]) -> Rendered:
    """The user turn: question, linearized memory graph with visual memory, next-step cue.

    ``nodes`` are the search nodes in creation order; the root is implicit.
    """
    out = Rendered(f"Question: {defuse(question)}\n\nMemory graph:\n")
    out += f"[{ROOT_ID}] the question\n"
    for node in nodes:
        parents = ", ".join(defuse(p) for p in node.parents)
        out += f"[{defuse(node.node_id)}] parents: {parents}\n"
        out += f"  query: {defuse(node.query)}\n"
        out += f"  summary: {defuse(node.summary) if node.summary else '(none yet)'}\n"
        if node.memory:
            out += "  visual memory:\n"
            for item in node.memory:
                out += _memory_line(item)
    return out + "\n" + _NEXT_STEP


_LABELS = {"text": "Text", "image": "Picture", "video": "Video"}


def item_labels(items: Sequence[RetrievedItem]) -> list[str]:
    """Labels of retrieved items, numbered by position: ``Text 1``, ``Picture 2``, …"""
    return [f"{_LABELS[item.modality]} {k}" for k, item in enumerate(items, start=1)]


def resolve_information_id(information_id: str, items: Sequence[RetrievedItem]) -> int | None:
    """Index of the retrieved item an ``information_id`` names (label or bare number), or None."""
    wanted = " ".join(information_id.split()).lower()
    for index, label in enumerate(item_labels(items)):
        if wanted in (label.lower(), label.split()[1]):
            return index
    return None


def tool_response(body: Rendered | str) -> Rendered:
    return Rendered(f"{TOOL_RESPONSE_OPEN}\n") + as_rendered(body) + f"\n{TOOL_RESPONSE_CLOSE}"


def retrieval_observation(items: Sequence[RetrievedItem]) -> Rendered:
    """The user turn after a search: the labelled results and the cue to memorize them."""
    if not items:
        body = Rendered("The search returned nothing.")
        return tool_response(body) + "\nRecord this with summarize_and_memorize (empty memorize)."
    body = Rendered("")
    for label, item in zip(item_labels(items), items, strict=True):
        body += f"{label}:"
        if item.modality == "text":
            body += f" {defuse(item.text)}\n"
            continue
        if item.text:
            body += f" {defuse(item.text)}"
        if item.modality == "image":
            body += "\n" + image_placeholder(item.item_id, item.height, item.width) + "\n"
        elif item.modality == "video":
            frames = video_placeholder(item.item_id, item.timestamps, item.height, item.width)
            body += "\n" + frames + "\n"
        else:
            raise ValueError(f"retrieved item {item.item_id}: unknown modality {item.modality!r}")
    body = Rendered(body.text.rstrip("\n"), body.visuals)
    cue = _MEMORIZE_STEP.format(example=item_labels(items)[0])
    return tool_response(body) + "\n" + cue


def error_observation(error: str) -> str:
    """The user turn after an invalid action: what was wrong and that nothing happened."""
    return (
        f"{TOOL_RESPONSE_OPEN}\nError: {defuse(error)}\n{TOOL_RESPONSE_CLOSE}\n"
        "Your last turn was not carried out. Reply again with exactly one valid tool call."
    )


def render_chat(messages: Sequence[Message], *, add_generation_prompt: bool = True) -> Rendered:
    """Qwen chat template: ``<|im_start|>role\\n…<|im_end|>\\n`` per message.

    Plain-string contents (e.g. an assistant turn as sampled) get turn and vision tokens
    defused, so only ``Rendered`` parts built here carry placeholders; tool-call tags stay.
    """
    out = Rendered("")
    for message in messages:
        if message.role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {message.role!r}")
        out += f"{IM_START}{message.role}\n"
        content = message.content
        if isinstance(content, str):
            content = Rendered(defuse(content, _STRUCTURAL))
        out += content + f"{IM_END}\n"
    if add_generation_prompt:
        out += f"{IM_START}assistant\n"
    return out


def step_prompt(
    question: str,
    nodes: Sequence[NodeView],
    turns: Sequence[Message] = (),
    *,
    style: str = "full",
) -> Rendered:
    """The full prompt of one model call: system, graph turn, then ``turns`` (e.g. the search
    call and its ``retrieval_observation``, or an invalid turn and its ``error_observation``),
    ending with the assistant generation prompt. ``style`` picks the system prompt."""
    messages = [
        Message("system", system_prompt(style)),
        Message("user", graph_prompt(question, nodes)),
    ]
    return render_chat([*messages, *turns])


__all__ = [
    "MAX_VIDEO_FRAMES",
    "PROMPT_STYLES",
    "SPECIAL_TOKENS",
    "VIDEO_FPS",
    "MemoryItemView",
    "Message",
    "NodeView",
    "Rendered",
    "RetrievedItem",
    "VisualRef",
    "defuse",
    "error_observation",
    "graph_prompt",
    "image_placeholder",
    "item_labels",
    "render_chat",
    "resolve_information_id",
    "retrieval_observation",
    "select_frames",
    "step_prompt",
    "system_prompt",
    "tool_response",
    "video_placeholder",
    "visual_tokens",
]
