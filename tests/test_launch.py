"""Launchers: shell syntax, the commands each dry run prints, and the sweep runner."""

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("common.sh", "local.sh", "tpu_pod.sh", "slurm_gpu.sbatch")


def _load_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"launch_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _load_file(ROOT / "launch" / "sweep.py")


def _dry_run(script: str, *args: str, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environ.update(DRY_RUN="1", **env)
    result = subprocess.run(
        ["bash", f"launch/{script}", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_syntax(script):
    result = subprocess.run(["bash", "-n", f"launch/{script}"], cwd=ROOT, capture_output=True)
    assert result.returncode == 0, result.stderr


def test_local_dry_run_starts_workers_then_the_learner():
    lines = _dry_run(
        "local.sh",
        "--config.seed=3",
        WORKDIR="/tmp/w",
        NUM_WORKERS="2",
        WORKER_FLAGS="--max_trajectories=8",
        CONFIG="configs/ggpo.py:tiny,gspo",
    )
    worker = (
        "python -m vimrag_jax.rollout.worker --config=configs/ggpo.py:tiny,gspo --workdir=/tmp/w "
        "--worker_id=local{0} --max_trajectories=8 --config.seed=3 "
        "> /tmp/w/logs/worker_{0}.log 2>&1 &"
    )
    assert lines == [
        worker.format(0),
        worker.format(1),
        "python -m vimrag_jax.train --config=configs/ggpo.py:tiny,gspo --workdir=/tmp/w "
        "--config.rollout.embedded_workers=0 --config.seed=3",
    ]


def test_local_rejects_a_bad_worker_count():
    result = subprocess.run(
        ["bash", "launch/local.sh"],
        cwd=ROOT,
        env=dict(os.environ, DRY_RUN="1", NUM_WORKERS="two"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "NUM_WORKERS must be a number" in result.stderr


def test_tpu_pod_dry_run():
    lines = _dry_run(
        "tpu_pod.sh",
        "--config.model.path=/mnt/m",
        TPU_NAME="pod",
        ZONE="us-east5-a",
        WORKDIR="/mnt/run",
        ROLLOUT_VMS="g1 g2",
        WORKERS_PER_VM="2",
    )
    text = "\n".join(lines)
    assert lines[0].startswith("tar czf /tmp/vimrag_jax_src.tgz --exclude=.venv")
    assert "gcloud compute tpus tpu-vm scp /tmp/vimrag_jax_src.tgz pod:/tmp/" in text
    assert sum("rollout.worker" in line for line in lines) == 4  # 2 VMs x 2 workers
    ids = [re.search(r"--worker_id=(\S+)", line).group(1) for line in lines if "worker_id" in line]
    assert ids == ["g1-w0", "g1-w1", "g2-w0", "g2-w1"]  # distinct: no shard name collides
    assert sum("pip install --quiet" in line for line in lines) == 1  # jax[tpu] on the pod
    learner = lines[-1]
    assert learner.startswith("gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a --worker=all")
    for part in (
        "python -m vimrag_jax.train --config=configs/ggpo.py:qwen3vl_8b --workdir=/mnt/run",
        "--config.distributed.enabled=True",
        "--config.rollout.embedded_workers=0 --config.model.path=/mnt/m",
    ):
        assert part in learner
    only_train = _dry_run("tpu_pod.sh", TPU_NAME="p", ZONE="z", WORKDIR="/w", STAGES="train")
    assert len(only_train) == 1 and "vimrag_jax.train" in only_train[0]


def test_tpu_pod_needs_its_variables():
    result = subprocess.run(
        ["bash", "launch/tpu_pod.sh"],
        cwd=ROOT,
        env=dict(os.environ, DRY_RUN="1"),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "set TPU_NAME" in result.stderr


def test_slurm_dry_run_splits_nodes_between_learner_and_workers():
    lines = _dry_run(
        "slurm_gpu.sbatch",
        "--config.seed=1",
        SLURM_JOB_NUM_NODES="3",
        SLURM_JOB_ID="42",
        LEARNER_NODES="2",
        WORKERS_PER_NODE="4",
        WORKDIR="/shared/r",
        PYTHON="python",
    )
    assert lines == [
        "srun --nodes=1 --relative=2 --ntasks=4 --ntasks-per-node=4 --gpus-per-task=1 "
        "--kill-on-bad-exit=0 python -m vimrag_jax.rollout.worker "
        "--config=configs/ggpo.py:qwen3vl_8b --workdir=/shared/r --worker_id=slurm "
        "--worker_id_env=SLURM_PROCID --config.seed=1 "
        "> /shared/r/logs/workers_42.log 2>&1 &",
        "srun --nodes=2 --relative=0 --ntasks=2 --ntasks-per-node=1 --gpus-per-node=8 "
        "--kill-on-bad-exit=1 python -m vimrag_jax.train --config=configs/ggpo.py:qwen3vl_8b "
        "--workdir=/shared/r --config.distributed.enabled=True "
        "--config.rollout.embedded_workers=0 --config.seed=1",
    ]
    learner_only = _dry_run("slurm_gpu.sbatch", SLURM_JOB_NUM_NODES="2", LEARNER_NODES="2")
    assert len(learner_only) == 1 and "vimrag_jax.train" in learner_only[0]


def test_sweep_expands_algorithm_by_seed():
    runs = sweep.load_sweep("configs/sweeps/ggpo_vs_gspo.py:qwen3vl_2b,seeds=2")
    lines = sweep.commands(runs, "/runs", ["--config.optim.total_steps=5"], python="python")
    assert [" ".join(line) for line in lines] == [
        f"python -m vimrag_jax.train --config=configs/ggpo.py:qwen3vl_2b,{algo} "
        f"--workdir=/runs/{algo}_seed{seed} --config.seed={seed} --config.optim.total_steps=5"
        for algo in ("ggpo", "gspo")
        for seed in (0, 1)
    ]
    assert len(sweep.load_sweep("configs/sweeps/ggpo_vs_gspo.py")) == 6  # tiny, 3 seeds
    with pytest.raises(ValueError, match="unknown preset"):
        sweep.load_sweep("configs/sweeps/ggpo_vs_gspo.py:huge")
    with pytest.raises(FileNotFoundError):
        sweep.load_sweep("configs/sweeps/nope.py")


def test_sweep_dry_run_prints_and_real_run_goes_in_order(monkeypatch, capsys):
    spec = "configs/sweeps/ggpo_vs_gspo.py:tiny,seeds=1"
    assert sweep.main([f"--sweep={spec}", "--workdir=/r", "--dry_run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[1].endswith("--workdir=/r/gspo_seed0 --config.seed=0")

    calls = []

    def fake_run(command, cwd, check):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1 if "ggpo_seed" in command[4] else 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    assert sweep.main([f"--sweep={spec}", "--workdir=/r"]) == 1  # stops at the failure
    assert len(calls) == 1
    assert sweep.main([f"--sweep={spec}", "--workdir=/r", "--keep_going"]) == 1
    assert len(calls) == 3 and "gspo_seed" in calls[-1][4]


def test_every_sweep_run_names_an_existing_config_file():
    for run in sweep.load_sweep("configs/sweeps/ggpo_vs_gspo.py"):
        path, _, arg = run["config"].partition(":")
        assert (ROOT / path).is_file(), path
        config = _load_file(ROOT / path).get_config(arg)
        assert run["name"] == f"{config.algorithm}_seed{run['overrides']['seed']}"


def test_one_launcher_line_starts_workers_with_distinct_ids():
    from absl import app

    from vimrag_jax.rollout.worker import worker_id

    ids = {worker_id("slurm", "SLURM_PROCID", {"SLURM_PROCID": str(i)}) for i in range(4)}
    assert ids == {"slurm0", "slurm1", "slurm2", "slurm3"}
    assert worker_id("w0", "", {}) == "w0"
    with pytest.raises(app.UsageError, match="SLURM_PROCID is not set"):
        worker_id("slurm", "SLURM_PROCID", {})
