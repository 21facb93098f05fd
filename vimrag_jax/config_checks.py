"""Checks a run config before anything compiles, and says every problem at once.

A pod job that dies after ten minutes of compilation because ``top_k`` was 0 or
the mesh did not fit the devices wastes the pod; these checks are cheap and run
first. Each message names the config key to change.
"""

from __future__ import annotations

import os

import ml_collections

from vimrag_jax.memory.energy import PIXELS_PER_TOKEN
from vimrag_jax.parallel.mesh import resolve_mesh_shape
from vimrag_jax.rl.losses import LossConfig

BUDGET_MODES = ("energy", "averaged")
STEP_KINDS = ("pjit", "pmap")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A run config that cannot work; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def _check_positive(problems: list[str], block: ml_collections.ConfigDict, prefix: str, *keys):
    for key in keys:
        value = block[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{prefix}.{key} must be a positive integer, got {value!r}")


def find_problems(cfg: ml_collections.ConfigDict, num_devices: int) -> list[str]:
    """Every problem with ``cfg`` on a job of ``num_devices`` devices (empty when fine)."""
    problems: list[str] = []

    try:
        LossConfig.from_config(cfg.loss)
    except (TypeError, ValueError) as err:
        problems.append(f"config.loss: {err}")
    if cfg.step not in STEP_KINDS:
        problems.append(f"config.step must be one of {STEP_KINDS}, got {cfg.step!r}")

    mesh = cfg.mesh
    try:
        data, fsdp, tensor = resolve_mesh_shape((mesh.data, mesh.fsdp, mesh.tensor), num_devices)
    except ValueError as err:
        problems.append(str(err))
    else:
        if cfg.step == "pmap" and (fsdp, tensor) != (1, 1):
            problems.append(
                "config.step='pmap' is data parallel only: set config.mesh.fsdp=1 and "
                "config.mesh.tensor=1, or use config.step='pjit'"
            )
        if cfg.data.batch_segments % (data * fsdp):
            problems.append(
                f"config.data.batch_segments={cfg.data.batch_segments} must be divisible by the "
                f"batch shards (mesh data × fsdp = {data * fsdp})"
            )

    _check_positive(
        problems,
        cfg.graph,
        "config.graph",
        "max_items",
        "max_keyframes",
        "max_query_tokens",
        "max_summary_tokens",
    )
    if cfg.graph.max_nodes < 2:
        problems.append(
            f"config.graph.max_nodes must be >= 2 (root + one step), got {cfg.graph.max_nodes}"
        )

    memory = cfg.memory
    _check_positive(problems, memory, "config.memory", "top_k")
    if memory.total_pixels < PIXELS_PER_TOKEN:
        problems.append(
            f"config.memory.total_pixels={memory.total_pixels} is less than one "
            f"visual token ({PIXELS_PER_TOKEN} pixels)"
        )
    if memory.lam < 0:
        problems.append(f"config.memory.lam must be >= 0, got {memory.lam}")
    if not 0 <= memory.gamma:
        problems.append(f"config.memory.gamma must be >= 0, got {memory.gamma}")
    for key in ("rollout_budget", "eval_budget"):
        if memory[key] not in BUDGET_MODES:
            problems.append(
                f"config.memory.{key} must be one of {BUDGET_MODES}, got {memory[key]!r}"
            )

    rollout = cfg.rollout
    _check_positive(problems, rollout, "config.rollout", "max_model_calls", "retrieval_top_k")
    if rollout.group_size < 2:
        problems.append(
            f"config.rollout.group_size must be >= 2 (advantages are normalised "
            f"within a group), got {rollout.group_size}"
        )
    if rollout.retrieval_top_k > cfg.graph.max_items:
        problems.append(
            f"config.rollout.retrieval_top_k={rollout.retrieval_top_k} exceeds the "
            f"memory slots per node config.graph.max_items={cfg.graph.max_items}"
        )
    if rollout.max_policy_lag < 0:
        problems.append(f"config.rollout.max_policy_lag must be >= 0, got {rollout.max_policy_lag}")

    _check_positive(problems, cfg.data, "config.data", "batch_segments", "max_segment_tokens")
    _check_positive(problems, cfg.optim, "config.optim", "total_steps")
    if not cfg.optim.learning_rate > 0:
        problems.append(f"config.optim.learning_rate must be > 0, got {cfg.optim.learning_rate}")

    if cfg.model.dtype not in DTYPES:
        problems.append(f"config.model.dtype must be one of {DTYPES}, got {cfg.model.dtype!r}")
    if cfg.model.name == "hf":
        path = cfg.model.path
        if not path:
            problems.append(
                "config.model.path is empty: point it at a local Hugging Face "
                "checkpoint directory (config.json + *.safetensors)"
            )
        elif not os.path.isfile(os.path.join(path, "config.json")):
            problems.append(f"config.model.path={path!r} has no config.json")
    for key in ("corpus",):
        path = cfg.data[key]
        if path and not os.path.exists(path):
            problems.append(f"config.data.{key}={path!r} does not exist")
    return problems


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ``ConfigError`` listing every problem with ``cfg``."""
    problems = find_problems(cfg, num_devices)
    if problems:
        raise ConfigError(problems)
