"""Benchmark evaluation (`vimrag_jax.benchmarks.evaluate`, `table`, `paper`) on a tiny store.

Three benchmarks (HotpotQA, SQuAD and SlideVQA, whose slides are made here) are built from the
fixtures and merged by the corpus command, then evaluated with the scripted oracle policies (no
model): rows per benchmark with EM/F1 and the paper's numbers beside ours, repeated searches,
resuming after a partial run and a torn line, the merged table and its plot, the errors, and a
policy restored from an orbax checkpoint into an 8-device mesh.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from vimrag_jax.agent.episode import Episode, Turn
from vimrag_jax.agent.protocol import Action
from vimrag_jax.benchmarks import corpus, evaluate, paper, table
from vimrag_jax.benchmarks.build import build
from vimrag_jax.envs.dataset import DatasetQuestion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import ggpo  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
DECK = "2012-02-20fy11roadshow-120221022442-phpapp02_95"
NAMES = ("hotpotqa", "squad", "slidevqa")


def _config():
    cfg = ggpo.get_config()
    cfg.env.update(num_entities=12, num_questions=10, eval_questions=2)
    cfg.data.max_segment_tokens = 8192  # HotpotQA paragraphs in the tiny BPE's tokens
    cfg.rollout.max_model_calls = 8
    return cfg


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unified store of the three benchmarks, built by the corpus command."""
    root = tmp_path_factory.mktemp("bench")
    data_dir, raw = root / "tfds", {}
    for name in NAMES:
        build(name, manual_dir=FIXTURES / name, data_dir=data_dir, log=lambda _: None)
        raw[name] = root / "raw" / name
        shutil.copytree(FIXTURES / name, raw[name])
    slides = raw["slidevqa"] / "images" / "test" / DECK
    slides.mkdir(parents=True)
    for page in range(1, 21):
        Image.new("RGB", (40, 30), (page * 10, 0, 0)).save(slides / f"slide-{page}-1024.jpg")
    out = root / "store"
    argv = [f"--data_dir={data_dir}", f"--out={out}", f"--benchmarks={','.join(NAMES)}"]
    argv += ["--raw=" + ",".join(f"{n}={raw[n]}" for n in NAMES), "--workers=1"]
    assert corpus.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def run(store: Path, tmp_path_factory: pytest.TempPathFactory):
    """The oracle (vimrag agent) on every benchmark, and the workdir with its logs."""
    workdir = tmp_path_factory.mktemp("work")
    lines: list[str] = []
    request = evaluate.Request(store=str(store), policy="scripted_expert", batch_size=4)
    summary = evaluate.evaluate_benchmarks(_config(), workdir, request, log=lines.append)
    return workdir, summary, lines


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_repeated_searches_count_normalised_repeats_of_one_episode() -> None:
    assert evaluate.repeated_searches(["Who is X?", "who is x", "The city of Y", "city of y!"]) == 2
    assert evaluate.repeated_searches(["x y", "y x", "x  y"]) == 1  # order matters
    question = DatasetQuestion("q", "Who?", "Ann", (), 1, ())
    episode = Episode(question, "g", 0, "g/0")

    def search(query: str, error: str | None = None) -> Turn:
        return Turn("", Action("search", {"id": "s", "parent_ids": ["root"], "query": query}),
                    error, "")  # fmt: skip

    episode.turns = [
        search("Where was Ann born?"),
        Turn("", Action("memorize", {"summarize": "", "memorize": []}), None, ""),
        search("where was ann born", error="search twice in a row"),  # rejected: no retrieval
        search("WHERE was Ann born"),
        search("Ann's birthplace"),
        search("where was  ann born ?"),
    ]
    assert evaluate.episode_searches(episode) == [
        "Where was Ann born?", "WHERE was Ann born", "Ann's birthplace", "where was  ann born ?"
    ]  # fmt: skip
    result = evaluate.episode_result(episode, "hotpotqa", reward=0.0)
    assert (result["searches"], result["repeated_searches"]) == (4, 2)
    assert (result["em"], result["f1"], result["answered"]) == (0.0, 0.0, False)


