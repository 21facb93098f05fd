"""The one feature spec every benchmark builder writes, and helpers that build its examples.

Every benchmark, whatever its modality, becomes examples of the same shape so that the learner,
eval and the corpus builder read all nine the same way:

``id`` (str)
    The benchmark's own question id (``_id``, ``qa_id``, ``uid``, ``qid``, ...) or, where the
    release has none, the record's 0-based position in its file.
``question`` (str)
    The question as the benchmark poses it (multiple-choice options stay inside it).
``answers`` (list of str)
    Every accepted answer: aliases and annotator answers, deduplicated in file order; the
    option letter for multiple-choice questions; empty where the split hides its answers.
``answer_format`` (str)
    The benchmark's own answer category where it has one (MMLongBench-Doc ``Str``/``Int``/
    ``Float``/``List``/``None``, SlideVQA ``answer_type``, WebQA ``Qcate``,
    ``"multiple_choice"`` for LVBench); ``""`` for free-form answers.
``choices`` (list of str)
    The options of a multiple-choice question in letter order (``choices[0]`` is option A);
    empty otherwise.
``evidence`` (sequence of {kind, source, ref, start, end})
    The gold evidence in the benchmark's own terms, one entry per reference:

    ========  =====================================  ===============================  ==========
    kind      source                                 ref                              start, end
    ========  =====================================  ===============================  ==========
    sentence  paragraph title (HotpotQA)             0-based sentence index           -1, -1
    passage   article title (SQuAD); WebQA           0-based paragraph index (SQuAD)  -1, -1
              ``snippet_id``                         / ``""``
    image     WebQA ``image_id``                     ``""``                           -1, -1
    page      deck name (SlideVQA) / PDF ``doc_id``  1-based page number              -1, -1
              (MMLongBench-Doc)
    video     YouTube id (LVBench, WikiHowQA,        LVBench ``time_reference``;      seconds or
              SyntheticQA)                           ``""`` = the whole video         -1, -1
    clip      XVBench ``video_name``                 reference clip file name         -1, -1
    ========  =====================================  ===============================  ==========

    ``start``/``end`` are seconds into the video for time spans and ``-1`` where the reference
    is not a time span (see `NO_TIME`). Derived subsets (`vimrag_jax.benchmarks.derived`) use
    the same sources except UniversalRAG's HotpotQA and SQuAD passages, whose ``source`` is
    UniversalRAG's corpus id (LongRAG ``corpus_id``, DPR ``psg_id``). Duplicate references
    are dropped. Read back, the sequence is a dict of lists
    (``example["evidence"]["source"][i]``).
``metadata`` (str)
    A JSON object of the record's other fields that evaluation may break results down by
    (HotpotQA ``type``/``level``, LVBench ``question_type``, MMLongBench-Doc ``doc_type`` and
    ``evidence_sources``, WebQA ``topic``, ...); ``"{}"`` when there are none.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

KINDS = ("sentence", "passage", "image", "page", "video", "clip")
NO_TIME = -1.0

EVIDENCE = tfds.features.Sequence(
    {
        "kind": tfds.features.Text(),
        "source": tfds.features.Text(),
        "ref": tfds.features.Text(),
        "start": np.float32,
        "end": np.float32,
    }
)

FEATURES = tfds.features.FeaturesDict(
    {
        "id": tfds.features.Text(),
        "question": tfds.features.Text(),
        "answers": tfds.features.Sequence(tfds.features.Text()),
        "answer_format": tfds.features.Text(),
        "choices": tfds.features.Sequence(tfds.features.Text()),
        "evidence": EVIDENCE,
        "metadata": tfds.features.Text(),
    }
)


def evidence(
    kind: str, source: str, ref: str = "", start: float = NO_TIME, end: float = NO_TIME
) -> dict[str, Any]:
    """One evidence reference (a row of the table above)."""
    if kind not in KINDS:
        raise ValueError(f"evidence kind {kind!r} is not one of {KINDS}")
    return {"kind": kind, "source": source, "ref": ref, "start": start, "end": end}


def example(
    id: str,
    question: str,
    answers: Iterable[str],
    evidence: Iterable[Mapping[str, Any]],
    *,
    answer_format: str = "",
    choices: Iterable[str] = (),
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An example in `FEATURES`' shape; answers and evidence are deduplicated in order."""
    return {
        "id": id,
        "question": question,
        "answers": list(dict.fromkeys(answers)),
        "answer_format": answer_format,
        "choices": list(choices),
        "evidence": [dict(e) for e in dict.fromkeys(tuple(e.items()) for e in evidence)],
        "metadata": json.dumps(dict(metadata or {}), ensure_ascii=False, sort_keys=True),
    }


def as_text(value: str | bytes) -> str:
    """A string field as read back from a data source (TFDS returns text as bytes)."""
    return value.decode("utf-8") if isinstance(value, bytes) else value
