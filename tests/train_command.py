"""The train command of the end-to-end tests (`test_train.py`, `test_multiprocess.py`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The `smoke` preset: the tiny one shrunk so a run takes about a minute on two cores.
SMALL = ("--config=configs/ggpo.py:smoke",)


def train_command(workdir: Path, total_steps: int, *overrides: str) -> list[str]:
    """The small run's command line; ``overrides`` (``--config.KEY=VALUE``) come after the
    preset's values, so they win."""
    return [
        sys.executable,
        "-m",
        "vimrag_jax.train",
        *SMALL,
        *overrides,
        f"--config.optim.total_steps={total_steps}",
        f"--workdir={workdir}",
    ]


def run_train(
    workdir: Path, total_steps: int, *overrides: str, kill_at: str = ""
) -> subprocess.CompletedProcess:
    """Runs the small train command to its end (``kill_at``: a ``VIMRAG_KILL_AT`` kill point)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    env.pop("VIMRAG_KILL_AT", None)
    if kill_at:
        env["VIMRAG_KILL_AT"] = kill_at
    return subprocess.run(
        train_command(workdir, total_steps, *overrides),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
