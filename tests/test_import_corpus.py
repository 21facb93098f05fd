"""A real corpus end to end: the JSON-lines import command, the question file loader, the config
checks for ``data.corpus`` / ``data.questions``, and ``Experiment.from_config`` plus a rollout
worker on the imported store. Everything is built in the test (no downloads)."""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from vimrag_jax import config_checks
from vimrag_jax.agent.prompts import VIDEO_FPS
from vimrag_jax.envs.dataset import DatasetError, load_questions
from vimrag_jax.retrieval.corpus import CorpusStore
from vimrag_jax.retrieval.embedders import HashingEmbedder
from vimrag_jax.retrieval.import_corpus import (
    CorpusImportError,
    import_corpus,
    main,
    parse_embedder,
    read_items,
    resample_to_grid,
)
from vimrag_jax.retrieval.store_format import corpus_fingerprint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import ggpo  # noqa: E402

TEXTS = {
    0: ("Ada Lovelace", "Ada Lovelace wrote the first published program for the engine."),
    1: ("Charles Babbage", "Charles Babbage designed the analytical engine in London."),
    2: ("Analytical Engine", "The analytical engine read its programs from punched cards."),
    3: ("Jacquard loom", "The Jacquard loom wove patterns chosen by punched cards."),
}
VIDEO_TIMES = [0.0, 1.1, 2.2]  # 1 fps, as extracted (round(t) is the frame)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    """Media files under one root: an RGB and a greyscale PNG, a 3-frame video, a video with
    frames of two sizes, and a file that is not an image."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (16, 8), dtype=np.uint8)
    (root / "pictures").mkdir()
    Image.fromarray(rgb, "RGB").save(root / "pictures" / "engine.png")
    Image.fromarray(grey, "L").save(root / "loom.png")
    frames = rng.integers(0, 256, (3, 10, 14, 3), dtype=np.uint8)
    (root / "clip").mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame, "RGB").save(root / "clip" / f"{i:04d}.png")
    (root / "clip" / ".DS_Store").write_bytes(b"\0junk")  # hidden files are not frames
    (root / "ragged").mkdir()
    Image.fromarray(frames[0], "RGB").save(root / "ragged" / "0000.png")
    Image.fromarray(rgb, "RGB").save(root / "ragged" / "0001.png")
    (root / "broken.png").write_bytes(b"this is not a png")
    return {
        "root": root,
        "rgb": rgb,
        "grey": np.repeat(grey[..., None], 3, axis=-1),
        "frames": frames,
    }


def _good_rows() -> list[dict]:
    rows = [{"id": i, "modality": "text", "title": t, "text": x} for i, (t, x) in TEXTS.items()]
    rows += [
        {
            "id": 10,
            "modality": "image",
            "title": "Analytical Engine",
            "text": "A drawing of the analytical engine's mill.",
            "path": "pictures/engine.png",
        },
        {
            "id": 11,
            "modality": "image",
            "title": "Jacquard loom",
            "text": "A grey photograph of a Jacquard loom.",
            "path": "loom.png",
        },
        {
            "id": 20,
            "modality": "video",
            "title": "Charles Babbage",
            "text": "A clip of Charles Babbage turning the difference engine's crank.",
            "path": "clip",
            "timestamps": VIDEO_TIMES,
        },
    ]
    return rows


QUESTIONS = [
    {"id": f"q{i}", "question": q, "answer": a, "evidence_ids": e}
    for i, (q, a, e) in enumerate(
        [
            ("Who wrote the first published program?", "Ada Lovelace", [0]),
            ("Where was the analytical engine designed?", "London", [1]),
            ("What did the engine read its programs from?", "punched cards", [2]),
            ("What did the Jacquard loom weave?", "patterns", [3]),
            ("What part of the engine does the drawing show?", "the mill", [10]),
            ("What colour is the loom photograph?", "grey", [11]),
            ("Who turns the crank in the clip?", "Charles Babbage", [20, 1]),
            ("Who designed the engine Ada programmed?", "Charles Babbage", [0, 1]),
            ("What is the capital of the loom?", "unknown", []),
        ]
    )
]


