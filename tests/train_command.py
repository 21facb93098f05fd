"""The train command of the end-to-end tests (`test_train.py`, `test_multiprocess.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tiny preset, shrunk so a run takes about a minute on two cores: one warm-start step on
# four expert trajectories, then RL steps on rollouts of a local worker subprocess.
SMALL = (
    "--config=configs/ggpo.py",
    # The smallest policy; a random policy's groups are all reward 0, so keep them.
    "--config.model.name=tiny",
    "--config.data.skip_uniform_groups=False",
    "--config.eval.every_steps=0",
    "--config.sft.steps=1",
    "--config.sft.warmup_steps=1",
    "--config.sft.num_trajectories=4",
    "--config.optim.warmup_steps=1",
    "--config.rollout.group_size=2",
    "--config.rollout.questions_per_batch=2",
    "--config.rollout.max_model_calls=9",
    "--config.rollout.max_new_tokens=192",
    "--config.data.batch_segments=8",
    "--config.data.max_wait_s=240",
    "--config.checkpoint.every_steps=1",
    "--config.metrics.every_steps=1",
    "--config.eval.num_questions=2",
    "--config.export.dtype=float32",
)


def train_command(workdir: Path, total_steps: int, *overrides: str) -> list[str]:
    """The small run's command line; ``overrides`` (``--config.KEY=VALUE``) replace `SMALL`'s
    values."""
    keys = {flag.split("=")[0] for flag in overrides}
    small = [flag for flag in SMALL if flag.split("=")[0] not in keys]
    return [
        sys.executable,
        "-m",
        "vimrag_jax.train",
        *small,
        *overrides,
        f"--config.optim.total_steps={total_steps}",
        f"--workdir={workdir}",
    ]
