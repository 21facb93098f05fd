"""End to end: the train command killed at one moment after another, restarted each time with
the same command, finishes with every RL update done once and policy versions only going up."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import train_command

from vimrag_jax import publish
from vimrag_jax.models import from_pretrained
from vimrag_jax.resume import EXPERT_DONE
from vimrag_jax.rollout.records import list_shards, read_shard
from vimrag_jax.timeline import load_timeline

TOTAL_STEPS = 4
# One warm-start step, then RL steps 2..5; a checkpoint every 2 steps (2 and 4) and at the end,
# written before the next step (so which one a kill falls back to is certain; a save cut short is
# `test_timeline.test_a_checkpoint_half_written_is_never_restored`); a version published after
# every update; expert data in two shards.
OVERRIDES = (
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.async_save=False",
    "--config.sft.num_trajectories=8",
    "--config.eval.at_end=True",
)


def _train(workdir: Path, kill_at: str = "") -> subprocess.CompletedProcess:
    return train_command.run_train(workdir, TOTAL_STEPS, *OVERRIDES, kill_at=kill_at)


def _killed(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == -signal.SIGKILL, result.stderr[-4000:]
    # Its embedded worker went with it (a restart reuses the worker id).
    for pid in re.findall(r"started rollout worker \S+ \(pid (\d+)\)", result.stderr):
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and "zombie" not in _status(pid):
            assert time.monotonic() < deadline, f"worker {pid} outlived the killed trainer"
            time.sleep(0.1)


def _status(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "zombie"


def _rl_steps(workdir: Path) -> list[int]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


def test_killed_at_every_phase_and_restarted_the_run_finishes_on_one_timeline(tmp_path):
    workdir = tmp_path / "run"

    # 1. Killed while the scripted expert writes the warm start's data (after its first shard).
    _killed(_train(workdir, "expert_data:0"))
    expert = workdir / "sft_data"
    assert len(list_shards(expert)) == 1 and not (expert / EXPERT_DONE).exists()

    # 2. Killed after RL step 4 (its version not yet published, its checkpoint not written):
    #    the last checkpoint is step 2, which had published version 1; version 2 is on disk.
    _killed(_train(workdir, "rl_step:4"))
    assert (expert / EXPERT_DONE).exists()  # the restart wrote only the missing trajectories
    assert sum(len(list(read_shard(p))) for p in list_shards(expert)) == 8
    assert publish.published_versions(workdir)[-1] == 2
    assert _rl_steps(workdir) == [2, 3]  # step 4 died before its metrics

    # 3. Killed half-way through publishing a version: restored at step 2 (version 1), version 2
    #    is lost and the run continues as version 3 (step 3 publishes 4, step 4 is cut short
    #    writing 5, whose temporary directory nobody ever reads).
    result = _train(workdir, "publish:5")
    _killed(result)
    assert "versions 2..2 were published after that checkpoint" in result.stderr
    assert list((workdir / publish.POLICY_DIR).glob(".tmp-v00000005-*"))
    assert publish.latest_policy(workdir)[0] == 4

    # 4. Killed while exporting, after the last update and checkpoint (the evaluation comes
    #    after the export): restored at step 2 again, versions 2..4 lost, continues as 5 (steps
    #    3, 4, 5 publish 6, 7, 8).
    result = _train(workdir, "export")
    _killed(result)
    assert "versions 2..4 were published after that checkpoint" in result.stderr
    assert not (workdir / "export").exists()  # never a partial export in its place
    assert not (workdir / "eval" / "eval-v00000008.json").exists()

    # 5. Restarted once more: nothing lost, nothing trained again; evaluates and exports.
    result = _train(workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "were published after that checkpoint" not in result.stderr

    timeline = load_timeline(workdir)
    assert timeline.lost == ((2, 2), (2, 4))
    assert [(r["restored_step"], r["resumed_as"]) for r in timeline.restores] == [(2, 3), (2, 5)]
    history = [entry["version"] for entry in publish.publication_history(workdir)]
    assert history == sorted(set(history)) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    # Every RL step on the surviving timeline exactly once: each restart re-did the steps after
    # its checkpoint, and the last run had nothing left to do.
    steps = _rl_steps(workdir)
    assert steps == [2, 3] + [3] + [3, 4, 5]  # runs 2, 3 and 4; run 5 had nothing left
    survivors = steps[:1] + steps[-3:]  # run 2 up to its checkpoint, then run 4
    assert survivors == [2, 3, 4, 5]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if "loss" in row][-1]
    assert last["policy_version"] == 8 and last["data/lost_records"] >= 0
    assert all(row["policy_lag"] >= 0 for row in rows if "policy_lag" in row)
    assert from_pretrained(workdir / "export").config.vocab_size >= 13
    assert not list(workdir.glob(".export-*"))
    assert json.loads((workdir / "eval" / "eval-v00000008.json").read_text())["episodes"] == 2
