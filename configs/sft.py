"""Supervised warm start: imitate scripted-expert VimRAG trajectories, no RL.

    python -m vimrag_jax.train --config=configs/sft.py[:preset] --workdir=DIR \
        [--config.sft.data=DIR_OF_EXPERT_SHARDS]

Token cross-entropy on the policy-generated tokens of expert trajectories (the loss mask of
SPEC §6), for ``sft.steps`` updates at ``sft.learning_rate``. With ``sft.data`` empty the
trajectories come from the synthetic environment's scripted expert. Same presets and keys as
``configs/ggpo.py``, which this file loads by path (config files are not a package); a later
RL run can start from this run's checkpoint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

ALGORITHM = "sft"


def _base():
    path = Path(__file__).with_name("ggpo.py")
    spec = importlib.util.spec_from_file_location("vimrag_configs_ggpo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRESETS = _base().PRESETS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The GGPO config of a preset switched to supervised training on expert trajectories."""
    c = _base().get_config(arg)
    c.algorithm = ALGORITHM
    c.rollout.embedded_workers = 0  # no rollouts: the data are expert trajectories
    # The SFT phase's optimizer is config.optim with sft.learning_rate / warmup_steps / steps
    # (vimrag_jax.optim.sft_optim_config), so those keys are the only ones to set here.
    c.sft.steps = 100 if c.preset == "tiny" else 500
    return c
