"""One timeline of policy versions across restarts: what a kill between checkpoints loses.

The learner publishes a policy version every ``publish.every_steps`` updates and saves a
checkpoint every ``checkpoint.every_steps`` steps. Killed in between, it restarts from its last
checkpoint, whose metadata names the version it had published by then (``v_ck``), while newer
versions ``v_ck + 1 .. P`` are already on disk and workers may have sampled rollouts with them.
Those versions came from updates that no longer exist.

The choice made here: versions only go up. The restored learner publishes its parameters as
``P + 1`` (so every worker switches to it, it being the newest), and ``v_ck + 1 .. P`` are
*lost*: recorded in ``WORKDIR/policy/timeline.json`` with the checkpoint step they fell back
to, never reused. Rollouts sampled by a lost version are dropped by the input pipeline and
counted (``lost_groups`` / ``lost_records``); the others are trained once, on this timeline.
The lag of a rollout is counted in versions of the surviving timeline (`surviving_lag`), so a
restart neither makes old rollouts look older than they are nor yields a negative lag.

A kill therefore costs at most ``checkpoint.every_steps`` updates, the versions they published
and the rollouts sampled with those versions (the README's "What a kill costs").
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from vimrag_jax.publish import POLICY_DIR

TIMELINE_FILE = "timeline.json"


@dataclasses.dataclass(frozen=True)
class Timeline:
    """The lost version ranges (inclusive ``(first, last)`` pairs) and the restores that lost
    them, oldest first (each a dict: ``restored_step``, ``checkpoint_version``, ``lost``,
    ``resumed_as``, ``time``)."""

    lost: tuple[tuple[int, int], ...] = ()
    restores: tuple[dict[str, Any], ...] = ()

    @functools.cached_property
    def _disjoint(self) -> tuple[tuple[int, int], ...]:
        # Two restores from the same checkpoint lose overlapping ranges: merge them.
        merged: list[list[int]] = []
        for first, last in sorted(self.lost):
            if merged and first <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], last)
            else:
                merged.append([first, last])
        return tuple((first, last) for first, last in merged)

    def is_lost(self, version: int | np.ndarray) -> bool | np.ndarray:
        """Whether ``version`` (or each of an array) was published on a lost branch."""
        version = np.asarray(version)
        out = np.zeros(version.shape, bool)
        for first, last in self._disjoint:
            out |= (version >= first) & (version <= last)
        return bool(out) if out.ndim == 0 else out

    def surviving_lag(self, sampled: int | np.ndarray, trained: int) -> int | np.ndarray:
        """Versions of this timeline after ``sampled`` up to ``trained``: ``trained - sampled``
        less the lost versions in between (0 when they are equal; never negative for a
        ``sampled <= trained``)."""
        sampled = np.asarray(sampled, np.int64)
        lag = trained - sampled
        for first, last in self._disjoint:
            overlap = np.minimum(last, trained) - np.maximum(first, sampled + 1) + 1
            lag = lag - np.maximum(overlap, 0)
        return int(lag) if lag.ndim == 0 else lag


#: A run that never lost a version.
NO_LOSS = Timeline()


def timeline_path(workdir: str | os.PathLike) -> Path:
    return Path(workdir) / POLICY_DIR / TIMELINE_FILE


def load_timeline(workdir: str | os.PathLike) -> Timeline:
    """The run's timeline (empty when nothing was ever lost); ValueError on a damaged file."""
    path = timeline_path(workdir)
    if not path.is_file():
        return NO_LOSS
    try:
        body = json.loads(path.read_text())
        lost = tuple((int(a), int(b)) for a, b in body["lost"])
        restores = tuple(dict(r) for r in body["restores"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a policy timeline: {err}") from None
    return Timeline(lost, restores)


def resume_version(checkpoint_version: int, published: int | None) -> tuple[int, tuple | None]:
    """``(version, lost)`` for a learner restored at ``checkpoint_version`` when ``published``
    is the newest version on disk (None: none): the version it continues as, and the range of
    versions it lost (None when it lost none)."""
    if published is None or published <= checkpoint_version:
        return checkpoint_version, None
    return published + 1, (checkpoint_version + 1, published)


def record_loss(
    workdir: str | os.PathLike,
    *,
    restored_step: int,
    checkpoint_version: int,
    lost: tuple[int, int],
    resumed_as: int,
) -> Timeline:
    """Adds a restore that lost the versions ``lost`` to the timeline (written atomically; call
    on one process, before the new version is published) and returns the new timeline."""
    old = load_timeline(workdir)
    entry = {
        "restored_step": int(restored_step),
        "checkpoint_version": int(checkpoint_version),
        "lost": [int(lost[0]), int(lost[1])],
        "resumed_as": int(resumed_as),
        "time": time.time(),
    }
    new = Timeline((*old.lost, (int(lost[0]), int(lost[1]))), (*old.restores, entry))
    path = timeline_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    body = {"lost": [list(r) for r in new.lost], "restores": list(new.restores)}
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, path)
    return new
