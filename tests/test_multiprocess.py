"""Multi-host on one machine: JAX processes of four CPU devices each, joined by
`jax.distributed` (gloo collectives).

The learner over two processes (`multiprocess_learner.py`) trains exactly like one process over
the same eight devices, a Qwen3-VL learner too when the processes' images need different patch
buckets, and each process resumes its own input pipeline position; the train command itself
runs, checkpoints and resumes on two processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import learner_cases
import multiprocess_learner as job
import numpy as np
import pytest
import train_command

from vimrag_jax.checkpointing import (
    PER_PROCESS,
    Checkpointer,
    CheckpointMismatchError,
    this_process_data,
)
from vimrag_jax.data.shards import owned_shards
from vimrag_jax.learner import Learner
from vimrag_jax.parallel.mesh import make_mesh
from vimrag_jax.rollout.records import list_shards

SCRIPT = Path(__file__).with_name("multiprocess_learner.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes")
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    logs = [open(out / f"log-{i}.txt", "w") for i in range(job.PROCESSES)]  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(i), str(port), str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for i, log in enumerate(logs)
    ]
    try:
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
        for log in logs:
            log.close()
    tails = "\n".join((out / f"log-{i}.txt").read_text()[-3000:] for i in range(len(procs)))
    assert codes == [0] * len(procs), tails
    return out


def _report(job_dir: Path, process: int) -> dict:
    return json.loads((job_dir / f"process-{process}.json").read_text())


def test_cross_process_helpers(job_dir):
    for process in range(job.PROCESSES):
        report = _report(job_dir, process)
        assert report["max"] == 7 and report["broadcast"] == 5
        assert report["gathered"] == [
            {"process": 0, "text": ""},
            {"process": 1, "text": "é" * 40},
        ]


def test_two_processes_train_like_one(job_dir):
    # The same global batches in one process over the same mesh: same metrics, same parameters.
    # (The processes' rows need different token lengths: only an agreed length gives one batch.)
    learner = Learner(
        learner_cases.model_fn,
        learner_cases.optimizer(),
        job.loss_config(),
        make_mesh(1, 8, 1),
        length_bucket=job.LENGTH_BUCKET,
    )
    learner.initialize()
    single = [learner.train_step(job.global_batch(seed)) for seed in range(2)]
    assert single[1]["kl"] > 0 and single[0]["tis_weight"] > 0  # both extra forwards ran
    for process in range(job.PROCESSES):
        for ours, theirs in zip(single, _report(job_dir, process)["metrics"], strict=True):
            for key in ("loss", "grad_norm", "kl", "logprob_gap", "kept_fraction", "tis_weight"):
                np.testing.assert_allclose(
                    theirs[key], ours[key], rtol=1e-5, atol=1e-7, err_msg=key
                )
    saved = np.load(job_dir / "params.npz")
    ours = jax.tree.leaves(jax.device_get(learner.params()))
    assert len(saved.files) == len(ours)
    diffs = np.concatenate(
        [np.abs(saved[f"arr_{i}"] - np.asarray(leaf)).ravel() for i, leaf in enumerate(ours)]
    )
    # The cross-process all-reduce sums in another order: Adam's ~lr * sign(g) step can move a
    # near-zero gradient entry by a fraction of lr (1e-3); every other entry agrees.
    assert diffs.max() < 1e-4 and np.mean(diffs > 1e-6) < 1e-3


def test_two_processes_with_images_in_different_patch_buckets_train_like_one(job_dir):
    # Each process's pipeline padded its rows to its own patch bucket (64 and 128 patches):
    # only an agreed bucket gives one global batch. One process with the whole batch (its
    # pipeline picks 128 for all rows) over the same two-device layout trains the same.
    reports = [_report(job_dir, process) for process in range(job.PROCESSES)]
    assert [report["vl_patch_rows"] for report in reports] == [[64, 64], [128, 128]]
    # Both placed the same global arrays. JAX assumes every process runs the same program and
    # does not check it; on these CPU devices, whose rows never leave their process, programs
    # of mismatched shapes still pair their collectives, so only the shapes show a mismatch.
    shapes = reports[0]["vl_global_shapes"]
    assert [4, 128, 1536] in shapes and [4, 64, 1536] not in shapes
    assert all(report["vl_global_shapes"] == shapes for report in reports)
    stage = job.vl_stage()
    batches = [stage(job.vl_global_batch(seed)) for seed in range(2)]
    assert [batch["pixel_values"].shape[1] for batch in batches] == [128, 128]
    learner = job.vl_learner()
    assert learner.takes_visuals
    learner.initialize(job.vl_params())
    single = [learner.train_step(batch) for batch in batches]
    assert single[1]["kl"] > 0 and single[0]["grad_norm"] > 0  # the reference's forward ran
    for report in reports:
        for ours, theirs in zip(single, report["vl_metrics"], strict=True):
            for key in ("loss", "grad_norm", "kl", "logprob_gap", "kept_fraction", "tis_weight"):
                np.testing.assert_allclose(
                    theirs[key], ours[key], rtol=1e-5, atol=1e-7, err_msg=key
                )
    saved = np.load(job_dir / "vl_params.npz")
    ours = jax.tree.leaves(jax.device_get(learner.params()))
    assert len(saved.files) == len(ours)
    for i, leaf in enumerate(ours):  # SGD: the same gradient gives the same parameters
        np.testing.assert_allclose(saved[f"arr_{i}"], np.asarray(leaf), rtol=1e-5, atol=1e-6)


def test_each_process_resumes_its_own_pipeline_position(job_dir):
    for process in range(job.PROCESSES):
        report = _report(job_dir, process)
        want = {"process": process, "cursor": [process] * (3 + process)}
        assert report["restored_position"] == want
        assert report["restored_step"] == 2 and report["restored_params_equal"]
    # One process cannot take over the positions of two.
    learner = Learner(
        learner_cases.model_fn, learner_cases.optimizer(), job.loss_config(), make_mesh(1, 8, 1)
    )
    with Checkpointer(job_dir / "checkpoints", every_steps=1, keep=1) as ckpt:
        restored = learner.restore(ckpt)
    assert restored.metadata == {"phase": "rl"} and learner.step == 2
    with pytest.raises(CheckpointMismatchError, match="saved by 2 process"):
        this_process_data(restored)


# --- the train command as two processes --------------------------------------------------


def _run_two_processes(
    workdir: Path, total_steps: int, *overrides: str, expect: int = 0
) -> list[str]:
    """`train_command` on two processes of four CPU devices each (both must exit with
    ``expect``); returns their logs."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    procs, logs = [], []
    for process in range(2):
        log = open(workdir.parent / f"{workdir.name}-{total_steps}-{process}.log", "w+")  # noqa: SIM115
        command = train_command.train_command(
            workdir,
            total_steps,
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={process}",
            "--config.distributed.initialization_timeout_s=120",
            *overrides,
        )
        procs.append(
            subprocess.Popen(
                command, cwd=train_command.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        )
        logs.append(log)
    try:
        codes = [proc.wait(timeout=400) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    assert codes == [expect, expect], "\n".join(text[-3000:] for text in texts)
    return texts


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("train") / "run"
    first = _run_two_processes(workdir, total_steps=2)
    return workdir, first


def _checkpoint_data(workdir: Path, step: int) -> list[dict]:
    (path,) = (workdir / "checkpoints" / str(step) / "data").glob("metadata")
    return json.loads(path.read_text())[PER_PROCESS]


def test_the_train_command_runs_on_two_processes(two_process_run):
    workdir, _ = two_process_run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    trained = [row["step"] for row in rows if "loss" in row or "sft/loss" in row]
    assert trained == [1, 2, 3]  # one writer: process 0
    # The warm-start data was written in enough shards for both processes to read some.
    assert len(list_shards(workdir / "sft_data")) >= 2
    # Each process saved its own pipeline position, over shards of its own.
    positions = _checkpoint_data(workdir, 3)
    assert len(positions) == 2
    names = [p["cursor"]["shard"] for p in positions if p["cursor"]["shard"]]
    names += [name for p in positions for name in p["done_shards"]]
    for process, position in enumerate(positions):
        own = owned_shards(names, process, 2, follow=True)
        mine = [position["cursor"]["shard"]] if position["cursor"]["shard"] else []
        assert set(mine + position["done_shards"]) <= set(own)
    # The data metrics count both processes' pipelines.
    last = next(row for row in rows if row["step"] == 3 and "loss" in row)
    for key in ("records_read", "segments_emitted"):
        assert last[f"data/{key}"] == sum(p["counters"][key] for p in positions), key
    assert (workdir / "export" / "config.json").is_file()
    assert (workdir / "policy" / "LATEST").read_text().strip() == "2"


def test_two_processes_resume_where_they_stopped(two_process_run):
    workdir, _ = two_process_run
    before = _checkpoint_data(workdir, 3)
    logs = _run_two_processes(workdir, total_steps=3)
    assert all("resumed RL at step 2, policy version 2" in log for log in logs)
    after = _checkpoint_data(workdir, 4)
    for old, new in zip(before, after, strict=True):  # each ledger moved on from its own
        assert new["counters"]["records_consumed"] >= old["counters"]["records_consumed"]
        assert set(old["done_shards"]) <= set(new["done_shards"])
    assert (workdir / "policy" / "LATEST").read_text().strip() == "3"


def test_processes_give_up_together_when_one_gets_no_rollouts(two_process_run, tmp_path):
    # One shard, owned by process 0: process 1 never gets a batch. Both must stop with exit 3
    # (a process that gave up alone would leave the other blocked in a collective).
    workdir, _ = two_process_run
    shards = [
        path
        for path in list_shards(workdir / "rollouts")
        if owned_shards([path.name], 0, 2, follow=True)
    ]
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    shutil.copy(shards[0], rollouts / shards[0].name)
    logs = _run_two_processes(
        tmp_path / "run",
        1,
        "--config.sft.steps=0",
        "--config.rollout.embedded_workers=0",
        f"--config.data.shard_dir={rollouts}",
        "--config.data.max_wait_s=5",
        expect=3,
    )
    assert all("no trainable rollout arrived" in log for log in logs)
