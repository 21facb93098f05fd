"""The rollout worker CLI, run as a subprocess: shards written atomically, restarts that continue
the sequence, clean SIGTERM, and the tiny random model end to end."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vimrag_jax.rollout.records import list_shards, read_shard, validate_record
from vimrag_jax.rollout.worker import next_sequence, questions_for_batch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import ggpo  # noqa: E402


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "small.py"
    path.write_text(
        textwrap.dedent(
            f"""
            import importlib.util

            _spec = importlib.util.spec_from_file_location("ggpo", "{REPO / "configs/ggpo.py"}")
            _ggpo = importlib.util.module_from_spec(_spec)
            _spec.loader.exec_module(_ggpo)


            def get_config(arg=None):
                # ":model" samples few tokens (a random model rarely stops); scripts need more.
                c = _ggpo.get_config()
                c.model.name = "tiny"
                c.data.max_segment_tokens = 2048
                c.rollout.group_size = 2
                c.rollout.questions_per_batch = 2
                c.rollout.max_new_tokens = 12 if arg == "model" else 320
                c.rollout.max_model_calls = 12
                c.env.update(num_entities=12, num_questions=24, eval_questions=4, max_hops=2)
                return c
            """
        )
    )
    return path


def _worker(config_file, workdir, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    command = [
        sys.executable,
        "-m",
        "vimrag_jax.rollout.worker",
        f"--config={config_file}",
        f"--workdir={workdir}",
        *args,
    ]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _records(directory):
    out = []
    for path in list_shards(directory):
        records = list(read_shard(path))
        assert records
        for record in records:
            validate_record(record)
        out.append((path.name, records))
    return out


def _wait_for_shard(directory, process, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not list_shards(directory):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no shard published in time"
        time.sleep(0.1)


def _check_groups(records, group_size):
    for start in range(0, len(records), group_size):
        group = records[start : start + group_size]
        assert {r["group_id"] for r in group} == {group[0]["group_id"]}
        assert {r["question_id"] for r in group} == {group[0]["question_id"]}
        assert all(r["group_size"] == group_size for r in group)


def test_sigkill_leaves_no_partial_shard_and_restart_continues(config_file, tmp_path):
    directory = tmp_path / "rollouts"
    process = _worker(config_file, tmp_path, "--policy=scripted_expert")
    _wait_for_shard(directory, process)
    process.kill()
    process.wait()
    before = _records(directory)  # every visible shard is whole and readable
    assert before and all(name.startswith("w0-") for name, _ in before)
    last = next_sequence(directory, "w0")
    process = _worker(config_file, tmp_path, "--policy=scripted_expert", "--max_trajectories=4")
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    after = _records(directory)
    new = [name for name, _ in after if name not in dict(before)]
    assert new == [f"w0-{last:08d}.array_record"]
    for _, records in after:
        _check_groups(records, 2)
        assert all(r["reward"] == 1.0 and r["policy_version"] == 0 for r in records)


def test_sigterm_finishes_the_shard_and_exits_cleanly(config_file, tmp_path):
    directory = tmp_path / "rollouts"
    process = _worker(config_file, tmp_path, "--policy=scripted_noisy", "--worker_id=noisy")
    _wait_for_shard(directory, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "stopped after" in output
    shards = _records(directory)
    assert [name for name, _ in shards] == [
        f"noisy-{i:08d}.array_record" for i in range(len(shards))
    ]
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]


def test_model_worker_writes_readable_shards(config_file, tmp_path):
    process = _worker(f"{config_file}:model", tmp_path, "--max_trajectories=2")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    ((name, records),) = _records(tmp_path / "rollouts")
    assert name == "w0-00000000.array_record" and len(records) == 2
    _check_groups(records, 2)
    assert "generated tokens/s" in output and "invalid-action rate" in output
    # The experiment was cached in the workdir for the next process.
    assert (tmp_path / "corpus" / "manifest.json").is_file()
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()


def test_question_stream_is_deterministic_and_cycles():
    questions = list(range(5))
    first = questions_for_batch(questions, "w0", 0, 0, 12)
    assert first == questions_for_batch(questions, "w0", 0, 0, 12)
    assert sorted(first[:5]) == questions and sorted(first[5:10]) == questions
    assert first[3:7] == questions_for_batch(questions, "w0", 0, 3, 4)
    assert first != questions_for_batch(questions, "w1", 0, 0, 12)


def test_experiment_loads_published_weights(tmp_path):
    import jax
    from flax import nnx

    from vimrag_jax import publish
    from vimrag_jax.experiment import Experiment

    cfg = ggpo.get_config()
    cfg.model.name = "tiny"
    cfg.data.max_segment_tokens = 2048
    cfg.env.update(num_entities=12, num_questions=8, eval_questions=2)
    experiment = Experiment.from_config(cfg, tmp_path)
    assert len(experiment.train_questions) == 6 and len(experiment.eval_questions) == 2
    model = experiment.initial_model()
    assert experiment.load_latest(model) is None  # nothing published: version 0 stays
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    shifted = jax.tree.map(lambda x: x + 1.0, params)
    publish.publish_policy(shifted, tmp_path, version=3)
    assert experiment.load_latest(model, newer_than=3) is None
    assert experiment.load_latest(model) == 3
    loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(shifted), strict=True):
        assert (a == b).all()
    assert experiment.sft_questions == experiment.train_questions  # no warm-start split
    # A second bootstrap reuses the cached corpus and tokenizer; it may split off the warm
    # start's questions (the first ones), leaving the RL split the rest.
    cfg.env.sft_questions = 4
    again = Experiment.from_config(cfg, tmp_path)
    assert again.store.reused and again.tokenizer.get_vocab() == experiment.tokenizer.get_vocab()
    assert again.sft_questions == experiment.train_questions[:4]
    assert again.train_questions == experiment.train_questions[4:]
    assert again.eval_questions == experiment.eval_questions
    cfg.env.sft_questions = 6
    with pytest.raises(ValueError, match="env.sft_questions=6 must leave RL questions"):
        Experiment.from_config(cfg, tmp_path)


def _throttled_config():

    cfg = ggpo.get_config()
    cfg.model.name = "tiny"
    cfg.data.max_segment_tokens = 2048
    cfg.rollout.group_size = 2
    cfg.rollout.questions_per_batch = 1
    cfg.rollout.max_new_tokens = 12
    cfg.rollout.max_model_calls = 4
    cfg.rollout.max_shards_per_version = 1
    cfg.env.update(num_entities=12, num_questions=24, eval_questions=4, max_hops=2)
    return cfg


@pytest.mark.parametrize("publish_newer", [True, False])
def test_throttled_worker_waits_for_a_newer_policy(tmp_path, monkeypatch, caplog, publish_newer):
    # One shard per version: the second shard waits for v1 (published once the first shard
    # exists), or, when none comes, is written anyway after THROTTLE_MAX_WAIT_S.
    import threading

    from flax import nnx

    from vimrag_jax import publish
    from vimrag_jax.experiment import Experiment
    from vimrag_jax.rollout import worker

    monkeypatch.setattr(worker, "THROTTLE_MAX_WAIT_S", 120.0 if publish_newer else 0.5)
    cfg = _throttled_config()
    directory = tmp_path / "rollouts"

    def publish_after_first_shard():
        while not list_shards(directory):
            time.sleep(0.05)
        model = Experiment.from_config(cfg, tmp_path).initial_model()
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        publish.publish_policy(params, tmp_path, version=1)

    publisher = threading.Thread(target=publish_after_first_shard, daemon=True)
    if publish_newer:
        publisher.start()
    with caplog.at_level("INFO"):
        written = worker.run_worker(cfg, str(tmp_path), worker_id="w0", policy="model",
                                    max_trajectories=4)  # fmt: skip
    assert written == 4
    versions = [[r["policy_version"] for r in records] for _, records in _records(directory)]
    assert versions == ([[0, 0], [1, 1]] if publish_newer else [[0, 0], [0, 0]])
    assert "shards of policy v0 written (rollout.max_shards_per_version)" in caplog.text
