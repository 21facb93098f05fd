"""Questions of a real dataset, read from a JSON-lines file (``data.questions``).

One JSON object per line (blank lines are skipped)::

    {"id": "q17", "question": "Who designed the engine in the clip?", "answer": "Babbage",
     "evidence_ids": [9, 7]}

- ``id``: the question's unique id (a string; an integer is accepted and kept as its decimal
  string); ``question`` and ``answer``: non-empty strings;
- ``answers`` (optional): every accepted answer (aliases, other spellings), a list of non-empty
  strings; ``answer`` counts as accepted either way and stays the one stored in the trajectory
  records. The rewards take the best over all of them (EM / F1), and the judge sees them all;
- ``evidence_ids``: the corpus item ids that hold the gold evidence (may be empty), each present
  in the corpus store. GGPO marks a search node *relevant* when its retrieval returned one of them
  (SPEC §4), so they shape the negative-reward mask.

A dataset states no reasoning chain, so each ``Question`` gets ``chain = ()`` and
``hops = max(1, len(evidence_ids))``. The scripted expert needs a chain: with a real dataset the
warm start's trajectories come from ``sft.data``, not from the scripted expert.

Bad input stops with one ``DatasetError`` naming the file, the line and the problem.
"""

from __future__ import annotations

import os
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vimrag_jax import jsonl
from vimrag_jax.envs.synthetic import Question

KEYS = ("id", "question", "answer", "evidence_ids")
OPTIONAL_KEYS = ("answers",)


@dataclass(frozen=True)
class DatasetQuestion(Question):
    """A dataset question: a ``Question`` with its accepted answers (``answer`` first, then the
    record's ``answers`` aliases; see ``envs.rewards.gold_answers``)."""

    answers: tuple[str, ...] = ()


class DatasetError(ValueError):
    """A problem with a question file; the message names the file and line."""


def parse_question(record: Any, known_ids: Container[int] | None = None) -> DatasetQuestion:
    """One decoded JSON line as a ``DatasetQuestion``; ValueError with the reason.

    ``known_ids`` (the corpus store's item ids) rejects evidence the store does not hold.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in KEYS if key not in record]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(map(repr, missing))}")
    unknown = sorted(set(record) - set(KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; a question has "
            f"{', '.join(KEYS)} and optionally {', '.join(OPTIONAL_KEYS)}"
        )
    question_id = record["id"]
    if isinstance(question_id, int) and not isinstance(question_id, bool):
        question_id = str(question_id)
    if not isinstance(question_id, str) or not question_id.strip():
        raise ValueError(f"'id' must be a non-empty string, got {record['id']!r}")
    for key in ("question", "answer"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise ValueError(f"{key!r} must be a non-empty string, got {record[key]!r}")
    aliases = record.get("answers", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise ValueError(f"'answers' must be a list of non-empty strings, got {aliases!r}")
    evidence = record["evidence_ids"]
    if not isinstance(evidence, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in evidence
    ):
        raise ValueError(f"'evidence_ids' must be a list of integer item ids, got {evidence!r}")
    if len(set(evidence)) != len(evidence):
        raise ValueError(f"'evidence_ids' lists an item twice: {evidence}")
    if known_ids is not None:
        absent = [i for i in evidence if i not in known_ids]
        if absent:
            raise ValueError(
                f"evidence id(s) {', '.join(map(str, absent))} are not in the corpus store"
            )
    return DatasetQuestion(
        question_id=question_id,
        text=record["question"],
        answer=record["answer"],
        evidence_ids=tuple(evidence),
        hops=max(1, len(evidence)),
        chain=(),
        answers=tuple(dict.fromkeys([record["answer"], *aliases])),
    )


def load_questions(path: str | os.PathLike, store: Any = None) -> list[Question]:
    """Every question of a JSON-lines file, in file order.

    ``store`` (a ``CorpusStore``; None skips the check) must hold every evidence id. Raises
    ``DatasetError`` (``FILE:LINE: problem``) at the first bad line, or for an empty file.
    """
    source = Path(path)
    if not source.is_file():
        raise DatasetError(f"{source}: the question file does not exist")
    known = None if store is None else {int(i) for i in store.ids}
    questions: list[Question] = []
    seen: dict[str, int] = {}  # question id -> line
    for line_no, record in jsonl.records(source, DatasetError):
        try:
            question = parse_question(record, known)
        except ValueError as error:
            raise DatasetError(f"{source}:{line_no}: {error}") from None
        if question.question_id in seen:
            raise DatasetError(
                f"{source}:{line_no}: duplicate id {question.question_id!r} "
                f"(first used on line {seen[question.question_id]})"
            )
        seen[question.question_id] = line_no
        questions.append(question)
    if not questions:
        raise DatasetError(f"{source}: no questions (the file is empty)")
    return questions


__all__ = ["DatasetError", "DatasetQuestion", "load_questions", "parse_question"]
