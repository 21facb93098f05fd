"""Tests for answer normalization, EM / F1 and the outcome reward."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vimrag_jax.envs.rewards import (
    exact_match,
    gold_answers,
    normalize_answer,
    outcome_reward,
    token_f1,
)

words = st.lists(
    st.sampled_from(["the", "a", "cat", "Cat", "sat", "mat", "on", "1990", "it's", "-"]), max_size=8
)
answers = st.one_of(st.text(max_size=40), words.map(" ".join))


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple,a day ", "apple day"),
        ("Theatre", "theatre"),  # only whole words are articles
        ("“Quoted” — text…", "quoted text"),
        ("the-end", "end"),
        ("", ""),
    ],
)
def test_normalize_answer_cases(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_match_and_f1_cases():
    assert exact_match("the Beatles", "Beatles")
    assert exact_match("Paris.", ["London", "paris"])
    assert not exact_match("Paris, France", "Paris")
    assert not exact_match(None, "x")
    assert token_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    assert token_f1("blue", ["red", "light blue"]) == pytest.approx(2 / 3)  # best gold wins
    assert token_f1("x", "y") == 0.0 and token_f1(None, "y") == 0.0
    with pytest.raises(ValueError, match="gold"):
        exact_match("x", [])


def test_outcome_reward_cases():
    assert outcome_reward("The Beatles", ["beatles"]) == 1.0
    assert outcome_reward("Beatles band", "beatles") == 0.0
    assert outcome_reward("Beatles band", "beatles", metric="f1", threshold=0.6) == 1.0
    assert outcome_reward("Beatles band", "beatles", metric="f1", threshold=0.7) == 0.0
    for blank in (None, "", "  ", "the", "?!"):
        assert outcome_reward(blank, "the") == 0.0
    with pytest.raises(ValueError, match="metric"):
        outcome_reward("x", "x", metric="bleu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        outcome_reward("x", "x", metric="f1", threshold=0.0)


def test_gold_answers_are_the_answer_then_its_aliases():
    class Plain:  # a synthetic question: one answer, no aliases
        answer = "Smith"

    class Aliased:
        answer = "NYC"
        answers = ("New York City", "NYC", " ", "New York")

    assert gold_answers(Plain()) == ("Smith",)
    assert gold_answers(Aliased()) == ("NYC", "New York City", "New York")
    assert outcome_reward("new york", gold_answers(Aliased())) == 1.0
    with pytest.raises(ValueError, match="judge"):
        outcome_reward("x", "x", metric="judge")  # type: ignore[arg-type]


@given(answers)
def test_normalization_is_idempotent(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once


@given(answers, answers)
def test_f1_is_symmetric_and_bounded(a, b):
    f1 = token_f1(a, b)
    assert 0.0 <= f1 <= 1.0
    assert f1 == pytest.approx(token_f1(b, a))


@given(answers, st.lists(answers, min_size=1, max_size=3))
def test_exact_match_implies_full_f1_and_reward(prediction, golds):
    if exact_match(prediction, golds):
        assert token_f1(prediction, golds) == 1.0
        assert outcome_reward(prediction, golds, metric="f1", threshold=1.0) == float(
            bool(normalize_answer(prediction))
        )
    assert outcome_reward(prediction, golds) in (0.0, 1.0)
    assert outcome_reward(prediction, golds, metric="f1") in (0.0, 1.0)


@given(answers)
def test_an_answer_matches_itself(text):
    assert exact_match(text, text) and token_f1(text, text) == 1.0
