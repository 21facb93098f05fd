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
RL_ALGORITHMS = ("ggpo", "gspo", "gspo_token", "grpo")
ALGORITHMS = (*RL_ALGORITHMS, "sft")
SCHEDULES = ("warmup_cosine", "warmup_constant")
ROLLOUT_BACKENDS = ("embedded", "sglang", "vllm", "openai")
HF_LAYOUTS = ("auto", "on", "off")
REQUIRED_BLOCKS = (
    "algorithm", "loss", "mesh", "model", "graph", "memory", "rollout", "data", "optim", "sft",
    "checkpoint", "publish", "metrics", "eval", "export", "distributed",
)  # fmt: skip


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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_at_least(problems: list[str], block, prefix: str, minimum: float, *keys, integer=True):
    for key in keys:
        value = block[key]
        ok = _is_int(value) if integer else _is_number(value)
        if not ok or value < minimum:
            kind = "an integer" if integer else "a number"
            problems.append(f"{prefix}.{key} must be {kind} >= {minimum}, got {value!r}")


def _check_env(problems: list[str], cfg: ml_collections.ConfigDict) -> None:
    """The synthetic world's question splits: eval, warm start and RL each non-empty."""
    env = cfg.get("env")
    if env is None or "num_questions" not in env:
        return
    keys = [k for k in ("eval_questions", "sft_questions") if k in env]
    before = len(problems)
    _check_positive(problems, env, "config.env", "num_questions")
    _check_at_least(problems, env, "config.env", 0, *keys)
    if len(problems) > before:
        return
    held = sum(env[k] for k in keys)
    if held >= env.num_questions:
        problems.append(
            f"config.env.num_questions={env.num_questions} leaves no RL questions after "
            + " + ".join(f"{k}={env[k]}" for k in keys)
        )


