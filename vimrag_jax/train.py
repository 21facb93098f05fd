"""The learner: ``python -m vimrag_jax.train --config=configs/ggpo.py --workdir=DIR``.

Reads top to bottom: config → distributed start → mesh → experiment (world, tokenizer,
initial policy) → checkpoints and metrics → optional supervised warm start on scripted-expert
trajectories (``sft.steps``) → RL (GGPO by default; the ``loss`` block picks GSPO / GRPO) on
the rollout workers' shards, publishing policy weights every ``publish.every_steps`` updates
(written by a background thread of process 0 while the next updates run: ``publish.background``).
With ``rollout.embedded_workers > 0`` (the CPU default) the trainer runs its own rollout worker
processes; on pods ``launch/`` starts them elsewhere.

Restarting with the same ``--workdir`` resumes, after a clean stop or a kill at any moment:
the newest orbax checkpoint gives the train state, the policy version and the input pipeline's
ledger as of one step, so no trajectory is trained twice on the surviving timeline; the policy
versions published after that checkpoint are lost and their rollouts dropped and counted
(`vimrag_jax.resume`, `vimrag_jax.timeline`); a checkpoint waits until the version it names is
written, so a version cut short by the kill is always newer than the checkpoint's, never needed.
``faults.kill_point`` marks the moments tests and the kill drill kill the learner at.

Exit status: 0 done, 2 bad config, 3 no rollout data arrived in time (or no warm-start data).
"""

from __future__ import annotations

from vimrag_jax import host_memory

if __name__ == "__main__":  # glibc reads its tunables at start: re-execute before importing jax
    host_memory.reexec_with_huge_pages()

import collections
import contextlib
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vimrag_jax import config_checks, distributed, optim, publish
from vimrag_jax.checkpointing import (
    Checkpointer,
    quiet_orbax_info,
    run_metadata,
    this_process_data,
)
from vimrag_jax.data.pipeline import (
    PolicyVersion,
    drop_late_segments,
    make_pipeline,
    options_from_config,
    visual_stage_from_config,
)
from vimrag_jax.data.pipeline import pipeline_metrics as read_pipeline_counters
from vimrag_jax.faults import kill_point
from vimrag_jax.footprint import param_dtype
from vimrag_jax.learner import Learner, batch_token_counts
from vimrag_jax.metrics import MetricWriter
from vimrag_jax.parallel.mesh import mesh_from_config
from vimrag_jax.resume import (
    continue_timeline,
    expert_trajectories_missing,
    mark_expert_data_done,
    read_phase,
    use_compile_cache,
    write_phase,
)
from vimrag_jax.rl.losses import LossConfig, behavior_gap_warning
from vimrag_jax.rollout.local_workers import LocalWorkers, config_flags_from_argv
from vimrag_jax.rollout.records import ROLLOUT_DIR
from vimrag_jax.rollout.trajectory import record_dims
from vimrag_jax.rollout.worker import hf_layout_enabled
from vimrag_jax.timeline import NO_LOSS, Timeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/ggpo.py[:preset].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and rollouts.")

SFT_DATA_DIR = "sft_data"
EXIT_BAD_CONFIG = 2
EXIT_NO_DATA = 3


class NoRolloutData(RuntimeError):
    """No trajectory arrived for ``data.max_wait_s`` seconds."""


class NoWarmStartData(RuntimeError):
    """A pass over the warm-start shards gave this process no batch."""


def _dropped(counters: dict[str, int]) -> str:
    """What the pipeline has read and thrown away (``PipelineOptions.progress``), for a learner
    that waits in vain: a policy whose every group got one reward, under
    ``data.skip_uniform_groups``, starves it as surely as a dead worker does."""
    c = collections.defaultdict(int, counters)
    return (
        f"records read so far {c['records_read']} ({c['stale_records']} already stale), dropped: "
        f"{c['uniform_records']} in groups with one reward for all, "
        f"{c['incomplete_records']} in incomplete groups, {c['corrupt_records']} corrupt"
    )


