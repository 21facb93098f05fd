"""Named kill points: SIGKILL this process at a chosen moment, to test resuming after a kill.

A run survives a kill at any instant only if every such instant is tried. The learner marks the
moments that matter (``kill_point("rl_step", step)`` after an update, ``"publish"`` with a
version half written, ``"checkpoint"`` with a save in flight, ``"eval"``, ``"export"``, ...);
with the environment variable ``VIMRAG_KILL_AT=NAME`` or ``NAME:STEP`` the process kills itself
there with SIGKILL (no cleanup, no ``finally``: exactly what a preempted host does). Unset, a
kill point costs one dictionary lookup. `scripts/kill_drill.py` kills from outside instead, at
random moments.

A kill point on a background thread (``"publish"`` and ``"published"`` while the learner writes a
version in the background, `vimrag_jax.publish.BackgroundPublisher`) kills the whole process too,
but the learner's thread may be anywhere by then: while a kill point is `armed`, the learner
waits for each background write, so a named kill happens at the same moment every run (as the
kill tests need; random moments, writes in flight included, are the kill drill's).
"""

from __future__ import annotations

import os
import signal

ENV = "VIMRAG_KILL_AT"
#: Every kill point the code marks (a misspelt ``VIMRAG_KILL_AT`` is an error, not a no-op).
POINTS = (
    "sft_step",  # after a warm-start update, before its checkpoint
    "expert_data",  # the warm start's expert trajectories partly written
    "rl_step",  # after an RL update, before it is published or checkpointed
    "publish",  # a policy version written to its temporary directory, not yet renamed
    "published",  # a version renamed into place, LATEST not yet updated
    "checkpoint",  # a checkpoint save started, its files still being written
    "eval",  # in the middle of an evaluation
    "export",  # the Hugging Face export partly written
)


def _target() -> tuple[str, int | None] | None:
    value = os.environ.get(ENV, "")
    if not value:
        return None
    name, _, step = value.partition(":")
    if name not in POINTS:
        raise ValueError(f"{ENV}={value!r}: unknown kill point {name!r}; known: {POINTS}")
    try:
        return name, int(step) if step else None
    except ValueError:
        raise ValueError(f"{ENV}={value!r}: the step after ':' must be an integer") from None


def armed() -> bool:
    """Whether ``VIMRAG_KILL_AT`` names a kill point (ValueError when it names none known)."""
    return _target() is not None


def kill_point(name: str, step: int | None = None, *, parent: bool = False) -> None:
    """SIGKILLs this process if ``VIMRAG_KILL_AT`` names this point (and this step, when it
    gives one). With ``parent`` it kills the process that started this one, then this one (a
    worker marking a moment of the learner's: the learner dies, and its embedded workers with
    it). This process does not wait for the parent-death signal: a parent with gigabytes to
    tear down can take long enough to die that the worker would write one more shard."""
    if name not in POINTS:
        raise ValueError(f"unknown kill point {name!r}; add it to faults.POINTS")
    target = _target()
    if target is None or target[0] != name or (target[1] is not None and target[1] != step):
        return
    if parent:
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
