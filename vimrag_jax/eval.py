"""Evaluation: greedy episodes on the held-out questions; accuracy and invalid-action rate.

    python -m vimrag_jax.eval --config=configs/ggpo.py --workdir=DIR [--num_questions=N]
        [--policy=model|scripted_expert]

Runs one greedy rollout per held-out question (``env.eval_questions``) with the evaluation
budget (``memory.eval_budget``: the energy allocation of SPEC §2, where training rollouts use
the averaged budget), on the newest policy published in ``DIR/policy/`` (the initial policy
when none is), and writes ``DIR/eval/eval-v<version>.json`` with the episodes beside it
(``episodes-v<version>.array_record``; draw one with ``python -m vimrag_jax.rollout.render``).
The learner calls `evaluate` itself every ``eval.every_steps`` updates and at the end of
training.

On the paper's benchmarks (a store built by ``python -m vimrag_jax.benchmarks.corpus``), as its
own job on a checkpoint loaded straight into the mesh's shardings, a published policy, a
Hugging Face directory or a served model::

    python -m vimrag_jax.eval --config=configs/ggpo.py --workdir=DIR --benchmarks=all|NAME,...
        [--agent=vimrag|react|summary|mem1] [--store=STORE] [--split=auto|test|validation]
        [--checkpoint=auto|latest|STEP|published|initial|PATH] [--num_questions=N]

writes the episodes under ``DIR/eval/<agent>/<benchmark>/`` as they finish (a rerun resumes) and
the paper-style table ``DIR/eval/<agent>/results.{md,csv,json}``
(`vimrag_jax.benchmarks.evaluate`, `vimrag_jax.benchmarks.table`).

A served model (``rollout.backend`` sglang, vllm or openai) is first brought to the newest
published version through the rollout worker's reload path (`served_policy`); the report's
``version_confirmed`` says whether the server confirmed that version (SGLang reports its
``weight_version``; vLLM and the text-only client report none: the version is the one requested).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from absl import app, flags, logging

from vimrag_jax import host_memory

if TYPE_CHECKING:
    from vimrag_jax.envs.judge import Judge

EVAL_DIR = "eval"


def evaluate(
    experiment: Any,
    backend: Any,
    *,
    num_questions: int | None = None,
    policy_version: int = 0,
    episodes_dir: str | os.PathLike | None = None,
    judge: Judge | None = None,
) -> dict[str, float]:
    """Greedy episodes of the configured agent on the eval split; returns scalar metrics.

    ``backend`` is a generation backend (e.g. ``experiment.make_backend(model)`` or a scripted
    sampler). ``accuracy`` is the mean outcome reward (SPEC §4's judged-correct reward): with
    ``rollout.reward_metric = "judge"`` graded by ``judge`` (an ``envs.judge.Judge``; built from
    the config when None), and then ``judge_failures`` counts the episodes it could not grade
    (scored 0, so the accuracy is a lower bound while it is not 0).
    With ``episodes_dir`` the episodes are also written there as the trajectory shard
    ``episodes-v<version>`` (replacing an older one of that version), to read or draw with
    ``python -m vimrag_jax.rollout.render``.
    """
    from vimrag_jax.rollout.trajectory import mean_reward, run_records
    from vimrag_jax.rollout.worker import experiment_agent

    config = experiment.rollout_config(evaluation=True)
    questions = experiment.eval_questions[: num_questions or None]
    if not questions:
        raise ValueError("no evaluation questions: set env.eval_questions > 0")
    agent = experiment_agent(experiment, backend, config)
    own_judge = judge is None and config.reward_metric == "judge"
    if own_judge:
        from vimrag_jax.envs.judge import Judge

        judge = Judge.from_config(experiment.cfg, experiment.workdir)
    judged = judge.stats() if judge is not None else {}
    began = time.perf_counter()
    try:
        records, out = run_records(
            agent,
            questions,
            group_size=1,
            policy_version=policy_version,
            greedy=True,
            seed=0,
            judge=judge,
        )
    finally:
        if own_judge:
            judge.close()
    stats = out.stats
    if episodes_dir is not None:
        write_episodes(episodes_dir, policy_version, records)
    answered = sum(record["answer_node"] >= 0 for record in records)
    judge_metrics = {}
    if judge is not None and config.reward_metric == "judge":
        from vimrag_jax.envs.judge import stats_delta

        judge_metrics = {k: float(v) for k, v in stats_delta(judge.stats(), judged).items()}
    return {
        "accuracy": mean_reward(records),
        **judge_metrics,
        "answered": answered / len(records),
        "invalid_action_rate": stats.invalid_rate,
        "model_calls_per_episode": stats.model_calls / max(stats.episodes, 1),
        "episodes": float(stats.episodes),
        "seconds": time.perf_counter() - began,
    }


def write_episodes(directory: str | os.PathLike, version: int, records: list[dict]) -> Path:
    """Writes ``records`` as the shard ``DIR/episodes-v<version>.array_record``."""
    from vimrag_jax.rollout.records import SHARD_SUFFIX, ShardWriter

    name = f"episodes-v{version:08d}"
    (Path(directory) / f"{name}{SHARD_SUFFIX}").unlink(missing_ok=True)
    with ShardWriter(directory, name=name) as writer:
        for record in records:
            writer.write(record)
    return writer.path


def write_report(workdir: str | os.PathLike, version: int, metrics: dict[str, float]) -> Path:
    """Writes ``WORKDIR/eval/eval-v<version>.json`` (atomically) and returns its path."""
    directory = Path(workdir) / EVAL_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"eval-v{version:08d}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"policy_version": version, **metrics}, indent=1))
    os.replace(tmp, path)
    return path


_FLAGS: dict[str, flags.FlagHolder] = {}


def _define_flags() -> None:
    from ml_collections import config_flags

    _FLAGS.update(
        config=config_flags.DEFINE_config_file(
            "config", None, "Experiment config file.", lock_config=True
        ),
        workdir=flags.DEFINE_string("workdir", None, "Run directory (policy/, corpus/)."),
        num_questions=flags.DEFINE_integer(
            "num_questions", 0, "Evaluate only the first N held-out questions (0: all)."
        ),
        policy=flags.DEFINE_enum(
            "policy",
            "model",
            ["model", "scripted_expert", "scripted_noisy"],
            "Who acts (scripted: a ceiling; on benchmarks, the gold-reading oracle).",
        ),
        # The benchmark evaluation (vimrag_jax.benchmarks.evaluate); off while --benchmarks="".
        benchmarks=flags.DEFINE_string(
            "benchmarks", "", "all | NAME,...: evaluate on the corpus store's benchmarks."
        ),
        agent=flags.DEFINE_string("agent", "", "vimrag | react | summary | mem1 (rollout.agent)."),
        store=flags.DEFINE_string("store", "", "Corpus store with questions/ (data.corpus)."),
        split=flags.DEFINE_string("split", "auto", "auto (test, else validation) | SPLIT."),
        checkpoint=flags.DEFINE_string(
            "checkpoint", "auto", "auto | latest | STEP | published | initial | PATH."
        ),
        batch_size=flags.DEFINE_integer(
            "batch_size", 0, "Episodes per batch (0: questions_per_batch x group_size)."
        ),
    )


def main(argv: list[str]) -> int:
    from vimrag_jax.rollout.worker import flag_values

    value = flag_values(_FLAGS, argv)
    if value["benchmarks"]:
        return _benchmark_main(value)
    from vimrag_jax.envs import scripted_sampler
    from vimrag_jax.experiment import Experiment

    experiment = Experiment.from_config(value["config"], value["workdir"])
    version, extra = 0, {}
    if value["policy"] == "model" and experiment.cfg.rollout.backend != "embedded":
        backend = experiment.make_backend()  # served: no JAX model here
        version, confirmed = served_policy(experiment, backend)
        extra = {"version_confirmed": confirmed}
    elif value["policy"] == "model":
        model = experiment.initial_model()
        version = experiment.load_latest(model) or 0
        backend = experiment.make_backend(model)
    else:
        calls = experiment.rollout_config().max_model_calls
        factory = scripted_sampler.expert_factory(max_calls=calls)
        if value["policy"] == "scripted_noisy":
            factory = scripted_sampler.noisy_factory(experiment.entities, max_calls=calls)
        backend = scripted_sampler.ScriptedSampler(experiment.tokenizer, factory)
    metrics = evaluate(
        experiment,
        backend,
        num_questions=value["num_questions"],
        policy_version=version,
        episodes_dir=Path(value["workdir"]) / EVAL_DIR,
    )
    metrics = {**metrics, **extra}
    path = write_report(value["workdir"], version, metrics)
    logging.info("policy v%d: %s (written to %s)", version, metrics, path)
    print(json.dumps({"policy_version": version, **metrics}))
    return 0


def served_policy(experiment: Any, backend: Any) -> tuple[int, bool]:
    """Brings a served model to the newest published version the way the rollout worker does
    (``rollout.worker.ServerWeights``: reload, then the server's confirmation where it reports
    a version) and returns (the version it serves, whether the server confirmed it). Where it
    cannot confirm (vLLM, the text-only client: no version reported) the version is the one
    requested and a warning says so."""
    from vimrag_jax.rollout.worker import ServerWeights

    version, confirmed = ServerWeights(experiment, backend, "eval").sync()
    if not confirmed:
        logging.warning(
            "eval: the %s server(s) do not confirm serving policy v%d (no version reported); "
            "the episodes are labelled with the version requested (version_confirmed: false)",
            experiment.cfg.rollout.backend, version,
        )  # fmt: skip
    return version, confirmed


def _benchmark_main(value: dict[str, Any]) -> int:
    """``--benchmarks``: `vimrag_jax.benchmarks.evaluate` on the corpus store's questions."""
    from vimrag_jax.benchmarks import evaluate as bench
    from vimrag_jax.checkpointing import quiet_orbax_info
    from vimrag_jax.resume import use_compile_cache

    quiet_orbax_info()
    use_compile_cache(value["config"].compile_cache, value["workdir"])
    request = bench.Request(
        **{k: value[k] for k in ("benchmarks", "agent", "store", "split", "checkpoint")},
        num_questions=value["num_questions"],
        policy=value["policy"],
        batch_size=value["batch_size"],
    )
    try:
        summary = bench.evaluate_benchmarks(value["config"], value["workdir"], request)
    except (ValueError, OSError) as error:  # EvalError, a bad question file, the judge's keys
        print(f"eval: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"agent": summary["agent"], "overall": summary["overall"]}))
    return 0


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()  # huge pages for XLA:CPU's temporaries
    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