@pytest.fixture(scope="module")
def dataset(media, tmp_path_factory) -> dict:
    """An imported store and its question file."""
    base = tmp_path_factory.mktemp("dataset")
    items = _write_jsonl(base / "items.jsonl", _good_rows())
    store = import_corpus(items, base / "store", media_root=media["root"], progress_every=0)
    questions = _write_jsonl(base / "questions.jsonl", QUESTIONS)
    return {"items": items, "store": store, "dir": base / "store", "questions": questions}


def test_import_round_trips_items_pixels_and_timestamps(dataset, media):
    store = CorpusStore.open(str(dataset["dir"]))  # reopened from disk, embedder from manifest
    assert [info.item_id for info in store] == [0, 1, 2, 3, 10, 11, 20]
    for item_id, (title, text) in TEXTS.items():
        info = store.item(item_id)
        assert (info.modality, info.title, info.text, info.shape) == ("text", title, text, ())
    engine = store.load_item(10)
    assert engine.modality == "image" and engine.pixels.dtype == np.uint8
    np.testing.assert_array_equal(engine.pixels, media["rgb"])
    np.testing.assert_array_equal(store.load_item(11).pixels, media["grey"])  # L -> RGB
    clip = store.load_item(20)
    assert clip.timestamps == tuple(VIDEO_TIMES) and clip.pixels.shape == (3, 10, 14, 3)
    np.testing.assert_array_equal(clip.pixels, media["frames"])
    np.testing.assert_array_equal(store.load_visual(20, 2), media["frames"][2])
    assert store.embedder.spec() == HashingEmbedder().spec()
    ids, _ = store.search(["who designed the analytical engine in London"], k=1)
    assert ids[0, 0] == 1


def test_video_timestamps_default_to_one_fps_and_paths_to_the_item_file(media):
    row = {**_good_rows()[-1]}
    del row["timestamps"]
    # Without --media_root, paths are relative to the item file's directory.
    (item,) = read_items(_write_jsonl(media["root"] / "video_only.jsonl", [row]))
    assert item.timestamps == (0.0, 1.0, 2.0)
    np.testing.assert_array_equal(item.pixels, media["frames"])


def test_reimport_reuses_progress_and_refuses_to_clobber(dataset, media, tmp_path):
    lines: list[str] = []
    again = import_corpus(
        dataset["items"],
        dataset["dir"],
        media_root=media["root"],
        progress_every=3,
        log=lines.append,
    )
    assert again.reused and again.fingerprint == dataset["store"].fingerprint
    assert lines[0].startswith("read 3 items (0 images/frames) in ")
    assert lines[1].startswith("read 6 items (2 images/frames) in ")
    assert "already up to date" in lines[-1]
    fewer = _write_jsonl(tmp_path / "fewer.jsonl", _good_rows()[:2])
    with pytest.raises(CorpusImportError, match="holds a different corpus store; pass --overwrite"):
        import_corpus(fewer, dataset["dir"], media_root=media["root"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CorpusImportError, match="is not empty and holds no corpus store"):
        import_corpus(fewer, tmp_path / "busy", media_root=media["root"])


def test_overwrite_replaces_a_store(media, tmp_path):
    first = _write_jsonl(tmp_path / "a.jsonl", _good_rows()[:2])
    second = _write_jsonl(tmp_path / "b.jsonl", _good_rows()[2:5])
    import_corpus(first, tmp_path / "store", media_root=media["root"])
    store = import_corpus(second, tmp_path / "store", media_root=media["root"], overwrite=True)
    assert [info.item_id for info in CorpusStore.open(str(store.directory))] == [2, 3, 10]


def _row(**changes) -> dict:
    row = {"id": 7, "modality": "image", "title": "T", "text": "a caption", "path": "loom.png"}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not None}


