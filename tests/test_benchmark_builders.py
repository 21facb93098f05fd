"""The nine benchmark builders on raw-layout fixtures (``tests/fixtures/benchmarks/``).

Every builder runs once (a module fixture) into one data_dir; the tests then read the datasets back
through `vimrag_jax.benchmarks.load` (a ``tfds.data_source``): split names and counts, answers
with their aliases, answer formats, evidence references; malformed files must fail naming the
file and record and leave nothing `load` accepts; the build command and grain reading work.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vimrag_jax import benchmarks
from vimrag_jax.benchmarks import features, raw
from vimrag_jax.benchmarks.build import build
from vimrag_jax.benchmarks.raw import MissingRawFiles, RawFormatError, Record

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"

COUNTS = {
    "hotpotqa": {"train": 1, "validation": 3},
    "squad": {"validation": 8},
    "webqa": {"train": 2, "validation": 1, "test": 1},
    "slidevqa": {"validation": 1, "test": 3},
    "mmlongbench_doc": {"test": 5},
    "lvbench": {"test": 3},
    "wikihowqa": {"test": 2},
    "syntheticqa": {"test": 4},
    "xvbench": {"test": 2},
}
DERIVED_COUNTS = {  # (name, format): test examples
    ("hotpotqa", "universalrag"): 3,
    ("squad", "universalrag"): 3,
    ("webqa", "universalrag"): 3,
    ("lvbench", "universalrag"): 3,
    ("wikihowqa", "universalrag"): 2,
    ("syntheticqa", "universalrag"): 3,
    ("slidevqa", "vrag"): 2,
    ("mmlongbench_doc", "vrag"): 2,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tfds")
    for name in benchmarks.NAMES:
        build(name, manual_dir=FIXTURES / name, data_dir=out, log=lambda _: None)
    for name, config in DERIVED_COUNTS:
        manual_dir = FIXTURES / config
        build(name, manual_dir=manual_dir, data_dir=out, config=config, log=lambda _: None)
    return out


def text(value: str | bytes) -> str:
    return features.as_text(value)


def read(data_dir: Path, name: str, split: str, config: str = "raw") -> dict[str, dict]:
    """The split as {id: example} with strings decoded and evidence as a list of tuples."""
    out = {}
    for example in benchmarks.load(name, data_dir=data_dir, split=split, config=config):
        evidence = example["evidence"]
        out[text(example["id"])] = {
            "question": text(example["question"]),
            "answers": [text(a) for a in example["answers"]],
            "answer_format": text(example["answer_format"]),
            "choices": [text(c) for c in example["choices"]],
            "evidence": [
                (text(k), text(s), text(r), float(a), float(b))
                for k, s, r, a, b in zip(
                    evidence["kind"],
                    evidence["source"],
                    evidence["ref"],
                    evidence["start"],
                    evidence["end"],
                    strict=True,
                )
            ],
            "metadata": json.loads(text(example["metadata"])),
        }
    return out


def test_names_cover_the_nine_benchmarks() -> None:
    assert benchmarks.NAMES == tuple(COUNTS)


@pytest.mark.parametrize("name", list(COUNTS))
def test_splits_and_counts(data_dir: Path, name: str) -> None:
    info = benchmarks.builder(name, data_dir=data_dir).info
    assert {split: s.num_examples for split, s in info.splits.items()} == COUNTS[name]
    assert info.file_format.value == "array_record"
    for split, count in COUNTS[name].items():
        assert len(benchmarks.load(name, data_dir=data_dir, split=split)) == count


def test_hotpotqa_supporting_facts_are_sentence_evidence(data_dir: Path) -> None:
    dev = read(data_dir, "hotpotqa", "validation")
    assert list(dev) == [
        "5a8b57f25542995d1e6f1371",
        "5a8c7595554299585d9e36b6",
        "5a85ea095542994775f606a8",
    ]  # file order is kept
    first = dev["5a8b57f25542995d1e6f1371"]
    assert first["answers"] == ["yes"]
    assert first["evidence"] == [
        ("sentence", "Scott Derrickson", "0", -1.0, -1.0),
        ("sentence", "Ed Wood", "0", -1.0, -1.0),
    ]
    assert first["metadata"] == {"type": "comparison", "level": "hard"}
    second = dev["5a8c7595554299585d9e36b6"]
    assert second["answers"] == ["Chief of Protocol"]
    assert [(e[1], e[2]) for e in second["evidence"]] == [
        ("Kiss and Tell (1945 film)", "0"),
        ("Shirley Temple", "0"),
        ("Shirley Temple", "1"),
    ]
    train = read(data_dir, "hotpotqa", "train")
    assert train["5a7a06935542990198eaf050"]["answers"] == ["Arthur's Magazine"]


def test_squad_keeps_every_distinct_annotator_answer(data_dir: Path) -> None:
    dev = read(data_dir, "squad", "validation")
    where = dev["56be4db0acb8001400a502ee"]
    assert where["question"] == "Where did Super Bowl 50 take place?"
    assert where["answers"] == [
        "Santa Clara, California",
        "Levi's Stadium",
        "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California.",
    ]
    assert where["evidence"] == [("passage", "Super_Bowl_50", "0", -1.0, -1.0)]
    assert dev["56be4db0acb8001400a502ec"]["answers"] == ["Denver Broncos"]  # 3 identical
    theme = dev["56be8e613aeaaa14008c90d1"]["answers"]
    assert theme == ['"golden anniversary"', "gold-themed", '"golden anniversary']
    second_paragraph = [e for e in dev.values() if e["evidence"][0][2] == "1"]
    assert len(second_paragraph) == 2
    assert dev["56be4db0acb8001400a502ee"]["metadata"]["answer_starts"] == [403, 355, 355]


def test_webqa_splits_answers_and_image_or_snippet_evidence(data_dir: Path) -> None:
    train = read(data_dir, "webqa", "train")
    frog = train["d5c5bcf60dba11ecb1e81171463288e9"]
    assert frog["question"] == "What color is the belly of a Green Tree Frog?"
    assert frog["answers"] == ["The belly of a Green Tree Frog is white."]
    assert frog["answer_format"] == "color"
    assert frog["evidence"] == [("image", "30240126", "", -1.0, -1.0)]  # negatives are not gold
    assert frog["metadata"] == {"topic": "frog", "keywords": "white"}
    both = train["ffeeddccbbaa99887766554433221100"]
    assert [e[:2] for e in both["evidence"]] == [("image", "30146309"), ("image", "30240126")]
    assert both["answer_format"] == "YesNo"
    val = read(data_dir, "webqa", "validation")
    assert [e[:2] for e in val["0a1b2c3d4e5f60718293a4b5c6d7e8f9"]["evidence"]] == [
        ("passage", "0a1b2c3d4e5f60718293a4b5c6d7e8f9_0"),
        ("passage", "0a1b2c3d4e5f60718293a4b5c6d7e8f9_1"),
    ]
    test = read(data_dir, "webqa", "test")["1234567890abcdef1234567890abcdef"]
    assert test["answers"] == [] and test["evidence"] == [] and test["answer_format"] == "shape"


def test_slidevqa_evidence_pages_and_answer_types(data_dir: Path) -> None:
    deck = "2012-02-20fy11roadshow-120221022442-phpapp02_95"
    test = read(data_dir, "slidevqa", "test")
    assert test["0"]["answers"] == ["12.5 bn"]
    assert test["0"]["evidence"] == [("page", deck, "5", -1.0, -1.0)]
    assert [e[2] for e in test["1"]["evidence"]] == ["5", "7"]
    assert [test[i]["answer_format"] for i in "012"] == ["Single-Span", "Single-Span", "Non-Span"]
    assert test["2"]["metadata"]["arithmetic_expression"] == "12.5 - 11.7"
    assert "arithmetic_expression" not in test["0"]["metadata"]
    assert test["1"]["metadata"]["page_files"][6] == "slide-7-1024.jpg"
    assert read(data_dir, "slidevqa", "validation")["0"]["evidence"][0][2] == "1"


def test_mmlongbench_doc_formats_pages_and_unanswerable(data_dir: Path) -> None:
    test = read(data_dir, "mmlongbench_doc", "test")
    assert list(test) == ["0", "1", "2", "3", "4"]
    assert [e["answer_format"] for e in test.values()] == ["Str", "Int", "List", "Float", "None"]
    assert [e[2] for e in test["1"]["evidence"]] == ["4", "7", "9", "10", "13", "14"]
    assert test["0"]["evidence"] == [("page", "PH_2016.06.08_Economy-Final.pdf", "5", -1.0, -1.0)]
    assert test["2"]["answers"] == ["['White', '10%']"]
    assert test["4"]["answers"] == ["Not answerable"] and test["4"]["evidence"] == []
    assert test["0"]["metadata"] == {
        "doc_type": "Research report / Introduction",
        "evidence_sources": ["Chart"],
    }


def test_lvbench_multiple_choice_letters_and_time_spans(data_dir: Path) -> None:
    test = read(data_dir, "lvbench", "test")
    assert list(test) == ["55", "56", "840"]
    year = test["55"]
    assert year["answers"] == ["D"] and year["answer_format"] == "multiple_choice"
    assert year["choices"] == ["1636", "1366", "1363", "1633"]
    assert year["question"].startswith("What year appears") and "(D) 1633" in year["question"]
    assert year["evidence"] == [("video", "Cm73ma6Ibcs", "00:15-00:19", 15.0, 19.0)]
    assert test["56"]["evidence"][0][3:] == (3723.0, 3730.0)  # HH:MM:SS
    assert test["840"]["evidence"] == [("video", "vaL_vSdZKZo", "31:15-31:16", 1875.0, 1876.0)]
    assert test["56"]["metadata"]["question_type"] == ["event understanding", "temporal grounding"]


def test_videorag_gold_videos_in_rank_order(data_dir: Path) -> None:
    wikihow = read(data_dir, "wikihowqa", "test")
    assert list(wikihow) == ["290", "292"]
    assert wikihow["290"]["evidence"] == [("video", "3GsRPpOomE0", "", -1.0, -1.0)]
    ranked = wikihow["292"]
    assert len(ranked["evidence"]) == 10 and ranked["evidence"][0][1] == "XOuNZRCoHkg"
    assert ranked["metadata"]["ranks"] == [1, 9, 10, 12, 13, 21, 27, 31, 33, 49]
    assert ranked["question"].startswith("How To ")
    records = json.loads((FIXTURES / "wikihowqa" / "datasets" / "qa" / "wikihow.json").read_text())
    assert ranked["answers"] == [records[1]["answer_text"]]
    assert ranked["question"] == records[1]["wikihow_query_text"]
    assert ranked["metadata"]["howto100m_query_text"] == records[1]["howto100m_query_text"]
    synthetic = read(data_dir, "syntheticqa", "test")
    assert list(synthetic) == ["fH7ZK9YAckQ_0", "fH7ZK9YAckQ_1", "fH7ZK9YAckQ_2", "7HvrG7AZhR8_0"]
    assert synthetic["7HvrG7AZhR8_0"]["evidence"] == [("video", "7HvrG7AZhR8", "", -1.0, -1.0)]


def test_videorag_videos_are_sorted_by_rank(tmp_path: Path) -> None:
    copy = _copy("wikihowqa", tmp_path)
    path = copy / "datasets" / "qa" / "wikihow.json"
    _break_json_list(path, 1, lambda r: r["videos"].reverse())
    build("wikihowqa", manual_dir=copy, data_dir=tmp_path / "out", log=lambda _: None)
    ranked = read(tmp_path / "out", "wikihowqa", "test")["292"]
    assert ranked["metadata"]["ranks"] == [1, 9, 10, 12, 13, 21, 27, 31, 33, 49]
    assert ranked["evidence"][0][1] == "XOuNZRCoHkg"


def test_xvbench_reference_clips(data_dir: Path) -> None:
    test = read(data_dir, "xvbench", "test")
    assert test["0"]["answers"] == ["The brake caliper."]
    assert test["0"]["evidence"] == [
        ("clip", "fH7ZK9YAckQ", "fH7ZK9YAckQ_chunk_002.mp4", -1.0, -1.0)
    ]
    assert [e[2] for e in test["1"]["evidence"]] == [
        "7HvrG7AZhR8_chunk_000.mp4",
        "fH7ZK9YAckQ_chunk_001.mp4",
    ]


@pytest.mark.parametrize(("name", "config"), list(DERIVED_COUNTS))
def test_derived_formats_are_builder_configs(data_dir: Path, name: str, config: str) -> None:
    dataset = benchmarks.builder(name, data_dir=data_dir, config=config)
    assert dataset.data_path == data_dir / name / config / "1.0.0"
    assert {s: i.num_examples for s, i in dataset.info.splits.items()} == {
        "test": DERIVED_COUNTS[name, config]
    }


def test_universalrag_query_files(data_dir: Path) -> None:
    hotpot = read(data_dir, "hotpotqa", "test", "universalrag")["hotpotqa_4367"]
    assert hotpot["answers"] == ["Gesellschaft mit beschränkter Haftung"]
    assert [e[:2] for e in hotpot["evidence"]] == [("passage", "435910"), ("passage", "477707")]
    squad = read(data_dir, "squad", "test", "universalrag")["squad5"]
    assert squad["evidence"] == [("passage", "11704162", "", -1.0, -1.0)]  # listed twice
    webqa = read(data_dir, "webqa", "test", "universalrag")
    first = webqa["webqa_d5bbc7c80dba11ecb1e81171463288e9"]
    assert first["evidence"] == [("image", "30079629", "", -1.0, -1.0)]
    assert first["answer_format"] == "YesNo"
    # The same LVBench question reads the same from UniversalRAG's file and the raw release.
    lvbench = read(data_dir, "lvbench", "test", "universalrag")["lvbench_840"]
    raw_lvbench = read(data_dir, "lvbench", "test")["840"]
    for field in ("question", "answers", "answer_format", "choices", "evidence"):
        assert lvbench[field] == raw_lvbench[field], field
    wikihow = read(data_dir, "wikihowqa", "test", "universalrag")["videorag_wikihow_133"]
    assert wikihow["question"] == "What is the correct way to cite a poem in APA style?"
    assert [e[1] for e in wikihow["evidence"][:2]] == ["wBEwT537I38", "Z-YeTbosx2k"]
    assert len(wikihow["evidence"]) == 27  # a Python-literal list in this file
    synth = read(data_dir, "syntheticqa", "test", "universalrag")
    assert synth["videorag_synth_fH7ZK9YAckQ_1"]["evidence"][0][:2] == ("video", "fH7ZK9YAckQ")


def test_vrag_unified_files(data_dir: Path) -> None:
    slides = read(data_dir, "slidevqa", "test", "vrag")
    raw_slides = read(data_dir, "slidevqa", "test")
    assert slides["3"]["evidence"] == raw_slides["1"]["evidence"]  # qa_id 1 of the test split
    assert slides["3"]["answer_format"] == "Single-Span"
    assert slides["3"]["metadata"] == {"reasoning_type": "Multi-Hop"}
    docs = read(data_dir, "mmlongbench_doc", "test", "vrag")
    raw_docs = read(data_dir, "mmlongbench_doc", "test")
    # uid 0 is samples.json's record 0, the raw fixture's first record.
    for field in ("question", "answers", "answer_format", "evidence", "metadata"):
        assert docs["0"][field] == raw_docs["0"][field], field
    assert [e[2] for e in docs["1"]["evidence"]] == ["19", "20"]
    assert docs["1"]["metadata"]["evidence_sources"] == ["Table"]


def test_unknown_format(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="xvbench has no format 'universalrag'; it reads raw"):
        benchmarks.builder("xvbench", data_dir=data_dir, config="universalrag")


def test_load_reads_into_grain(data_dir: Path) -> None:
    source = benchmarks.load("squad", data_dir=data_dir, split="validation")
    dataset = grain.MapDataset.source(source).map(
        lambda ex: {"id": text(ex["id"]), "answers": [text(a) for a in ex["answers"]]}
    )
    assert dataset[2]["id"] == "56be4db0acb8001400a502ee"  # random access, file order
    batches = list(dataset.batch(4, batch_fn=list))
    assert [len(b) for b in batches] == [4, 4]
    ids = [ex["id"] for ex in dataset.shuffle(seed=0)]
    assert sorted(ids) == sorted(ex["id"] for b in batches for ex in b)
    assert isinstance(source[0]["evidence"]["start"][0], np.floating)


def test_load_errors(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not built.*benchmarks.build --benchmark=squad"):
        benchmarks.load("squad", data_dir=tmp_path, split="validation")
    with pytest.raises(ValueError, match="not 'train'"):
        benchmarks.load("squad", data_dir=data_dir, split="train")
    with pytest.raises(ValueError, match="unknown benchmark 'nope'.*hotpotqa.*xvbench"):
        benchmarks.load("nope", data_dir=data_dir, split="test")


def _copy(name: str, tmp_path: Path) -> Path:
    copy = tmp_path / "raw"
    shutil.copytree(FIXTURES / name, copy)
    return copy


def _break_json_list(path: Path, index: int, edit) -> None:
    records = json.loads(path.read_text())
    edit(records[index])
    path.write_text(json.dumps(records))


def _break_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


MALFORMED = {
    # name: (edit of the raw copy, file name in the error, record in the error, problem)
    "hotpotqa": (
        lambda raw: _break_json_list(raw / "hotpot_train_v1.1.json", 0, lambda r: r.pop("answer")),
        "hotpot_train_v1.1.json",
        "record 0 (_id 5a7a06935542990198eaf050)",
        "'answer' is missing",
    ),
    "mmlongbench_doc": (
        lambda raw: _break_json_list(
            raw / "data" / "samples.json", 3, lambda r: r.update(evidence_pages="[3, 5")
        ),
        "samples.json",
        "record 3 (doc_id",
        "not a Python list literal",
    ),
    "lvbench": (
        lambda raw: _break_line(raw / "data" / "video_info.meta.jsonl", 2, '{"key": "x", "qa": ['),
        "video_info.meta.jsonl",
        "record line 2",
        "invalid JSON",
    ),
    "slidevqa": (
        lambda raw: _break_line(
            raw / "annotations" / "qa" / "test.jsonl",
            3,
            json.dumps({"deck_name": "d", "qa_id": 9, "question": "q", "answer": "a"}).replace(
                "}", ', "evidence_pages": [0]}'
            ),
        ),
        "test.jsonl",
        "record line 3 (qa_id 9)",
        "1-based pages",
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_raw_file_names_file_and_record_and_writes_nothing(
    name: str, tmp_path: Path
) -> None:
    edit, file_name, record, problem = MALFORMED[name]
    copy = _copy(name, tmp_path)
    edit(copy)
    out = tmp_path / "out"
    with pytest.raises(RawFormatError) as caught:
        build(name, manual_dir=copy, data_dir=out, log=lambda _: None)
    message = str(caught.value)
    assert file_name in message and record in message and problem in message
    # The other split(s) were fine, yet nothing was kept: no version directory, no array_record.
    assert not list(out.rglob("1.0.0")) and not list(out.rglob("*.array_record*"))
    assert (out / name).is_dir()  # TFDS did start writing here
    with pytest.raises(FileNotFoundError, match="not built"):
        benchmarks.load(name, data_dir=out, split="test")


def test_malformed_derived_file(tmp_path: Path) -> None:
    copy = _copy("universalrag", tmp_path)
    path = copy / "dataset" / "query" / "lvbench.json"
    path.write_text(path.read_text().replace("1876", "1874", 1))
    with pytest.raises(RawFormatError) as caught:
        build("lvbench", manual_dir=copy, data_dir=tmp_path / "out", config="universalrag")
    assert str(caught.value) == (
        f"{path}: record 0 (index lvbench_840): time_reference [1875, 1874] is not "
        "[start, end] seconds"
    )
    assert not list((tmp_path / "out").rglob("1.0.0"))


def test_lvbench_answer_outside_the_options_is_rejected(tmp_path: Path) -> None:
    copy = _copy("lvbench", tmp_path)
    path = copy / "data" / "video_info.meta.jsonl"
    path.write_text(path.read_text().replace('"answer": "D"', '"answer": "E"'))
    with pytest.raises(RawFormatError, match=r"line 1 \(key Cm73ma6Ibcs\), qa\[0\] \(uid 55\)"):
        build("lvbench", manual_dir=copy, data_dir=tmp_path / "out", log=lambda _: None)


def test_repeated_id_is_rejected(tmp_path: Path) -> None:
    copy = _copy("xvbench", tmp_path)
    path = copy / "xvbench.jsonl"
    rows = [dict(json.loads(line), id="q1") for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RawFormatError, match="xvbench.jsonl: record line 2: id 'q1' repeats"):
        build("xvbench", manual_dir=copy, data_dir=tmp_path / "out", log=lambda _: None)


def test_missing_raw_files_names_the_files_expected(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "unrelated.txt").write_text("x")
    with pytest.raises(MissingRawFiles) as caught:
        build("hotpotqa", manual_dir=tmp_path / "raw", data_dir=tmp_path / "out")
    assert "hotpot_dev_distractor_v1.json" in str(caught.value)
    assert "hotpot_train_v1.1.json" in str(caught.value)
    with pytest.raises(MissingRawFiles, match="data/video_info.meta.jsonl"):
        build("lvbench", manual_dir=tmp_path / "absent", data_dir=tmp_path / "out")


def test_a_built_dataset_is_reused_unless_overwritten(tmp_path: Path) -> None:
    copy = _copy("xvbench", tmp_path)
    out, lines = tmp_path / "out", []
    assert build("xvbench", manual_dir=copy, data_dir=out, log=lines.append) == {"test": 2}
    path = copy / "xvbench.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    assert build("xvbench", manual_dir=copy, data_dir=out, log=lines.append) == {"test": 2}
    assert any("already built" in line for line in lines)
    assert build("xvbench", manual_dir=copy, data_dir=out, overwrite=True) == {"test": 1}
    assert len(benchmarks.load("xvbench", data_dir=out, split="test")) == 1


def _command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vimrag_jax.benchmarks.build", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_build_command(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _command(
        "--benchmark=slidevqa", f"--manual_dir={FIXTURES / 'slidevqa'}", f"--data_dir={out}"
    )
    assert done.returncode == 0, done.stderr
    assert "slidevqa train: not found (annotations/qa/train.jsonl)" in done.stdout
    assert "slidevqa test: 3 examples" in done.stdout
    assert len(benchmarks.load("slidevqa", data_dir=out, split="test")) == 3
    vrag = _command(
        "--benchmark=slidevqa",
        "--format=vrag",
        f"--manual_dir={FIXTURES / 'vrag'}",
        f"--data_dir={out}",
    )
    assert vrag.returncode == 0, vrag.stderr
    assert len(benchmarks.load("slidevqa", data_dir=out, split="test", config="vrag")) == 2
    unknown = _command("--benchmark=nope", f"--manual_dir={tmp_path}", f"--data_dir={out}")
    assert unknown.returncode != 0
    assert "hotpotqa|squad|webqa|slidevqa|mmlongbench_doc|lvbench" in unknown.stderr
    missing = _command("--benchmark=xvbench", f"--manual_dir={tmp_path}", f"--data_dir={out}")
    assert missing.returncode == 1 and "xvbench.jsonl" in missing.stderr


clock = st.tuples(st.integers(0, 9), st.integers(0, 59), st.integers(0, 59))


@given(clock, clock)
def test_lvbench_time_references_parse_to_seconds(a: tuple, b: tuple) -> None:
    (start, end) = sorted([a, b])

    def fmt(h: int, m: int, s: int) -> str:
        return f"{h:02d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"

    record = Record("f.jsonl", "line 1", {})
    parsed = raw.time_span(record, f"{fmt(*start)}-{fmt(*end)}")
    assert parsed == tuple(float(h * 3600 + m * 60 + s) for h, m, s in (start, end))


_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
option_text = st.text(st.characters(exclude_characters=_LINE_BREAKS), min_size=1).map(str.strip)


@given(st.lists(option_text.filter(bool), min_size=2, max_size=6))
def test_lvbench_options_parse_in_letter_order(texts: list[str]) -> None:
    question = "Stem?\n" + "\n".join(f"({chr(65 + i)}) {t}" for i, t in enumerate(texts))
    record = Record("f.jsonl", "line 1", {})
    assert raw.options(record, question) == texts
