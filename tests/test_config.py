"""Config presets, validation messages and the train entry point's behaviour."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vimrag_jax import config_checks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import ggpo  # noqa: E402


@pytest.mark.parametrize("preset", ggpo.PRESETS)
def test_presets_are_consistent(preset, tmp_path):
    cfg = ggpo.get_config(preset)
    if cfg.model.name == "hf":
        (tmp_path / "config.json").write_text("{}")
        cfg.model.path = str(tmp_path)
    devices = {"tiny": 1, "qwen3vl_2b": 8, "qwen3vl_4b": 8, "qwen3vl_8b": 8}[preset]
    assert config_checks.find_problems(cfg, devices) == []


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ggpo.get_config("huge")


def test_every_problem_is_reported_with_its_key():
    cfg = ggpo.get_config()
    cfg.mesh.data, cfg.mesh.tensor = 3, 1
    cfg.memory.top_k = 0
    cfg.memory.total_pixels = 10
    cfg.memory.rollout_budget = "uniform"
    cfg.rollout.group_size = 1
    cfg.loss.clip_low = -1.0
    cfg.step = "pmap"
    with pytest.raises(config_checks.ConfigError) as err:
        config_checks.validate(cfg, num_devices=8)
    text = str(err.value)
    for key in (
        "config.mesh",
        "config.memory.top_k",
        "config.memory.total_pixels",
        "config.memory.rollout_budget",
        "config.rollout.group_size",
        "config.loss",
    ):
        assert key in text
    assert len(err.value.problems) == 6


def test_pmap_needs_a_data_parallel_mesh_and_divisible_batch():
    cfg = ggpo.get_config()
    cfg.step = "pmap"
    cfg.mesh.data, cfg.mesh.fsdp = 4, 2
    cfg.data.batch_segments = 12
    problems = config_checks.find_problems(cfg, 8)
    assert any("data parallel only" in p for p in problems)
    assert any("batch_segments=12" in p for p in problems)


def test_missing_checkpoint_path(tmp_path):
    cfg = ggpo.get_config("qwen3vl_2b")
    assert any("config.model.path is empty" in p for p in config_checks.find_problems(cfg, 8))
    cfg.model.path = str(tmp_path)
    assert any("has no config.json" in p for p in config_checks.find_problems(cfg, 8))


def _train(*flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "vimrag_jax.train", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_train_validates_then_says_what_is_missing():
    ok = _train("--config=configs/ggpo.py")
    assert ok.returncode == 1, ok.stderr
    assert "config ok: preset=tiny" in ok.stdout
    assert "cannot run yet" in ok.stderr
    bad = _train("--config=configs/ggpo.py", "--config.memory.top_k=0")
    assert bad.returncode == 2
    assert "config.memory.top_k must be a positive integer" in bad.stderr
