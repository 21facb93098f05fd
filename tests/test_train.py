"""End to end: `python -m vimrag_jax.train` with the tiny config, a real worker, a restart."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import train_command

from vimrag_jax import train
from vimrag_jax.models import from_pretrained
from vimrag_jax.rollout.records import list_shards, read_shard


def _train(workdir: Path, total_steps: int, *overrides: str) -> subprocess.CompletedProcess:
    """The small run (the `smoke` preset; ``overrides`` replace its values)."""
    return train_command.run_train(workdir, total_steps, *overrides)


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    # publish.hf_layout=on: every version also in Hugging Face layout, as a server loads it.
    result = _train(workdir, 2, "--config.publish.hf_layout=on")
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, result


def test_warm_start_then_rl_with_a_worker(first_run):
    workdir, _ = first_run
    rows = _rows(workdir)
    assert [row["step"] for row in rows if "sft/loss" in row] == [1]
    rl = [row for row in rows if "loss" in row]
    assert [row["step"] for row in rl] == [2, 3]  # checkpoint steps continue after the warm start
    assert all(row["data/segments_emitted"] > 0 for row in rl)
    # The worker sampled the first RL batch with the published version 0, which is exactly the
    # learner's policy at its first update: the sampler and learner log-probs agree.
    assert rl[0]["logprob_gap"] < 1e-3
    assert json.loads((workdir / "phase.json").read_text())["phase"] == "rl"
    assert (
        sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1]
        == 3
    )
    assert list_shards(workdir / "sft_data") and list_shards(workdir / "rollouts")
    assert (workdir / "policy" / "LATEST").read_text().strip() == "2"
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    report = json.loads((workdir / "eval" / "eval-v00000002.json").read_text())
    assert report["episodes"] == 2 and 0.0 <= report["accuracy"] <= 1.0
    episodes = list(read_shard(workdir / "eval" / "episodes-v00000002.array_record"))
    assert [r["policy_version"] for r in episodes] == [2, 2]
    assert all(0.0 <= row["rollout_reward"] <= 1.0 for row in rl if "rollout_reward" in row)
    assert any("rollout_reward" in row for row in rl)
    assert any("eval/accuracy" in row for row in rows)
    served = from_pretrained(workdir / "policy" / "v00000002" / "hf")  # written by the learner
    assert (workdir / "policy" / "v00000002" / "hf" / "tokenizer.json").is_file()
    exported = from_pretrained(workdir / "export")  # the final policy as an HF checkpoint
    assert served.config.vocab_size == exported.config.vocab_size
    assert exported.config.vocab_size >= 13
    assert (workdir / "export" / "tokenizer.json").is_file()


def test_restart_resumes_rl_where_it_stopped(first_run):
    workdir, _ = first_run
    before = _rows(workdir)
    consumed_before = max(row["data/records_consumed"] for row in before if "loss" in row)
    result = _train(workdir, total_steps=3)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed RL at step 2, policy version 2" in result.stderr
    after = [row for row in _rows(workdir)[len(before) :] if "loss" in row or "sft/loss" in row]
    assert [row["step"] for row in after] == [4]  # no warm start again, one more RL step
    assert after[0]["data/records_consumed"] >= consumed_before  # the ledger moved on
    assert (workdir / "policy" / "LATEST").read_text().strip() == "3"


def test_a_learner_starved_of_trainable_groups_says_why(first_run, tmp_path):
    # The first run's rollouts (a random policy: every group got reward 0) read by a learner that
    # skips groups with one reward for all: nothing is trainable, and the exit says so.
    workdir, _ = first_run
    records = sum(len(list(read_shard(p))) for p in list_shards(workdir / "rollouts"))
    result = _train(
        tmp_path,
        1,
        "--config.sft.steps=0",
        "--config.rollout.embedded_workers=0",
        "--config.data.skip_uniform_groups=True",
        f"--config.data.shard_dir={workdir / 'rollouts'}",
        "--config.data.max_wait_s=1",
    )
    assert result.returncode == 3, result.stderr[-4000:]
    assert "no trainable rollout arrived" in result.stderr
    read = f"records read so far {records} (0 already stale), dropped: {records} in groups"
    assert read in result.stderr


def test_warm_start_data_without_a_segment_is_a_clear_exit(tmp_path):
    empty = tmp_path / "expert_shards"
    empty.mkdir()
    result = _train(tmp_path / "run", 1, f"--config.sft.data={empty}")
    assert result.returncode == 3, result.stderr[-4000:]
    assert "this process (process 0 of 1) found no warm-start segments" in result.stderr


def test_late_segments_are_dropped_before_the_update_and_an_empty_batch_is_skipped():
    batch = {
        "segment_valid": np.array([True, True, False]),
        "policy_version": np.array([1, 3, 0]),
        "tokens": np.zeros((3, 4), np.int32),
    }
    kept, late = train._without_late_segments(batch, 5, 2)  # lags 4 and 2 (padding row: 5)
    assert late == 1 and kept["segment_valid"].tolist() == [False, True, False]
    assert train._without_late_segments(batch, 6, 2) == (None, 2)  # nothing left to train
    kept, late = train._without_late_segments(batch, 3, 2)
    assert late == 0 and kept["segment_valid"].tolist() == [True, True, False]


def test_behavior_log_probs_warn_when_the_gap_exceeds_the_clip():
    from vimrag_jax.rl.losses import LossConfig, behavior_gap_warning

    behavior = LossConfig.for_algorithm("ggpo")  # old_logprobs="behavior", clip 3e-4 / 4e-4
    message = behavior_gap_warning({"logprob_gap": 5e-4}, behavior)
    assert message is not None and "more than the clip range (0.0003)" in message
    assert behavior_gap_warning({"logprob_gap": 2e-4}, behavior) is None
    assert behavior_gap_warning({}, behavior) is None
    recompute = LossConfig.for_algorithm("ggpo", old_logprobs="recompute")
    assert behavior_gap_warning({"logprob_gap": 1.0}, recompute) is None