def _check_algorithm(problems: list[str], cfg: ml_collections.ConfigDict) -> None:
    algorithm = cfg.algorithm
    if algorithm not in ALGORITHMS:
        problems.append(f"config.algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        return
    try:
        loss = LossConfig.from_config(cfg.loss)
    except (TypeError, ValueError) as err:
        problems.append(f"config.loss: {err}")
        return
    if algorithm not in RL_ALGORITHMS:
        return
    preset = LossConfig.for_algorithm(algorithm)
    for key in ("name", "ggpo_mask"):
        if getattr(loss, key) != getattr(preset, key):
            problems.append(
                f"config.loss.{key}={getattr(loss, key)!r} contradicts "
                f"config.algorithm={algorithm!r} (its preset has {getattr(preset, key)!r}); "
                f"use --config=configs/ggpo.py:PRESET,{algorithm}, or set config.algorithm to "
                "match the loss block"
            )


def _check_minibatches(problems: list[str], cfg: ml_collections.ConfigDict, shards: int) -> None:
    """``loss.num_minibatches`` M: a rollout batch is M optimizer updates in one step call, so
    the batch splits into M minibatches of whole shards, and every interval counted in step
    calls or updates is a multiple of M (none is skipped when the step counter jumps by M)."""
    minibatches = cfg.loss.get("num_minibatches", 1)
    if not _is_int(minibatches) or minibatches <= 1:
        return
    rows = cfg.data.batch_segments
    if _is_int(rows) and rows % (minibatches * shards):
        problems.append(
            f"config.data.batch_segments={rows} must split into loss.num_minibatches="
            f"{minibatches} minibatches of whole batch shards ({shards})"
        )
    if cfg.optim.accumulate_steps != 1:
        problems.append(
            "config.loss.num_minibatches > 1 needs config.optim.accumulate_steps=1 (each "
            "minibatch is one optimizer update)"
        )
    for block, key in (
        ("optim", "total_steps"),
        ("publish", "every_steps"),
        ("checkpoint", "every_steps"),
        ("eval", "every_steps"),
    ):
        value = cfg[block][key]
        if _is_int(value) and value % minibatches:
            problems.append(
                f"config.{block}.{key}={value} must be a multiple of loss.num_minibatches="
                f"{minibatches} (a rollout batch is that many updates)"
            )


def _check_micro_batches(problems: list[str], cfg: ml_collections.ConfigDict, shards: int):
    """``optim.micro_batches`` K: every optimizer update's rows (a minibatch of RL's batch, the
    warm start's batch) split into K passes, each an equal share of every batch shard."""
    micro = cfg.optim.get("micro_batches", 1)
    if not _is_int(micro) or micro < 1:
        problems.append(f"config.optim.micro_batches must be a positive integer, got {micro!r}")
        return
    if micro == 1:
        return
    minibatches = cfg.loss.get("num_minibatches", 1)
    rl_rows = cfg.data.batch_segments
    sft_rows = cfg.sft.get("batch_segments", 0) or rl_rows
    rl_parts = minibatches * micro if _is_int(minibatches) else micro
    for key, rows, parts, why in (
        ("data", rl_rows, rl_parts, "loss.num_minibatches × optim.micro_batches"),
        ("sft", sft_rows, micro, "optim.micro_batches"),
    ):
        if _is_int(rows) and rows % (parts * shards):
            problems.append(
                f"config.{key}.batch_segments={rows} must split into {parts} passes ({why}) "
                f"of whole batch shards ({shards})"
            )


def _check_memory(problems: list[str], cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    """``mesh.device_memory_gb`` > 0: the analytic per-device peak (`vimrag_jax.footprint`)
    must fit it. A model whose config cannot be read is left to the model checks."""
    limit = cfg.mesh.get("device_memory_gb", 0)
    if not _is_number(limit) or limit < 0:
        problems.append(f"config.mesh.device_memory_gb must be a number >= 0, got {limit!r}")
        return
    if not limit:
        return
    from vimrag_jax import footprint

    try:
        need = footprint.estimate(cfg, num_devices)
    except (OSError, ValueError, KeyError, NotImplementedError):
        return
    if need.total_bytes > limit * footprint.GIB:
        size = footprint.format_bytes
        data, fsdp, _ = resolve_mesh_shape(
            (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), num_devices
        )
        rows = footprint.rows_per_pass(cfg, data * fsdp)
        problems.append(
            f"the run needs about {size(need.total_bytes)} per device, more than "
            f"config.mesh.device_memory_gb={limit} (parameters {size(need.params_bytes)}, "
            f"optimizer {size(need.optimizer_bytes)}, gradients {size(need.gradients_bytes)}, "
            f"batch {size(need.batch_bytes)}, activations {size(need.activation_bytes)} for "
            f"{rows} segment rows per pass): raise config.optim.micro_batches, shard wider or "
            "use more devices; python -m vimrag_jax.plan gives XLA's figures"
        )


def _check_optim(problems: list[str], optim: ml_collections.ConfigDict) -> None:
    _check_positive(problems, optim, "config.optim", "total_steps", "accumulate_steps")
    if not (_is_number(optim.learning_rate) and optim.learning_rate > 0):
        problems.append(f"config.optim.learning_rate must be > 0, got {optim.learning_rate!r}")
    if optim.schedule not in SCHEDULES:
        problems.append(f"config.optim.schedule must be one of {SCHEDULES}, got {optim.schedule!r}")
    _check_at_least(problems, optim, "config.optim", 0, "warmup_steps")
    if _is_int(optim.warmup_steps) and _is_int(optim.total_steps):
        if optim.warmup_steps > optim.total_steps:
            problems.append(
                f"config.optim.warmup_steps={optim.warmup_steps} exceeds "
                f"config.optim.total_steps={optim.total_steps}"
            )
    if not (_is_number(optim.final_lr_ratio) and 0 <= optim.final_lr_ratio <= 1):
        problems.append(
            f"config.optim.final_lr_ratio must be in [0, 1], got {optim.final_lr_ratio!r}"
        )
    for key in ("b1", "b2"):
        if not (_is_number(optim[key]) and 0 <= optim[key] < 1):
            problems.append(f"config.optim.{key} must be in [0, 1), got {optim[key]!r}")
    if not (_is_number(optim.eps) and optim.eps > 0):
        problems.append(f"config.optim.eps must be > 0, got {optim.eps!r}")
    _check_at_least(problems, optim, "config.optim", 0, "weight_decay", "grad_clip", integer=False)


def _check_sft(problems: list[str], cfg: ml_collections.ConfigDict) -> None:
    sft = cfg.sft
    minimum = 1 if cfg.algorithm == "sft" else 0
    if not _is_int(sft.steps) or sft.steps < minimum:
        why = " (config.algorithm='sft' trains only this phase)" if minimum else ""
        problems.append(f"config.sft.steps must be an integer >= {minimum}{why}, got {sft.steps!r}")
    if not (_is_number(sft.learning_rate) and sft.learning_rate > 0):
        problems.append(f"config.sft.learning_rate must be > 0, got {sft.learning_rate!r}")
    _check_at_least(problems, sft, "config.sft", 0, "warmup_steps")
    if "batch_segments" in sft:
        _check_at_least(problems, sft, "config.sft", 0, "batch_segments")
    _check_positive(problems, sft, "config.sft", "num_trajectories")
    if sft.data and not os.path.isdir(sft.data):
        problems.append(f"config.sft.data={sft.data!r} is not a directory")


def _check_dataset(problems: list[str], cfg: ml_collections.ConfigDict) -> None:
    """A real corpus (``data.corpus`` set): a store directory, its question file, and a warm
    start from ``sft.data`` — the scripted expert that writes it otherwise needs the synthetic
    world's question chains, which a real dataset does not have."""
    corpus = cfg.data.get("corpus", "")
    if not corpus:
        return
    if not os.path.isdir(corpus):
        problems.append(f"config.data.corpus={corpus!r} is not a directory")
    elif not os.path.isfile(os.path.join(corpus, "manifest.json")):
        problems.append(
            f"config.data.corpus={corpus!r} holds no corpus store (no manifest.json); "
            "write one with python -m vimrag_jax.retrieval.import_corpus --out=DIR"
        )
    questions = cfg.data.get("questions", "")
    if not questions:
        problems.append(
            "config.data.questions is empty: with config.data.corpus set, point it at the "
            "question file (JSON lines: id, question, answer, evidence_ids)"
        )
    elif not os.path.isfile(questions):
        problems.append(f"config.data.questions={questions!r} is not a file")
    steps = cfg.sft.get("steps", 0)
    if _is_int(steps) and steps > 0 and not cfg.sft.get("data", ""):
        problems.append(
            f"config.sft.steps={steps} with config.data.corpus set needs config.sft.data, a shard "
            "directory of expert trajectories: the scripted expert that generates them works only "
            "on the synthetic world (or set config.sft.steps=0)"
        )


def _check_rollout_backend(problems: list[str], cfg: ml_collections.ConfigDict) -> None:
    rollout = cfg.rollout
    backend = rollout.backend
    if backend not in ROLLOUT_BACKENDS:
        problems.append(
            f"config.rollout.backend must be one of {ROLLOUT_BACKENDS}, got {backend!r}"
        )
    elif backend != "embedded":
        from vimrag_jax.sampling.http import server_urls

        try:
            server_urls(rollout.server_url)
        except ValueError as error:
            example = {"sglang": ":30000", "vllm": ":8000", "openai": ":8000/v1"}[backend]
            problems.append(
                f"config.rollout.backend={backend!r} needs config.rollout.server_url, one or more "
                f"comma-separated http(s) URLs (e.g. http://host{example}): {error}; got "
                f"{rollout.server_url!r}"
            )
        if backend == "openai" and not rollout.server_model:
            problems.append(
                "config.rollout.backend='openai' needs config.rollout.server_model, the name "
                "the server serves the policy under"
            )
    if "max_inflight" in rollout:
        _check_positive(problems, rollout, "config.rollout", "max_inflight")
    if "sampler_tensor" in rollout:
        _check_positive(problems, rollout, "config.rollout", "sampler_tensor")
    if rollout.get("sampler_dtype", "") not in ("", *DTYPES):
        problems.append(
            f"config.rollout.sampler_dtype must be '' or one of {DTYPES}, got "
            f"{rollout.sampler_dtype!r}"
        )
    hf_layout = cfg.publish.get("hf_layout", "auto")
    if hf_layout not in HF_LAYOUTS:
        problems.append(f"config.publish.hf_layout must be one of {HF_LAYOUTS}, got {hf_layout!r}")
    elif backend in ("sglang", "vllm") and hf_layout == "off":
        problems.append(
            f"config.publish.hf_layout='off' with config.rollout.backend={backend!r}: the servers "
            "load only Hugging Face checkpoints, so new policy versions could never reach them"
        )
    for key in ("connect_timeout_s", "request_timeout_s"):
        if not (_is_number(rollout[key]) and rollout[key] > 0):
            problems.append(f"config.rollout.{key} must be > 0 seconds, got {rollout[key]!r}")
    backoff = rollout.get("retry_backoff_s", 0.0)
    if not (_is_number(backoff) and backoff >= 0):
        problems.append(f"config.rollout.retry_backoff_s must be >= 0 seconds, got {backoff!r}")
    _check_at_least(problems, rollout, "config.rollout", 0, "max_retries", "embedded_workers")


def _check_judge(problems: list[str], rollout: ml_collections.ConfigDict) -> None:
    """The ``rollout.judge_*`` keys (`vimrag_jax.envs.judge.Judge.from_config`): their types
    always, the server and model only when ``rollout.reward_metric = "judge"``."""
    _check_positive(problems, rollout, "config.rollout", "judge_batch", "judge_max_tokens")
    _check_at_least(problems, rollout, "config.rollout", 0, "judge_max_retries")
    if not (_is_number(rollout.judge_timeout_s) and rollout.judge_timeout_s > 0):
        problems.append(
            f"config.rollout.judge_timeout_s must be > 0 seconds, got {rollout.judge_timeout_s!r}"
        )
    for key in ("judge_url", "judge_model", "judge_cache", "judge_api_key_env"):
        if not isinstance(rollout[key], str):
            problems.append(f"config.rollout.{key} must be a string, got {rollout[key]!r}")
    if rollout.reward_metric != "judge":
        return
    url = rollout.judge_url
    if not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        problems.append(
            "config.rollout.reward_metric='judge' needs config.rollout.judge_url, the judge "
            f"server's http(s) API root (e.g. http://host:8000/v1); got {url!r}"
        )
    if not rollout.judge_model:
        problems.append(
            "config.rollout.reward_metric='judge' needs config.rollout.judge_model, the name "
            "the server serves the judge model under"
        )
    env = rollout.judge_api_key_env
    if isinstance(env, str) and env and not os.environ.get(env):
        problems.append(
            f"config.rollout.judge_api_key_env={env!r}, but that environment variable is not set"
        )


def _check_distributed(problems: list[str], dist: ml_collections.ConfigDict) -> None:
    if dist.enabled not in (None, True, False):
        problems.append(
            f"config.distributed.enabled must be True, False or None (detect), got {dist.enabled!r}"
        )
    address = dist.coordinator_address
    if address:
        host, sep, port = address.rpartition(":")
        if not (sep and host and port.isdigit()):
            problems.append(
                f"config.distributed.coordinator_address must be HOST:PORT, got {address!r}"
            )
    for key in ("num_processes", "process_id"):
        value = dist[key]
        if not _is_int(value) or (value != -1 and value < (1 if key == "num_processes" else 0)):
            problems.append(
                f"config.distributed.{key} must be -1 (from the environment) or "
                f"{'>= 1' if key == 'num_processes' else '>= 0'}, got {value!r}"
            )
    if _is_int(dist.num_processes) and _is_int(dist.process_id) and dist.num_processes > 0:
        if dist.process_id >= dist.num_processes:
            problems.append(
                f"config.distributed.process_id={dist.process_id} must be below "
                f"config.distributed.num_processes={dist.num_processes}"
            )
    _check_positive(problems, dist, "config.distributed", "initialization_timeout_s")


def _multi_process_problems(
    cfg: ml_collections.ConfigDict, batch_shards: int, process_count: int
) -> list[str]:
    """A learner over several processes: each reads its own rows of every batch."""
    problems = []
    if cfg.step == "pmap":
        problems.append(
            f"config.step='pmap' runs on one process, this job has {process_count}: "
            "use config.step='pjit'"
        )
    if batch_shards % process_count:
        problems.append(
            f"the batch shards (mesh data × fsdp = {batch_shards}) must be a multiple of the "
            f"{process_count} processes: each process feeds its own rows of the batch"
        )
    return problems


def find_problems(
    cfg: ml_collections.ConfigDict, num_devices: int, process_count: int = 1
) -> list[str]:
    """Every problem with ``cfg`` on a job of ``num_devices`` devices over ``process_count``
    processes (empty when fine)."""
    problems: list[str] = []
    missing = [name for name in REQUIRED_BLOCKS if name not in cfg]
    if missing:
        return [
            f"config.{name} is missing; start from configs/ggpo.py, which defines every key"
            for name in missing
        ]

    _check_algorithm(problems, cfg)
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
        for block, key in (("data", "batch_segments"), ("sft", "batch_segments")):
            value = cfg[block].get(key, 0)
            if _is_int(value) and value % (data * fsdp):
                problems.append(
                    f"config.{block}.{key}={value} must be divisible by the "
                    f"batch shards (mesh data × fsdp = {data * fsdp})"
                )
        _check_minibatches(problems, cfg, data * fsdp)
        _check_micro_batches(problems, cfg, data * fsdp)
        if process_count > 1:
            problems.extend(_multi_process_problems(cfg, data * fsdp, process_count))

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
    if "max_shards_per_version" in rollout:
        _check_at_least(problems, rollout, "config.rollout", 0, "max_shards_per_version")
    if rollout.max_policy_lag < 0:
        problems.append(f"config.rollout.max_policy_lag must be >= 0, got {rollout.max_policy_lag}")

    _check_rollout_backend(problems, cfg)
    _check_judge(problems, rollout)

    _check_positive(problems, cfg.data, "config.data", "batch_segments", "max_segment_tokens")
    _check_at_least(problems, cfg.data, "config.data", 0, "prefetch", "length_bucket")
    if not (_is_number(cfg.data.max_wait_s) and cfg.data.max_wait_s > 0):
        problems.append(f"config.data.max_wait_s must be > 0, got {cfg.data.max_wait_s!r}")
    if not isinstance(cfg.data.skip_uniform_groups, bool):
        problems.append(
            "config.data.skip_uniform_groups must be True or False, got "
            f"{cfg.data.skip_uniform_groups!r}"
        )
    _check_optim(problems, cfg.optim)
    _check_sft(problems, cfg)
    _check_positive(problems, cfg.checkpoint, "config.checkpoint", "every_steps", "keep")
    if not isinstance(cfg.checkpoint.async_save, bool):
        problems.append(
            f"config.checkpoint.async_save must be True or False, got {cfg.checkpoint.async_save!r}"
        )
    _check_positive(problems, cfg.publish, "config.publish", "every_steps", "keep")
    if not isinstance(cfg.publish.get("background", True), bool):
        problems.append(
            f"config.publish.background must be True or False, got {cfg.publish.background!r}"
        )
    _check_positive(problems, cfg.metrics, "config.metrics", "every_steps")
    _check_at_least(problems, cfg.eval, "config.eval", 0, "every_steps", "num_questions")
    if cfg.export.dtype not in ("bfloat16", "float32"):
        problems.append(
            f"config.export.dtype must be 'bfloat16' or 'float32', got {cfg.export.dtype!r}"
        )
    _check_distributed(problems, cfg.distributed)
    _check_env(problems, cfg)

    if cfg.model.dtype not in DTYPES:
        problems.append(f"config.model.dtype must be one of {DTYPES}, got {cfg.model.dtype!r}")
    stored = cfg.model.get("param_dtype", "float32")
    if stored not in DTYPES:
        problems.append(f"config.model.param_dtype must be one of {DTYPES}, got {stored!r}")
    from vimrag_jax.models.decoder import REMAT_POLICIES

    policy = cfg.model.get("remat_policy", "nothing_saveable")
    if policy not in REMAT_POLICIES:
        problems.append(
            f"config.model.remat_policy must be one of {REMAT_POLICIES}, got {policy!r}"
        )
    if cfg.model.name == "hf":
        path = cfg.model.path
        if not path:
            problems.append(
                "config.model.path is empty: point it at a local Hugging Face "
                "checkpoint directory (config.json + *.safetensors)"
            )
        elif not os.path.isfile(os.path.join(path, "config.json")):
            problems.append(f"config.model.path={path!r} has no config.json")
    _check_dataset(problems, cfg)
    if not problems:  # the agent's own cross-checks (a prompt fits a segment, known agent, ...)
        from vimrag_jax.agent.config import RolloutConfig

        try:
            RolloutConfig.from_config(cfg)
        except (ValueError, TypeError) as err:
            problems.append(f"config.rollout: {err}")
    if not problems:  # the estimate needs a consistent config
        _check_memory(problems, cfg, num_devices)
    return problems


def validate(cfg: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> None:
    """Raises ``ConfigError`` listing every problem with ``cfg``."""
    problems = find_problems(cfg, num_devices, process_count)
    if problems:
        raise ConfigError(problems)
