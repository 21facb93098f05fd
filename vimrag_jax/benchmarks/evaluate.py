"""Evaluation on the benchmarks of the unified corpus: one agent, greedy, resumable, with a table.

    python -m vimrag_jax.eval --config=CONFIG --workdir=DIR --benchmarks=all|NAME,... \
        [--agent=vimrag|react|summary|mem1] [--store=STORE] [--split=auto|test|validation]
        [--checkpoint=auto|latest|STEP|published|initial|PATH] [--num_questions=N]
        [--policy=model|scripted_expert|scripted_noisy] [--batch_size=B]

Each selected benchmark's questions (``STORE/questions/<label>.<split>.jsonl`` of
`vimrag_jax.benchmarks.corpus`; ``--split=auto``: ``test`` where the store has it, else
``validation``) go through the agent greedily with the evaluation budget, retrieving from
``STORE`` (default ``data.corpus``). Each batch's episodes are appended to
``DIR/eval/<agent>/<label>/episodes.jsonl`` (results; a rerun of the same `run_key` skips what
is there) and ``batch-<run>-<n>.array_record`` (trajectory records) as it finishes; then
`vimrag_jax.benchmarks.table` writes ``DIR/eval/<agent>/results.{md,csv,json}`` and the
merged table. The policy (`load_policy`): an orbax checkpoint's parameters restored straight
into the mesh's shardings, a published version, a Hugging Face directory, the initial policy,
a served model (``rollout.backend``), or the scripted `OraclePolicy` (no model). Columns and
the repeated-search definition: `vimrag_jax.benchmarks.table`; the whole story:
``docs/benchmarks_data.md``, "Evaluating on the benchmarks".
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vimrag_jax import benchmarks
from vimrag_jax.agent.config import AGENTS
from vimrag_jax.agent.episode import Episode, EpisodeView
from vimrag_jax.benchmarks.table import (
    EPISODES_FILE,
    EpisodeLog,
    episode_result,
    episode_searches,
    repeated_searches,
    run_hash,
    run_key,
    visual_tokens,
)
from vimrag_jax.envs.rewards import gold_answers

EVAL_DIR = "eval"
SPLITS = ("test", "validation")
POLICIES = ("model", "scripted_expert", "scripted_noisy")
Log = Callable[[str], None]


class EvalError(ValueError):
    """A request the evaluation cannot serve (unknown name, missing files); a readable message."""


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- which questions -----------------------------------------------------------------------------


def question_files(store: str | os.PathLike) -> dict[str, dict[str, Path]]:
    """``{label: {split: file}}`` of the store's question files (``<label>.<split>.jsonl``;
    a label is a benchmark name, or ``name.format`` for a derived subset)."""
    root = Path(store) / "questions"
    if not root.is_dir():
        raise EvalError(
            f"{store} has no questions/ directory: build the store with python -m "
            "vimrag_jax.benchmarks.corpus (it writes questions/<name>.<split>.jsonl)"
        )
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(root.glob("*.jsonl")):
        label, _, split = path.name[: -len(".jsonl")].rpartition(".")
        if label:
            found.setdefault(label, {})[split] = path
    return found


def _order(label: str) -> tuple[int, str]:
    base = label.split(".", 1)[0]
    return (benchmarks.NAMES.index(base) if base in benchmarks.NAMES else 99, label)


def select_benchmarks(
    spec: str, store: str | os.PathLike, split: str = "auto"
) -> list[tuple[str, str, Path]]:
    """``(label, split, question file)`` per benchmark of ``spec`` (``all`` or ``NAME,...``,
    a derived subset as ``NAME:FORMAT`` or ``NAME.FORMAT``). ``split="auto"`` picks ``test``
    where the store has it, else ``validation``. EvalError for an unknown benchmark, or one
    the store has no question file of that split for."""
    files = question_files(store)
    wanted = [s.strip().replace(":", ".") for s in spec.split(",") if s.strip()]
    if not wanted:
        raise EvalError("--benchmarks is empty: give all or NAME,...")
    if wanted == ["all"]:
        wanted = sorted(files, key=_order)
        if not wanted:
            raise EvalError(f"{store}/questions holds no question files")
    selected = []
    for label in wanted:
        if label.split(".", 1)[0] not in benchmarks.NAMES:
            raise EvalError(
                f"unknown benchmark {label!r}; expected all or names among "
                f"{', '.join(benchmarks.NAMES)} (a derived subset as NAME:FORMAT)"
            )
        splits = files.get(label, {})
        chosen = next((s for s in SPLITS if s in splits), None) if split == "auto" else split
        if chosen not in splits:
            have = ", ".join(sorted(splits)) or "none"
            raise EvalError(
                f"{store} has no {split if split != 'auto' else 'test or validation'} question "
                f"file for {label} (questions/{label}.<split>.jsonl; splits there: {have})"
            )
        selected.append((label, chosen, splits[chosen]))
    return selected


# -- the scripted oracle -------------------------------------------------------------------------


class OraclePolicy:
    """A scripted policy for benchmark questions (no reasoning chain needed): searches the
    question as asked, memorizes the gold evidence items as useful (priority 5) and the rest
    as not, then answers with the gold answer. ``repeat`` searches the same question again
    (a repeated search); ``wrong`` answers a wrong string. It reads the gold labels, so it is a
    ceiling of the pipeline (retrieval permitting), not a model."""

    def __init__(self, question: Any, *, repeat: bool = False, wrong: bool = False):
        self.question = question
        self.gold = {int(i) for i in question.evidence_ids}
        self.queries = [question.text] * (2 if repeat else 1)
        self.issued: list[str] = []
        self.wrong = wrong

    def act(self, view: EpisodeView) -> tuple[str, dict[str, Any]]:
        from vimrag_jax.envs import scripted

        if view.pending:
            entries = [
                {
                    "information_id": item.information_id,
                    "is_useful": item.item_id in self.gold,
                    "key_timestamp": [],
                    "priority_score": 5 if item.item_id in self.gold else 1,
                }
                for item in view.pending
            ]
            useful = " ".join(i.text for i in view.pending if i.item_id in self.gold).split()
            summary = (  # short: the graph keeps graph.max_summary_tokens tokens of it
                f"Found: {' '.join(useful[:8])}" if useful else "These results do not help."
            )
            return scripted.MEMORIZE, {"summarize": summary, "memorize": entries}
        if len(self.issued) < len(self.queries):
            node = f"s{len(self.issued) + 1}"
            parent = self.issued[-1] if self.issued else scripted.ROOT_ID
            self.issued.append(node)
            return scripted.SEARCH, {
                "id": node,
                "parent_ids": [parent],
                "query": self.queries[len(self.issued) - 1],
            }
        answer = "no idea" if self.wrong else self.question.answer
        return scripted.ANSWER, {"parent_ids": self.issued or [scripted.ROOT_ID], "answer": answer}


def oracle_sampler(tokenizer: Any, *, noisy: bool, seed: int = 0) -> Any:
    """A `ScriptedSampler` over `OraclePolicy`; ``noisy``: per episode (seeded by its key) a
    repeated search with probability 1/2 and a wrong answer with probability 1/3."""
    from vimrag_jax.envs.scripted_sampler import ScriptedSampler, episode_seed

    def make(context: Any) -> OraclePolicy:
        rng = np.random.default_rng(episode_seed(context.key, seed))
        repeat, wrong = bool(rng.random() < 0.5), bool(rng.random() < 1 / 3)
        return OraclePolicy(context.question, repeat=noisy and repeat, wrong=noisy and wrong)

    return ScriptedSampler(tokenizer, make)


# -- running one benchmark -----------------------------------------------------------------------


def _rewards(episodes: Sequence[Episode], config: Any, judge: Any) -> list[tuple[float, Any]]:
    """(reward, judge verdict) per episode; a judge failure (None) scores 0."""
    if config.reward_metric != "judge":
        from vimrag_jax.rollout.trajectory import episode_rewards

        return [(r, None) for r in episode_rewards(episodes, config)]
    from vimrag_jax.envs.judge import JudgeRequest

    verdicts = judge.verdicts(
        [JudgeRequest(e.question.text, gold_answers(e.question), e.prediction) for e in episodes]
    )
    return [(1.0 if v is True else 0.0, v) for v in verdicts]


def run_benchmark(
    agent: Any,
    label: str,
    questions: Sequence[Any],
    directory: Path,
    *,
    batch_size: int,
    judge: Any = None,
    policy_version: int = 0,
    run: str = "",
    log: Log = stderr_log,
) -> list[dict[str, Any]]:
    """Runs the questions not yet in ``directory/episodes.jsonl`` under the key ``run``
    (`EpisodeLog`) in batches, appending each batch's results (and writing its trajectory
    shard) as it finishes; returns every result of ``questions`` in their order."""
    from vimrag_jax.rollout.records import ShardWriter
    from vimrag_jax.rollout.trajectory import trajectory_record

    episodes_log = EpisodeLog(directory, run)
    todo = [q for q in questions if str(q.question_id) not in episodes_log.done]
    total = len(questions)
    log(f"{label}: {total} questions, {total - len(todo)} already done")
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        rollouts = agent.run(batch, group_size=1, seed=0, greedy=True)
        scored = _rewards(rollouts.episodes, agent.config, judge)
        name = f"batch-{run_hash(run)}-{total - len(todo) + start:06d}"
        (directory / f"{name}.array_record").unlink(missing_ok=True)  # from a killed run
        with ShardWriter(directory, name=name) as writer:
            pairs = zip(rollouts.episodes, scored, strict=True)
            for row, (episode, (reward, _)) in enumerate(pairs):
                record = trajectory_record(
                    episode,
                    rollouts.graph,
                    row,
                    agent.config,
                    policy_version=policy_version,
                    env_name=label,
                    reward=reward,
                )
                writer.write(record)
        episodes_log.append(
            [
                episode_result(e, label, reward, verdict)
                for e, (reward, verdict) in zip(rollouts.episodes, scored, strict=True)
            ]
        )
        ids = [str(q.question_id) for q in questions]
        done = [episodes_log.done[i] for i in ids if i in episodes_log.done]
        accuracy = sum(r["reward"] for r in done) / max(len(done), 1)
        log(f"{label}: {len(done)}/{total} episodes, accuracy {accuracy:.3f}")
    return [episodes_log.done[str(q.question_id)] for q in questions]


# -- the whole evaluation --------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    """What to evaluate (the command's flags)."""

    benchmarks: str = "all"
    agent: str = ""  # "" : the config's rollout.agent
    store: str = ""  # "" : the config's data.corpus
    split: str = "auto"
    checkpoint: str = "auto"
    num_questions: int = 0
    policy: str = "model"
    batch_size: int = 0  # 0 : rollout.questions_per_batch * rollout.group_size


def check_request(request: Request, cfg: Any) -> tuple[str, str]:
    """(agent, store) of ``request`` after the config's defaults; EvalError when invalid."""
    agent = request.agent or str(cfg.rollout.agent)
    if agent not in AGENTS:
        raise EvalError(f"unknown agent {agent!r}; expected one of {', '.join(AGENTS)}")
    if request.policy not in POLICIES:
        raise EvalError(f"unknown policy {request.policy!r}; expected one of {POLICIES}")
    if request.split != "auto" and not request.split:
        raise EvalError("--split is empty")
    store = request.store or str(cfg.data.corpus or "")
    if not store:
        raise EvalError("no corpus store: pass --store=STORE (or set data.corpus)")
    if not Path(store).is_dir():
        raise EvalError(f"the corpus store {store} does not exist")
    return agent, store


def evaluate_benchmarks(
    cfg: Any,
    workdir: str | os.PathLike,
    request: Request,
    *,
    judge: Any = None,
    log: Log = stderr_log,
) -> dict[str, Any]:
    """Runs the evaluation the module docstring describes; returns ``results.json``'s content.

    With ``rollout.reward_metric = "judge"`` the episodes are graded by ``judge`` (an
    ``envs.judge.Judge``; built from the config, and closed at the end, when None)."""
    from vimrag_jax.agent import baselines
    from vimrag_jax.benchmarks import table
    from vimrag_jax.envs.dataset import load_questions
    from vimrag_jax.experiment import Experiment
    from vimrag_jax.retrieval.corpus import CorpusStore
    from vimrag_jax.rollout.worker import visual_patches

    agent_name, store_dir = check_request(request, cfg)
    selected = select_benchmarks(request.benchmarks, store_dir, request.split)
    experiment = Experiment.from_config(cfg, workdir)
    store = CorpusStore.open(store_dir)
    backend, policy_label, version, confirmed = make_policy_backend(experiment, request, log=log)
    config = dataclasses.replace(experiment.rollout_config(evaluation=True), agent=agent_name)
    agent = baselines.make_agent(
        config,
        store,
        experiment.tokenizer,
        backend,
        stop_token_ids=experiment.stop_token_ids(),
        visual_patches=visual_patches(backend, store),
    )
    batch = request.batch_size or config.questions_per_batch * config.group_size
    own_judge = judge is None and config.reward_metric == "judge"
    if own_judge:
        from vimrag_jax.envs.judge import Judge

        judge = Judge.from_config(cfg, workdir)
    out = Path(workdir) / EVAL_DIR / agent_name
    log(
        f"evaluating {agent_name} ({policy_label}) on {len(selected)} benchmark(s) from {store_dir}"
    )
    began = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    splits: dict[str, str] = {}
    try:
        for label, split, path in selected:
            questions = load_questions(path, store)[: request.num_questions or None]
            splits[label] = split
            results[label] = run_benchmark(
                agent,
                label,
                questions,
                out / label,
                batch_size=max(1, batch),
                judge=judge,
                policy_version=version,
                run=run_key(policy_label, config, split, store_dir),
                log=log,
            )
    finally:
        if own_judge:
            judge.close()
    meta = {
        "agent": agent_name,
        "policy": policy_label,
        "policy_version": version,
        "version_confirmed": confirmed,
        "reward_metric": config.reward_metric,
        "budget": config.budget,
        "store": str(store_dir),
        "splits": splits,
        "seconds": time.perf_counter() - began,
    }
    summary = table.write_agent_results(out, results, meta)
    merged = table.merge(out.parent)
    log(f"results in {out}/results.md; all agents in {merged['markdown']}")
    return summary


# -- the policy ----------------------------------------------------------------------------------


def make_policy_backend(experiment: Any, request: Request, *, log: Log = stderr_log):
    """(generation backend, a label naming the policy, policy version, whether that version is
    confirmed) for ``request``. A served model is first brought to the newest published version
    (`vimrag_jax.eval.served_policy`: the rollout worker's reload path); its label says when the
    server could not confirm the version (vLLM, the text-only client report none)."""
    from vimrag_jax.eval import served_policy
    from vimrag_jax.experiment import SERVER_BACKENDS

    cfg = experiment.cfg
    if request.policy != "model":
        noisy = request.policy == "scripted_noisy"
        return oracle_sampler(experiment.tokenizer, noisy=noisy), request.policy, 0, True
    if cfg.rollout.backend in (*SERVER_BACKENDS, "openai"):
        served = cfg.rollout.server_model or cfg.rollout.server_url
        backend = experiment.make_backend()
        version, confirmed = served_policy(experiment, backend)
        label = f"served {cfg.rollout.backend}:{served} v{version}"
        if not confirmed:
            label += " (version requested, not confirmed by the server)"
        log(f"policy: {label}")
        return backend, label, version, confirmed
    import jax

    from vimrag_jax.parallel.mesh import mesh_from_config

    mesh = mesh_from_config(cfg.mesh, jax.devices())
    model, label, version = load_policy(experiment, request.checkpoint, mesh)
    log(f"policy: {label} on mesh {dict(mesh.shape)}")
    return experiment.make_backend(model), label, version, True


def _abstract_params(experiment: Any, mesh: Any) -> tuple[Any, Any]:
    """(graphdef, abstract parameters with their mesh shardings) of the experiment's policy."""
    from flax import nnx

    from vimrag_jax.checkpointing import abstract_state
    from vimrag_jax.parallel.sharding import param_shardings

    with nnx.use_eager_sharding(False):
        graphdef, params, _ = nnx.split(experiment.abstract_model(), nnx.Param, ...)
        return graphdef, abstract_state(params, param_shardings(params, mesh))


def restore_params(step_dir: str | os.PathLike, abstract_params: Any) -> Any:
    """The ``params`` of an orbax train-state checkpoint step directory (``.../checkpoints/
    <step>``), restored alone (no optimizer state is read) straight into the shardings of
    ``abstract_params`` (``jax.ShapeDtypeStruct`` leaves with shardings)."""
    import orbax.checkpoint as ocp

    path = Path(step_dir) / "state"
    if not path.is_dir():
        raise EvalError(f"{step_dir} is not an orbax checkpoint step (no state/ in it)")
    item = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,
    )
    try:
        return ocp.PyTreeCheckpointer().restore(path.absolute(), args=args)["params"]
    except (ValueError, KeyError) as error:
        raise EvalError(
            f"cannot restore the policy parameters of {step_dir} into this config's model "
            f"(another model or preset?): {error}"
        ) from error