TEXT_ROW = {"id": 1, "modality": "text", "title": "T", "text": "a passage"}
VIDEO_ROW = {"id": 8, "modality": "video", "title": "V", "text": "a clip", "path": "clip"}
BAD_ITEMS = {
    "malformed_json": ([TEXT_ROW, '{"id": 2, "modality": "text",'], 2, "malformed JSON"),
    "not_an_object": (["[1, 2]"], 1, "expected a JSON object, got list"),
    "missing_field": ([TEXT_ROW, _row(text=None)], 2, r"missing field\(s\) 'text'"),
    "unknown_field": ([{**TEXT_ROW, "timestamp": [0]}], 1, r"unknown field\(s\) 'timestamp'"),
    "unknown_modality": ([_row(modality="audio")], 1, "unknown modality 'audio'"),
    "id_not_int": ([_row(id="7")], 1, "'id' must be an integer, got '7'"),
    "id_negative": ([_row(id=-3)], 1, r"item_id must be an int in \[0, 2\*\*31\)"),
    "empty_caption": ([_row(text="  ")], 1, "text/caption must not be empty"),
    "text_with_path": ([{**TEXT_ROW, "path": "loom.png"}], 1, "a text item has no 'path'"),
    "image_without_path": ([_row(path=None)], 1, "image item needs 'path'"),
    "missing_image": ([TEXT_ROW, _row(path="nope.png")], 2, "image file .*nope.png.* not exist"),
    "corrupt_image": ([_row(path="broken.png")], 1, "cannot decode image .*broken.png"),
    "duplicate_id": ([TEXT_ROW, _row(), {**TEXT_ROW, "text": "b"}], 3, "duplicate id 1 .*line 1"),
    "video_not_a_directory": ([{**VIDEO_ROW, "path": "loom.png"}], 1, "is not a directory"),
    "ragged_frames": (
        [{**VIDEO_ROW, "path": "ragged"}],
        1,
        "video frames differ in size: 0000.png is 14x10, 0001.png is 20x12",
    ),
    "timestamp_count": (
        [{**VIDEO_ROW, "timestamps": [0, 1]}],
        1,
        "'timestamps' has 2 values but the video has 3 frames",
    ),
    "timestamps_not_increasing": (
        [{**VIDEO_ROW, "timestamps": [0, 2, 1]}],
        1,
        "strictly increasing",
    ),
    "timestamps_sparser_than_1fps": (
        [{**VIDEO_ROW, "timestamps": [0, 1.5, 3]}],
        1,
        r"no frame in second 1 \(none rounds to it; the nearest are at 0 s and 1.5 s\): it is "
        "sparser than 1 fps there",
    ),
    "fps_sparser_than_1fps": (
        [TEXT_ROW, {**VIDEO_ROW, "fps": 0.5}],
        2,
        r"no frame in second 1 .*nearest are at 0 s and 2 s.*extract the frames at 1 fps or more",
    ),
    "fps_and_timestamps": (
        [{**VIDEO_ROW, "fps": 1, "timestamps": [0, 1, 2]}],
        1,
        "a video gives 'timestamps' or 'fps', not both",
    ),
    "fps_not_positive": ([{**VIDEO_ROW, "fps": 0}], 1, "'fps' must be a positive number"),
    "fps_not_a_number": ([{**VIDEO_ROW, "fps": "30"}], 1, "'fps' must be a positive number"),
    "timestamps_on_image": ([_row(timestamps=[0.0])], 1, "an image item has no 'timestamps'"),
    "fps_on_image": ([_row(fps=30)], 1, "an image item has no 'fps'"),
    "fps_on_text": ([{**TEXT_ROW, "fps": 30}], 1, "a text item has no 'fps'"),
}


@pytest.mark.parametrize("case", sorted(BAD_ITEMS))
def test_bad_items_name_file_line_and_problem(case, media, tmp_path):
    rows, line, problem = BAD_ITEMS[case]
    path = _write_jsonl(tmp_path / "items.jsonl", rows)
    with pytest.raises(CorpusImportError) as caught:
        import_corpus(path, tmp_path / "store", media_root=media["root"])
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert re.search(problem, message), message
    error = caught.value  # raised on its own: no chained traceback from deep inside
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert os.listdir(tmp_path) == ["items.jsonl"]  # no store, no staging directory


