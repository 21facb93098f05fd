"""Config presets, validation messages and the train entry point's behaviour."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from vimrag_jax import config_checks
from vimrag_jax.rl.losses import LossConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import ggpo  # noqa: E402


@pytest.mark.parametrize("preset", ggpo.PRESETS)
def test_presets_are_consistent(preset, tmp_path):
    cfg = ggpo.get_config(preset)
    if cfg.model.name == "hf":  # the published config: the memory estimate runs on real sizes
        from vimrag_jax.models.presets import preset_config

        published = preset_config(preset.replace("_", "-"))
        (tmp_path / "config.json").write_text(json.dumps(published))
        cfg.model.path = str(tmp_path)
    devices = {"tiny": 1, "smoke": 1, "qwen3vl_2b": 8, "qwen3vl_4b": 8, "qwen3vl_8b": 16}[preset]
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


def test_train_refuses_a_bad_config_before_building_anything(tmp_path):
    bad = _train(
        "--config=configs/ggpo.py", f"--workdir={tmp_path / 'run'}", "--config.memory.top_k=0"
    )
    assert bad.returncode == 2
    assert "config.memory.top_k must be a positive integer" in bad.stderr
    assert not (tmp_path / "run").exists()  # refused before the workdir was touched
    no_workdir = _train("--config=configs/ggpo.py")
    assert no_workdir.returncode != 0 and "--workdir is required" in no_workdir.stderr


# --- experiment files, new blocks and their checks ----------------------------------------


def _load(arg: str | None = None, *overrides: str):
    """Loads configs/ggpo.py[:arg] through config_flags, as the CLIs do."""
    spec = "configs/ggpo.py" + (f":{arg}" if arg else "")
    argv = ["prog", f"--config={ROOT / spec}", *overrides]
    flag_values = flags.FlagValues()
    # config_flags defines the --config.KEY flags from the argv it is given at definition.
    config_flags.DEFINE_config_file(
        "config", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    return flag_values.config


@pytest.mark.parametrize("algorithm", ggpo.ALGORITHMS)
@pytest.mark.parametrize("preset", ggpo.PRESETS)
def test_every_algorithm_and_preset_validates(algorithm, preset, tmp_path):
    cfg = _load(f"{preset},{algorithm}")
    assert cfg.preset == preset and cfg.algorithm == algorithm
    if cfg.model.name == "hf":
        (tmp_path / "config.json").write_text("{}")
        cfg.model.path = str(tmp_path)
    assert config_checks.find_problems(cfg, 1 if preset in ("tiny", "smoke") else 8) == []


@pytest.mark.parametrize("algorithm", ggpo.ALGORITHMS)
@pytest.mark.parametrize("preset", ggpo.PRESETS)
def test_the_algorithm_token_is_with_algorithm(algorithm, preset):
    expected = ggpo.with_algorithm(ggpo.get_config(preset), algorithm).to_dict()
    assert ggpo.get_config(f"{preset},{algorithm}").to_dict() == expected
    assert ggpo.get_config(f"{algorithm},{preset}").to_dict() == expected  # either order
    if preset == "tiny":  # the default preset
        assert ggpo.get_config(algorithm).to_dict() == expected
        assert _load(algorithm).to_dict() == expected


def test_ggpo_is_the_default_algorithm():
    assert ggpo.parse_arg(None) == ggpo.parse_arg("") == ("tiny", "ggpo")
    assert ggpo.parse_arg("qwen3vl_8b") == ("qwen3vl_8b", "ggpo")
    assert ggpo.get_config("tiny,ggpo").to_dict() == ggpo.get_config().to_dict()


@pytest.mark.parametrize(
    "arg, message",
    [
        ("tiny,gpso", "unknown preset 'gpso' (nor an algorithm)"),
        ("huge,gspo", "unknown preset 'huge'"),
        ("tiny,qwen3vl_8b", "more than one preset or algorithm"),
        ("gspo,grpo", "more than one preset or algorithm"),
    ],
)
def test_a_bad_config_argument_names_the_presets_and_algorithms(arg, message):
    with pytest.raises(ValueError) as err:
        ggpo.get_config(arg)
    text = str(err.value)
    assert message in text and repr(arg) in text
    assert all(name in text for name in ggpo.PRESETS + ggpo.ALGORITHMS)


@pytest.mark.parametrize("algorithm", ["ggpo", "gspo", "grpo"])
def test_loss_block_is_the_algorithm_preset(algorithm):
    cfg = _load(algorithm)
    assert cfg.algorithm == algorithm
    # The algorithm's preset, except the run's own settings (the same for every algorithm).
    run = {key: cfg.loss[key] for key in ggpo.RUN_LOSS_KEYS}
    tiny = {"old_logprobs": "recompute", "tis_cap": 2.0, "kl_coef": 0.5, "num_minibatches": 1}
    assert run == tiny
    preset = dataclasses.replace(LossConfig.for_algorithm(algorithm), **run)
    assert LossConfig.from_config(cfg.loss) == preset
    assert (cfg.loss.clip_low, cfg.loss.clip_high) == (
        (0.2, 0.2) if algorithm == "grpo" else (3e-4, 4e-4)
    )


def test_sft_trains_only_the_supervised_phase():
    cfg = _load("sft")
    assert cfg.algorithm == "sft" and cfg.sft.steps > 0 and cfg.rollout.embedded_workers == 0
    assert _load("qwen3vl_8b,sft").sft.steps == 500
    cfg.sft.steps = 0
    assert any("config.sft.steps must be an integer >= 1" in p for p in _problems(cfg))


def test_command_line_overrides_reach_the_new_blocks():
    cfg = _load(
        "tiny,gspo",
        "--config.distributed.enabled=True",
        "--config.checkpoint.async_save=False",
        "--config.optim.accumulate_steps=4",
        "--config.rollout.backend=openai",
        "--config.rollout.server_url=http://h:8000/v1",
        "--config.rollout.server_model=policy",
        "--config.loss.clip_high=0.001",
    )
    assert cfg.distributed.enabled is True and cfg.checkpoint.async_save is False
    assert cfg.optim.accumulate_steps == 4 and cfg.loss.clip_high == 0.001
    assert _problems(cfg) == []
    with pytest.raises(AttributeError):  # locked: a typo cannot add a key
        _load(None, "--config.optim.acumulate_steps=2")


def _problems(cfg) -> list[str]:
    return config_checks.find_problems(cfg, 1)


def test_new_keys_report_every_problem_with_its_key():
    cfg = ggpo.get_config()
    cfg.optim.accumulate_steps = 0
    cfg.optim.schedule = "linear"
    cfg.optim.warmup_steps = 500
    cfg.optim.b2 = 1.0
    cfg.sft.learning_rate = 0.0
    cfg.rollout.backend = "openai"
    cfg.rollout.request_timeout_s = 0.0
    cfg.data.prefetch = -1
    cfg.checkpoint.keep = 0
    cfg.metrics.every_steps = 0
    cfg.distributed.coordinator_address = "nohost"
    cfg.distributed.num_processes, cfg.distributed.process_id = 2, 2
    problems = _problems(cfg)
    for key in (
        "config.optim.accumulate_steps",
        "config.optim.schedule",
        f"config.optim.warmup_steps=500 exceeds config.optim.total_steps={cfg.optim.total_steps}",
        "config.optim.b2",
        "config.sft.learning_rate",
        "config.rollout.server_url",
        "config.rollout.server_model",
        "config.rollout.request_timeout_s",
        "config.data.prefetch",
        "config.checkpoint.keep",
        "config.metrics.every_steps",
        "config.distributed.coordinator_address must be HOST:PORT",
        "config.distributed.process_id=2 must be below config.distributed.num_processes=2",
    ):
        assert sum(key in p for p in problems) == 1, (key, problems)
    assert len(problems) == 13


def test_algorithm_must_agree_with_the_loss_block():
    cfg = ggpo.get_config()
    cfg.algorithm = "gspo"  # the loss block still has the GGPO mask
    (problem,) = _problems(cfg)
    assert "config.loss.ggpo_mask=True contradicts config.algorithm='gspo'" in problem
    cfg.algorithm = "ppo"
    assert any("config.algorithm must be one of" in p for p in _problems(cfg))
    cfg = ggpo.with_algorithm(ggpo.get_config(), "grpo")
    cfg.loss.clip_low = 0.1  # clip values may be tuned freely
    assert _problems(cfg) == []


def test_a_config_missing_a_block_says_which():
    cfg = ggpo.get_config()
    del cfg["distributed"]
    assert _problems(cfg) == [
        "config.distributed is missing; start from configs/ggpo.py, which defines every key"
    ]


def test_agent_cross_checks_are_reported():
    cfg = ggpo.get_config()
    cfg.rollout.max_new_tokens = cfg.data.max_segment_tokens
    with pytest.raises(config_checks.ConfigError, match="leaves no room for a prompt"):
        config_checks.validate(cfg, 8)


def test_question_splits_must_leave_rl_questions():
    cfg = ggpo.get_config()
    cfg.env.num_questions, cfg.env.eval_questions, cfg.env.sft_questions = 30, 10, 20
    assert config_checks.find_problems(cfg, 1) == [
        "config.env.num_questions=30 leaves no RL questions after eval_questions=10 + "
        "sft_questions=20"
    ]
    cfg.env.sft_questions = -1
    (problem,) = config_checks.find_problems(cfg, 1)
    assert "config.env.sft_questions must be an integer >= 0" in problem
    cfg.env.sft_questions = 19
    assert config_checks.find_problems(cfg, 1) == []


def test_warm_start_batch_is_checked_against_the_mesh():
    cfg = ggpo.get_config()
    cfg.sft.batch_segments = 6
    assert config_checks.find_problems(cfg, 4) == [
        "config.sft.batch_segments=6 must be divisible by the batch shards (mesh data × fsdp = 4)"
    ]
    cfg.sft.batch_segments = -1
    assert any(
        "config.sft.batch_segments must be an integer >= 0" in p
        for p in config_checks.find_problems(cfg, 1)
    )


def test_several_processes_need_pjit_and_a_batch_axis_over_them():
    cfg = ggpo.get_config()  # tiny: data=-1 fills the 8 devices, batches of 48 and 16
    assert config_checks.find_problems(cfg, 8, process_count=2) == []
    cfg.step = "pmap"
    assert config_checks.find_problems(cfg, 8, process_count=2) == [
        "config.step='pmap' runs on one process, this job has 2: use config.step='pjit'"
    ]
    assert config_checks.find_problems(cfg, 8) == []  # one process: pmap is fine
    cfg.step = "pjit"
    cfg.mesh.data, cfg.mesh.tensor = 1, 8  # the batch is not split: no rows per process
    cfg.data.batch_segments = cfg.sft.batch_segments = 8
    assert config_checks.find_problems(cfg, 8, process_count=2) == [
        "the batch shards (mesh data × fsdp = 1) must be a multiple of the 2 processes: "
        "each process feeds its own rows of the batch"
    ]
    from vimrag_jax.data.pipeline import rows_per_process

    assert rows_per_process(48, 2) == 24 and rows_per_process(48, 1) == 48
    with pytest.raises(ValueError, match="does not split over 2 processes"):
        rows_per_process(7, 2)


def test_minibatches_need_whole_shards_and_aligned_intervals():
    cfg = ggpo.get_config()
    cfg.loss.num_minibatches = 4
    cfg.data.batch_segments = 48
    problems = config_checks.find_problems(cfg, 8)
    for part in (
        "config.data.batch_segments=48 must split into loss.num_minibatches=4",
        "config.checkpoint.every_steps=30 must be a multiple of loss.num_minibatches=4",
        "config.publish.every_steps=1 must be a multiple",
        "config.optim.total_steps=90 must be a multiple",
    ):
        assert any(part in problem for problem in problems), part
    cfg.loss.num_minibatches = 0
    problems = config_checks.find_problems(cfg, 1)
    assert any("num_minibatches must be an int >= 1" in problem for problem in problems)


def test_micro_batches_need_whole_shards_per_pass():
    cfg = ggpo.get_config()  # tiny: data.batch_segments=48, sft.batch_segments=16
    cfg.optim.micro_batches = 4
    assert config_checks.find_problems(cfg, 8) == [
        "config.data.batch_segments=48 must split into 4 passes (loss.num_minibatches × "
        "optim.micro_batches) of whole batch shards (8)",
        "config.sft.batch_segments=16 must split into 4 passes (optim.micro_batches) of whole "
        "batch shards (8)",
    ]
    cfg.optim.micro_batches = 2
    assert config_checks.find_problems(cfg, 8) == []
    cfg.optim.micro_batches = 0
    assert config_checks.find_problems(cfg, 8) == [
        "config.optim.micro_batches must be a positive integer, got 0"
    ]


def test_server_backends_need_urls_and_the_hf_layout():
    cfg = ggpo.get_config()
    cfg.rollout.backend = "sglang"
    cfg.rollout.server_url = "http://a:30000, http://b:30000"  # several, comma-separated
    assert _problems(cfg) == []
    cfg.rollout.server_url = "a:30000"
    cfg.rollout.max_inflight = 0
    cfg.rollout.retry_backoff_s = -1.0
    cfg.publish.hf_layout = "off"
    problems = _problems(cfg)
    for key in (
        "config.rollout.server_url",
        "config.rollout.max_inflight",
        "config.rollout.retry_backoff_s",
        "config.publish.hf_layout='off'",
    ):
        assert sum(key in p for p in problems) == 1, (key, problems)
    assert len(problems) == 4
    cfg.rollout.backend = "tgi"
    assert any("config.rollout.backend must be one of" in p for p in _problems(cfg))


def test_embedded_sampler_split_and_dtype_are_checked():
    cfg = ggpo.get_config()
    cfg.rollout.sampler_tensor = 0
    cfg.rollout.sampler_dtype = "float16"
    assert config_checks.find_problems(cfg, 1) == [
        "config.rollout.sampler_tensor must be a positive integer, got 0",
        "config.rollout.sampler_dtype must be '' or one of ('float32', 'bfloat16'), got 'float16'",
    ]