def _checkpoint_version(step_dir: Path) -> int:
    try:
        return int(json.loads((step_dir / "metadata" / "metadata").read_text())["policy_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _orbax_steps(workdir: Path) -> list[int]:
    from vimrag_jax.checkpointing import CHECKPOINT_DIR

    root = workdir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(
        int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").is_dir()
    )


def load_policy(experiment: Any, spec: str, mesh: Any) -> tuple[Any, str, int]:
    """(model, label, policy version) for ``--checkpoint=spec`` (see the module docstring):
    ``auto`` (the newest orbax checkpoint, else the newest published version, else the
    initial policy), ``latest``, a step number, ``published``, ``initial``, or a path (a
    checkpoint step directory, a published version directory, or a Hugging Face directory)."""
    from flax import nnx

    from vimrag_jax import publish
    from vimrag_jax.checkpointing import CHECKPOINT_DIR

    workdir = experiment.workdir
    steps = _orbax_steps(workdir)
    step_dir: Path | None = None
    published: tuple[int, Path] | None = None
    if spec == "auto":
        if steps:
            step_dir = workdir / CHECKPOINT_DIR / str(steps[-1])
        else:
            published = publish.latest_policy(workdir)
    elif spec == "latest" or spec.isdigit():
        if not steps:
            raise EvalError(f"no orbax checkpoint in {workdir / CHECKPOINT_DIR}")
        step = steps[-1] if spec == "latest" else int(spec)
        if step not in steps:
            raise EvalError(f"no checkpoint of step {step} in {workdir}; steps there: {steps}")
        step_dir = workdir / CHECKPOINT_DIR / str(step)
    elif spec == "published":
        published = publish.latest_policy(workdir)
        if published is None:
            raise EvalError(f"no published policy in {workdir / publish.POLICY_DIR}")
    elif spec != "initial":
        path = Path(spec)
        if (path / "state").is_dir():
            step_dir = path
        elif (path / publish.INFO_FILE).is_file():
            info = json.loads((path / publish.INFO_FILE).read_text())
            published = (int(info.get("version", 0)), path)
        elif (path / "config.json").is_file():
            return _hf_model(experiment, path, mesh), f"hf {path}", 0
        else:
            raise EvalError(
                f"--checkpoint={spec}: not auto, latest, a step, published, initial, an orbax "
                "step directory, a published version directory or a Hugging Face directory"
            )
    if step_dir is not None:
        graphdef, abstract = _abstract_params(experiment, mesh)
        params = restore_params(step_dir, abstract)
        version = _checkpoint_version(step_dir)
        return nnx.merge(graphdef, params), f"checkpoint {step_dir}", version
    if published is not None:
        graphdef, abstract = _abstract_params(experiment, mesh)
        loaded = publish.load_policy(published[1], nnx.to_pure_dict(abstract))
        nnx.replace_by_pure_dict(abstract, loaded)
        return nnx.merge(graphdef, abstract), f"published v{published[0]}", published[0]
    if experiment.cfg.model.name == "hf":
        return _hf_model(experiment, experiment.cfg.model.path, mesh), "initial (model.path)", 0
    return experiment.initial_model(), "initial (untrained)", 0


def _hf_model(experiment: Any, path: str | os.PathLike, mesh: Any) -> Any:
    """A Hugging Face checkpoint directory loaded straight into the mesh's shardings."""
    from vimrag_jax.models.hf import from_pretrained

    return from_pretrained(path, dtype=experiment.cfg.model.dtype, mesh=mesh)


__all__ = [
    "EPISODES_FILE",
    "EpisodeLog",
    "EvalError",
    "OraclePolicy",
    "Request",
    "episode_result",
    "episode_searches",
    "evaluate_benchmarks",
    "load_policy",
    "oracle_sampler",
    "question_files",
    "repeated_searches",
    "restore_params",
    "run_benchmark",
    "run_key",
    "select_benchmarks",
    "visual_tokens",
]
