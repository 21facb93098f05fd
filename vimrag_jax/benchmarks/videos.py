"""Video benchmarks: LVBench (long videos), WikiHowQA and SyntheticQA (VideoRAG over
HowTo100M) and XVBench (VimRAG's cross-video benchmark over HowTo100M clips).

Gold evidence is ``video`` references (``source`` = the YouTube id; LVBench adds the time span,
``ref`` = its ``time_reference`` and ``start``/``end`` in seconds) or, for XVBench, ``clip``
references (``source`` = ``video_name``, ``ref`` = the reference clip's file name).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vimrag_jax.benchmarks import derived, features
from vimrag_jax.benchmarks.raw import (
    RawBenchmark,
    Record,
    json_list,
    option_letter,
    options,
    read_jsonl,
    time_span,
)


class LVBench(RawBenchmark, skip_registration=True):
    """LVBench (Wang et al., 2024): four-option questions on hour-long YouTube videos.

    One split, ``test``, from ``data/video_info.meta.jsonl`` (one video per line, its
    questions in ``qa``). ``answers`` is the option letter, ``choices`` the option texts;
    ``metadata`` holds ``question_type`` (list) and the video's ``type`` (genre).
    """

    name = "lvbench"
    HOMEPAGE = "https://lvbench.github.io/"
    SPLIT_FILES = {"test": ("data/video_info.meta.jsonl", "video_info.meta.jsonl")}
    DERIVED = {"universalrag": derived.universalrag("lvbench", multiple_choice=True)}

    def examples(self, path: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for line, data in read_jsonl(path):
            video = Record(path, f"line {line}", data)
            key = video.need("key", str)
            video.where = f"line {line} (key {key})"
            for n, qa_data in enumerate(video.need("qa", list)):
                qa = video.sub("qa", n, qa_data)
                uid = qa.need("uid", (int, str))
                qa.where = f"{qa.where} (uid {uid})"
                question = qa.need("question", str)
                choices = options(qa, question)
                answer = option_letter(qa, qa.need("answer", str), choices)
                reference = qa.get("time_reference", str, "").strip()
                if reference:
                    start, end = time_span(qa, reference)
                    evidence = features.evidence("video", key, reference, start, end)
                else:  # no span given: the whole video is the evidence
                    evidence = features.evidence("video", key)
                example = features.example(
                    str(uid),
                    question,
                    [answer],
                    [evidence],
                    answer_format="multiple_choice",
                    choices=choices,
                    metadata={
                        "question_type": qa.get("question_type", list, []),
                        "video_type": video.get("type", str, ""),
                    },
                )
                yield qa.where, example


class WikiHowQA(RawBenchmark, skip_registration=True):
    """VideoRAG's WikiHowQA (Jeong et al., 2025): how-to questions answered from HowTo100M.

    One split, ``test``, from VideoRAG's ``datasets/qa/wikihow.json``. ``question`` is
    ``wikihow_query_text``, the one answer ``answer_text``; the gold evidence is every video
    in ``videos`` (whole videos, best rank first; ranks in ``metadata["ranks"]``). The
    retriever's ranked ``query2videos.json`` is not gold and is not read.
    """

    name = "wikihowqa"
    HOMEPAGE = "https://github.com/starsuzi/VideoRAG"
    SPLIT_FILES = {"test": ("datasets/qa/wikihow.json", "qa/wikihow.json")}
    DERIVED = {"universalrag": derived.universalrag("videorag_wikihow")}

    def examples(self, path: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for index, data in enumerate(json_list(path)):
            record = Record(path, str(index), data)
            qid = record.need("qid", (int, str))
            record.where = f"{index} (qid {qid})"
            videos = []
            for n, video_data in enumerate(record.need("videos", list)):
                video = record.sub("videos", n, video_data)
                videos.append((video.get("rank", int, n + 1), video.need("video_id", str)))
            videos.sort()
            metadata: dict[str, Any] = {
                "howto100m_query_text": record.get("howto100m_query_text", str, ""),
                "ranks": [rank for rank, _ in videos],
            }
            if record.get("wikihow_article_id", int) is not None:
                metadata["wikihow_article_id"] = record.data["wikihow_article_id"]
            example = features.example(
                str(qid),
                record.need("wikihow_query_text", str),
                [record.need("answer_text", str)],
                [features.evidence("video", video_id) for _, video_id in videos],
                metadata=metadata,
            )
            yield record.where, example


class SyntheticQA(WikiHowQA, skip_registration=True):
    """VideoRAG's SyntheticQA: generated questions about one HowTo100M video each.

    One split, ``test``, from ``datasets/qa/synthetic.json``; same record layout as WikiHowQA
    (``qid`` is ``<video_id>_<k>``, one gold video).
    """

    name = "syntheticqa"
    SPLIT_FILES = {"test": ("datasets/qa/synthetic.json", "qa/synthetic.json")}
    DERIVED = {"universalrag": derived.universalrag("videorag_synth")}


class XVBench(RawBenchmark, skip_registration=True):
    """XVBench (VimRAG, 2026): open-ended questions answered from HowTo100M video clips.

    One split, ``test``, from ``xvbench.jsonl``. The dataset card names ``video_name`` (the
    source video) and ``reference`` (the supporting clip file or files, cut by its
    ``split_video.sh`` into 60-second chunks); the question and answer keys were not seen, so
    ``question``/``query`` and ``answer``/``gt_answer``/``ground_truth`` are accepted, and an
    ``id``/``qid``/``uid`` if present (else the 0-based line position).
    """

    name = "xvbench"
    HOMEPAGE = "https://huggingface.co/datasets/Alibaba-NLP/XVBench"
    SPLIT_FILES = {"test": ("xvbench.jsonl",)}

    def examples(self, path: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for index, (line, data) in enumerate(read_jsonl(path)):
            record = Record(path, f"line {line}", data)
            ids = (record.get(key, (int, str)) for key in ("id", "qid", "uid"))
            qid = str(next((i for i in ids if i is not None), index))
            answer = record.first(("answer", "gt_answer", "ground_truth"), (str, list))
            answers = [answer] if isinstance(answer, str) else answer
            if not all(isinstance(a, str) for a in answers):
                raise record.error("the answer should be a string or a list of strings")
            video_name = record.need("video_name", str)
            references = record.need("reference", (str, list))
            references = [references] if isinstance(references, str) else references
            if not references or not all(isinstance(r, str) and r for r in references):
                raise record.error("field 'reference' should name one or more clip files")
            example = features.example(
                qid,
                record.first(("question", "query"), str),
                answers,
                [features.evidence("clip", video_name, clip) for clip in references],
            )
            yield record.where, example
