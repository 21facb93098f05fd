"""Text QA benchmarks: HotpotQA (multi-hop, distractor setting) and SQuAD v1.1.

Both read the official JSON releases unchanged. HotpotQA's gold evidence is its supporting
facts, one ``sentence`` reference (paragraph title, 0-based sentence index) per fact; the gold
paragraphs are the distinct titles. SQuAD's is the enclosing paragraph, a ``passage``
reference (article title, 0-based paragraph index within the article); its answers are every
distinct annotator span.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vimrag_jax.benchmarks import derived, features
from vimrag_jax.benchmarks.raw import RawBenchmark, Record, json_list, read_json


class HotpotQA(RawBenchmark, skip_registration=True):
    """HotpotQA (Yang et al., 2018): multi-hop questions over Wikipedia paragraphs.

    ``validation`` is the dev set in the distractor setting (2 gold + 8 distractor paragraphs
    per question); the fullwiki dev file has the same questions and the test file no answers,
    so neither is built. ``metadata`` holds ``type`` (bridge/comparison) and ``level``.
    """

    name = "hotpotqa"
    HOMEPAGE = "https://hotpotqa.github.io/"
    SPLIT_FILES = {
        "train": ("hotpot_train_v1.1.json",),
        "validation": ("hotpot_dev_distractor_v1.json",),
    }
    DERIVED = {"universalrag": derived.universalrag("hotpotqa")}

    def examples(self, path: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for index, data in enumerate(json_list(path)):
            record = Record(path, str(index), data)
            qid = record.need("_id", str)
            record.where = f"{index} (_id {qid})"
            evidence = []
            for fact in record.need("supporting_facts", list):
                if not (
                    isinstance(fact, list)
                    and len(fact) == 2
                    and isinstance(fact[0], str)
                    and isinstance(fact[1], int)
                ):
                    raise record.error(f"supporting fact {fact!r} is not [title, sentence_index]")
                evidence.append(features.evidence("sentence", fact[0], str(fact[1])))
            example = features.example(
                qid,
                record.need("question", str),
                [record.need("answer", str)],
                evidence,
                metadata={k: record.get(k, str) for k in ("type", "level") if k in record.data},
            )
            yield record.where, example


class SQuAD(RawBenchmark, skip_registration=True):
    """SQuAD v1.1 (Rajpurkar et al., 2016): extractive questions on Wikipedia paragraphs.

    ``validation`` is ``dev-v1.1.json`` (several annotator answers per question, all kept as
    aliases); the test set is hidden. ``metadata`` holds the answers' character offsets in
    the paragraph (``answer_starts``, aligned with the raw answer list, duplicates included).
    """

    name = "squad"
    HOMEPAGE = "https://rajpurkar.github.io/SQuAD-explorer/"
    SPLIT_FILES = {"train": ("train-v1.1.json",), "validation": ("dev-v1.1.json",)}
    DERIVED = {"universalrag": derived.universalrag("squad")}

    def examples(self, path: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        data = read_json(path)
        articles = Record(path, "(top level)", data).need("data", list)
        for a, article_data in enumerate(articles):
            article = Record(path, f"data[{a}]", article_data)
            title = article.need("title", str)
            for p, paragraph_data in enumerate(article.need("paragraphs", list)):
                paragraph = article.sub("paragraphs", p, paragraph_data)
                paragraph.need("context", str)
                for q, qa_data in enumerate(paragraph.need("qas", list)):
                    qa = paragraph.sub("qas", q, qa_data)
                    qid = qa.need("id", str)
                    qa.where = f"{qa.where} (id {qid})"
                    answers, starts = [], []
                    for n, answer_data in enumerate(qa.need("answers", list)):
                        answer = qa.sub("answers", n, answer_data)
                        answers.append(answer.need("text", str))
                        starts.append(answer.need("answer_start", int))
                    example = features.example(
                        qid,
                        qa.need("question", str),
                        answers,
                        [features.evidence("passage", title, str(p))],
                        metadata={"answer_starts": starts},
                    )
                    yield qa.where, example
