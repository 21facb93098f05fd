"""Times the learner's grain input pipeline against the learner consuming its batches.

Shards: scripted-expert trajectories of the default (``tiny``) ``configs/ggpo.py``, written by
the real rollout worker (``run_worker(policy="scripted_expert")``) into a temporary workdir,
so record sizes, segment counts and groups are those a run trains on.

Pipeline alone: ``make_pipeline(options_from_config(..., follow=False, advantage="group"))``
read to the end, with prefetch 0 and with the config's ``data.prefetch``; valid segments/s and
batches/s, best of ``--repeats`` passes. Baseline, "learner consumption": the tiny policy's
GGPO ``Learner.train_step`` fed by the same pipeline (config prefetch), timing per step the
wait in ``next(iterator)`` and the step itself; the first (compiling) step is excluded. Target:
data wait < 5 % of the learner's wall time, i.e. the pipeline is never the bottleneck.

    python benchmarks/pipeline.py [--trajectories 256] [--learner_steps 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

TARGET_WAIT_SHARE = 0.05


def load_config():
    """The default (tiny) ``configs/ggpo.py``, imported by path like the config flags do."""
    path = Path(__file__).resolve().parents[1] / "configs" / "ggpo.py"
    spec = importlib.util.spec_from_file_location("ggpo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def time_pipeline(make_iterator, repeats: int) -> tuple[float, int, int]:
    """(best seconds for one full pass, valid segments, batches) over ``repeats`` passes."""
    best, segments, batches = float("inf"), 0, 0
    for _ in range(repeats):
        began = time.perf_counter()
        segments = batches = 0
        for batch in make_iterator():
            segments += int(np.sum(batch["segment_valid"]))
            batches += 1
        best = min(best, time.perf_counter() - began)
    return best, segments, batches


def time_learner(learner, make_iterator, steps: int) -> tuple[list[float], list[float], list[int]]:
    """Per timed step: seconds waiting in ``next``, seconds in ``train_step``, valid segments.

    Runs ``steps + 1`` steps (the first compiles and is dropped), starting a new pass over
    the shards when one ends, as the warm start does.
    """
    waits, steps_s, segments = [], [], []
    iterator = make_iterator()
    while len(steps_s) < steps + 1:
        began = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = make_iterator()
            continue
        wait = time.perf_counter() - began
        metrics = learner.train_step(batch)  # returns host floats: the step has finished
        waits.append(wait)
        steps_s.append(metrics["step_time_s"])
        segments.append(int(np.sum(batch["segment_valid"])))
    return waits[1:], steps_s[1:], segments[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=256, help="scripted rollouts written")
    parser.add_argument("--learner_steps", type=int, default=10, help="timed steps (+1 compile)")
    parser.add_argument("--repeats", type=int, default=5, help="pipeline passes per setting")
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.WARNING)

    from vimrag_jax import optim
    from vimrag_jax.data.pipeline import make_pipeline, options_from_config
    from vimrag_jax.experiment import Experiment
    from vimrag_jax.learner import Learner
    from vimrag_jax.parallel.mesh import mesh_from_config
    from vimrag_jax.rl.losses import LossConfig
    from vimrag_jax.rollout.records import list_shards
    from vimrag_jax.rollout.trajectory import record_dims
    from vimrag_jax.rollout.worker import run_worker

    cfg = load_config()
    prefetch = int(cfg.data.prefetch)
    with tempfile.TemporaryDirectory() as workdir:
        shard_dir = os.path.join(workdir, "shards")
        began = time.perf_counter()
        written = run_worker(
            cfg,
            workdir,
            worker_id="bench",
            policy="scripted_expert",
            max_trajectories=args.trajectories,
            shard_dir=shard_dir,
        )
        write_s = time.perf_counter() - began
        shards = list_shards(shard_dir)
        shard_bytes = sum(path.stat().st_size for path in shards)

        experiment = Experiment.from_config(cfg, workdir)
        dims = record_dims(experiment.rollout_config())
        options = options_from_config(cfg, shard_dir, dims, follow=False, advantage="group")

        def batches(depth: int):
            return lambda: iter(make_pipeline(options, prefetch=depth))

        alone = {depth: time_pipeline(batches(depth), args.repeats) for depth in (0, prefetch)}

        learner = Learner(
            experiment.initial_model,
            optim.make_optimizer(cfg.optim),
            LossConfig.from_config(cfg.loss),
            mesh_from_config(cfg.mesh, jax.devices()),
            step_kind=cfg.step,
        )
        learner.initialize()
        waits, steps_s, segments = time_learner(learner, batches(prefetch), args.learner_steps)

    wait_s, step_s = float(np.sum(waits)), float(np.sum(steps_s))
    learner_rate = sum(segments) / step_s
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
        f"{jax.device_count()} x {jax.devices()[0].platform}, jax {jax.__version__}"
    )
    print(
        f"shards: {written} scripted-expert trajectories in {len(shards)} shard(s), "
        f"{shard_bytes / 2**20:.1f} MiB, written in {write_s:.1f} s; dims {dims}"
    )
    print(
        f"batch: {cfg.data.batch_segments} segments x {dims.tokens} tokens, "
        f"model {cfg.model.name}, loss {cfg.loss.name} (ggpo_mask={cfg.loss.ggpo_mask})"
    )
    for depth, (seconds, count, n_batches) in alone.items():
        print(
            f"pipeline, prefetch {depth}: {count / seconds:9.1f} segments/s "
            f"{n_batches / seconds:7.2f} batches/s ({count} segments, {n_batches} batches "
            f"in {seconds:.2f} s, best of {args.repeats})"
        )
    print(
        f"learner consumption: {learner_rate:9.1f} segments/s "
        f"(step median {np.median(steps_s) * 1e3:.0f} ms over {len(steps_s)} steps, "
        f"compile step excluded)"
    )
    pipeline_rate = alone[prefetch][1] / alone[prefetch][0]
    print(f"pipeline / learner consumption: {pipeline_rate / learner_rate:.1f}x")
    unhidden = alone[0][0] / alone[0][2] / float(np.median(steps_s))
    print(
        f"decode + batch without prefetch: {unhidden * 100:.2f} % of a median step "
        "(the wait if nothing overlapped)"
    )
    share = wait_s / (wait_s + step_s)
    verdict = "met" if share < TARGET_WAIT_SHARE else "NOT met"
    print(
        f"data wait: {share * 100:.2f} % of learner wall time (median wait "
        f"{np.median(waits) * 1e3:.2f} ms, max {np.max(waits) * 1e3:.1f} ms per step); "
        f"target < {TARGET_WAIT_SHARE * 100:.0f} %: {verdict}"
    )


if __name__ == "__main__":
    main()