def test_cli_imports_and_reports_errors_without_traceback(media, tmp_path, capsys):
    items = _write_jsonl(tmp_path / "items.jsonl", _good_rows()[:5])
    out = tmp_path / "store"
    args = [f"--items={items}", f"--out={out}", f"--media_root={media['root']}"]
    assert main([*args, "--embedder=hashing:64", "--progress_every=2"]) == 0
    err = capsys.readouterr().err
    assert "read 2 items" in err and "5 items, written in" in err
    assert CorpusStore.open(str(out)).embedder.dim == 64
    bad = _write_jsonl(tmp_path / "bad.jsonl", [TEXT_ROW, "{oops"])
    assert main([f"--items={bad}", f"--out={tmp_path / 'other'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"import_corpus: error: {bad}:2: malformed JSON")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main([f"--items={tmp_path / 'missing.jsonl'}", f"--out={out}"]) == 2
    assert "the item file does not exist" in capsys.readouterr().err


def test_parse_embedder_specs():
    assert parse_embedder("hashing").spec() == HashingEmbedder().spec()
    assert parse_embedder('{"kind": "hashing", "dim": 32}').spec() == HashingEmbedder(32).spec()
    full = HashingEmbedder(48, max_word_ngram=2).spec()
    assert parse_embedder(json.dumps(full)).spec() == full
    for bad, problem in [
        ("bm25", "expected hashing, hashing:DIM"),
        ("hashing:wide", "expected hashing:DIM"),
        ('{"kind": "clip"}', "'kind' must be 'hashing' or 'hf'"),
        ('{"kind": "hf"}', "needs 'path'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(problem)):
            parse_embedder(bad)


# -- questions --------------------------------------------------------------------------------


def test_questions_load_without_a_chain(dataset):
    questions = load_questions(dataset["questions"], dataset["store"])
    assert [q.question_id for q in questions] == [f"q{i}" for i in range(len(QUESTIONS))]
    crank = questions[6]
    assert crank.text == "Who turns the crank in the clip?" and crank.answer == "Charles Babbage"
    assert crank.evidence_ids == (20, 1) and crank.hops == 2 and crank.chain == ()
    assert questions[0].hops == 1 and questions[-1].evidence_ids == () and questions[-1].hops == 1


Q = {"id": "a", "question": "Who?", "answer": "Ada", "evidence_ids": [0]}
BAD_QUESTIONS = {
    "malformed_json": ([Q, '{"id": "b"'], 2, "malformed JSON"),
    "missing_field": ([{k: v for k, v in Q.items() if k != "answer"}], 1, "missing field.*answer"),
    "unknown_field": ([{**Q, "evidence": [0]}], 1, "unknown field(s) 'evidence'"),
    "empty_answer": ([{**Q, "answer": ""}], 1, "'answer' must be a non-empty string"),
    "evidence_not_ints": ([{**Q, "evidence_ids": ["0"]}], 1, "list of integer item ids"),
    "evidence_not_in_store": (
        [Q, {**Q, "id": "b", "evidence_ids": [1, 99, 5]}],
        2,
        "evidence id(s) 99, 5 are not in the corpus store",
    ),
    "duplicate_id": ([Q, {**Q, "question": "Again?"}], 2, "duplicate id 'a' .*line 1"),
    "empty_file": (["", "  "], None, "no questions"),
}


@pytest.mark.parametrize("case", sorted(BAD_QUESTIONS))
def test_bad_questions_name_file_line_and_problem(case, dataset, tmp_path):
    rows, line, problem = BAD_QUESTIONS[case]
    path = _write_jsonl(tmp_path / "questions.jsonl", rows)
    with pytest.raises(DatasetError) as caught:
        load_questions(path, dataset["store"])
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: "), message
    assert re.search(re.escape(problem) if "(" in problem else problem, message), message


# -- config and experiment --------------------------------------------------------------------


def _dataset_config(dataset, **sft):
    cfg = ggpo.get_config()
    cfg.data.corpus = str(dataset["dir"])
    cfg.data.questions = str(dataset["questions"])
    cfg.sft.steps = 0
    cfg.sft.update(sft)
    return cfg


def test_config_checks_for_a_real_corpus(dataset, tmp_path):
    assert config_checks.find_problems(_dataset_config(dataset), 1) == []
    cfg = _dataset_config(dataset, steps=300)
    cfg.data.questions = ""
    cfg.data.corpus = str(tmp_path)  # a directory, but no store
    problems = config_checks.find_problems(cfg, 1)
    assert len(problems) == 3, problems
    assert "holds no corpus store (no manifest.json)" in problems[0]
    assert "config.data.questions is empty" in problems[1]
    assert problems[2].startswith("config.sft.steps=300 with config.data.corpus set needs")
    assert "scripted expert" in problems[2]
    cfg = _dataset_config(dataset, steps=300, data=str(tmp_path))  # warm start from shards: fine
    cfg.data.questions = str(tmp_path / "none.jsonl")
    cfg.data.corpus = str(tmp_path / "absent")
    assert config_checks.find_problems(cfg, 1) == [
        f"config.data.corpus={str(tmp_path / 'absent')!r} is not a directory",
        f"config.data.questions={str(tmp_path / 'none.jsonl')!r} is not a file",
    ]


def test_experiment_and_worker_on_an_imported_corpus(dataset, tmp_path):
    from vimrag_jax.experiment import Experiment
    from vimrag_jax.rollout.records import list_shards, read_shard, validate_record
    from vimrag_jax.rollout.worker import run_worker

    cfg = _dataset_config(dataset)
    cfg.model.name = "tiny"  # the tiny preset's compact prompt fits its 1,024-token segments
    cfg.env.eval_questions = 2
    cfg.env.sft_questions = 3
    cfg.rollout.group_size = 2
    cfg.rollout.questions_per_batch = 1
    cfg.rollout.max_new_tokens = 12
    cfg.rollout.max_model_calls = 3
    questions = load_questions(dataset["questions"], dataset["store"])
    experiment = Experiment.from_config(cfg, tmp_path)
    assert experiment.env_name == "dataset" and experiment.entities == {}
    assert experiment.store.directory == str(dataset["dir"])  # opened in place
    assert experiment.store.fingerprint == dataset["store"].fingerprint
    assert not (tmp_path / "corpus").exists() and (tmp_path / "tokenizer").is_dir()
    assert experiment.eval_questions == questions[-2:]
    assert experiment.sft_questions == questions[:3]
    assert experiment.train_questions == questions[3:-2]
    ids = experiment.tokenizer("Who turns the crank in the clip?")["input_ids"]
    assert len(ids) < 12  # the BPE saw the questions
    cfg.env.sft_questions = 7
    with pytest.raises(ValueError, match="env.sft_questions=7 must leave RL questions out of 7"):
        Experiment.from_config(cfg, tmp_path)
    cfg.env.sft_questions = 0
    cfg.data.questions = ""
    with pytest.raises(ValueError, match="data.questions must name its question file"):
        Experiment.from_config(cfg, tmp_path)
    cfg.data.questions = str(dataset["questions"])

    written = run_worker(cfg, str(tmp_path), worker_id="w0", policy="model", max_trajectories=2)
    assert written == 2
    (shard,) = list_shards(tmp_path / "rollouts")
    records = list(read_shard(shard))
    train_ids = {q.question_id for q in questions[:-2]}
    for record in records:
        validate_record(record)
        assert record["question_id"] in train_ids and record["env"] == "dataset"


class _EvidencePolicy:
    """Searches with the question once, keeps the retrieved gold evidence (pictures and video
    keyframes included) and answers: drives the real agent loop over an imported store without
    a model (a real dataset has no chain for the scripted expert)."""

    def __init__(self, question):
        self.question = question
        self.searched = False

    def act(self, view):
        from vimrag_jax.envs import scripted

        if view.pending:
            entries = []
            for item in view.pending:
                useful = item.item_id in self.question.evidence_ids
                entries.append(
                    {
                        "information_id": item.information_id,
                        "is_useful": useful,
                        "key_timestamp": list(item.timestamps[1:]) if useful else [],
                        "priority_score": 5 if useful else 1,
                    }
                )
            return scripted.MEMORIZE, {"summarize": self.question.answer, "memorize": entries}
        if not self.searched:
            self.searched = True
            arguments = {"id": "s1", "parent_ids": ["root"], "query": self.question.text}
            return scripted.SEARCH, arguments
        return scripted.ANSWER, {"parent_ids": ["s1"], "answer": self.question.answer}


def test_agent_keeps_imported_pictures_and_video_frames(dataset, tmp_path):
    from vimrag_jax.agent import baselines
    from vimrag_jax.envs.scripted_sampler import ScriptedSampler
    from vimrag_jax.experiment import Experiment
    from vimrag_jax.rollout.records import validate_record
    from vimrag_jax.rollout.trajectory import run_records

    cfg = _dataset_config(dataset)
    cfg.model.name = "tiny"
    cfg.env.eval_questions = 2
    experiment = Experiment.from_config(cfg, tmp_path)
    rc = experiment.rollout_config()
    backend = ScriptedSampler(
        experiment.tokenizer, lambda context: _EvidencePolicy(context.question)
    )
    agent = baselines.make_agent(
        rc,
        experiment.store,
        experiment.tokenizer,
        backend,
        stop_token_ids=experiment.stop_token_ids(),
    )
    by_id = {q.question_id: q for q in load_questions(dataset["questions"], dataset["store"])}
    records, _ = run_records(
        agent,
        [by_id["q4"], by_id["q6"]],  # about the picture 10 and the video 20
        group_size=2,
        policy_version=0,
        seed=0,
        group_ids=["g4", "g6"],
        env_name="dataset",
        worker_id="t",
    )
    assert len(records) == 4
    kept = {"q4": (10, [0]), "q6": (20, [1, 2])}  # the video's frames at key_timestamp 1.1, 2.2
    for record in records:
        validate_record(record)
        assert record["reward"] == 1.0 and record["num_invalid_actions"] == 0
        assert record["relevant"][1] and record["answer_node"] == 2
        item_id, frames = kept[record["question_id"]]
        assert item_id in record["item_id"][1]  # the search node's visual memory bank
        last = int(record["segment_valid"].sum()) - 1  # the answer call sees the kept memory
        refs = record["segment_visuals"][last][record["segment_visual_valid"][last]]
        assert [int(r[0]) for r in refs] == [item_id] * len(frames)
        assert [int(r[1]) for r in refs] == frames
        for ref in refs:  # what the learner reads back
            assert experiment.store.load_visual(int(ref[0]), int(ref[1])).shape[-1] == 3


# -- streaming import ---------------------------------------------------------------------------


def _store_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> dict:
    """300 items (text, 4x4 images, 3-frame videos at 1 fps and at 10 fps) and their media."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(1)
    rows: list[dict] = []
    for i in range(300):
        row = {"id": 1000 + i, "title": f"entity {i % 17}", "text": f"passage {i} about {i % 7}"}
        if i % 10 == 3:
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(root / f"{i}.png")
            row.update(modality="image", path=f"{i}.png")
        elif i % 50 == 7:
            (root / f"v{i}").mkdir()
            for f in range(21):
                frame = rng.integers(0, 256, (2, 3, 3), dtype=np.uint8)
                Image.fromarray(frame).save(root / f"v{i}" / f"{f:03d}.png")
            row.update(modality="video", path=f"v{i}", fps=10 if i % 100 == 7 else 1)
        else:
            row.update(modality="text")
        rows.append(row)
    return {"root": root, "rows": rows}


def test_streamed_import_equals_the_in_memory_build(many, tmp_path):
    items_path = _write_jsonl(tmp_path / "items.jsonl", many["rows"])
    lines: list[str] = []
    store = import_corpus(
        items_path,
        tmp_path / "store",
        media_root=many["root"],
        progress_every=100,
        log=lines.append,
        embed_batch=16,
    )
    assert [line.split(" in ")[0] for line in lines[:4]] == [
        "read 100 items (34 images/frames)",  # 10 images, a 10 fps and a 1 fps video
        "read 200 items (68 images/frames)",
        "read 300 items (102 images/frames)",
        "read 300 items (102 images/frames)",  # then the final step
    ]
    assert lines[3].endswith(f"; finishing {tmp_path / 'store'}") and len(lines) == 5
    items = read_items(items_path, many["root"])
    assert sum(item.modality == "video" for item in items) == 6
    assert {item.num_frames for item in items if item.modality == "video"} == {3, 21}
    embedder = HashingEmbedder()
    assert store.fingerprint == corpus_fingerprint(items, embedder)
    np.testing.assert_array_equal(store.embeddings, embedder.embed_items(items))
    built = CorpusStore.build(items, str(tmp_path / "built"))
    assert built.fingerprint == store.fingerprint
    assert _store_bytes(tmp_path / "store") == _store_bytes(tmp_path / "built")
    for item in items[::7] + [item for item in items if item.modality != "text"]:
        loaded = store.load_item(item.item_id)
        assert (loaded.text, loaded.timestamps) == (item.text, item.timestamps)
        np.testing.assert_array_equal(loaded.pixels, item.pixels)
    assert sorted(os.listdir(tmp_path)) == ["built", "items.jsonl", "store"]


class _FailingEmbedder(HashingEmbedder):
    """Fails on its third batch: an error found only after many items were written."""

    calls = 0

    def embed_items(self, items):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("the embedder ran out of memory")
        return super().embed_items(items)


def test_late_errors_leave_no_store_and_keep_an_old_one(many, tmp_path):
    rows = many["rows"]
    bad_json = _write_jsonl(tmp_path / "bad.jsonl", rows[:289] + ["{not json", *rows[289:]])
    missing = [*rows[:294], {**rows[3], "id": 5000, "path": "absent.png"}, *rows[294:]]
    bad_media = _write_jsonl(tmp_path / "missing.jsonl", missing)
    for path, line, problem in [
        (bad_json, 290, "malformed JSON"),
        (bad_media, 295, "image file .*absent.png.* does not exist"),
    ]:
        with pytest.raises(CorpusImportError, match=f"^{re.escape(str(path))}:{line}: {problem}"):
            import_corpus(path, tmp_path / "store", media_root=many["root"], embed_batch=8)
    with pytest.raises(RuntimeError, match="ran out of memory"):
        import_corpus(
            _write_jsonl(tmp_path / "ok.jsonl", rows),
            tmp_path / "store",
            media_root=many["root"],
            embedder=_FailingEmbedder(),
            embed_batch=8,
        )
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "missing.jsonl", "ok.jsonl"]
    old = import_corpus(tmp_path / "ok.jsonl", tmp_path / "store", media_root=many["root"])
    before = _store_bytes(tmp_path / "store")
    with pytest.raises(CorpusImportError, match=":290: malformed JSON"):
        import_corpus(bad_json, tmp_path / "store", media_root=many["root"], overwrite=True)
    assert _store_bytes(tmp_path / "store") == before
    assert CorpusStore.open(str(tmp_path / "store")).fingerprint == old.fingerprint
    assert "store" in os.listdir(tmp_path) and len(os.listdir(tmp_path)) == 4


# -- videos at any frame rate -------------------------------------------------------------------


def _reference_resample(times: list[float]) -> list[int] | None:
    """Loop-level reference of the 1 fps rule: for each second from round(first) to round(last)
    the frame nearest to it (ties: the earlier); None when a second has no frame rounding to it."""
    seconds = range(round(times[0]), round(times[-1]) + 1)
    if any(all(round(t) != s for t in times) for s in seconds):
        return None
    return [min(range(len(times)), key=lambda j: (abs(times[j] - s), j)) for s in seconds]


@st.composite
def _frame_times(draw) -> list[float]:
    kind = draw(st.sampled_from(["gaps", "ticks", "covered", "fps"]))
    if kind == "gaps":
        start = draw(st.floats(0, 4))
        gaps = draw(st.lists(st.floats(0.01, 1.6), max_size=40))
        return list(itertools.accumulate(gaps, initial=start))
    if kind == "ticks":  # halves and quarters: many exact ties between two frames
        per_second = draw(st.sampled_from([2, 4]))
        ticks = draw(
            st.lists(st.integers(0, 12 * per_second), min_size=1, max_size=30, unique=True)
        )
        return [tick / per_second for tick in sorted(ticks)]
    if kind == "covered":  # every second has frames, often two equally near ones
        times: set[float] = set()
        for second in range(draw(st.integers(1, 12))):
            near = [-0.25, 0.0, 0.25] + ([-0.5, 0.5] if second % 2 == 0 else [])  # round to it
            offsets = draw(st.sets(st.sampled_from(near), min_size=1))
            times |= {second + offset for offset in offsets if second + offset >= 0}
        return sorted(times) or [0.0]
    fps = draw(st.floats(0.4, 60))
    return [i / fps for i in range(draw(st.integers(1, 120)))]


@given(times=_frame_times())
def test_resampling_keeps_the_nearest_frame_of_every_second(times):
    assert VIDEO_FPS == 1.0  # the reference works in seconds
    want = _reference_resample(times)
    if want is None:
        with pytest.raises(ValueError, match="no frame in second .* sparser than 1 fps"):
            resample_to_grid(times)
        return
    kept, stored = resample_to_grid(times)
    assert list(kept) == want
    first = round(times[0])
    assert [round(times[k]) for k in kept] == list(range(first, first + len(kept)))
    if all(round(t) == i for i, t in enumerate(times)):  # already at 1 fps: stored as given
        assert stored == tuple(times)
    else:
        assert stored == tuple(float(i) for i in range(len(kept)))


def test_resampling_hand_checked_cases():
    assert resample_to_grid([0.0, 1.1, 2.2]) == ((0, 1, 2), (0.0, 1.1, 2.2))  # as before
    assert resample_to_grid([i / 30 for i in range(61)]) == ((0, 30, 60), (0.0, 1.0, 2.0))
    # 89 frames at 30 fps end at 2.93 s, which rounds to second 3: its nearest frame is the last.
    assert resample_to_grid([i / 30 for i in range(89)])[0] == (0, 30, 60, 88)
    # Second 2 lies half-way between 1.5 and 2.5 (both round to 2): the earlier frame wins.
    assert resample_to_grid([0, 1, 1.5, 2.5, 3]) == ((0, 1, 2, 4), (0.0, 1.0, 2.0, 3.0))
    # A clip starting at 5 s is stored from 0 s: stored frame i is second i.
    assert resample_to_grid([5.0, 6.2, 7.1]) == ((0, 1, 2), (0.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="no frame in second 1 .* at 0 s and 2 s"):
        resample_to_grid([0, 2, 4])  # 0.5 fps


def test_a_30fps_video_is_imported_at_1fps_decoding_only_the_kept_frames(tmp_path):
    (tmp_path / "clip").mkdir()
    for i in range(89):
        path = tmp_path / "clip" / f"{i:03d}.png"
        if i % 30 and i != 88:  # dropped frames are never opened: these are not even images
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(np.full((2, 2, 3), i, np.uint8)).save(path)
    row = {**VIDEO_ROW, "path": "clip", "fps": 30}
    (item,) = read_items(_write_jsonl(tmp_path / "items.jsonl", [row]))
    assert item.timestamps == (0.0, 1.0, 2.0, 3.0)
    assert item.pixels[:, 0, 0, 0].tolist() == [0, 30, 60, 88]
    starts_late = {**VIDEO_ROW, "path": "clip", "timestamps": [5 + i / 30 for i in range(89)]}
    (item,) = read_items(_write_jsonl(tmp_path / "late.jsonl", [starts_late]))
    assert item.timestamps == (0.0, 1.0, 2.0, 3.0)
    assert item.pixels[:, 0, 0, 0].tolist() == [0, 30, 60, 88]  # 5, 6, 7 and 7.93 s