def _without_late_segments(
    batch, version: int, max_lag: int, timeline: Timeline = NO_LOSS
) -> tuple[dict | None, int]:
    """(``batch`` without the segments lagging more than ``max_lag`` versions of ``timeline``
    behind ``version`` (``data.pipeline.drop_late_segments``), or None when no process has a
    segment left to train; the number dropped over all processes). Collective on several
    processes."""
    batch, late = drop_late_segments(batch, version, max_lag, timeline)
    late = int(distributed.sum_over_processes({"late": late})["late"])
    if late and not distributed.max_over_processes(bool(batch["segment_valid"].any())):
        logging.info("skipped a batch: all its segments lag more than %d versions", max_lag)
        return None, late
    return batch, late


class RolloutReward:
    """``rollout_reward``: the share of positive rollouts (reward >= ``loss.positive_threshold``;
    the mean reward, for the binary outcome reward) among those the pipeline read since the last
    report (every complete group, before the lag and uniform-reward filters), i.e. how well the
    workers' recent policies do; absent from a step that read nothing new."""

    def __init__(self, counters: dict[str, float] | None = None):
        self._last = self._read(counters) if counters else (0, 0)

    @staticmethod
    def _read(counters: dict[str, float]) -> tuple[int, int]:
        return int(counters["records_read"]), int(counters["rewarded_records"])

    def update(self, counters: dict[str, float]) -> dict[str, float]:
        now = self._read(counters)
        last, self._last = self._last, now
        if now[0] <= last[0]:
            return {}
        return {"rollout_reward": (now[1] - last[1]) / (now[0] - last[0])}


