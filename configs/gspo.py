"""Baseline: plain GSPO (sequence ratios, no graph-guided mask), otherwise the GGPO experiment.

    python -m vimrag_jax.train --config=configs/gspo.py[:preset] --workdir=DIR

Same presets and keys as ``configs/ggpo.py``, which this file loads by path (config files
are not a package) and switches to the ``gspo`` loss preset.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

ALGORITHM = "gspo"


def _base():
    path = Path(__file__).with_name("ggpo.py")
    spec = importlib.util.spec_from_file_location("vimrag_configs_ggpo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRESETS = _base().PRESETS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The GGPO config of a preset with the GSPO loss preset (ε = 3e-4 / 4e-4, no mask)."""
    base = _base()
    return base.with_algorithm(base.get_config(arg), ALGORITHM)
