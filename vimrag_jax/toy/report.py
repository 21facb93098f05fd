"""The toy experiment's figures: curve summaries, the JSON object, the text table and the PNG."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

SMOOTHING = 10  # updates in the trailing mean that "reaching" a reward is judged on


def trailing_mean(curve: np.ndarray, window: int = SMOOTHING) -> np.ndarray:
    """Mean of the last ``window`` values at each update (fewer at the start), last axis."""
    cumulative = np.cumsum(curve, axis=-1)
    shifted = np.concatenate(
        [np.zeros_like(cumulative[..., :window]), cumulative[..., :-window]], axis=-1
    )[..., : curve.shape[-1]]
    count = np.minimum(np.arange(1, curve.shape[-1] + 1), window)
    return (cumulative - shifted) / count


def first_reaching(curve: np.ndarray, target: float) -> int | None:
    """The first update (1-based) whose trailing mean reaches ``target``; None if never."""
    hits = np.flatnonzero(trailing_mean(curve) >= target - 1e-9)
    return int(hits[0]) + 1 if hits.size else None


def final_value(curve: np.ndarray) -> float:
    """The mean over the last tenth of the updates (at least one)."""
    tail = max(1, curve.shape[-1] // 10)
    return float(np.mean(curve[..., -tail:]))


def summarize_algorithm(rewards_su: np.ndarray, target: float) -> dict[str, Any]:
    """Figures of one algorithm's reward curves ``[seeds, updates]`` against ``target``."""
    mean_u = rewards_su.mean(0)
    per_seed = [first_reaching(curve, target) for curve in rewards_su]
    reached = [s for s in per_seed if s is not None]
    return {
        "reward_curve": [round(float(x), 5) for x in mean_u],
        "reward_std_curve": [round(float(x), 5) for x in rewards_su.std(0)],
        "final_reward": final_value(mean_u),
        "steps_to_target": first_reaching(mean_u, target),
        "seed_steps_to_target_median": float(np.median(reached)) if reached else None,
        "seeds_reaching_target": len(reached),
        # Spread between seeds, averaged over the run, and the update-to-update wobble of a
        # seed's own curve (the variance of its changes), averaged over seeds.
        "seed_std_mean": float(rewards_su.std(0).mean()),
        "curve_variance": float(np.diff(rewards_su, axis=-1).var(-1).mean()),
        "final_seed_std": float(rewards_su[:, -max(1, rewards_su.shape[1] // 10) :].mean(1).std()),
    }


def summarize(
    runs: Mapping[tuple[str, str], Mapping[str, Any]], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """The command's JSON object from ``{(algorithm, memory): train output [seeds, ...]}``.

    The algorithms are compared on the graph memory; the memories are all trained with GGPO.
    ``steps_to_target`` is the first update at which the mean curve's trailing mean reaches
    GSPO's final reward (the mean of its last tenth of updates).
    """
    gspo = np.asarray(runs["gspo", "graph"]["curves"]["reward"])
    target = final_value(gspo.mean(0))
    algorithms = {
        algorithm: summarize_algorithm(
            np.asarray(runs[algorithm, "graph"]["curves"]["reward"]), target
        )
        for algorithm in ("ggpo", "gspo")
    }
    ablations = {
        algorithm: summarize_algorithm(np.asarray(run["curves"]["reward"]), target)
        for (algorithm, memory), run in runs.items()
        if memory == "graph" and algorithm not in algorithms
    }
    for group in (algorithms, ablations):
        for algorithm, figures in group.items():
            kept = np.asarray(runs[algorithm, "graph"]["curves"]["kept_fraction"])
            figures["kept_fraction"] = float(kept.mean())
    memories = {}
    for memory in ("graph", "linear", "summary"):
        run = runs["ggpo", memory]
        evals = {k: np.asarray(v) for k, v in run["eval"].items()}
        memories[memory] = {
            **{k: float(v.mean()) for k, v in evals.items()},
            **{f"{k}_seed_std": float(v.std()) for k, v in evals.items()},
            "reward_curve": [
                round(float(x), 5) for x in np.asarray(run["curves"]["reward"]).mean(0)
            ],
        }
    seeds = gspo.shape[0]
    return {
        "seeds": seeds,
        "target_reward": target,
        "settings": dict(settings),
        "algorithms": algorithms,
        "memories": memories,
        "ablations": ablations,
    }


def table(result: Mapping[str, Any]) -> str:
    """The figures as plain text (curves left out)."""
    lines = [
        f"seeds: {result['seeds']}   target (GSPO's final reward): {result['target_reward']:.3f}"
    ]
    lines.append(
        "algorithm (graph)   final  steps_to_target  seed_median  seed_std  curve_var  kept"
    )
    for name, a in {**result["algorithms"], **result.get("ablations", {})}.items():
        lines.append(
            f"{name:18}  {a['final_reward']:.3f}  {a['steps_to_target']!s:>15}  "
            f"{a['seed_steps_to_target_median']!s:>11}  {a['seed_std_mean']:.3f}     "
            f"{a['curve_variance']:.5f}    {a['kept_fraction']:.2f}"
        )
    lines.append("memory (GGPO)  accuracy  searches  repeated_searches")
    for name, m in result["memories"].items():
        lines.append(
            f"{name:13}  {m['accuracy']:.3f}     {m['searches']:.2f}      "
            f"{m['repeated_searches']:.2f}"
        )
    return "\n".join(lines)


def write(result: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Writes ``toy.json`` and ``toy.png`` (curves with their seed spread, memory bars)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "toy.json", out / "toy.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    fig, (curves, memory_curves, bars) = plt.subplots(1, 3, figsize=(15, 4))
    for name, a in {**result["algorithms"], **result.get("ablations", {})}.items():
        mean, std = np.asarray(a["reward_curve"]), np.asarray(a["reward_std_curve"])
        x = np.arange(1, mean.size + 1)
        curves.plot(x, mean, label=name.upper())
        curves.fill_between(x, mean - std, mean + std, alpha=0.2)
    curves.axhline(result["target_reward"], color="grey", ls=":", label="GSPO final")
    curves.set(title="graph memory: reward (mean ± std over seeds)", xlabel="update")
    curves.legend()
    for name, m in result["memories"].items():
        memory_curves.plot(np.arange(1, len(m["reward_curve"]) + 1), m["reward_curve"], label=name)
    memory_curves.set(title="GGPO: reward by memory (mean over seeds)", xlabel="update")
    memory_curves.legend()
    names = list(result["memories"])
    width = 0.27
    for i, key in enumerate(("accuracy", "searches", "repeated_searches")):
        values = [result["memories"][n][key] for n in names]
        bars.bar(np.arange(len(names)) + (i - 1) * width, values, width, label=key)
    bars.set_xticks(np.arange(len(names)), names)
    bars.set(title="after training: per episode")
    bars.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return [json_path, png_path]
