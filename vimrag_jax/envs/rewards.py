"""Outcome rewards: answer normalization, exact match and token F1 over every accepted answer.

VimRAG trains on a binary outcome reward r ∈ {0, 1}: was the final answer correct
(SPEC §1). The string checks here (``rollout.reward_metric`` ``"em"`` / ``"f1"``) normalize both
answers the usual open-domain QA way (lowercase, punctuation and the articles a/an/the removed,
whitespace collapsed), then compare by exact match or token F1 against every accepted answer
of the question (`gold_answers`: its answer and its aliases), taking the best. The third metric,
``"judge"``, asks a language model (`vimrag_jax.envs.judge.Judge`, batched over a rollout
batch), and is computed by ``rollout.trajectory.episode_rewards``.
"""

from __future__ import annotations

import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

Gold = str | Sequence[str]
Metric = Literal["em", "f1"]

_ARTICLES = frozenset({"a", "an", "the"})
# ASCII punctuation plus every Unicode punctuation character (curly quotes, dashes, …).
_PUNCTUATION = frozenset(string.punctuation)


def _is_punctuation(char: str) -> bool:
    return char in _PUNCTUATION or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a string, got {type(text).__name__}")
    lowered = text.lower()
    no_punct = "".join(" " if _is_punctuation(c) else c for c in lowered)
    # Removing punctuation can expose an article ("the-end" → "the end"), so split after.
    return " ".join(word for word in no_punct.split() if word not in _ARTICLES)


def _golds(gold: Gold) -> list[str]:
    answers = [gold] if isinstance(gold, str) else list(gold)
    if not answers or not all(isinstance(g, str) for g in answers):
        raise ValueError("gold must be a string or a non-empty list of strings")
    return answers


def exact_match(prediction: str | None, gold: Gold) -> bool:
    """True when the normalized prediction equals some normalized gold answer."""
    if prediction is None:
        return False
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(g) for g in _golds(gold))


def _f1(predicted: list[str], expected: list[str]) -> float:
    if not predicted or not expected:
        return float(predicted == expected)  # both empty: a match; one empty: none
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str | None, gold: Gold) -> float:
    """Best bag-of-words F1 in [0, 1] between the normalized prediction and any gold answer."""
    if prediction is None:
        return 0.0
    predicted = normalize_answer(prediction).split()
    return max(_f1(predicted, normalize_answer(g).split()) for g in _golds(gold))


def outcome_reward(
    prediction: str | None,
    gold: Gold,
    *,
    metric: Metric = "em",
    threshold: float = 0.5,
) -> float:
    """The binary outcome reward: 1.0 if the answer counts as correct, else 0.0.

    ``metric="em"`` needs an exact match; ``metric="f1"`` needs token F1 ≥ ``threshold``.
    A missing or blank prediction (no answer node, empty answer) scores 0.
    """
    if prediction is None or not normalize_answer(prediction):
        return 0.0
    if metric == "em":
        return float(exact_match(prediction, gold))
    if metric == "f1":
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        return float(token_f1(prediction, gold) >= threshold)
    if metric == "judge":
        raise ValueError(
            "metric 'judge' asks a language model: use rollout.trajectory.episode_rewards with "
            "an envs.judge.Judge"
        )
    raise ValueError(f"metric must be 'em' or 'f1', got {metric!r}")


def gold_answers(question: Any) -> tuple[str, ...]:
    """Every accepted answer of a question: its ``answer`` first, then its ``answers`` aliases
    (a dataset question may list them; a synthetic one has none), blanks and repeats dropped."""
    answers = (question.answer, *(getattr(question, "answers", ()) or ()))
    kept = tuple(dict.fromkeys(a for a in answers if isinstance(a, str) and a.strip()))
    if not kept:
        raise ValueError(f"question {getattr(question, 'question_id', '?')!r} has no answer")
    return kept


__all__ = [
    "exact_match",
    "gold_answers",
    "normalize_answer",
    "outcome_reward",
    "token_f1",
]
