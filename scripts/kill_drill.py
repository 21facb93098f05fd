"""Kill drill: SIGKILL the learner at random moments, restart it each time, check the result.

    bash scripts/kill_drill.sh [N] [--workdir=DIR] [--seed=S] [--total_steps=T]

Runs a short configuration of `python -m vimrag_jax.train` (the tiny preset, shrunk to a few
minutes: a warm start on scripted-expert data, then RL with one embedded rollout worker, a
checkpoint every 3 steps written in the background). N times it starts the run, waits a random
time, kills the learner with SIGKILL (its worker must die with it), and starts it again; then it
lets the run finish. For each kill it prints the phase and step the learner had reached, the step
the next start restored, the policy versions it lost and the expert trajectories it had to
write again. At the end it checks that the run finished (exit 0), that every step was done
exactly once on the surviving timeline (each restart discards what was logged after the step it
restored), that published policy versions only went up, and that no worker outlived a kill;
the exit status is 0 when all checks hold.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SFT_STEPS = 4
FLAGS = (  # the `smoke` preset with a longer warm start and checkpoints every 3 steps
    "--config=configs/ggpo.py:smoke",
    f"--config.sft.steps={SFT_STEPS}",
    "--config.sft.num_trajectories=16",
    "--config.checkpoint.every_steps=3",
)


def _rows(workdir: Path) -> list[dict]:
    from vimrag_jax.jsonl import log_entries

    return log_entries(workdir / "metrics.jsonl")


def _trained_steps(rows: list[dict]) -> list[int]:
    """Global steps of the updates in ``rows`` (warm start and RL), in order."""
    return [int(row["step"]) for row in rows if "loss" in row or "sft/loss" in row]


def _restored_step(log: str) -> int:
    """The global step a start resumed from (0: from scratch), read off its log."""
    rl = re.search(r"resumed RL at step (\d+)", log)
    if rl:
        return SFT_STEPS + int(rl.group(1))
    if "starting RL from the warm start's last checkpoint" in log:
        return SFT_STEPS
    sft = re.search(r"resumed the warm start at step (\d+)", log)
    return int(sft.group(1)) if sft else 0


def _orphans(workdir: Path) -> list[int]:
    """Worker processes still running for this workdir."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "vimrag_jax.rollout.worker" in cmdline and f"--workdir={workdir}" in cmdline:
            found.append(int(proc.name))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kills", nargs="?", type=int, default=10)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--total_steps", type=int, default=150)
    parser.add_argument("--min_s", type=float, default=10.0, help="earliest kill after a start")
    parser.add_argument("--max_s", type=float, default=50.0, help="latest kill after a start")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kill_drill-")).resolve()
    command = [
        sys.executable,
        "-m",
        "vimrag_jax.train",
        *FLAGS,
        f"--config.optim.total_steps={args.total_steps}",
        f"--workdir={workdir}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("VIMRAG_KILL_AT", None)
    print(f"kill drill: {args.kills} kills, workdir {workdir}", flush=True)
    logs_dir = workdir / "drill_logs"
    logs_dir.mkdir(parents=True, exist_ok=True)

    surviving: list[int] = []  # the updates on the surviving timeline, by global step
    kills: list[dict] = []
    orphans: list[int] = []
    began = time.monotonic()
    code = None
    for start in range(args.kills + 1):
        before = len(_rows(workdir))
        log_path = logs_dir / f"start{start:02d}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
            killing = start < args.kills
            delay = rng.uniform(args.min_s, args.max_s) if killing else None
            try:
                code = proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                code = proc.wait()
        text = log_path.read_text()
        restored = _restored_step(text)
        new_rows = _rows(workdir)[before:]
        if kills:  # what this start says about the kill before it
            lost = re.search(r"versions (\d+)\.\.(\d+) were published after", text)
            rewritten = re.search(r"writing (\d+) scripted-expert trajectories \(of", text)
            kills[-1].update(
                restored=restored,
                lost=f"v{lost.group(1)}..v{lost.group(2)}" if lost else "none",
                expert_rewritten=int(rewritten.group(1)) if rewritten and start > 0 else 0,
            )
        surviving = [step for step in surviving if step <= restored] + _trained_steps(new_rows)
        time.sleep(1.0)  # the kernel delivers the workers' parent-death signal
        orphans += _orphans(workdir)
        if code == -signal.SIGKILL:
            last = _trained_steps(new_rows)
            if not last:  # killed before this start's first update
                phase = "start-up (world, expert data)" if restored == 0 else "start-up"
            else:
                phase = "rl" if any("loss" in row for row in new_rows) else "warm start"
            kills.append(
                dict(kill=len(kills) + 1, after_s=round(delay, 1), phase=phase,
                     last_step=last[-1] if last else restored)
            )  # fmt: skip
            continue
        break  # finished (or failed) before the planned kill

    total = SFT_STEPS + args.total_steps
    for kill in kills:
        print(
            f"kill {kill['kill']:2d} at {kill['after_s']:5.1f}s: phase {kill['phase']}, last step "
            f"{kill['last_step']}; restored step {kill.get('restored', '?')}; versions lost "
            f"{kill.get('lost', '?')}; expert trajectories still missing "
            f"{kill.get('expert_rewritten', 0)}"
        )
    from vimrag_jax import publish
    from vimrag_jax.timeline import load_timeline

    history = [entry["version"] for entry in publish.publication_history(workdir)]
    timeline = load_timeline(workdir)
    last_row = [row for row in _rows(workdir) if "loss" in row][-1:]
    counters = {k: v for k, v in (last_row[0] if last_row else {}).items() if k.startswith("data/")}
    checks = {
        "run finished (exit 0)": code == 0,
        f"every step 1..{total} once on the surviving timeline": surviving
        == list(range(1, total + 1)),
        "policy versions only went up": history == sorted(set(history)),
        "no worker outlived a kill": not orphans,
    }
    print(
        f"\n{len(kills)} kills in {time.monotonic() - began:.0f} s; "
        f"versions published {len(history)} (last v{history[-1] if history else '-'}), "
        f"lost {timeline.lost or 'none'}; rollouts dropped as lost "
        f"{int(counters.get('data/lost_records', 0))}, late segments "
        f"{int(last_row[0].get('late_segments', 0)) if last_row else 0}"
    )
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    if not checks[f"every step 1..{total} once on the surviving timeline"]:
        print(f"  surviving steps: {surviving}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
