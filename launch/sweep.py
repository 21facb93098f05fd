"""Runs a sweep of training runs one after another, or prints their commands (``--dry_run``).

    python launch/sweep.py --sweep=configs/sweeps/ggpo_vs_gspo.py[:ARG] --workdir=DIR \
        [--dry_run] [--keep_going] [-- EXTRA_TRAIN_FLAGS...]

A sweep file defines ``get_sweep(arg) -> list of {"name", "config", "overrides"}``; each run
trains with ``python -m vimrag_jax.train --config=CONFIG --workdir=DIR/NAME
--config.KEY=VALUE ...`` from the repository root, followed by the extra flags. A run whose
workdir already holds checkpoints resumes, so re-running a sweep after a failure is safe.
The printed commands are the way to put a sweep on a cluster: one line per job.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_sweep(spec: str) -> list[dict]:
    """The runs of ``PATH[:ARG]``; the path is relative to the repository root or absolute."""
    path, _, arg = spec.partition(":")
    file = Path(path) if Path(path).is_absolute() else ROOT / path
    if not file.is_file():
        raise FileNotFoundError(f"no sweep file {file}")
    module_spec = importlib.util.spec_from_file_location(f"sweep_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    runs = module.get_sweep(arg or None)
    names = [run["name"] for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep {spec} repeats run names: {names}")
    return runs


def _flag_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def commands(
    runs: list[dict], workdir: str, extra: list[str], python: str = sys.executable
) -> list[list[str]]:
    """One ``vimrag_jax.train`` command line per run."""
    result = []
    for run in runs:
        command = [
            python,
            "-m",
            "vimrag_jax.train",
            f"--config={run['config']}",
            f"--workdir={Path(workdir) / run['name']}",
        ]
        command += [f"--config.{k}={_flag_value(v)}" for k, v in run.get("overrides", {}).items()]
        result.append(command + list(extra))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", required=True, help="sweep file[:arg]")
    parser.add_argument("--workdir", required=True, help="parent directory of the runs")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser.add_argument("--keep_going", action="store_true", help="run the rest after a failure")
    parser.add_argument("extra", nargs="*", help="flags appended to every command (after --)")
    args = parser.parse_args(argv)

    lines = commands(load_sweep(args.sweep), args.workdir, args.extra)
    if args.dry_run:
        for line in lines:
            print(shlex.join(line))
        return 0
    failed = []
    for i, line in enumerate(lines, 1):
        print(f"[{i}/{len(lines)}] {shlex.join(line)}", flush=True)
        if subprocess.run(line, cwd=ROOT, check=False).returncode != 0:
            failed.append(line)
            if not args.keep_going:
                break
    if failed:
        print(f"{len(failed)} run(s) failed; first: {shlex.join(failed[0])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
