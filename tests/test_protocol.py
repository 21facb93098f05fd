"""Tests for the tool-call protocol: fuzzing, round trips and hand-checked errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vimrag_jax.agent.protocol import (
    MAX_CALL_CHARS,
    TOOLS,
    Action,
    format_tool_call,
    parse_action,
    validate_arguments,
)

SEARCH = {"id": "director", "parent_ids": ["root"], "query": "who directed the film?"}
MEMORIZE = {
    "summarize": "The film was directed by A. Smith.",
    "memorize": [
        {"information_id": "Text 1", "is_useful": True, "priority_score": 3},
        {"information_id": "Video 2", "is_useful": False, "priority_score": 1, "key_timestamp": []},
        {"information_id": "Picture 3", "is_useful": True, "priority_score": 5},
    ],
}
ANSWER = {"parent_ids": ["director", "root"], "answer": "A. Smith"}


def call(name: str, arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def raw(members: str) -> str:
    """A call whose JSON object members are given verbatim (for non-standard JSON)."""
    return "<tool_call>{" + members + "}</tool_call>"


MEMORIZE_ONE = (
    '"name": "summarize_and_memorize", "arguments": {"summarize": "", "memorize": '
    '[{"information_id": "a", "is_useful": true, "priority_score": 1, "key_timestamp": [TIMES]}]}'
)


def check_action(action: Action) -> None:
    """Every parse result is a well-formed Action."""
    assert isinstance(action, Action)
    if action.kind == "invalid":
        assert isinstance(action.error, str) and action.error
        action.error.encode("utf-8")  # can be shown to the model
        assert action.arguments == {}
    else:
        assert action.kind in ("search", "memorize", "answer")
        assert action.error is None
        validate_arguments(action.tool_name, action.arguments)


# --- strategies ---------------------------------------------------------------------------

ids = st.text(min_size=1, max_size=20).filter(str.strip)
free_text = st.text(max_size=200).filter(
    lambda s: "<tool_call>" not in s and "</tool_call>" not in s
)


@st.composite
def tool_calls(draw):
    kind = draw(st.sampled_from(["add_search_node", "summarize_and_memorize", "add_answer_node"]))
    parents = draw(st.lists(ids, min_size=1, max_size=4, unique=True))
    if kind == "add_search_node":
        return kind, {"id": draw(ids), "parent_ids": parents, "query": draw(ids)}
    if kind == "add_answer_node":
        return kind, {"parent_ids": parents, "answer": draw(st.text(max_size=50))}
    entries = []
    for info in draw(st.lists(ids, max_size=4, unique=True)):
        entry = {
            "information_id": info,
            "is_useful": draw(st.booleans()),
            "priority_score": draw(st.integers(1, 5)),
        }
        if draw(st.booleans()):
            times = st.floats(0, 1e4, allow_nan=False, allow_infinity=False)
            entry["key_timestamp"] = draw(st.lists(times, max_size=4))
        entries.append(entry)
    return kind, {"summarize": draw(st.text(max_size=80)), "memorize": entries}


reasoning = st.one_of(
    free_text,
    free_text.map(lambda s: f"<think>{s}</think>\n"),
    st.just(""),
)
endings = st.sampled_from(["", "\n", "  \n", "<|im_end|>", "\n<|im_end|>\n", "<|endoftext|>"])


@st.composite
def mutated_calls(draw):
    """Near misses: a valid call with characters deleted, duplicated, swapped or cut off."""
    name, arguments = draw(tool_calls())
    text = format_tool_call(name, arguments)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["delete", "duplicate", "swap_quotes", "truncate", "insert"]))
        if not text:
            break
        i = draw(st.integers(0, len(text) - 1))
        if op == "delete":
            text = text[:i] + text[i + 1 :]
        elif op == "duplicate":
            text = text[:i] + text[i] + text[i:]
        elif op == "swap_quotes":
            text = text.replace('"', "'", draw(st.integers(1, 5)))
        elif op == "truncate":
            text = text[:i]
        else:
            text = text[:i] + draw(st.sampled_from(list('{}[]",:0 \\'))) + text[i:]
    return text


@st.composite
def wrong_arguments(draw):
    """A valid call with one argument replaced, dropped or joined by an unknown key."""
    name, arguments = draw(tool_calls())
    arguments = dict(arguments)
    key = draw(st.sampled_from(sorted(arguments)))
    op = draw(st.sampled_from(["drop", "retype", "extra"]))
    if op == "drop":
        del arguments[key]
    elif op == "retype":
        arguments[key] = draw(st.sampled_from([None, 3, 2.5, True, {"a": 1}, [1, 2]]))
    else:
        arguments["unexpected"] = 1
    return name, arguments


# --- properties ---------------------------------------------------------------------------


@given(st.text(max_size=300))
def test_arbitrary_text_never_raises(text):
    check_action(parse_action(text))


@given(reasoning, st.text(max_size=300))
def test_arbitrary_text_inside_tags_never_raises(prefix, body):
    check_action(parse_action(f"{prefix}<tool_call>{body}</tool_call>"))
    check_action(parse_action(f"{prefix}<tool_call>{body}"))


@given(mutated_calls())
def test_near_miss_json_never_raises(text):
    check_action(parse_action(text))


@given(wrong_arguments())
def test_wrong_arguments_are_invalid_with_a_message(case):
    name, arguments = case
    action = parse_action(call(name, arguments))
    check_action(action)
    assert action.kind == "invalid"
    assert action.tool_name == name  # the error can say which tool was meant


@given(tool_calls(), reasoning, endings)
def test_format_then_parse_round_trips(case, prefix, ending):
    name, arguments = case
    action = parse_action(prefix + format_tool_call(name, arguments) + ending)
    check_action(action)
    assert action.kind != "invalid", action.error
    assert action.tool_name == name
    assert action.arguments == arguments
    assert action.reasoning == prefix


@given(tool_calls())
def test_missing_close_tag_is_accepted_when_json_is_complete(case):
    name, arguments = case
    text = format_tool_call(name, arguments).removesuffix("</tool_call>")
    assert parse_action(text).arguments == arguments


# --- hand-checked cases -------------------------------------------------------------------


def test_valid_calls_of_each_tool():
    assert parse_action(call("add_search_node", SEARCH)).kind == "search"
    assert parse_action(call("summarize_and_memorize", MEMORIZE)).kind == "memorize"
    answer = parse_action("<think>easy</think>\nSo:\n" + call("add_answer_node", ANSWER))
    assert (answer.kind, answer.arguments, answer.reasoning) == (
        "answer",
        ANSWER,
        "<think>easy</think>\nSo:\n",
    )


def test_key_timestamps_come_back_as_floats():
    args = {
        "summarize": "",
        "memorize": [
            {
                "information_id": "Video 1",
                "is_useful": True,
                "priority_score": 2,
                "key_timestamp": [3, 4.5],
            }
        ],
    }
    stamps = parse_action(call("summarize_and_memorize", args)).arguments["memorize"][0][
        "key_timestamp"
    ]
    assert stamps == [3.0, 4.5] and all(type(t) is float for t in stamps)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("I think the answer is 42.", "no tool call"),
        ("", "no tool call"),
        ("answer</tool_call>", "without <tool_call>"),
        (call("add_search_node", SEARCH) * 2, "several tool calls"),
        ("<tool_call>" + call("add_search_node", SEARCH), "several tool calls"),
        (call("add_search_node", SEARCH) + " and then more", "text after the tool call"),
        (call("add_search_node", SEARCH) + "</tool_call>", "</tool_call> twice"),
        ("<tool_call></tool_call>", "empty"),
        ("<tool_call>{'name': 'add_search_node'}</tool_call>", "not valid JSON"),
        ('<tool_call>{"name": "add_search_node", "arguments": {}</tool_call>', "not valid JSON"),
        ('<tool_call>{"name": "add_search_node"', "not valid JSON"),  # cut off, no close tag
        ("<tool_call>[1, 2]</tool_call>", "must be a JSON object"),
        ('<tool_call>{"arguments": {}}</tool_call>', '"name" string'),
        ('<tool_call>{"name": "add_search_node"}</tool_call>', '"arguments" object'),
        (call("web_search", {"q": "x"}), 'unknown tool "web_search"'),
        (
            '<tool_call>{"name": "add_answer_node", "arguments": {}, "id": 1}</tool_call>',
            'unknown key "id"',
        ),
        (call("add_answer_node", "root"), "must be a JSON object"),
        (call("add_search_node", {**SEARCH, "query": "  "}), "`query` must not be empty"),
        (
            call("add_search_node", {**SEARCH, "parent_ids": []}),
            "`parent_ids` must list at least 1",
        ),
        (call("add_search_node", {**SEARCH, "parent_ids": "root"}), "`parent_ids` must be a list"),
        (call("add_search_node", {**SEARCH, "parent_ids": ["a", "a"]}), "same value twice"),
        (call("add_search_node", {**SEARCH, "id": 7}), "`id` must be a string"),
        (call("add_search_node", {**SEARCH, "id": "x" * 65}), "longer than 64"),
        (
            call("add_search_node", {"id": "a", "query": "q"}),
            'missing the required key "parent_ids"',
        ),
        (call("add_answer_node", {**ANSWER, "confidence": 1}), 'unknown key "confidence"'),
        (call("add_answer_node", {"parent_ids": ["root"]}), 'missing the required key "answer"'),
        (
            call(
                "summarize_and_memorize",
                {
                    **MEMORIZE,
                    "memorize": [{"information_id": "a", "is_useful": 1, "priority_score": 2}],
                },
            ),
            "`memorize[0].is_useful` must be true or false",
        ),
        (
            call(
                "summarize_and_memorize",
                {
                    **MEMORIZE,
                    "memorize": [{"information_id": "a", "is_useful": True, "priority_score": 6}],
                },
            ),
            "from 1 to 5",
        ),
        (
            call(
                "summarize_and_memorize",
                {
                    **MEMORIZE,
                    "memorize": [{"information_id": "a", "is_useful": True, "priority_score": 2.0}],
                },
            ),
            "must be an integer",
        ),
        (
            call(
                "summarize_and_memorize",
                {
                    **MEMORIZE,
                    "memorize": [
                        {"information_id": "a", "is_useful": True, "priority_score": True}
                    ],
                },
            ),
            "must be an integer",
        ),
        (
            call(
                "summarize_and_memorize",
                {
                    **MEMORIZE,
                    "memorize": [
                        {
                            "information_id": "a",
                            "is_useful": True,
                            "priority_score": 2,
                            "key_timestamp": [-1],
                        }
                    ],
                },
            ),
            "at least 0",
        ),
        (
            call(
                "summarize_and_memorize",
                {
                    **MEMORIZE,
                    "memorize": [{"information_id": "a", "is_useful": True, "priority_score": 2}]
                    * 2,
                },
            ),
            'lists "a" twice',
        ),
        (call("summarize_and_memorize", {"summarize": "s"}), 'missing the required key "memorize"'),
        (
            raw('"name": "add_answer_node", "name": "add_search_node", "arguments": {}'),
            "duplicate key",
        ),
        (
            raw(MEMORIZE_ONE.replace("TIMES", "NaN")),
            "NaN is not allowed",
        ),
        (
            raw(MEMORIZE_ONE.replace("TIMES", "1e999")),
            "must be a number",
        ),
        (
            raw(
                '"name": "add_answer_node", "arguments": {"parent_ids": ["\\ud800"], "answer": ""}'
            ),
            "invalid unicode",
        ),
        ("<tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>", "nested too deeply"),
        ("<tool_call>" + " " * 10 + "1" * (MAX_CALL_CHARS + 1) + "</tool_call>", "longer than"),
    ],
)
def test_invalid_turns_name_the_problem(text, fragment):
    action = parse_action(text)
    check_action(action)
    assert action.kind == "invalid"
    assert fragment in action.error, action.error


def test_tolerated_endings_and_reasoning_mentions():
    base = call("add_search_node", SEARCH)
    for ending in ["", "\n\n", "<|im_end|>", "<|im_end|>\n<|endoftext|>  "]:
        assert parse_action(base + ending).kind == "search"
    # An unclosed call followed by the end-of-turn token is still a complete call.
    assert parse_action(base.removesuffix("</tool_call>") + "<|im_end|>").kind == "search"
    # Mentioning the tag in reasoning makes it a second call: the turn must hold exactly one.
    assert parse_action("I will use <tool_call> now. " + base).kind == "invalid"


def test_non_string_input_is_invalid():
    check_action(parse_action(None))  # type: ignore[arg-type]
    check_action(parse_action(b"<tool_call>"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>" + "[" * 1_000_000,
        "{" * 1_000_000,
        "<tool_call>" * 90_000,
        "<tool_call>{}</tool_call>" + "<|im_end|> " * 90_000,
        "x" * 1_000_000 + call("add_answer_node", ANSWER),
        '<tool_call>{"name": "' + '\\"' * 500_000,
        "\ud800" * 1000 + "<tool_call>" + "\udfff" * 1000,
    ],
)
def test_megabyte_adversarial_inputs(text):
    # Linear-time by construction (measured: each under 20 ms); correctness asserted here.
    action = parse_action(text)
    check_action(action)
    assert action.kind == ("answer" if text.startswith("x") else "invalid")


def test_format_tool_call_rejects_what_the_parser_would():
    with pytest.raises(ValueError, match="unknown tool"):
        format_tool_call("search", {})
    with pytest.raises(ValueError, match="priority_score"):
        bad = {
            "summarize": "",
            "memorize": [{"information_id": "a", "is_useful": True, "priority_score": 0}],
        }
        format_tool_call("summarize_and_memorize", bad)
    text = format_tool_call("add_search_node", SEARCH)
    assert text.startswith("<tool_call>\n{") and text.endswith("}\n</tool_call>")
    assert json.loads(text[len("<tool_call>") : -len("</tool_call>")]) == {
        "name": "add_search_node",
        "arguments": SEARCH,
    }


def test_tool_schemas_are_plain_json():
    names = [tool["function"]["name"] for tool in TOOLS]
    assert names == ["add_search_node", "summarize_and_memorize", "add_answer_node"]
    assert json.loads(json.dumps(TOOLS)) == list(TOOLS)
    for tool in TOOLS:
        params = tool["function"]["parameters"]
        assert set(params["required"]) <= set(params["properties"])


def test_arguments_mentioning_tags_survive_formatting():
    arguments = {
        "id": "t",
        "parent_ids": ["root"],
        "query": "what does </tool_call> or <|im_end|> mean?",
    }
    text = format_tool_call("add_search_node", arguments)
    assert text.count("<") == 2  # only the call's own tags
    assert parse_action(text).arguments == arguments
    assert parse_action(text.removesuffix("</tool_call>")).arguments == arguments
