"""Training metrics: TensorBoard event files, ``WORKDIR/metrics.jsonl`` and a console line.

``MetricWriter.write(step, scalars)`` records one row of scalars per step:

- TensorBoard scalars under ``WORKDIR/tensorboard/`` (tensorboard's own event writer, so no
  TensorFlow is needed to write or to view them);
- one JSON object per line in ``WORKDIR/metrics.jsonl`` (``{"step": ..., "time": ..., ...}``),
  which ``vimrag_jax.plot`` and quick scripts read without TensorBoard;
- every ``log_every`` steps, a progress line through absl logging: step / total, a few key
  metrics, steps per second and the estimated time left.

Non-finite values are skipped, not written, and counted (``skipped``): a ``Max``/``Min``
statistic of an empty selection is ∓inf by construction (``vimrag_jax.rl.stats``), and a NaN
should show up as a gap in a curve rather than break a plot's axis.

Only the main process writes (``enabled`` defaults to ``jax.process_index() == 0``); on the
others every method is a no-op, so the loop can call it unconditionally.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CONSOLE_KEYS = (
    "sft/loss",
    "loss",
    "rollout_reward",
    "reward_mean",
    "eval/accuracy",
    "grad_norm",
    "learning_rate",
    "clip_fraction",
)


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class MetricWriter:
    """Writes scalar metrics of the training loop (see the module docstring)."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int,
        enabled: bool | None = None,
        log_every: int = 10,
        console_keys: Sequence[str] = CONSOLE_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ):
        if log_every < 1:
            raise ValueError(
                f"log_every must be >= 1 (config.metrics.every_steps), got {log_every}"
            )
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self.total_steps = int(total_steps)
        self.log_every = int(log_every)
        self.console_keys = tuple(console_keys)
        self.skipped: collections.Counter[str] = collections.Counter()
        self._clock = clock
        self._last_log: tuple[int, float] | None = None
        self._events = self._jsonl = None
        if self.enabled:
            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._events = EventFileWriter(str(workdir / TENSORBOARD_DIR))
            self._jsonl = open(workdir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
        """Records ``scalars`` (numbers or 0-d arrays) at ``step``; returns the finite ones."""
        if not self.enabled:
            return {}
        finite: dict[str, float] = {}
        for name, value in scalars.items():
            number = float(np.asarray(value))
            if math.isfinite(number):
                finite[name] = number
            else:
                self.skipped[name] += 1
        step = int(step)
        now = time.time()
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in finite.items()]
        )
        self._events.add_event(event_pb2.Event(wall_time=now, step=step, summary=summary))
        self._jsonl.write(json.dumps({"step": step, "time": now, **finite}) + "\n")
        self._jsonl.flush()
        if step % self.log_every == 0 or step == self.total_steps:
            self._log_progress(step, finite)
        return finite

    def progress_line(self, step: int, scalars: Mapping[str, float]) -> str:
        """The console line for ``step``; also advances the steps-per-second clock."""
        now = self._clock()
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k}={scalars[k]:.4g}" for k in self.console_keys if k in scalars]
        if self._last_log is not None and step > self._last_log[0] and now > self._last_log[1]:
            rate = (step - self._last_log[0]) / (now - self._last_log[1])
            remaining = max(self.total_steps - step, 0) / rate
            parts.append(f"{rate:.3g} steps/s")
            parts.append(f"ETA {_format_duration(remaining)}")
        self._last_log = (step, now)
        return " | ".join(parts)

    def _log_progress(self, step: int, scalars: Mapping[str, float]) -> None:
        logging.info("%s", self.progress_line(step, scalars))

    def flush(self) -> None:
        """Pushes buffered events to disk."""
        if self.enabled:
            self._events.flush()
            self._jsonl.flush()

    def close(self) -> None:
        """Flushes and closes the files; logs how many non-finite values were skipped."""
        if not self.enabled or self._jsonl is None:
            return
        if self.skipped:
            logging.info("metrics: skipped non-finite values %s", dict(self.skipped))
        self._events.close()
        self._jsonl.close()
        self._jsonl = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of ``WORKDIR/metrics.jsonl`` (empty when there is none); bad lines are skipped.

    A run killed mid-write can leave a truncated last line, which must not hide the others.
    """
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows
