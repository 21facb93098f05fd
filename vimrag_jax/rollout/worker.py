"""The rollout worker: writes trajectory shards for the learner from the newest policy.

    python -m vimrag_jax.rollout.worker --config=configs/ggpo.py --workdir=DIR

Loop, one batch at a time:

1. pick up the newest published policy (``publish.latest_policy``; none: the config's initial
   policy as version 0) and hand it to the sampler: the embedded sampler gets the weights
   (``set_weights``); SGLang / vLLM servers (``rollout.backend``) are asked to load the version's
   Hugging Face layout (written here first when the learner did not, ``publish.write_hf_layout``)
   and the rollouts keep the old version's tag until every server confirmed the new one (a failed
   reload is logged and counted, and tried again before the next batch);
2. take ``rollout.questions_per_batch`` questions from the RL split (``--questions=sft``: the warm
   start's split, ``env.sft_questions``), cycling through it in
   an order fixed by the seed and ``--worker_id`` (a restart resumes at the position after the
   shards already written, so it neither repeats nor skips questions);
3. run ``rollout.group_size`` rollouts of each through the agent (``rollout.agent``);
4. write the records to one ArrayRecord shard ``DIR/rollouts/{worker_id}-{seq:08d}`` (atomic:
   readers never see a partial shard; each group's rollouts consecutive in it);
5. log throughput: trajectories/s, generated tokens/s, invalid-action rate, mean reward (and,
   with ``rollout.reward_metric = "judge"``, the judge's requests, failures and cache hits of
   the shard: a judge failure scores 0, so a rising count means the rewards are undercounted).

With ``rollout.max_shards_per_version`` > 0 a model worker writes at most that many shards per
published policy version, then waits for the next one (at most ``THROTTLE_MAX_WAIT_S`` per
extra shard, so a learner still short of a batch is never starved): on a machine it shares with
the learner it would otherwise spend the CPU on rollouts the learner drops as stale.

SIGTERM (and SIGINT) set a flag: the worker finishes the batch and shard in flight, then exits 0.
On restart the shard sequence continues after the highest one on disk for this worker id, so
every worker needs its own id: ``--worker_id_env=SLURM_PROCID`` appends a launcher's task index.
``--parent_pid`` (set by a trainer for its embedded workers): the worker dies with that process,
so a killed trainer leaves no orphan writing under the worker id its restart reuses.
``--policy=scripted_expert|scripted_noisy`` swaps the model for a scripted policy (SFT data).

With a server backend the worker builds no JAX model: it needs the tokenizer, the corpus and its
retriever, and hands the servers each prompt's pictures and frames (``sampling.http.
ServerVisuals``). A server that answers with weights of another version than the batch's tag
(``sampling.http.VersionChanged``, e.g. another worker reloaded a shared server) makes the worker
drop that batch unwritten and reload.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vimrag_jax import host_memory
from vimrag_jax.faults import kill_point
from vimrag_jax.rollout.local_workers import die_with_parent, parent_alive

if TYPE_CHECKING:
    from vimrag_jax.agent.config import RolloutConfig
    from vimrag_jax.agent.loop import PromptVisuals, VimRAGAgent

_FLAGS: dict[str, flags.FlagHolder] = {}


def _define_flags() -> None:
    # Defined only when run as a program: importing `run_worker` defines no global flags.
    _FLAGS.update(
        config=config_flags.DEFINE_config_file(
            "config", None, "Experiment config file, e.g. configs/ggpo.py[:preset].",
            lock_config=True,
        ),
        workdir=flags.DEFINE_string(
            "workdir", None, "Run directory (policy/, rollouts/, corpus/)."
        ),
        max_trajectories=flags.DEFINE_integer(
            "max_trajectories", 0,
            "Stop after writing at least this many trajectories (0: run forever).",
        ),
        worker_id=flags.DEFINE_string(
            "worker_id", "w0", "Name of this worker (shard name prefix)."
        ),
        worker_id_env=flags.DEFINE_string(
            "worker_id_env", "",
            "Append this environment variable's value to --worker_id (e.g. SLURM_PROCID: one "
            "command line starts many distinct workers).",
        ),
        policy=flags.DEFINE_enum(
            "policy", "model", ["model", "scripted_expert", "scripted_noisy"], "Who acts."
        ),
        shard_dir=flags.DEFINE_string(
            "shard_dir", "", "Where shards go (default: data.shard_dir)."
        ),
        questions=flags.DEFINE_enum(
            "questions", "rl", ["rl", "sft"],
            "Question split: the RL one, or the warm start's (env.sft_questions).",
        ),
        parent_pid=flags.DEFINE_integer(
            "parent_pid", 0,
            "Die with this parent process (set by the trainer for its embedded workers).",
        ),
    )  # fmt: skip


ROLLOUT_DIR = "rollouts"
THROTTLE_POLL_S = 0.25  # how often a throttled worker looks for a newer policy
THROTTLE_MAX_WAIT_S = 20.0  # after this long without one it writes another shard anyway


class StopFlag:
    """Set by SIGTERM / SIGINT; the loop checks it between batches."""

    def __init__(self):
        self.stop = False

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        logging.info("signal %d: stopping after the current shard", signum)
        self.stop = True


def next_sequence(directory: Path, worker_id: str) -> int:
    """The shard sequence number after this worker's highest published shard (0 if none)."""
    from vimrag_jax.rollout.records import SHARD_SUFFIX, list_shards

    pattern = re.compile(rf"^{re.escape(worker_id)}-(\d+){re.escape(SHARD_SUFFIX)}$")
    found = [pattern.match(p.name) for p in list_shards(directory)]
    return max((int(m.group(1)) + 1 for m in found if m), default=0)


def question_order(num_questions: int, worker_id: str, seed: int, epoch: int) -> np.ndarray:
    """The train-split order of one pass for this worker (deterministic)."""
    key = zlib.crc32(worker_id.encode())
    return np.random.default_rng([seed, key, epoch]).permutation(num_questions)


def questions_for_batch(questions, worker_id: str, seed: int, start: int, count: int) -> list:
    """``count`` questions from position ``start`` of this worker's endless question stream."""
    n = len(questions)
    out = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, n)
        out.append(questions[int(question_order(n, worker_id, seed, epoch)[offset])])
    return out


def build_agent(experiment, policy: str):
    """(agent, model or None) for ``policy`` and the config's ``rollout.agent``."""
    from vimrag_jax.envs import scripted_sampler

    rc = experiment.rollout_config()
    model = None
    if policy == "model" and experiment.cfg.rollout.backend != "embedded":
        backend = experiment.make_backend()  # a server generates: no JAX model here
    elif policy == "model":
        model = experiment.initial_model()
        backend = experiment.make_backend(model)
    elif policy == "scripted_expert":
        factory = scripted_sampler.expert_factory(max_calls=rc.max_model_calls)
        backend = scripted_sampler.ScriptedSampler(experiment.tokenizer, factory)
    else:
        factory = scripted_sampler.noisy_factory(experiment.entities, max_calls=rc.max_model_calls)
        backend = scripted_sampler.ScriptedSampler(experiment.tokenizer, factory)
    return experiment_agent(experiment, backend, rc), model


def experiment_agent(experiment: Any, backend: Any, config: RolloutConfig) -> VimRAGAgent:
    """The configured agent (``rollout.agent``) on the experiment's corpus and tokenizer."""
    from vimrag_jax.agent import baselines

    return baselines.make_agent(
        config,
        experiment.store,
        experiment.tokenizer,
        backend,
        stop_token_ids=experiment.stop_token_ids(),
        visual_patches=visual_patches(backend, experiment.store),
    )


def visual_patches(backend: Any, store: Any) -> PromptVisuals | None:
    """The pixels builder for a backend whose model sees images and videos (else None): the
    backend's own (``visuals``: a server takes pictures, not patches) or processor patches."""
    if not getattr(backend, "takes_prefill_inputs", False):
        return None
    if hasattr(backend, "visuals"):
        return backend.visuals(store)
    from vimrag_jax.data.vision import VisualPatches

    return VisualPatches.from_store(store)


def hf_layout_enabled(cfg: Any) -> bool:
    """``publish.hf_layout``: "on", "off", or "auto" (on for the sglang and vllm backends)."""
    from vimrag_jax.experiment import SERVER_BACKENDS

    value = cfg.publish.get("hf_layout", "auto")
    return cfg.rollout.backend in SERVER_BACKENDS if value == "auto" else value == "on"


class ServerWeights:
    """Keeps a server backend on the newest published version (module docstring, step 1).

    ``poll()`` returns the version rollouts are tagged with now. A published version newer
    than the one loaded is brought to the servers once; a failure is counted in ``failures``
    and logged, the tag stays, and the next poll tries again. Each poll also logs the requests
    that failed over since the last one (``sampling.http.ServerPool.failures``), so a server
    that keeps failing shows in the worker log while the others carry its load.
    """

    def __init__(self, experiment: Any, backend: Any, worker_id: str):
        self.experiment, self.backend, self.worker_id = experiment, backend, worker_id
        self.version = 0  # the initial policy's label when nothing is published
        self.loaded = -1  # the newest published version the servers confirmed
        self.failures = 0
        self.reloads = 0
        self._sync = getattr(backend, "sync_weights", None)
        if self._sync is None and getattr(backend, "reload_url", None):
            self._sync = backend.reload_weights  # the text-only client's reload hook
        if self._sync is None:
            logging.warning(
                "worker %s: the %s backend cannot reload weights; rollouts stay tagged with the "
                "initial policy's version 0",
                worker_id, type(backend).__name__,
            )  # fmt: skip
        self._hf = hf_layout_enabled(experiment.cfg)
        self._failed_tries = 0  # the pool's failed tries already logged

    def log_failovers(self) -> None:
        """Logs the server failures since the last call (none: nothing)."""
        pool = getattr(self.backend, "pool", None)
        failures = getattr(pool, "failures", None)
        if not failures or sum(failures.values()) <= self._failed_tries:
            return
        self._failed_tries = sum(failures.values())
        logging.warning(
            "worker %s: %d request tries failed on unavailable servers so far %s; %d requests "
            "answered by another server; cooling down: %s",
            self.worker_id, self._failed_tries, dict(failures),
            getattr(self.backend, "failovers", 0), pool.cooling() or "none",
        )  # fmt: skip

    def poll(self) -> int:
        from vimrag_jax import publish
        from vimrag_jax.sampling.http import GenerationError

        self.log_failovers()
        found = publish.latest_policy(self.experiment.workdir)
        if self._sync is None or found is None or found[0] <= self.loaded:
            return self.version
        version, path = found
        began = time.perf_counter()
        try:
            if self._hf:
                path = publish.write_hf_layout(
                    path,
                    self.experiment.abstract_model,
                    tokenizer=self.experiment.tokenizer,
                    source_dir=self.experiment.hf_source_dir(),
                )
            ok = bool(self._sync(str(path), version))
            error = getattr(self.backend, "last_reload_error", "the server refused")
        except (GenerationError, OSError) as failure:  # a pruned version, an unreachable server
            ok, error = False, str(failure)
        self.reloads += 1
        if not ok:
            self.failures += 1
            logging.warning(
                "worker %s: reload of policy v%d failed (%d failed so far); rollouts stay "
                "tagged v%d: %s",
                self.worker_id, version, self.failures, self.version, error,
            )  # fmt: skip
            return self.version
        self.version = self.loaded = version
        logging.info(
            "worker %s: servers serve policy v%d (reloaded in %.1f s)",
            self.worker_id, version, time.perf_counter() - began,
        )  # fmt: skip
        return version

    def confirmed(self) -> bool:
        """Whether every server reports serving ``version`` (SGLang's ``weight_version``);
        False where the backend reports no version (vLLM, the text-only client) or a server
        reports another one."""
        from vimrag_jax.sampling.http import GenerationError

        served = getattr(self.backend, "served_version", None)
        if served is None:
            return False
        try:
            return all(served(url) == str(self.version) for url in self.backend.urls)
        except GenerationError:
            return False

    def sync(self) -> tuple[int, bool]:
        """Brings the servers to the newest published version (`poll`) for an evaluation:
        (the version they serve, whether they confirmed it, `confirmed`)."""
        version = self.poll()
        return version, self.confirmed()


