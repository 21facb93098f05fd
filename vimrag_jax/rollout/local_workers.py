"""Rollout worker subprocesses that the trainer starts itself in the embedded default.

On one machine `python -m vimrag_jax.train` runs `rollout.embedded_workers` copies of
`python -m vimrag_jax.rollout.worker` with the trainer's own `--config` flags, watches them
(a worker that dies is restarted, up to a limit, and counted) and stops them on exit: SIGTERM
first, so each finishes its shard, then SIGKILL after a grace period. A trainer that is killed
takes its workers with it (`die_with_parent`): a restarted trainer starts workers of the same
ids, which must not meet orphans of the last run writing the same shard names. Their logs go to
`WORKDIR/logs/<worker id>.log`. On pods `rollout.embedded_workers = 0` and `launch/` starts
workers on their own hosts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from absl import logging

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Makes this process die with SIGKILL when ``parent_pid``, its parent, dies (Linux's
    parent-death signal); exits at once if that parent is already gone. Elsewhere the worker
    checks `parent_alive` between batches instead."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            logging.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if not parent_alive(parent_pid):  # died before the signal was armed
        logging.info("parent %d is gone; exiting", parent_pid)
        sys.exit(0)


def parent_alive(parent_pid: int) -> bool:
    """Whether ``parent_pid`` is still this process's parent (an orphan is re-parented)."""
    return os.getppid() == parent_pid


def config_flags_from_argv(argv: Sequence[str]) -> list[str]:
    """The `--config=...` and `--config.KEY=VALUE` flags of a command line, in order."""
    flags, it = [], iter(argv)
    for arg in it:
        if arg == "--config" or (arg.startswith("--config.") and "=" not in arg):
            flags.append(f"{arg}={next(it, '')}")  # `--flag value` form
        elif arg.startswith("--config=") or arg.startswith("--config."):
            flags.append(arg)
    return flags


class LocalWorkers:
    """A fixed number of local rollout worker processes (see the module docstring)."""

    def __init__(
        self,
        config_flags: Sequence[str],
        workdir: str | os.PathLike,
        *,
        count: int,
        max_restarts: int = 3,
        grace_s: float = 60.0,
        extra_flags: Sequence[str] = (),
    ):
        if count < 0:
            raise ValueError(f"rollout.embedded_workers must be >= 0, got {count}")
        self.config_flags = list(config_flags)
        self.workdir = Path(workdir)
        self.count = count
        self.max_restarts = max_restarts
        self.grace_s = grace_s
        self.extra_flags = list(extra_flags)
        self.restarts = 0
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, object] = {}

    def command(self, worker_id: str) -> list[str]:
        """The command line of one worker."""
        return [
            sys.executable,
            "-m",
            "vimrag_jax.rollout.worker",
            *self.config_flags,
            f"--workdir={self.workdir}",
            f"--worker_id={worker_id}",
            f"--parent_pid={os.getpid()}",
            *self.extra_flags,
        ]

    def _start(self, worker_id: str) -> None:
        log_dir = self.workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_dir / f"{worker_id}.log", "ab")  # noqa: SIM115 (kept open while it runs)
        self._logs[worker_id] = log
        self._procs[worker_id] = subprocess.Popen(
            self.command(worker_id), stdout=log, stderr=subprocess.STDOUT
        )
        logging.info("started rollout worker %s (pid %d)", worker_id, self._procs[worker_id].pid)

    def start(self) -> None:
        """Starts every worker (ids `local0`, `local1`, ...)."""
        for i in range(self.count):
            self._start(f"local{i}")

    def check(self) -> None:
        """Restarts workers that exited; raises RuntimeError once restarts run out."""
        for worker_id, proc in list(self._procs.items()):
            code = proc.poll()
            if code is None:
                continue
            self._logs.pop(worker_id).close()
            if self.restarts >= self.max_restarts:
                raise RuntimeError(
                    f"rollout worker {worker_id} exited with status {code} and the "
                    f"{self.max_restarts} restarts are used up; see "
                    f"{self.workdir / 'logs' / worker_id}.log"
                )
            self.restarts += 1
            logging.warning(
                "rollout worker %s exited with status %s; restarting (%d/%d)",
                worker_id, code, self.restarts, self.max_restarts,
            )  # fmt: skip
            self._start(worker_id)

    def run_once(self, worker_id: str) -> int:
        """Runs one worker to completion (e.g. with `--max_trajectories`); its exit status."""
        self._start(worker_id)
        code = self._procs.pop(worker_id).wait()
        self._logs.pop(worker_id).close()
        return code

    def alive(self) -> int:
        """How many workers are running."""
        return sum(proc.poll() is None for proc in self._procs.values())

    def stop(self) -> None:
        """SIGTERM to all (each finishes its shard), SIGKILL after the grace period."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for worker_id, proc in self._procs.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logging.warning("rollout worker %s ignored SIGTERM; killing it", worker_id)
                proc.kill()
                proc.wait()
        for log in self._logs.values():
            log.close()
        self._procs.clear()
        self._logs.clear()

    def __enter__(self) -> LocalWorkers:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
