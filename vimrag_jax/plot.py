"""Training curves of one or several runs side by side, from their ``metrics.jsonl``.

    python -m vimrag_jax.plot --workdir=/runs/ggpo --workdir=/runs/gspo --out=curves.png \
        [--metrics=rollout_reward,loss,accuracy] [--smoothing=0.6] [--labels=GGPO,GSPO]

One panel per metric, one line per run. A metric is the row key itself or, failing that, a key
ending in ``/<metric>`` (``train/reward``). Panels no run has are left out, so ``accuracy``
appears only once evaluation writes it. Smoothing is TensorBoard's debiased exponential moving
average (0: raw values). When a resumed run repeated steps, the last row of a step wins.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from absl import app, flags

from vimrag_jax.metrics import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

DEFAULT_METRICS = ("rollout_reward", "loss", "accuracy")


def smooth(values: Sequence[float], weight: float) -> np.ndarray:
    """Debiased exponential moving average; ``weight`` in [0, 1), 0 returns the values."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {weight}")
    values = np.asarray(values, np.float64)
    out = np.empty_like(values)
    average, norm = 0.0, 0.0
    for i, value in enumerate(values):
        average = weight * average + (1.0 - weight) * value
        norm = weight * norm + (1.0 - weight)
        out[i] = average / norm
    return out


def metric_key(rows: Sequence[dict], metric: str) -> str | None:
    """The row key that holds ``metric``: itself, else the first key ending in ``/metric``."""
    keys = sorted({k for row in rows for k in row})
    if metric in keys:
        return metric
    return next((k for k in keys if k.endswith("/" + metric)), None)


def curve(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of ``key``, sorted by step, the last row of a repeated step winning."""
    by_step = {int(row["step"]): float(row[key]) for row in rows if key in row}
    steps = np.array(sorted(by_step), np.int64)
    return steps, np.array([by_step[s] for s in steps], np.float64)


def plot_runs(
    workdirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    smoothing: float = 0.0,
    labels: Sequence[str] | None = None,
) -> list[str]:
    """Draws the curves into ``out`` (PNG); returns the metrics that got a panel."""
    if labels is not None and len(labels) != len(workdirs):
        raise ValueError(f"{len(labels)} labels for {len(workdirs)} workdirs")
    runs = [read_metrics(w) for w in workdirs]
    if not any(runs):
        raise ValueError(f"no metrics.jsonl rows in {[str(w) for w in workdirs]}")
    labels = list(labels) if labels else [Path(w).name or str(w) for w in workdirs]
    panels = [m for m in metrics if any(metric_key(rows, m) for rows in runs)]
    if not panels:
        raise ValueError(f"none of the metrics {list(metrics)} is in the runs' metrics.jsonl")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], panels, strict=True):
        for rows, label in zip(runs, labels, strict=True):
            key = metric_key(rows, metric)
            if key is None:
                continue
            steps, values = curve(rows, key)
            if smoothing:
                ax.plot(steps, values, alpha=0.25, linewidth=0.8)
                ax.plot(
                    steps, smooth(values, smoothing), label=label, color=ax.lines[-1].get_color()
                )
            else:
                ax.plot(steps, values, label=label)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return panels


_FLAGS: dict[str, flags.FlagHolder] = {}


def _define_flags() -> None:
    # Defined only when run as a program, so importing plot_runs defines no global flags.
    _FLAGS.update(
        workdir=flags.DEFINE_multi_string("workdir", None, "Run directory (repeat for several)."),
        out=flags.DEFINE_string("out", "curves.png", "Output PNG file."),
        metrics=flags.DEFINE_list("metrics", list(DEFAULT_METRICS), "Metrics, one panel each."),
        smoothing=flags.DEFINE_float("smoothing", 0.0, "EMA weight in [0, 1); 0 plots raw values."),
        labels=flags.DEFINE_list("labels", None, "Legend label per workdir (default: dir names)."),
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    value = {name: holder.value for name, holder in _FLAGS.items()}
    if not value["workdir"]:
        raise app.UsageError("--workdir is required (repeat it to compare runs)")
    panels = plot_runs(
        value["workdir"],
        value["out"],
        metrics=value["metrics"],
        smoothing=value["smoothing"],
        labels=value["labels"],
    )
    print(f"wrote {value['out']}: {', '.join(panels)}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
