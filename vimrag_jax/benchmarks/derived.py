"""Derived subsets of the benchmarks: UniversalRAG's query files and VRAG's unified files.

VimRAG's exact question subsets are unpublished; the two harnesses it most likely drew on
re-package the benchmarks (``../shared/benchmarks/README.md``). Builders read them as extra
builder configs (``universalrag``, ``vrag``) beside the raw release, with one split, ``test``:

* UniversalRAG (``dataset/query/<name>.json``: ``index``, ``question``, ``answer``, optional
  ``aliases``, ``gt_texts`` / ``gt_images`` / ``gt_videos`` as corpus file paths, LVBench's
  ``time_reference`` as [start, end] seconds, WebQA's ``Qcate``). ``id`` is ``index``.
  Evidence ``source`` is the corpus file's stem: a WebQA ``image_id`` or a YouTube id as in
  the raw configs, but for HotpotQA the LongRAG ``corpus_id`` and for SQuAD the DPR
  ``psg_id`` (``passage`` references; UniversalRAG's text corpus, not Wikipedia titles).
* VRAG (``{"examples": [{uid, query, reference_answer, meta_info}]}``): SlideVQA
  (``SlideVQA_test.json``) and MMLongBench-Doc (``MMLongDoc.json``). ``id`` is ``uid``;
  evidence is ``page`` references with the raw configs' sources (deck name = ``file_name``
  without ``.pdf``; MMLongBench-Doc's ``doc_id`` = ``file_name``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from vimrag_jax.benchmarks import features
from vimrag_jax.benchmarks.raw import (
    Format,
    Record,
    clock,
    json_list,
    option_letter,
    options,
    pages,
    python_list,
)

_GOLD = {"gt_texts": "passage", "gt_images": "image", "gt_videos": "video"}


def _paths(record: Record, key: str) -> list[str]:
    """A list of corpus paths (UniversalRAG's wikihow file writes it as a Python literal)."""
    value = record.get(key, (list, str), [])
    value = python_list(record, key) if isinstance(value, str) else value
    if not all(isinstance(p, str) for p in value):
        raise record.error(f"field {key!r} should be a list of paths")
    return value


def universalrag_examples(
    path: Path, split: str, *, multiple_choice: bool = False
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Examples of one UniversalRAG query file."""
    for index, data in enumerate(json_list(path)):
        record = Record(path, str(index), data)
        qid = record.need("index", str)
        record.where = f"{index} (index {qid})"
        question = record.need("question", str)
        answer = record.need("answer", str)
        aliases = record.get("aliases", list, [])
        if not all(isinstance(a, str) for a in aliases):
            raise record.error("field 'aliases' should be a list of strings")
        span = record.get("time_reference", list)
        if span is not None and not (
            len(span) == 2 and all(isinstance(t, int | float) for t in span) and span[0] <= span[1]
        ):
            raise record.error(f"time_reference {span!r} is not [start, end] seconds")
        evidence = []
        for key, kind in _GOLD.items():
            for corpus_path in _paths(record, key):
                source = PurePosixPath(corpus_path).stem
                if kind == "video" and span is not None:
                    ref = f"{clock(span[0])}-{clock(span[1])}"
                    evidence.append(features.evidence(kind, source, ref, span[0], span[1]))
                else:
                    evidence.append(features.evidence(kind, source))
        choices = options(record, question) if multiple_choice else []
        if multiple_choice:
            answer = option_letter(record, answer, choices)
        example = features.example(
            qid,
            question,
            [answer, *aliases],
            evidence,
            answer_format="multiple_choice" if multiple_choice else record.get("Qcate", str, ""),
            choices=choices,
            metadata={"gt_retrieval": record.get("gt_retrieval", str, "")},
        )
        yield record.where, example


def vrag_examples(
    path: Path, split: str, *, slides: bool = False
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Examples of one VRAG unified file (``slides``: SlideVQA, else MMLongBench-Doc)."""
    for index, data in enumerate(json_list(path, "examples")):
        record = Record(path, f"examples[{index}]", data)
        uid = record.need("uid", (int, str))
        record.where = f"examples[{index}] (uid {uid})"
        meta = record.sub("meta_info", 0, record.need("meta_info", dict))
        meta.where = f"{record.where}, meta_info"
        file_name = meta.need("file_name", str)
        source = file_name.removesuffix(".pdf") if slides else file_name
        evidence = [
            features.evidence("page", source, str(p))
            for p in pages(meta, "reference_page", meta.need("reference_page", list))
        ]
        if slides:  # query_type "Single-Hop_Single-Span": reasoning _ answer type
            reasoning, _, answer_format = meta.get("query_type", str, "").partition("_")
            metadata: dict[str, Any] = {"reasoning_type": reasoning}
        else:
            answer_format = meta.get("answer_format", str, "")
            metadata = {
                "doc_type": meta.get("doc_type", str, ""),
                "evidence_sources": meta.get("source_type", list, []),
            }
        example = features.example(
            str(uid),
            record.need("query", str),
            [str(record.need("reference_answer", (str, int, float)))],
            evidence,
            answer_format=answer_format,
            metadata=metadata,
        )
        yield record.where, example


def universalrag(file: str, *, multiple_choice: bool = False) -> Format:
    """The ``universalrag`` config of a builder whose query file is ``<file>.json``."""

    def read(path: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        return universalrag_examples(path, split, multiple_choice=multiple_choice)

    return Format(
        "UniversalRAG's evaluation subset (wgcyeo/UniversalRAG dataset/query/).",
        {"test": (f"dataset/query/{file}.json", f"{file}.json")},
        read,
    )


def vrag(file: str, *, slides: bool = False) -> Format:
    """The ``vrag`` config of a builder whose unified file is ``<file>.json``."""

    def read(path: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        return vrag_examples(path, split, slides=slides)

    return Format(
        "VRAG's unified evaluation file (Alibaba-NLP/VRAG, scripts/hf_dataset_convert.py).",
        {"test": (f"data/{file}.json", f"{file}.json")},
        read,
    )
