"""The VimRAG tool-call protocol: tool schemas, parsing one model turn, canonical formatting.

A model turn is free text that ends in exactly one Qwen-style tool call (SPEC §3)::

    optional reasoning, <think>…</think> included
    <tool_call>
    {"name": "add_search_node", "arguments": {"id": ..., "parent_ids": [...], "query": ...}}
    </tool_call>

``parse_action`` turns such a turn into an ``Action``. It never raises and runs in
linear time (no regular expressions: substring searches over the raw text, and the
JSON body is size-capped before ``json.loads``), so a megabyte of adversarial output
costs milliseconds. Anything that is not a well-formed call of a known tool with valid
arguments becomes ``Action(kind="invalid", error=...)``; the error is written to be
shown back to the model.

What is tolerated around the call:

- any text before ``<tool_call>`` (kept in ``Action.reasoning``);
- after the call, only whitespace and end-of-turn tokens (``<|im_end|>``,
  ``<|endoftext|>``); anything else is "text after the tool call" and invalid;
- a missing ``</tool_call>`` when the turn ends with a complete JSON object:
  samplers often stop on ``</tool_call>`` and drop the stop string.

The turn must contain the ``<tool_call>`` tag exactly once, even inside reasoning:
a second mention counts as a second call (inside argument strings, write ``<`` as
``\\u003c``, as ``format_tool_call`` does). Arguments are checked against ``TOOLS``
(types, required keys, no unknown keys, value ranges). Graph-level checks (unknown
parent ids, duplicate node ids, alternation of search and memorize, every retrieved
item listed) need the memory graph and belong to the agent loop.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

ActionKind = Literal["search", "memorize", "answer", "invalid"]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
#: End-of-turn tokens a sampler may leave at the end of a turn.
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")
#: The id of the root node (the user's question); valid as a parent from the first step.
ROOT_ID = "root"

#: Longest JSON body considered; longer calls are invalid without being parsed.
MAX_CALL_CHARS = 32_768
MAX_ID_CHARS = 64
MAX_TEXT_CHARS = 4_096
MAX_PARENTS = 16
MAX_MEMORIZE_ITEMS = 32
MAX_KEY_TIMESTAMPS = 32

_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}
_PARENTS = {
    "type": "array",
    "items": _ID,
    "minItems": 1,
    "maxItems": MAX_PARENTS,
    "uniqueItems": True,
    "description": f'Ids of existing nodes this step builds on ("{ROOT_ID}" is the question).',
}

#: Tool schemas in the function-calling layout the Qwen chat template lists in the system
#: prompt. ``parse_action`` validates arguments against exactly these schemas.
TOOLS: tuple[dict[str, Any], ...] = (
    {
        "type": "function",
        "function": {
            "name": "add_search_node",
            "description": (
                "Add a search step to the memory graph and run a retrieval for its query. "
                "The corpus returns a few passages, pictures or video clips; you must then "
                "call summarize_and_memorize on them."
            ),
            "parameters": {
                "type": "object",
                "properties": {
                    "id": {**_ID, "description": "A short title for the new node, unique."},
                    "parent_ids": _PARENTS,
                    "query": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_TEXT_CHARS,
                        "description": "What to look up, as a self-contained search query.",
                    },
                },
                "required": ["id", "parent_ids", "query"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "summarize_and_memorize",
            "description": (
                "Record what the last search found: a text summary for the current node and, "
                "for every retrieved item, whether it is useful and how much it matters. "
                "Useful pictures and video keyframes are kept in visual memory."
            ),
            "parameters": {
                "type": "object",
                "properties": {
                    "summarize": {
                        "type": "string",
                        "maxLength": MAX_TEXT_CHARS,
                        "description": "The facts the retrieved items establish for this query.",
                    },
                    "memorize": {
                        "type": "array",
                        "maxItems": MAX_MEMORIZE_ITEMS,
                        "description": "One entry per retrieved item.",
                        "items": {
                            "type": "object",
                            "properties": {
                                "information_id": {
                                    **_ID,
                                    "description": 'The item\'s label, e.g. "Picture 2".',
                                },
                                "is_useful": {"type": "boolean"},
                                "key_timestamp": {
                                    "type": "array",
                                    "items": {"type": "number", "minimum": 0},
                                    "maxItems": MAX_KEY_TIMESTAMPS,
                                    "description": "Videos only: seconds of the frames to keep.",
                                },
                                "priority_score": {
                                    "type": "integer",
                                    "minimum": 1,
                                    "maximum": 5,
                                    "description": "1 (marginal) to 5 (essential).",
                                },
                            },
                            "required": ["information_id", "is_useful", "priority_score"],
                            "additionalProperties": False,
                        },
                    },
                },
                "required": ["summarize", "memorize"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add_answer_node",
            "description": "Give the final answer, citing the nodes it rests on. Ends the episode.",
            "parameters": {
                "type": "object",
                "properties": {
                    "parent_ids": _PARENTS,
                    "answer": {
                        "type": "string",
                        "maxLength": MAX_TEXT_CHARS,
                        "description": "The answer, as short as possible.",
                    },
                },
                "required": ["parent_ids", "answer"],
                "additionalProperties": False,
            },
        },
    },
)

TOOL_KINDS: dict[str, ActionKind] = {
    "add_search_node": "search",
    "summarize_and_memorize": "memorize",
    "add_answer_node": "answer",
}
_SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


@dataclass(frozen=True)
class Action:
    """One parsed model turn.

    ``kind`` is ``"search"``, ``"memorize"``, ``"answer"`` or ``"invalid"``;
    ``arguments`` is the validated argument dict (empty when invalid); ``error`` is a
    message for the model when invalid, else None. ``tool_name`` is the called tool
    when one could be read (also for some invalid calls); ``reasoning`` is the text
    before the call.
    """

    kind: ActionKind
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    tool_name: str | None = None
    reasoning: str = ""

    @property
    def valid(self) -> bool:
        return self.kind != "invalid"


class _Invalid(Exception):
    """Internal: carries the model-facing message of a rejected call."""


def _invalid(error: str, *, tool_name: str | None = None, reasoning: str = "") -> Action:
    return Action("invalid", {}, error, tool_name, reasoning)


def _quote(text: str, limit: int = 40) -> str:
    """A short, always-encodable rendering of untrusted text for error messages."""
    short = text if len(text) <= limit else text[:limit] + "…"
    return json.dumps(short)  # ensure_ascii escapes lone surrogates and control characters


def _strip_end_of_turn(text: str) -> str:
    """Removes trailing whitespace and end-of-turn tokens (any number, any order).

    Walks an end index instead of slicing per token, so a megabyte of repeated
    ``<|im_end|>`` costs one pass, not a copy per token.
    """
    end = len(text.rstrip())
    while True:
        for token in END_OF_TURN:
            if text.endswith(token, 0, end):
                end -= len(token)
                break
        else:
            return text[:end]
        while end and text[end - 1].isspace():
            end -= 1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_quote(key)}")
        out[key] = value
    return out


def _load_json(body: str) -> Any:
    """``json.loads`` that rejects NaN/Infinity and duplicate keys; raises _Invalid."""
    try:
        return json.loads(body, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise _Invalid("the tool call JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, our hooks, int digit limits
        raise _Invalid(f"the tool call is not valid JSON ({exc})") from None


def _check_value(value: Any, schema: dict[str, Any], path: str) -> Any:
    """Validates ``value`` against the subset of JSON schema used in ``TOOLS``."""
    kind = schema["type"]
    if kind == "string":
        if not isinstance(value, str):
            raise _Invalid(f"`{path}` must be a string")
        if schema.get("minLength") and not value.strip():
            raise _Invalid(f"`{path}` must not be empty")
        if len(value) > schema.get("maxLength", math.inf):
            raise _Invalid(f"`{path}` is longer than {schema['maxLength']} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Invalid(f"`{path}` contains an invalid unicode character") from None
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _Invalid(f"`{path}` must be true or false")
        return value
    if kind in ("integer", "number"):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if kind == "integer":
            ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and kind == "number":
            try:
                ok = math.isfinite(float(value))
            except OverflowError:
                ok = False
        if not ok:
            raise _Invalid(f"`{path}` must be {'an integer' if kind == 'integer' else 'a number'}")
        low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
        if not low <= value <= high:
            bounds = f"from {low} to {high}" if math.isfinite(high) else f"at least {low}"
            raise _Invalid(f"`{path}` must be {bounds}")
        return float(value) if kind == "number" else value
    if kind == "array":
        if not isinstance(value, list):
            raise _Invalid(f"`{path}` must be a list")
        if len(value) < schema.get("minItems", 0):
            raise _Invalid(f"`{path}` must list at least {schema['minItems']} item(s)")
        if len(value) > schema.get("maxItems", math.inf):
            raise _Invalid(f"`{path}` must list at most {schema['maxItems']} items")
        items = [_check_value(v, schema["items"], f"{path}[{i}]") for i, v in enumerate(value)]
        if schema.get("uniqueItems") and len(set(map(json.dumps, items))) < len(items):
            raise _Invalid(f"`{path}` lists the same value twice")
        return items
    if kind == "object":
        if not isinstance(value, dict):
            raise _Invalid(f"`{path}` must be a JSON object")
        properties = schema["properties"]
        unknown = [key for key in value if key not in properties]
        if unknown:
            raise _Invalid(f"`{path}` has an unknown key {_quote(unknown[0])}")
        missing = [key for key in schema["required"] if key not in value]
        if missing:
            raise _Invalid(f"`{path}` is missing the required key {_quote(missing[0])}")
        return {
            key: _check_value(v, properties[key], f"{path}.{key}" if path else key)
            for key, v in value.items()
        }
    raise AssertionError(f"unsupported schema type {kind}")  # a bug in TOOLS, not bad input


def validate_arguments(name: str, arguments: Any) -> dict[str, Any]:
    """The checked, normalized arguments of a call to tool ``name``; ValueError if invalid.

    Numbers in ``key_timestamp`` come back as floats; everything else as given.
    """
    try:
        return _validate(name, arguments)
    except _Invalid as exc:
        raise ValueError(str(exc)) from None


def _validate(name: str, arguments: Any) -> dict[str, Any]:
    if name not in _SCHEMAS:
        known = ", ".join(_SCHEMAS)
        raise _Invalid(f"unknown tool {_quote(name)}; the tools are {known}")
    if not isinstance(arguments, dict):
        raise _Invalid(f"the arguments of {name} must be a JSON object")
    checked = _check_value(arguments, _SCHEMAS[name], "")
    if name == "summarize_and_memorize":
        seen: set[str] = set()
        for entry in checked["memorize"]:
            if entry["information_id"] in seen:
                raise _Invalid(f"`memorize` lists {_quote(entry['information_id'])} twice")
            seen.add(entry["information_id"])
    return checked


def _parse_call(body: str, reasoning: str) -> Action:
    body = body.strip()
    if not body:
        raise _Invalid("the tool call is empty")
    if len(body) > MAX_CALL_CHARS:
        raise _Invalid(f"the tool call is longer than {MAX_CALL_CHARS} characters")
    call = _load_json(body)
    if not isinstance(call, dict):
        raise _Invalid('the tool call must be a JSON object {"name": ..., "arguments": {...}}')
    extra = [key for key in call if key not in ("name", "arguments")]
    if extra:
        raise _Invalid(f"the tool call has an unknown key {_quote(extra[0])}")
    name = call.get("name")
    if not isinstance(name, str):
        raise _Invalid('the tool call needs a "name" string')
    if "arguments" not in call:
        raise _Invalid(f'the call to {_quote(name)} needs an "arguments" object')
    try:
        arguments = _validate(name, call["arguments"])
    except _Invalid as exc:
        known = name if name in TOOL_KINDS else None
        prefix = f"invalid arguments for {name}: " if known else ""
        raise _Invalid(prefix + str(exc)) from exc
    return Action(TOOL_KINDS[name], arguments, None, name, reasoning)


def parse_action(text: str) -> Action:
    """Parses one model turn into an ``Action``; never raises (see the module doc)."""
    try:
        return _parse_turn(text)
    except Exception as exc:  # a last guard: parsing must never take the rollout down
        return _invalid(f"the turn could not be read ({type(exc).__name__})")


def _parse_turn(text: str) -> Action:
    if not isinstance(text, str):
        return _invalid(f"a turn must be text, got {type(text).__name__}")
    text = _strip_end_of_turn(text)
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        hint = " (found </tool_call> without <tool_call>)" if TOOL_CALL_CLOSE in text else ""
        return _invalid(
            "no tool call found; end your turn with exactly one "
            f"{TOOL_CALL_OPEN}{{...}}{TOOL_CALL_CLOSE}{hint}",
            reasoning=text,
        )
    reasoning = text[:start]
    if TOOL_CALL_CLOSE in reasoning:
        return _invalid("found </tool_call> before <tool_call>", reasoning=reasoning)
    rest = text[start + len(TOOL_CALL_OPEN) :]
    if TOOL_CALL_OPEN in rest:
        return _invalid(
            "several tool calls found; make exactly one call per turn", reasoning=reasoning
        )
    end = rest.find(TOOL_CALL_CLOSE)
    if end >= 0:
        body, after = rest[:end], rest[end + len(TOOL_CALL_CLOSE) :]
        if TOOL_CALL_CLOSE in after:
            return _invalid("found </tool_call> twice", reasoning=reasoning)
        if after.strip():
            return _invalid(
                "text after the tool call; the call must end the turn", reasoning=reasoning
            )
    else:
        body = rest  # stopped on </tool_call>: accepted if the JSON is complete
    try:
        return _parse_call(body, reasoning)
    except _Invalid as exc:
        name = _peek_name(body)
        return _invalid(str(exc), tool_name=name, reasoning=reasoning)


def _peek_name(body: str) -> str | None:
    """The tool name of a call that failed validation, if its JSON parsed at all."""
    if len(body) > MAX_CALL_CHARS:
        return None
    try:
        call = _load_json(body.strip())
    except _Invalid:
        return None
    name = call.get("name") if isinstance(call, dict) else None
    return name if isinstance(name, str) and name in TOOL_KINDS else None


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """The canonical text of a tool call (as the Qwen chat template writes it).

    Raises ValueError when ``name`` is unknown or the arguments do not validate, so
    scripted policies can only emit calls that ``parse_action`` accepts. A model that
    writes a tag inside an argument string must escape it the same way (``\\u003c``);
    a literal ``<tool_call>`` there counts as a second call.
    """
    checked = validate_arguments(name, arguments)
    payload = json.dumps({"name": name, "arguments": checked}, ensure_ascii=False)
    # "<" only occurs inside JSON strings; escaping it keeps tags and special tokens that
    # an argument mentions (a query about "<tool_call>") from ending or splitting the call.
    payload = payload.replace("<", "\\u003c")
    return f"{TOOL_CALL_OPEN}\n{payload}\n{TOOL_CALL_CLOSE}"


__all__ = [
    "END_OF_TURN",
    "MAX_CALL_CHARS",
    "ROOT_ID",
    "TOOLS",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "TOOL_KINDS",
    "Action",
    "ActionKind",
    "format_tool_call",
    "parse_action",
    "validate_arguments",
]
