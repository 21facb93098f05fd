"""WebQA: open-domain questions answered from web images or text snippets.

Reads the official release (``WebQA_train_val.json``, ``WebQA_test.json``: JSON objects keyed
by ``Guid``). Its ``split`` field ("train"/"val") divides the first file into ``train`` and
``validation``; the test file has no answers or positive facts. The gold evidence is the
positive facts: ``img_posFacts`` as ``image`` references (``source`` = the ``image_id`` that
indexes ``imgs.tsv`` through ``imgs.lineidx``) and ``txt_posFacts`` as ``passage`` references
(``source`` = the ``snippet_id``). ``Q`` and ``A`` come wrapped in literal double quotes in the
release; one wrapping pair is removed. ``answer_format`` is ``Qcate`` (text, YesNo, Others,
choose, number, color, shape), which decides how the official accuracy is scored.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vimrag_jax.benchmarks import derived, features
from vimrag_jax.benchmarks.raw import RawBenchmark, RawFormatError, Record, read_json

_RAW_SPLIT = {"train": "train", "validation": "val"}


def unquote(text: str) -> str:
    """``text`` without one pair of wrapping double quotes (WebQA quotes Q and A)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].strip()
    return text


class WebQA(RawBenchmark, skip_registration=True):
    """WebQA (Chang et al., 2022): multi-hop, multimodal questions over web images and text.

    ``metadata`` holds ``topic`` and, where the release has them, ``keywords`` (``Keywords_A``,
    the keyword answer the official accuracy compares against).
    """

    name = "webqa"
    HOMEPAGE = "https://webqna.github.io/"
    SPLIT_FILES = {
        "train": ("WebQA_train_val.json",),
        "validation": ("WebQA_train_val.json",),
        "test": ("WebQA_test.json",),
    }
    DERIVED = {"universalrag": derived.universalrag("webqa")}

    def examples(self, path: Path, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        data = read_json(path)
        if not isinstance(data, dict):
            raise RawFormatError(path, "(top level)", "should be an object {Guid: record}")
        for index, (guid, record_data) in enumerate(data.items()):
            record = Record(path, f"{index} (Guid {guid})", record_data)
            raw_split = record.get("split", str)
            if split in _RAW_SPLIT and raw_split != _RAW_SPLIT[split]:
                if raw_split not in _RAW_SPLIT.values():
                    raise record.error(f"split {raw_split!r} is neither 'train' nor 'val'")
                continue
            evidence = []
            for n, fact_data in enumerate(record.get("img_posFacts", list, [])):
                fact = record.sub("img_posFacts", n, fact_data)
                image_id = fact.need("image_id", (int, str))
                evidence.append(features.evidence("image", str(image_id)))
            for n, fact_data in enumerate(record.get("txt_posFacts", list, [])):
                fact = record.sub("txt_posFacts", n, fact_data)
                evidence.append(features.evidence("passage", fact.need("snippet_id", str)))
            answers = record.get("A", list, [])
            if not all(isinstance(a, str) for a in answers):
                raise record.error("field 'A' should be a list of strings")
            metadata: dict[str, Any] = {"topic": record.get("topic", str, "")}
            if record.get("Keywords_A", str):
                metadata["keywords"] = unquote(record.data["Keywords_A"])
            example = features.example(
                guid,
                unquote(record.need("Q", str)),
                [unquote(a) for a in answers],
                evidence,
                answer_format=record.get("Qcate", str, ""),
                metadata=metadata,
            )
            yield record.where, example
