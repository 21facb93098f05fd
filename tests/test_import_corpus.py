"""A real corpus end to end: the JSON-lines import command, the question file loader, the config
checks for ``data.corpus`` / ``data.questions``, and ``Experiment.from_config`` plus a rollout
worker on the imported store. Everything is built in the test (no downloads)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vimrag_jax import config_checks
from vimrag_jax.envs.dataset import DatasetError, load_questions
from vimrag_jax.retrieval.corpus import CorpusStore
from vimrag_jax.retrieval.embedders import HashingEmbedder
from vimrag_jax.retrieval.import_corpus import (
    CorpusImportError,
    import_corpus,
    main,
    parse_embedder,
    read_items,
)

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
    "timestamps_off_the_1fps_grid": (
        [{**VIDEO_ROW, "timestamps": [0, 1.5, 3]}],
        1,
        "frame 1 is at 1.5 s: extract the video's frames at 1 fps",
    ),
    "timestamps_on_image": ([_row(timestamps=[0.0])], 1, "an image item has no 'timestamps'"),
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
    assert not (tmp_path / "store").exists()  # nothing written on bad input


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
    from vimrag_jax.agent.scripted_sampler import ScriptedSampler
    from vimrag_jax.experiment import Experiment
    from vimrag_jax.rollout.records import validate_record

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
    out = agent.run(
        [by_id["q4"], by_id["q6"]],  # about the picture 10 and the video 20
        group_size=2,
        policy_version=0,
        seed=0,
        group_ids=["g4", "g6"],
        env_name="dataset",
        worker_id="t",
    )
    assert len(out.records) == 4
    kept = {"q4": (10, [0]), "q6": (20, [1, 2])}  # the video's frames at key_timestamp 1.1, 2.2
    for record in out.records:
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