def run_worker(
    cfg,
    workdir: str,
    *,
    worker_id: str,
    policy: str,
    max_trajectories: int,
    shard_dir: str = "",
    questions: str = "rl",
    stop: StopFlag | None = None,
    parent_pid: int = 0,
) -> int:
    """The worker loop (see the module docstring); returns the trajectories written.

    ``questions`` picks the split it cycles through: ``rl`` (``Experiment.train_questions``)
    or ``sft`` (``Experiment.sft_questions``, the scripted expert's for the warm start).
    """
    from vimrag_jax.envs.judge import Judge, stats_delta
    from vimrag_jax.experiment import Experiment
    from vimrag_jax.rollout.records import ShardWriter, shard_name
    from vimrag_jax.rollout.trajectory import mean_reward, record_dims, run_records
    from vimrag_jax.sampling.http import VersionChanged

    stop = stop or StopFlag()
    experiment = Experiment.from_config(cfg, workdir)
    rc = experiment.rollout_config()
    directory = Path(shard_dir or cfg.data.get("shard_dir", "") or Path(workdir) / ROLLOUT_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    if questions not in ("rl", "sft"):
        raise ValueError(f"questions must be 'rl' or 'sft', got {questions!r}")
    pool = experiment.sft_questions if questions == "sft" else experiment.train_questions
    agent, model = build_agent(experiment, policy)
    judge = Judge.from_config(cfg, workdir)  # None unless rollout.reward_metric == "judge"
    server = None
    if policy == "model" and model is None:
        server = ServerWeights(experiment, agent.backend, worker_id)
    version = 0  # the initial policy's label when nothing is published
    loaded = -1  # the newest published version loaded (a published v0 must be loaded too)
    seed = int(cfg.get("seed", 0))
    sequence = next_sequence(directory, worker_id)
    written = discarded = 0
    logging.info(
        "worker %s: policy=%s agent=%s questions=%s (%d) shards from #%d in %s",
        worker_id,
        policy,
        rc.agent,
        questions,
        len(pool),
        sequence,
        directory,
    )
    # On a machine shared with the learner, rollouts of a policy the learner has moved well past
    # are dropped as stale: at most this many shards per published version (0: no limit).
    per_version = int(cfg.rollout.get("max_shards_per_version", 0)) if policy == "model" else 0
    at_version = 0  # shards written with the current version
    waiting_since = None
    while not stop.stop and (max_trajectories <= 0 or written < max_trajectories):
        if parent_pid and not parent_alive(parent_pid):
            logging.info("worker %s: the trainer that started it is gone; stopping", worker_id)
            break
        newer = None
        if server is not None:
            tag = server.poll()
            newer = tag if tag != version else None
            version = tag
        elif model is not None:
            newer = experiment.load_latest(model, newer_than=loaded)
            if newer is not None:
                agent.backend.set_weights(model)
                version = loaded = newer
                logging.info("worker %s: policy version %d", worker_id, version)
        if newer is not None:
            at_version, waiting_since = 0, None
        elif per_version and at_version >= per_version:
            if waiting_since is None:
                waiting_since = time.monotonic()
                logging.info(
                    "worker %s: %d shards of policy v%d written "
                    "(rollout.max_shards_per_version); waiting for a newer one",
                    worker_id, at_version, version,
                )  # fmt: skip
            # Bounded: a learner still short of a full batch (most groups skipped as
            # uniform, say) publishes nothing until more rollouts come.
            if time.monotonic() - waiting_since < THROTTLE_MAX_WAIT_S:
                time.sleep(THROTTLE_POLL_S)
                continue
            waiting_since = None  # one more shard, then wait again
        count = rc.questions_per_batch
        if max_trajectories > 0:
            count = min(count, -(-(max_trajectories - written) // rc.group_size))
        start = sequence * rc.questions_per_batch
        batch = questions_for_batch(pool, worker_id, seed, start, count)
        group_ids = [f"{worker_id}-{sequence:08d}-{i}" for i in range(count)]
        began = time.perf_counter()
        judged = judge.stats() if judge is not None else {}
        try:
            records, out = run_records(
                agent,
                batch,
                group_size=rc.group_size,
                policy_version=version,
                seed=_batch_seed(seed, worker_id, sequence),
                group_ids=group_ids,
                env_name=experiment.env_name,
                worker_id=worker_id,
                judge=judge,
            )
        except VersionChanged as changed:
            if server is None:
                raise
            discarded += 1
            logging.warning(
                "worker %s: batch %d dropped unwritten (%d so far): %s; reloading the servers",
                worker_id, sequence, discarded, changed,
            )  # fmt: skip
            server.loaded = -1  # bring every server to the newest version again
            continue
        name = shard_name(worker_id, sequence)
        with ShardWriter(directory, name=name, dims=record_dims(rc)) as writer:
            for record in records:
                writer.write(record)
        if policy == "scripted_expert":  # the trainer waits for these: kill it half-way
            kill_point("expert_data", sequence, parent=True)
        elapsed = time.perf_counter() - began
        written += len(records)
        stats = out.stats
        logging.info(
            "worker %s shard %d: %d trajectories (%.2f/s), %.1f generated tokens/s, "
            "invalid-action rate %.3f, mean reward %.3f, policy v%d, %.0f%% outside the model",
            worker_id,
            sequence,
            len(records),
            len(records) / elapsed,
            stats.generated_tokens / elapsed,
            stats.invalid_rate,
            mean_reward(records),
            version,
            100 * stats.outside_model_share,
        )
        if judge is not None:
            shard = stats_delta(judge.stats(), judged)
            logging.info(
                "worker %s shard %d: judge %d requests, %d failures (scored 0), %d cache hits; "
                "totals %s",
                worker_id, sequence, shard["judge_calls"], shard["judge_failures"],
                shard["judge_cache_hits"], judge.stats(),
            )  # fmt: skip
        sequence += 1
        at_version += 1
    if server is not None:
        logging.info(
            "worker %s: %d weight reloads, %d failed, %d batches dropped for a version change",
            worker_id, server.reloads, server.failures, discarded,
        )  # fmt: skip
        if hasattr(agent.backend, "close"):
            agent.backend.close()
    if judge is not None:
        logging.info("worker %s: judge totals %s", worker_id, judge.stats())
        judge.close()
    logging.info("worker %s: stopped after %d trajectories", worker_id, written)
    return written


def _batch_seed(seed: int, worker_id: str, sequence: int) -> int:
    return zlib.crc32(f"{seed}/{worker_id}/{sequence}".encode()) & 0x7FFFFFFF


def worker_id(base: str, env_var: str, environ: Mapping[str, str]) -> str:
    """``base`` followed by ``environ[env_var]`` (``base`` alone without ``env_var``): distinct
    ids for the workers one launcher line starts, stable across their restarts (an id keys its
    shard sequence and question order). UsageError when the variable is unset."""
    if not env_var:
        return base
    if env_var not in environ:
        raise app.UsageError(f"--worker_id_env={env_var}, but {env_var} is not set")
    return f"{base}{environ[env_var]}"


def flag_values(holders: dict[str, flags.FlagHolder], argv: list[str]) -> dict[str, Any]:
    """A program's flag values by name; UsageError on positional arguments or without
    ``--config`` and ``--workdir`` (the worker's and the evaluator's common flags)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    value = {name: holder.value for name, holder in holders.items()}
    if value["config"] is None or not value["workdir"]:
        raise app.UsageError("--config and --workdir are required")
    return value


def main(argv: list[str]) -> int:
    value = flag_values(_FLAGS, argv)
    value["worker_id"] = worker_id(value["worker_id"], value.pop("worker_id_env"), os.environ)
    stop = StopFlag().install()
    from vimrag_jax.resume import use_compile_cache

    use_compile_cache(value["config"].compile_cache, value["workdir"])
    if value["parent_pid"]:
        die_with_parent(value["parent_pid"])
    run_worker(
        value["config"],
        value["workdir"],
        worker_id=value["worker_id"],
        policy=value["policy"],
        max_trajectories=value["max_trajectories"],
        shard_dir=value["shard_dir"],
        questions=value["questions"],
        stop=stop,
        parent_pid=value["parent_pid"],
    )
    return 0


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()  # huge pages for XLA:CPU's temporaries
    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
