"""What a restarted run brings back from its workdir besides the checkpoint.

A training run may be killed at any moment and is restarted with the same command. The
checkpoint (`vimrag_jax.checkpointing`) restores the step, the optimizer, the input pipeline's
ledger, the policy version and the counters as of one step; this module holds the rest of the
story the workdir tells:

- the **phase** (``phase.json``): whether the warm start is over, so a restart during RL does
  not warm-start again;
- the **policy timeline** (`continue_timeline`, over `vimrag_jax.timeline`): a restart from a
  checkpoint older than the newest published policy version loses the versions after it and
  continues after the newest, publishing the restored policy at once; evaluations of the lost
  versions are set aside in ``eval/lost/``;
- the **compiled programs** (`use_compile_cache`): JAX's persistent compilation cache under
  the workdir, so a restart does not compile a big model's steps again;
- the **warm start's expert data** (`expert_trajectories_missing`, `mark_expert_data_done`):
  written by a scripted-expert worker shard by shard; a kill leaves some shards and no
  ``.done`` marker, and the next start writes only the trajectories still missing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import logging

from vimrag_jax import distributed, publish
from vimrag_jax.eval import EVAL_DIR
from vimrag_jax.timeline import Timeline, load_timeline, record_loss, resume_version

PHASE_FILE = "phase.json"
EXPERT_DONE = ".done"


def read_phase(workdir: str | os.PathLike) -> dict[str, Any]:
    """The run's phase record (``{"phase": "sft"}`` before RL started)."""
    path = Path(workdir) / PHASE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"phase": "sft"}


def write_phase(workdir: str | os.PathLike, phase: dict[str, Any]) -> None:
    """Replaces the phase record atomically (process 0 only)."""
    if not distributed.is_main_process():
        return
    path = Path(workdir) / PHASE_FILE
    tmp = path.with_name(f".{PHASE_FILE}.tmp")
    tmp.write_text(json.dumps(phase))
    os.replace(tmp, path)


def continue_timeline(
    workdir: str | os.PathLike,
    checkpoint_version: int,
    step: int,
    publish_as: Callable[[int], None],
) -> tuple[int, Timeline]:
    """``(version, timeline)``: the policy version a (re)started RL phase continues as, and the
    run's timeline. ``checkpoint_version`` is the version the restored checkpoint had published
    (0 for a fresh start) and ``step`` its step. When newer versions are on disk they are lost
    (recorded in ``policy/timeline.json`` first, with a warning); ``publish_as(version)`` is
    called to publish the restored policy whenever no version as new as ``version`` exists.
    Collective: process 0 reads and writes the policy directory, every process publishes."""
    newest = -1
    if distributed.is_main_process():
        versions = publish.published_versions(workdir)
        newest = versions[-1] if versions else -1
    newest = distributed.broadcast_from_main(newest)
    version, lost = resume_version(checkpoint_version, None if newest < 0 else newest)
    if lost is not None:
        if distributed.is_main_process():
            record_loss(
                workdir,
                restored_step=step,
                checkpoint_version=checkpoint_version,
                lost=lost,
                resumed_as=version,
            )
            set_aside_lost_evaluations(workdir, lost)
        logging.warning(
            "restored step %d (policy version %d), but versions %d..%d were published after "
            "that checkpoint: they are lost (policy/timeline.json), their rollouts are dropped "
            "and counted (data/lost_records), and the restored policy continues as version %d",
            step, checkpoint_version, lost[0], lost[1], version,
        )  # fmt: skip
    distributed.barrier("timeline")
    timeline = load_timeline(workdir)
    if newest < version:
        publish_as(version)
    return version, timeline


def set_aside_lost_evaluations(workdir: str | os.PathLike, lost: tuple[int, int]) -> list[Path]:
    """Moves the evaluation reports and episodes of the ``lost`` versions (an evaluation that ran
    after the restored checkpoint) to ``eval/lost/``: they describe policies that no longer
    exist, and a results table must not pick them up. Returns the moved files' new paths."""
    directory = Path(workdir) / EVAL_DIR
    moved = []
    for path in sorted(directory.glob("*-v*")) if directory.is_dir() else ():
        found = re.search(r"-v(\d{8,})[.]", path.name)
        if found and lost[0] <= int(found.group(1)) <= lost[1]:
            target = directory / "lost" / path.name
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            moved.append(target)
    return moved


def expert_trajectories_missing(directory: str | os.PathLike, wanted: int) -> int:
    """How many of ``wanted`` expert trajectories the warm start still needs written to
    ``directory``: 0 once marked done, else ``wanted`` less the records of the shards there
    (a killed expert leaves whole shards only)."""
    from vimrag_jax.rollout.records import list_shards, shard_size

    directory = Path(directory)
    if (directory / EXPERT_DONE).is_file():
        return 0
    written = sum(shard_size(path) for path in list_shards(directory))
    return max(0, int(wanted) - written)


def mark_expert_data_done(directory: str | os.PathLike) -> None:
    """Marks the expert data in ``directory`` complete (after its worker exited cleanly)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / EXPERT_DONE).write_text("")


COMPILE_CACHE_DIR = "compile_cache"


def use_compile_cache(block: Any, workdir: str | os.PathLike) -> Path | None:
    """Points JAX's persistent compilation cache at ``block.dir`` (the config's
    ``compile_cache``; empty: ``WORKDIR/compile_cache``; ``"off"``: no cache) for programs that
    took at least ``block.min_compile_time_s`` to compile. Call before the first compile; returns
    the directory, or None when off."""
    import jax

    if block.dir == "off":
        return None
    directory = Path(block.dir or Path(workdir) / COMPILE_CACHE_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(block.min_compile_time_s))
    return directory
