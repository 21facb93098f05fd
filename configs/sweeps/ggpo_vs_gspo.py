"""Sweep: GGPO against its GSPO baseline (SPEC §8: "GGPO converges faster and more stably").

Run it with ``launch/sweep.py``::

    python launch/sweep.py --sweep=configs/sweeps/ggpo_vs_gspo.py:tiny,seeds=3 --workdir=DIR
    python launch/sweep.py --sweep=configs/sweeps/ggpo_vs_gspo.py:qwen3vl_8b --workdir=DIR \
        --dry_run -- --config.model.path=/ckpt/Qwen3-VL-8B-Instruct

The argument after the colon is ``PRESET[,seeds=N]`` (default ``tiny,seeds=3``). Each run is a
dict: ``name`` (its sub-directory of the sweep's workdir), ``config`` (config file, preset and
algorithm, relative to the repository root: ``configs/ggpo.py:PRESET,ALGORITHM``) and
``overrides`` (``--config.KEY=VALUE`` pairs).
"""

from __future__ import annotations

ALGORITHMS = ("ggpo", "gspo")
PRESETS = ("tiny", "qwen3vl_2b", "qwen3vl_4b", "qwen3vl_8b")


def _parse(arg: str | None) -> tuple[str, int]:
    preset, seeds = "tiny", 3
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            preset = key
        elif key == "seeds":
            seeds = int(value)
        else:
            raise ValueError(f"unknown sweep argument {key!r}; use PRESET[,seeds=N]")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    return preset, seeds


def get_sweep(arg: str | None = None) -> list[dict]:
    """Every (algorithm, seed) run of the sweep, algorithm-major."""
    preset, seeds = _parse(arg)
    return [
        {
            "name": f"{algorithm}_seed{seed}",
            "config": f"configs/ggpo.py:{preset},{algorithm}",
            "overrides": {"seed": seed},
        }
        for algorithm in ALGORITHMS
        for seed in range(seeds)
    ]
