"""Document benchmarks: SlideVQA (slide decks) and MMLongBench-Doc (long PDFs).

Both give their gold evidence as 1-based page numbers into one document, written as ``page``
references (``source`` = the deck name or the PDF's ``doc_id``, ``ref`` = the page number).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from vimrag_jax.benchmarks import derived, features
from vimrag_jax.benchmarks.raw import (
    RawBenchmark,
    Record,
    json_list,
    pages,
    python_list,
    read_jsonl,
)


class SlideVQA(RawBenchmark, skip_registration=True):
    """SlideVQA (Tanaka et al., 2023): questions over 20-slide decks.

    Reads the GitHub release's ``annotations/qa/{train,dev,test}.jsonl`` (one QA per line; dev
    is ``validation``). Slide images are ``images/<split>/<deck_name>/<file>`` with ``<file>``
    the base name of the slide's URL, listed in order in ``metadata["page_files"]`` (page
    ``p`` is ``page_files[p - 1]``). ``answer_format`` is the release's ``answer_type``;
    ``metadata`` also holds ``reasoning_type`` and ``arithmetic_expression`` (when not
    ``"None"``).
    """

    name = "slidevqa"
    HOMEPAGE = "https://github.com/nttmdlab-nlp/SlideVQA"
    SPLIT_FILES = {
        "train": ("annotations/qa/train.jsonl",),
        "validation": ("annotations/qa/dev.jsonl",),
        "test": ("annotations/qa/test.jsonl",),
    }
    DERIVED = {"vrag": derived.vrag("SlideVQA_test", slides=True)}

    def examples(self, path: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for line, data in read_jsonl(path):
            record = Record(path, f"line {line}", data)
            qa_id = record.need("qa_id", (int, str))
            record.where = f"line {line} (qa_id {qa_id})"
            deck = record.need("deck_name", str)
            evidence_pages = pages(record, "evidence_pages", record.need("evidence_pages", list))
            urls = record.get("image_urls", list, [])
            if not all(isinstance(u, str) for u in urls):
                raise record.error("field 'image_urls' should be a list of strings")
            metadata: dict[str, Any] = {
                "deck_url": record.get("deck_url", str, ""),
                "page_files": [PurePosixPath(u).name for u in urls],
                "reasoning_type": record.get("reasoning_type", str, ""),
            }
            expression = record.get("arithmetic_expression", str, "None")
            if expression != "None":
                metadata["arithmetic_expression"] = expression
            example = features.example(
                str(qa_id),
                record.need("question", str),
                [str(record.need("answer", (str, int, float)))],
                [features.evidence("page", deck, str(p)) for p in evidence_pages],
                answer_format=record.get("answer_type", str, ""),
                metadata=metadata,
            )
            yield record.where, example


class MMLongBenchDoc(RawBenchmark, skip_registration=True):
    """MMLongBench-Doc (Ma et al., 2024): questions over long, multimodal PDFs.

    One split, ``test`` (``data/samples.json``; the PDFs are ``data/documents/<doc_id>``).
    Records have no id: ``id`` is the record's 0-based position in the file. ``answers``
    holds the answer string as released (List answers stay Python-list strings such as
    ``"['White', '10%']"``; "Not answerable" questions have no evidence); ``answer_format`` is
    ``Str``/``Int``/``Float``/``List``/``None``; ``metadata`` holds ``doc_type`` and
    ``evidence_sources``.
    """

    name = "mmlongbench_doc"
    HOMEPAGE = "https://github.com/mayubo2333/MMLongBench-Doc"
    SPLIT_FILES = {"test": ("data/samples.json", "samples.json")}
    DERIVED = {"vrag": derived.vrag("MMLongDoc")}

    def examples(self, path: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for index, data in enumerate(json_list(path)):
            record = Record(path, str(index), data)
            doc_id = record.need("doc_id", str)
            record.where = f"{index} (doc_id {doc_id})"
            evidence_pages = pages(record, "evidence_pages", python_list(record, "evidence_pages"))
            example = features.example(
                str(index),
                record.need("question", str),
                [str(record.need("answer", (str, int, float)))],
                [features.evidence("page", doc_id, str(p)) for p in evidence_pages],
                answer_format=record.need("answer_format", str),
                metadata={
                    "doc_type": record.get("doc_type", str, ""),
                    "evidence_sources": python_list(record, "evidence_sources"),
                },
            )
            yield record.where, example
