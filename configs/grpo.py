"""Baseline: GRPO (PPO-style token ratios, ε = 0.2, no graph mask), otherwise the GGPO run.

    python -m vimrag_jax.train --config=configs/grpo.py[:preset] --workdir=DIR

Same presets and keys as ``configs/ggpo.py``, which this file loads by path (config files
are not a package) and switches to the ``grpo`` loss preset.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

ALGORITHM = "grpo"


def _base():
    path = Path(__file__).with_name("ggpo.py")
    spec = importlib.util.spec_from_file_location("vimrag_configs_ggpo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRESETS = _base().PRESETS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The GGPO config of a preset with the GRPO loss preset (token ratios, ε = 0.2)."""
    base = _base()
    return base.with_algorithm(base.get_config(arg), ALGORITHM)