class Trainer:
    """Runs the phases of one training run (see the module docstring)."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, config_flags: list[str]):
        from vimrag_jax.experiment import Experiment  # imports the agent stack; keep --help fast

        self.cfg = cfg
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_flags = config_flags
        self.mesh = mesh_from_config(cfg.mesh, jax.devices())
        self.experiment = Experiment.from_config(cfg, self.workdir)
        self.dims = record_dims(self.experiment.rollout_config())
        self.pad_id = int(self.experiment.tokenizer.pad_token_id or 0)
        self.model_fn = self.experiment.learner_model_fn()
        self.checkpointer = Checkpointer.from_config(self.workdir, cfg.checkpoint)
        self._eval_backend = None
        self.publisher = publish.BackgroundPublisher(
            self.workdir,
            keep=int(cfg.publish.keep),
            background=bool(cfg.publish.get("background", True)),
        )
        self.micro = int(cfg.optim.accumulate_steps)  # step calls per optimizer update
        self.sft_calls = int(cfg.sft.steps) * self.micro
        self.rl_calls = 0 if cfg.algorithm == "sft" else int(cfg.optim.total_steps) * self.micro
        self.writer = MetricWriter(
            self.workdir,
            total_steps=self.sft_calls + self.rl_calls,
            log_every=int(cfg.metrics.every_steps),
        )
        logging.info(
            "mesh %s over %d %s device(s); phases: sft %d steps, rl %d steps (%s)",
            dict(self.mesh.shape), self.mesh.size, jax.devices()[0].platform,
            self.sft_calls, self.rl_calls, cfg.algorithm,
        )  # fmt: skip

    # --- shared pieces ----------------------------------------------------------------

    def _batches(self, options, data_state: dict | None):
        # A vision-language policy's segments carry their images and videos (None: text only).
        visual = visual_stage_from_config(
            self.cfg,
            self.model_fn,
            self.experiment.store,
            self.experiment.rollout_config().max_visual_patches,
        )
        dataset = make_pipeline(options, visual_inputs=visual, prefetch=int(self.cfg.data.prefetch))
        iterator = iter(dataset)
        if data_state:
            iterator.set_state(data_state)
        return iterator

    def _log(
        self, global_step: int, metrics: dict[str, float], batch, data_wait_s: float, prefix=""
    ):
        tokens, trained = batch_token_counts(batch, self.pad_id)  # this process's rows
        counts = distributed.sum_over_processes({"tokens": tokens, "trained": trained})
        metrics = {
            **metrics,
            "tokens_per_s": counts["tokens"] / max(metrics["step_time_s"], 1e-9),
            "trained_tokens": counts["trained"],
            "data_wait_s": data_wait_s,
        }
        self.writer.write(global_step, {prefix + key: value for key, value in metrics.items()})

    @staticmethod
    def _counters(data_state: dict) -> dict[str, float]:
        """The input pipelines' counters (``data/*`` metrics), summed over the processes."""
        return distributed.sum_over_processes(read_pipeline_counters(data_state))

    # --- supervised warm start --------------------------------------------------------

    def _sft_data(self) -> Path:
        """The warm start's shards: ``sft.data``, or scripted-expert trajectories written to
        ``WORKDIR/sft_data`` (only those still missing after a kill; then marked done)."""
        if self.cfg.sft.data:
            return Path(self.cfg.sft.data)
        directory = self.workdir / SFT_DATA_DIR
        trajectories = int(self.cfg.sft.num_trajectories)
        main = distributed.is_main_process()
        missing = expert_trajectories_missing(directory, trajectories) if main else 0
        if missing:
            logging.info(
                "writing %d scripted-expert trajectories (of %d) for the warm start to %s",
                missing, trajectories, directory,
            )  # fmt: skip
            extra = [
                "--policy=scripted_expert",
                "--questions=sft",
                f"--max_trajectories={missing}",
                f"--shard_dir={directory}",
            ]
            if jax.process_count() > 1:  # every process reads its own shards: write enough
                group, count = int(self.cfg.rollout.group_size), jax.process_count()
                per_shard = max(1, trajectories // (group * count))
                questions = min(int(self.cfg.rollout.questions_per_batch), per_shard)
                extra.append(f"--config.rollout.questions_per_batch={questions}")
            expert = LocalWorkers(self.config_flags, self.workdir, count=1, extra_flags=extra)
            code = expert.run_once("expert")
            if code != 0:
                raise RuntimeError(
                    f"the scripted-expert worker failed (status {code}); see "
                    f"{self.workdir / 'logs' / 'expert.log'}"
                )
        if main:
            mark_expert_data_done(directory)
        distributed.barrier("sft_data")
        return directory

    def run_sft(self) -> Any:
        """The warm start; returns the parameters it ends with (exported and evaluated when
        the run is SFT only)."""
        learner = Learner(
            self.model_fn,
            optim.make_optimizer(
                optim.sft_optim_config(self.cfg), param_dtype=param_dtype(self.cfg)
            ),
            LossConfig.for_algorithm("sft"),
            self.mesh,
            step_kind=self.cfg.step,
            length_bucket=int(self.cfg.data.length_bucket),
            micro_batches=int(self.cfg.optim.micro_batches),
        )
        restored = learner.restore(self.checkpointer)
        data_state: dict = {}
        if restored is None:
            learner.initialize(self.experiment.initial_params(self.mesh))
        else:
            data_state = this_process_data(restored)
            logging.info("resumed the warm start at step %d", learner.step)
        directory = self._sft_data()
        options = options_from_config(
            self.cfg,
            directory,
            self.dims,
            follow=False,
            advantage="one",
            batch_segments=int(self.cfg.sft.get("batch_segments", 0)) or None,
        )
        epoch = int(data_state.get("epoch", 0))
        iterator = self._batches(options, data_state.get("iterator"))
        batches_this_pass, resumed = 0, bool(data_state)

        def next_batch():
            """This process's next batch, starting a new pass over the shards when one ends;
            None when a whole pass (not a resumed one) gave nothing."""
            nonlocal epoch, iterator, batches_this_pass, resumed
            while True:
                try:
                    batch = next(iterator)
                except StopIteration:  # one pass over the expert data done
                    if batches_this_pass == 0 and not resumed:
                        return None
                    epoch, batches_this_pass, resumed = epoch + 1, 0, False
                    iterator = self._batches(options, None)
                    continue
                batches_this_pass += 1
                return batch

        while learner.step < self.sft_calls:
            began = time.perf_counter()
            batch = next_batch()
            # Every process steps together: all stop when any of them has nothing to read.
            if distributed.max_over_processes(batch is None):
                where = "this process" if batch is None else "another process"
                raise NoWarmStartData(
                    f"{where} (process {jax.process_index()} of {jax.process_count()}) found no "
                    f"warm-start segments in {directory}; every process reads its own shards, "
                    "so a shard set needs at least one per process"
                )
            wait = time.perf_counter() - began
            metrics = learner.train_step(batch)
            metrics["epoch"] = float(epoch)
            metrics["learning_rate"] = optim.learning_rate_at(
                optim.sft_optim_config(self.cfg), learner.step - 1
            )
            self._log(learner.step, metrics, batch, wait, prefix="sft/")
            kill_point("sft_step", learner.step)
            learner.save(
                self.checkpointer,
                learner.step,
                data_state={"epoch": epoch, "iterator": iterator.get_state()},
                metadata=run_metadata(self.cfg, 0, phase="sft"),
                force=learner.step == self.sft_calls,
            )
        if self.rl_calls == 0:  # the end of the run: export first (the result), then evaluate
            self._export(learner)
            if self.cfg.eval.at_end:
                self._evaluate(learner, 0, learner.step)
        return learner.params()

    # --- reinforcement learning --------------------------------------------------------

    def _evaluate(self, learner: Learner, version: int, global_step: int) -> None:
        """Greedy episodes on the held-out questions with the learner's current policy."""
        if self.cfg.rollout.backend != "embedded":
            return  # a served policy is evaluated with `python -m vimrag_jax.eval` instead
        model = learner.model()  # every process: several gather the parameters for process 0
        if not distributed.is_main_process():
            return
        from vimrag_jax import eval as eval_lib

        if self._eval_backend is None:
            self._eval_backend = self.experiment.make_backend(model)
        else:
            self._eval_backend.set_weights(model)
        metrics = eval_lib.evaluate(
            self.experiment,
            self._eval_backend,
            num_questions=int(self.cfg.eval.num_questions) or None,
            policy_version=version,
            episodes_dir=self.workdir / eval_lib.EVAL_DIR,
        )
        kill_point("eval", global_step)
        eval_lib.write_report(self.workdir, version, metrics)
        self.writer.write(global_step, {f"eval/{k}": v for k, v in metrics.items()})
        logging.info("eval at policy v%d: %s", version, metrics)

    def _export(self, learner: Learner) -> None:
        """The final policy (and tokenizer) as a Hugging Face checkpoint in WORKDIR/export."""
        if not self.cfg.export.hf:
            return
        model = learner.model()  # every process: several gather the parameters for process 0
        if not distributed.is_main_process():
            return
        from vimrag_jax.models.hf import save_pretrained

        # Written beside the target and swapped in whole: a kill leaves the previous export or
        # none, never a partial one (leftovers of a killed export are removed here).
        directory = self.workdir / "export"
        for stale in self.workdir.glob(".export-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = self.workdir / f".export-{os.getpid()}"
        try:
            save_pretrained(model, staging, dtype=self.cfg.export.dtype)
        except NotImplementedError as err:  # e.g. a model without an exporter yet
            logging.warning("no Hugging Face export: %s", err)
            return
        self.experiment.tokenizer.save_pretrained(str(staging))
        kill_point("export")
        if directory.exists():
            old = self.workdir / f".export-old-{os.getpid()}"
            os.rename(directory, old)
            shutil.rmtree(old)
        os.rename(staging, directory)
        logging.info("exported the final policy to %s", directory)

    def _publish(self, learner: Learner, version: int, step: int) -> None:
        """Publishes the learner's policy as ``version``: gathered now (every process), written
        by `self.publisher` (on a background thread with ``publish.background``)."""
        # Workers read the plain parameter tree (`Experiment.load_latest`): no Variable boxes.
        params = learner.params().to_pure_dict()
        hf_writer = None
        if hf_layout_enabled(self.cfg):  # what SGLang / vLLM load, inside the atomic publish
            experiment = self.experiment

            def hf_writer(directory: Path) -> None:
                publish.write_hf_layout(
                    directory.parent,
                    experiment.abstract_model,
                    tokenizer=experiment.tokenizer,
                    source_dir=experiment.hf_source_dir(),
                    dtype=str(self.cfg.export.dtype),
                )

        self.publisher.submit(params, version, step=step, hf_writer=hf_writer)

    def run_rl(self, start_params: Any | None) -> None:
        cfg = self.cfg
        loss_config = LossConfig.from_config(cfg.loss)
        gap_warned = False
        learner = Learner(
            self.model_fn,
            optim.make_optimizer(cfg.optim, param_dtype=param_dtype(cfg)),
            loss_config,
            self.mesh,
            step_kind=cfg.step,
            length_bucket=int(cfg.data.length_bucket),
            micro_batches=int(cfg.optim.micro_batches),
        )
        data_state: dict = {}
        version, late_segments = 0, 0
        self.checkpointer.wait()  # the warm start's last save may still be in flight
        restored = learner.restore(self.checkpointer)
        if restored is not None and restored.metadata.get("phase") == "rl":
            data_state, metadata = this_process_data(restored), restored.metadata
            version = int(metadata.get("policy_version", 0))
            late_segments = int(metadata.get("late_segments", 0))
            logging.info("resumed RL at step %d, policy version %d", learner.step, version)
        else:
            # From the warm start (just run, or its last checkpoint) or from scratch.
            params = start_params
            if params is None and restored is not None:
                params = learner.params()
                logging.info("starting RL from the warm start's last checkpoint")
            if params is None:
                params = self.experiment.initial_params(self.mesh)
            learner.initialize(params)
        offset = self.sft_calls  # checkpoint steps continue after the warm start's
        write_phase(self.workdir, {"phase": "rl", "checkpoint_offset": offset})

        version, timeline = continue_timeline(
            self.workdir,
            version,
            offset + learner.step,
            lambda new: self._publish(learner, new, offset + learner.step),
        )
        self.publisher.wait()  # the restored policy is on disk before any worker starts
        current = PolicyVersion(version)
        directory = Path(cfg.data.shard_dir or self.workdir / ROLLOUT_DIR)
        directory.mkdir(parents=True, exist_ok=True)
        options = options_from_config(
            cfg,
            directory,
            self.dims,
            current_version=current,
            skip_uniform_groups=bool(cfg.data.skip_uniform_groups),
            timeline=timeline,
        )
        options = dataclasses.replace(options, progress={})
        workers = LocalWorkers(
            self.config_flags,
            self.workdir,
            count=int(cfg.rollout.embedded_workers) if distributed.is_main_process() else 0,
        )
        workers.start()
        rollout_reward = RolloutReward(self._counters(data_state) if data_state else None)
        # max_policy_lag applies again at the update (`_without_late_segments`); late_segments
        # counts what that dropped and is kept in the checkpoint's metadata.
        max_lag = int(cfg.rollout.max_policy_lag)
        try:
            iterator = self._batches(options, data_state)
            last_data = time.monotonic()
            pending = None  # this process's next batch, held until every process has one
            while learner.step < self.rl_calls:
                if pending is None:
                    began = time.perf_counter()
                    with contextlib.suppress(StopIteration):  # none within the idle timeout
                        pending = next(iterator)
                if not distributed.all_processes(pending is not None):
                    workers.check()
                    waited = time.monotonic() - last_data
                    # Process 0's clock decides, so that every process gives up together.
                    if distributed.broadcast_from_main(waited > float(cfg.data.max_wait_s)):
                        raise NoRolloutData(
                            f"no trainable rollout arrived in {directory} for {waited:.0f} s "
                            f"(data.max_wait_s); {_dropped(options.progress)}. Are the "
                            "rollout workers running?"
                        )
                    logging.info("waiting for rollouts in %s (%.0f s)", directory, waited)
                    continue
                batch, pending = pending, None
                last_data = time.monotonic()
                wait = time.perf_counter() - began
                batch, late = _without_late_segments(batch, version, max_lag, timeline)
                late_segments += late
                if batch is None:
                    continue
                metrics = learner.train_step(batch)
                if not gap_warned and (message := behavior_gap_warning(metrics, loss_config)):
                    logging.warning(message)
                    gap_warned = True
                kill_point("rl_step", offset + learner.step)
                trained_version = version  # the policy this batch updated (lag is to it)
                if learner.step % self.micro == 0:
                    updates = learner.step // self.micro
                    if updates % int(cfg.publish.every_steps) == 0:
                        version += 1
                        self._publish(learner, version, offset + learner.step)
                        current.set(version)
                    every = int(cfg.eval.every_steps)
                    if every and updates % every == 0 and learner.step < self.rl_calls:
                        self._evaluate(learner, version, offset + learner.step)
                valid = np.asarray(batch["segment_valid"], bool)
                if valid.any():
                    sampled = np.asarray(batch["policy_version"])[valid]
                    metrics["policy_lag"] = float(
                        timeline.surviving_lag(sampled, trained_version).mean()
                    )
                metrics["policy_version"] = float(version)
                metrics["late_segments"] = float(late_segments)
                metrics["learning_rate"] = optim.learning_rate_at(cfg.optim, learner.step - 1)
                counters = self._counters(iterator.get_state())
                metrics.update({f"data/{k}": v for k, v in counters.items()})
                metrics.update(rollout_reward.update(counters))
                metrics["workers_restarted"] = float(workers.restarts)
                if self.publisher.last_write_s is not None:
                    metrics["publish_s"] = self.publisher.last_write_s  # the last finished write
                self._log(offset + learner.step, metrics, batch, wait)
                last = learner.step == self.rl_calls
                if last or self.checkpointer.should_save(offset + learner.step):
                    # A checkpoint names `version` as published: it is on disk first, so a kill
                    # never restores a version newer than the disk (`resume.continue_timeline`).
                    self.publisher.wait()
                saved = learner.save(
                    self.checkpointer,
                    offset + learner.step,
                    data_state=iterator.get_state(),
                    metadata=run_metadata(cfg, version, phase="rl", late_segments=late_segments),
                    force=last,
                )
                if saved:  # the save is written in the background: a kill here interrupts it
                    kill_point("checkpoint", offset + learner.step)
                workers.check()
        finally:
            try:
                self.publisher.wait()  # the last version on disk; a failed write is raised
            finally:
                workers.stop()
        # Export first: the run's result is on disk before the (long, at scale) evaluation.
        self._export(learner)
        if cfg.eval.at_end:
            self._evaluate(learner, version, offset + learner.step)

    def run(self) -> int:
        phase = read_phase(self.workdir)
        params = None
        try:
            if phase["phase"] != "rl" and self.sft_calls > 0:
                params = self.run_sft()
            if self.rl_calls > 0:
                self.run_rl(params)
        except (NoRolloutData, NoWarmStartData) as err:
            logging.error("%s", err)
            return EXIT_NO_DATA
        finally:
            self.checkpointer.close()
            self.writer.close()
        logging.info("training done; checkpoints in %s", self.checkpointer.directory)
        return 0


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config=configs/ggpo.py")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (checkpoints, metrics and rollouts go there)")
    quiet_orbax_info()
    distributed.maybe_initialize(cfg)
    try:
        config_checks.validate(cfg, len(jax.devices()), process_count=jax.process_count())
    except config_checks.ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_BAD_CONFIG
    use_compile_cache(cfg.compile_cache, _WORKDIR.value)  # before the first compile
    trainer = Trainer(cfg, _WORKDIR.value, config_flags_from_argv(sys.argv[1:]))
    return trainer.run()


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