def test_rows_per_benchmark_with_em_f1_and_the_papers_numbers(run, store: Path) -> None:
    workdir, summary, lines = run
    files = evaluate.question_files(store)
    assert sorted(files) == sorted(NAMES)
    assert summary["splits"] == {
        "hotpotqa": "validation",
        "squad": "validation",
        "slidevqa": "test",
    }
    out = workdir / "eval" / "vimrag"
    for label in NAMES:
        questions = files[label][summary["splits"][label]].read_text().splitlines()
        rows = _rows(out / label / evaluate.EPISODES_FILE)
        assert len(rows) == len(questions) == summary["benchmarks"][label]["questions"]
        assert all({"em", "f1", "reward", "tokens", "visual_tokens"} <= set(r) for r in rows)
        assert any(line.startswith(f"{label}: {len(rows)}/{len(rows)} episodes") for line in lines)
        assert list(out.joinpath(label).glob("batch-*.array_record"))
        row = summary["benchmarks"][label]
        assert row["paper_accuracy"] == paper.ACCURACY["qwen3-vl-8b"]["vimrag"][label]
        assert row["model_calls"] >= 3 and row["searches"] >= 1  # search, memorize, answer
    # The oracle answers the gold answer: EM and F1 are 100 wherever it answered.
    overall = summary["overall"]
    assert overall["em"] == overall["accuracy"] == overall["answered"] == 100.0
    assert overall["f1"] == pytest.approx(100.0) and overall["repeated_searches"] == 0
    assert summary["benchmarks"]["slidevqa"]["visual_tokens"] > 0  # slides kept in memory
    assert summary["benchmarks"]["hotpotqa"]["visual_tokens"] == 0
    assert overall["paper_accuracy"] == 50.1 and not overall["paper_comparable"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["benchmarks"]["hotpotqa"]["paper_accuracy"] == 79.1
    with open(out / "results.csv") as handle:
        table_rows = list(csv.DictReader(handle))
    assert [r["benchmark"] for r in table_rows] == [*NAMES, "overall", "macro"]
    assert float(table_rows[0]["paper"]) == 79.1 and float(table_rows[0]["Δ"]) == 100 - 79.1
    assert {"EM", "F1", "tokens/traj", "repeated searches"} <= set(table_rows[0])
    assert table_rows[3]["paper"] == "50.1" and table_rows[3]["Δ"] == ""  # 3 of 9 benchmarks
    assert "| hotpotqa | validation |" in (out / "results.md").read_text()


def test_a_partial_run_is_resumed_without_redoing_episodes(run, store: Path) -> None:
    workdir, _, _ = run
    cfg = _config()
    request = evaluate.Request(
        benchmarks="squad,hotpotqa", agent="react", store=str(store), policy="scripted_noisy",
        num_questions=3, batch_size=2,
    )  # fmt: skip
    expert = evaluate.Request(**{**vars(request), "policy": "scripted_expert", "num_questions": 1})
    evaluate.evaluate_benchmarks(cfg, workdir, expert, log=lambda _: None)
    first: list[str] = []
    evaluate.evaluate_benchmarks(cfg, workdir, request, log=first.append)
    assert "squad: 3 questions, 0 already done" in first  # another policy's episode is not reused
    episodes = workdir / "eval" / "react" / "squad" / evaluate.EPISODES_FILE
    before = episodes.read_text()
    assert len(before.splitlines()) == 1 + 3
    with open(episodes, "a") as handle:
        handle.write('{"id": "torn')  # a kill in the middle of an append
    again: list[str] = []
    summary = evaluate.evaluate_benchmarks(
        cfg, workdir, evaluate.Request(**{**vars(request), "num_questions": 0}), log=again.append
    )
    assert "squad: 8 questions, 3 already done" in again
    rows = _rows(episodes)[1:]  # after the expert's episode
    assert episodes.read_text().startswith(before) and len(rows) == 8
    assert len({r["id"] for r in rows}) == 8 and len({r["run"] for r in rows}) == 1
    assert summary["benchmarks"]["squad"]["questions"] == 8
    # The noisy oracle repeats its search in about half the episodes and errs in some.
    overall = summary["overall"]
    assert overall["repeated_searches"] > 0 and 0 < overall["repeated_share"] <= 50
    assert all(r["repeated_searches"] == len(r["queries"]) - 1 for r in rows)
    assert overall["accuracy"] < 100 and overall["accuracy"] == overall["em"]
    assert summary["benchmarks"]["squad"]["paper_accuracy"] == 65.5  # the paper's ReAct
    # A third run has nothing left to do.
    third: list[str] = []
    evaluate.evaluate_benchmarks(
        cfg, workdir, evaluate.Request(**{**vars(request), "num_questions": 0}), log=third.append
    )
    assert "squad: 8 questions, 8 already done" in third
    assert not [line for line in third if "episodes, accuracy" in line]


class FakeJudge:
    """Grades like exact match, but cannot grade SQuAD's question 0 (a failed request)."""

    def __init__(self):
        self.asked = 0

    def verdicts(self, requests):
        self.asked += len(requests)
        return [
            None if "Super Bowl 50" in r.question and "AFC" in r.question
            else r.prediction in r.references
            for r in requests
        ]  # fmt: skip


def test_judged_accuracy_counts_failures_with_em_and_f1_beside(run, store: Path) -> None:
    workdir, _, _ = run
    cfg = _config()
    cfg.rollout.reward_metric = "judge"
    judge = FakeJudge()
    request = evaluate.Request(
        benchmarks="squad", agent="summary", store=str(store), policy="scripted_expert"
    )
    summary = evaluate.evaluate_benchmarks(cfg, workdir, request, judge=judge, log=lambda _: None)
    row = summary["benchmarks"]["squad"]
    assert judge.asked == row["questions"] == 8 and row["judge_failures"] == 1
    assert row["accuracy"] == 100 * 7 / 8 and row["em"] == row["f1"] == 100.0
    text = (workdir / "eval" / "summary" / "results.md").read_text()
    assert "judge failures" in text and "reward_metric = judge" in text
    assert row["paper_accuracy"] is None  # the paper has no summary-agent row


def test_merged_table_and_plot_of_every_agent(run, store: Path, tmp_path: Path) -> None:
    workdir, _, _ = run
    eval_dir = workdir / "eval"
    if not (eval_dir / "react" / "results.json").is_file():  # when run alone
        request = evaluate.Request(benchmarks="squad", agent="react", store=str(store),
                                   policy="scripted_noisy")  # fmt: skip
        evaluate.evaluate_benchmarks(_config(), workdir, request, log=lambda _: None)
    done = subprocess.run(
        [sys.executable, "-m", "vimrag_jax.benchmarks.table", f"--eval_dir={eval_dir}",
         f"--out={tmp_path}"], capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "results.md").read_text()
    assert text.strip() in done.stdout
    assert "| vimrag | ours: scripted_expert | 100.0 |" in text
    assert "| react | ours: scripted_noisy |" in text
    assert "| vimrag | paper (qwen3-vl-8b) | 79.1 | 76.4 | 62.4 | 50.1 |" in text
    assert "| mem1 | paper (qwen3-vl-8b) | 73.0 | 68.4 | 55.7 | 43.6 |" in text
    assert "repeated searches" in text
    png = (tmp_path / table.PLOT_FILE).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert (tmp_path / "results.csv").read_text().startswith("method,source,HotpotQA,SQuAD")
    empty = table.main([f"--eval_dir={tmp_path / 'nothing'}"])
    assert empty == 2


def test_clear_errors_for_unknown_names_and_missing_question_files(store: Path, tmp_path) -> None:
    with pytest.raises(evaluate.EvalError, match="unknown benchmark 'nope'"):
        evaluate.select_benchmarks("hotpotqa,nope", store)
    with pytest.raises(evaluate.EvalError, match="no test question file for hotpotqa.*validation"):
        evaluate.select_benchmarks("hotpotqa", store, "test")
    with pytest.raises(evaluate.EvalError, match="no test or validation question file for lvbench"):
        evaluate.select_benchmarks("lvbench", store)
    with pytest.raises(evaluate.EvalError, match="no questions/ directory"):
        evaluate.select_benchmarks("all", tmp_path)
    cfg = _config()
    with pytest.raises(evaluate.EvalError, match="unknown agent 'rag'"):
        evaluate.check_request(evaluate.Request(agent="rag", store=str(store)), cfg)
    with pytest.raises(evaluate.EvalError, match="pass --store"):
        evaluate.check_request(evaluate.Request(), cfg)
    done = subprocess.run(
        [sys.executable, "-m", "vimrag_jax.eval", "--config=configs/ggpo.py",
         f"--workdir={tmp_path}", "--benchmarks=squad,nope", f"--store={store}"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert "eval: error: EvalError: unknown benchmark 'nope'" in done.stderr


def test_policy_restored_from_an_orbax_checkpoint_is_sharded_over_8_devices(run, store) -> None:
    from flax import nnx

    from vimrag_jax import checkpointing, publish
    from vimrag_jax.experiment import Experiment
    from vimrag_jax.parallel import mesh as mesh_lib
    from vimrag_jax.parallel import step

    workdir, _, _ = run
    experiment = Experiment.from_config(_config(), workdir)
    optimizer = optax.sgd(1e-3)  # the optimizer state is never read back by the eval
    saving_mesh = mesh_lib.make_mesh(2, 4, 1)
    _, state, _ = step.create_train_state(experiment.initial_model, optimizer, saving_mesh)
    with checkpointing.Checkpointer(workdir, every_steps=1, keep=2, async_save=False) as saver:
        saver.save(5, state, metadata={"policy_version": 3}, force=True)
    mesh = mesh_lib.make_mesh(1, 8, 1)
    model, label, version = evaluate.load_policy(experiment, "auto", mesh)
    assert (label, version) == (f"checkpoint {workdir / 'checkpoints' / '5'}", 3)
    params = nnx.state(model, nnx.Param)
    saved = jax.tree.leaves(state.params)
    leaves = jax.tree.leaves(params)
    assert len(leaves) == len(saved)
    for got, want in zip(leaves, saved, strict=True):
        assert got.sharding.mesh.devices.size == 8
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    split = [x for x in leaves if not x.sharding.is_fully_replicated]
    assert split, "no parameter is sharded over the mesh"
    big = max(split, key=lambda x: x.size)
    assert big.addressable_shards[0].data.size * 8 == big.size  # one eighth per device
    with pytest.raises(evaluate.EvalError, match="no checkpoint of step 7"):
        evaluate.load_policy(experiment, "7", mesh)
    # A published version goes into the same shardings.
    publish.publish_policy(nnx.to_pure_dict(state.params), workdir, version=4)  # as the learner
    model, label_v4, version = evaluate.load_policy(experiment, "published", mesh)
    assert (label_v4, version) == ("published v4", 4)
    published = jax.tree.leaves(nnx.state(model, nnx.Param))
    for got, restored, want in zip(published, leaves, saved, strict=True):
        assert got.sharding == restored.sharding  # as the checkpoint's restore placed them
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The evaluation as its own job: that checkpoint, sharded, through the embedded sampler.
    cfg = _config()
    cfg.mesh.update(data=1, fsdp=8)
    cfg.rollout.update(max_model_calls=1, max_new_tokens=8)
    request = evaluate.Request(benchmarks="squad", agent="mem1", num_questions=1, checkpoint="5")
    request.store = str(store)
    summary = evaluate.evaluate_benchmarks(cfg, workdir, request, log=lambda _: None)
    assert summary["policy"] == label and summary["policy_version"] == 3
    assert summary["overall"]["questions"] == summary["overall"]["model_calls"] == 1
    assert 0 < summary["overall"]["generated_tokens"] <= 8
