"""Metric writer (TensorBoard + jsonl + console), curves plot, and multi-host init decisions."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vimrag_jax import distributed, metrics, plot

ROOT = Path(__file__).resolve().parents[1]


def test_scalars_reach_tensorboard_and_jsonl_and_non_finite_are_skipped(tmp_path):
    with metrics.MetricWriter(tmp_path, total_steps=3, enabled=True) as writer:
        writer.write(1, {"loss": np.float32(0.5), "ratio_max": -np.inf})
        writer.write(2, {"loss": 0.25, "reward": np.asarray(1.0), "ratio_min": np.inf})
        writer.write(3, {"loss": float("nan"), "reward": 0.5})
        assert writer.skipped == {"ratio_max": 1, "ratio_min": 1, "loss": 1}

    rows = [json.loads(line) for line in (tmp_path / metrics.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [{k: v for k, v in r.items() if k not in ("step", "time")} for r in rows] == [
        {"loss": 0.5},
        {"loss": 0.25, "reward": 1.0},
        {"reward": 0.5},
    ]
    events = EventAccumulator(str(tmp_path / metrics.TENSORBOARD_DIR))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "reward"]
    assert [(s.step, s.value) for s in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert [(s.step, s.value) for s in events.Scalars("reward")] == [(2, 1.0), (3, 0.5)]


def test_other_processes_write_nothing(tmp_path):
    writer = metrics.MetricWriter(tmp_path / "run", total_steps=5, enabled=False)
    assert writer.write(1, {"loss": 1.0}) == {}
    writer.close()
    assert not (tmp_path / "run").exists()


def test_progress_line_has_rate_and_eta(tmp_path):
    times = iter([100.0, 110.0])
    writer = metrics.MetricWriter(
        tmp_path, total_steps=100, enabled=True, log_every=10, clock=lambda: next(times)
    )
    first = writer.progress_line(10, {"loss": 0.123456, "rollout_reward": 0.5, "other": 3.0})
    assert first == "step 10/100 | loss=0.1235 | rollout_reward=0.5"
    second = writer.progress_line(30, {"loss": 0.1})
    assert second == "step 30/100 | loss=0.1 | 2 steps/s | ETA 0m35s"
    writer.close()
    assert metrics.read_metrics(tmp_path) == []


def test_read_metrics_survives_a_truncated_last_line(tmp_path):
    (tmp_path / metrics.METRICS_FILE).write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert metrics.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


def _fake_run(path: Path, offset: float, with_accuracy: bool) -> None:
    path.mkdir()
    with metrics.MetricWriter(path, total_steps=20, enabled=True) as writer:
        for step in range(20):
            row = {"loss": 1.0 / (step + 1) + offset, "train/rollout_reward": step / 20 + offset}
            if with_accuracy and step % 5 == 0:
                row["accuracy"] = step / 40
            writer.write(step, row)


def test_plot_draws_runs_side_by_side(tmp_path):
    _fake_run(tmp_path / "ggpo", 0.0, with_accuracy=True)
    _fake_run(tmp_path / "gspo", 0.1, with_accuracy=False)
    out = tmp_path / "curves.png"
    panels = plot.plot_runs([tmp_path / "ggpo", tmp_path / "gspo"], out, smoothing=0.5)
    assert panels == ["rollout_reward", "loss", "accuracy"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="none of the metrics"):
        plot.plot_runs([tmp_path / "gspo"], out, metrics=["accuracy"])


def test_smoothing_and_curves():
    np.testing.assert_allclose(plot.smooth([1.0, 3.0], 0.0), [1.0, 3.0])
    # Debiased EMA: the first value is kept, then (0.5*0.5*1 + 0.5*3) / 0.75.
    np.testing.assert_allclose(plot.smooth([1.0, 3.0], 0.5), [1.0, (0.25 + 1.5) / 0.75])
    steps, values = plot.curve([{"step": 2, "x": 1}, {"step": 1, "x": 5}, {"step": 2, "x": 7}], "x")
    assert steps.tolist() == [1, 2] and values.tolist() == [5.0, 7.0]


def test_plot_command_line(tmp_path):
    _fake_run(tmp_path / "run", 0.0, with_accuracy=False)
    out = tmp_path / "cli.png"
    result = subprocess.run(
        [sys.executable, "-m", "vimrag_jax.plot", f"--workdir={tmp_path / 'run'}", f"--out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "reward, loss" in result.stdout and out.stat().st_size > 1000


# --- multi-host initialisation decisions (vimrag_jax.distributed) ---------------------------


@pytest.mark.parametrize(
    "enabled, environ, expected, reason",
    [
        (None, {}, False, "single process"),
        (None, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False, "single process"),
        (None, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True, "SLURM"),
        (None, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True, "JAX_COORDINATOR_ADDRESS"),
        (None, {"TPU_WORKER_HOSTNAMES": "a,b,c,d"}, True, "TPU pod"),
        (None, {"TPU_WORKER_HOSTNAMES": "localhost"}, False, "single process"),
        (None, {"OMPI_COMM_WORLD_SIZE": "2"}, True, "Open MPI"),
        (False, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, False, "distributed.enabled=False"),
        (True, {}, True, "distributed.enabled=True"),
    ],
)
def test_initialize_decision(enabled, environ, expected, reason):
    config = distributed.DistributedConfig(enabled=enabled)
    decision = distributed.decide(config, environ)
    assert decision.initialize is expected
    assert reason in decision.reason


def test_maybe_initialize_passes_explicit_settings_once():
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)

    config = distributed.DistributedConfig(
        enabled=True, coordinator_address="h:1", num_processes=2, process_id=1
    )
    assert distributed.maybe_initialize(config, environ={}, initialize=fake)
    assert calls == [
        {
            "coordinator_address": "h:1",
            "num_processes": 2,
            "process_id": 1,
            "initialization_timeout": 300,
        }
    ]
    quiet = distributed.DistributedConfig(enabled=None)
    assert not distributed.maybe_initialize(quiet, environ={}, initialize=fake)
    assert len(calls) == 1
    assert distributed.is_main_process()
