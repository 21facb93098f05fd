"""The toy reproduction's command: GGPO vs GSPO, and graph vs linear vs summary memory.

    python -m vimrag_jax.toy --seeds=32 [--json] [--out=DIR] [--updates=400] [--ablations]

Trains four settings, each one ``jax.jit`` over a whole run ``vmap``ped over the seeds (the
settings share one compiled program): GGPO and GSPO on the graph memory, and GGPO on the
linear and summary memories. Prints the figures (with ``--json`` the last line is the JSON
object) and writes ``toy.json`` and ``toy.png`` into ``--out`` (default: the system's temporary
directory, ``vimrag_toy/``). ``--ablations`` adds GGPO with only one of its two masks.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags

from vimrag_jax.toy.env import EnvConfig
from vimrag_jax.toy.report import summarize, table, write
from vimrag_jax.toy.train import TrainConfig, compiled_train, setting

RUNS = (("ggpo", "graph"), ("gspo", "graph"), ("ggpo", "linear"), ("ggpo", "summary"))
ABLATIONS = (("ggpo_positive_only", "graph"), ("ggpo_negative_only", "graph"))

_FLAGS: dict[str, flags.FlagHolder] = {}


def run_experiment(
    config: TrainConfig,
    seeds: int,
    seed: int = 0,
    *,
    ablations: bool = False,
    quick_compile: bool = False,
) -> dict[str, Any]:
    """Trains every setting of ``RUNS`` (and ``ABLATIONS``) on ``seeds`` seeds; returns the
    summary object."""
    train = compiled_train(config, quick_compile)
    keys = jax.random.split(jax.random.key(seed), seeds)
    runs, seconds = {}, {}
    for algorithm, memory in RUNS + (ABLATIONS if ablations else ()):
        start = time.perf_counter()
        out = jax.device_get(train(keys, setting(algorithm, memory)))
        runs[algorithm, memory] = out
        seconds[f"{algorithm}/{memory}"] = round(time.perf_counter() - start, 1)
    settings = {**config._asdict(), "env": config.env._asdict(), "seed": seed}
    result = summarize(runs, settings)
    result["seconds"] = seconds  # the first run includes the compilation
    return result


def _define_flags() -> None:
    # Defined only when run as a program, so importing this module defines no global flags.
    defaults = TrainConfig()
    _FLAGS.update(
        seeds=flags.DEFINE_integer("seeds", 32, "Training runs per setting (vmapped)."),
        json=flags.DEFINE_bool("json", False, "Print the JSON object as the last line."),
        out=flags.DEFINE_string(
            "out", str(Path(tempfile.gettempdir()) / "vimrag_toy"), "Where toy.json/png go."
        ),
        seed=flags.DEFINE_integer("seed", 0, "The key all seeds are split from."),
        ablations=flags.DEFINE_bool(
            "ablations", False, "Also train GGPO's positive-only and negative-only masks."
        ),
        updates=flags.DEFINE_integer("updates", defaults.updates, "Updates per run."),
        learning_rate=flags.DEFINE_float("learning_rate", defaults.learning_rate, "Adam."),
        window=flags.DEFINE_integer("window", defaults.window, "Linear memory's window."),
        max_steps=flags.DEFINE_integer("max_steps", EnvConfig().max_steps, "Step limit."),
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    value = {name: holder.value for name, holder in _FLAGS.items()}
    config = TrainConfig(
        env=EnvConfig(max_steps=value["max_steps"]),
        window=value["window"],
        updates=value["updates"],
        learning_rate=value["learning_rate"],
    )
    start = time.perf_counter()
    result = run_experiment(config, value["seeds"], value["seed"], ablations=value["ablations"])
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    emit(result, value["out"], as_json=value["json"])


def emit(result: dict[str, Any], out_dir: str, *, as_json: bool) -> None:
    """Writes the JSON and PNG, prints the table and, with ``as_json``, the JSON line last."""
    paths = write(result, out_dir)
    print(table(result))
    print(f"{result.get('total_seconds', '?')} s; wrote {', '.join(map(str, paths))}")
    if as_json:
        print(json.dumps(result, default=lambda x: np.asarray(x).tolist()))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
