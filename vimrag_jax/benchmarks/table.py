"""Results of the benchmark evaluation: per-episode measures, the episode log, paper-style tables.

    python -m vimrag_jax.benchmarks.table --eval_dir=DIR/eval [--out=DIR]

`episode_result` measures one episode (a line of ``episodes.jsonl``, kept by `EpisodeLog`);
`write_agent_results` turns one agent's episodes (`vimrag_jax.benchmarks.evaluate`) into
``DIR/eval/<agent>/results.{md,csv,json}``: a row per benchmark, then ``overall`` (every episode
pooled, as the paper's overall reads) and ``macro`` (the mean of the benchmark rows). Columns:

| column | meaning |
|---|---|
| accuracy | % of episodes whose outcome reward is 1 (``rollout.reward_metric``: em, f1 or judge) |
| paper, Δ | the paper's accuracy of the same method (`paper`, SPEC §8) and ours minus it |
| EM, F1 | % exact match and mean token F1 (x100) against every accepted answer, always |
| judge failures | episodes the judge could not grade (scored 0); with ``reward_metric=judge`` |
| tokens | prompt + generated tokens over all model calls of a trajectory (mean) |
| visual tokens | picture and frame tokens shown over the trajectory (pixels / 32², mean) |
| model calls, searches | per trajectory (mean); searches = accepted search actions |
| repeated searches | per trajectory (mean): searches of a normalised query searched before |
| repeated % | repeated searches / searches, over all episodes |

The command (and the evaluation, after each agent) merges every ``DIR/eval/<agent>/
results.json`` into ``DIR/eval/results.{md,csv}`` — our rows and the paper's rows for the same
benchmarks — and draws ``DIR/eval/accuracy_vs_visual_tokens.png`` (overall accuracy against
visual tokens per trajectory, one color per method, small marks per benchmark).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vimrag_jax.agent.episode import Episode
from vimrag_jax.benchmarks import paper
from vimrag_jax.envs.rewards import exact_match, gold_answers, normalize_answer, token_f1

RESULTS = "results"
EPISODES_FILE = "episodes.jsonl"
PLOT_FILE = "accuracy_vs_visual_tokens.png"
#: (key in a summary, Markdown heading, decimals) of the cost columns.
COST_COLUMNS = (
    ("tokens", "tokens/traj", 0),
    ("visual_tokens", "visual tokens/traj", 0),
    ("model_calls", "model calls", 2),
    ("searches", "searches", 2),
    ("repeated_searches", "repeated searches", 2),
    ("repeated_share", "repeated %", 1),
)
DEFINITIONS = {
    "accuracy": "% of episodes with outcome reward 1 under rollout.reward_metric",
    "em": "% exact match (normalised) against any accepted answer",
    "f1": "mean best token F1 against the accepted answers, x100",
    "tokens": "prompt + generated tokens summed over a trajectory's model calls (mean)",
    "visual_tokens": "visual tokens (pixels / 32^2 per picture or frame) over a trajectory",
    "searches": "accepted search actions (a retrieval ran) per trajectory",
    "repeated_searches": (
        "searches whose query, normalised (lowercase, no punctuation or articles, single "
        "spaces), equals an earlier search query of the same episode; per trajectory"
    ),
    "repeated_share": "% of all searches that were repeated",
    "overall": "every episode pooled (question-weighted)",
    "macro": "mean of the benchmark rows",
}


# -- what an episode did ------------------------------------------------------------------------


def repeated_searches(queries: Sequence[str]) -> int:
    """How many of ``queries`` (one episode's searches, in order) repeat an earlier one after
    `normalize_answer` (case, punctuation, articles and spacing ignored)."""
    seen: set[str] = set()
    repeats = 0
    for query in queries:
        key = normalize_answer(query)
        repeats += key in seen
        seen.add(key)
    return repeats


def episode_searches(episode: Episode) -> list[str]:
    """The queries of the episode's accepted searches (those that ran a retrieval), in order;
    a rejected search call (an invalid action) retrieved nothing and is not counted."""
    return [
        str(turn.action.arguments.get("query", ""))
        for turn in episode.turns
        if turn.error is None and turn.action.kind == "search"
    ]


def visual_tokens(episode: Episode) -> int:
    """Visual tokens the model was shown over the episode: every prompt's pictures and frames
    at their resized size (SPEC §2: pixels / (32*32) per frame)."""
    from vimrag_jax.agent.prompts import visual_tokens as tokens_of

    return sum(tokens_of(v.height, v.width) for s in episode.segments for v in s.visuals)


def episode_result(
    episode: Episode, benchmark: str, reward: float, verdict: bool | None = None
) -> dict[str, Any]:
    """One line of ``episodes.jsonl``: the question, the prediction and what it cost.

    ``reward`` is the accuracy score (the configured metric); ``verdict`` the judge's (None:
    not judged, or the judge failed: see ``judge_failed``)."""
    question = episode.question
    golds = list(gold_answers(question))
    queries = episode_searches(episode)
    gold_ids = {int(i) for i in question.evidence_ids}
    prompt_tokens = sum(len(s.prompt) for s in episode.segments)
    generated = sum(len(s.sampled) for s in episode.segments)
    return {
        "id": str(question.question_id),
        "benchmark": benchmark,
        "question": question.text,
        "answers": golds,
        "prediction": episode.prediction,
        "reward": float(reward),
        "em": float(exact_match(episode.prediction, golds)),
        "f1": float(token_f1(episode.prediction, golds)),
        "judge": verdict,
        "answered": episode.prediction is not None,
        "model_calls": len(episode.segments),
        "searches": len(queries),
        "repeated_searches": repeated_searches(queries),
        "queries": queries,
        "invalid_actions": int(episode.num_invalid),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "tokens": prompt_tokens + generated,
        "visual_tokens": visual_tokens(episode),
        "evidence_hit": bool(gold_ids & {i for found in episode.retrieved for i in found})
        if gold_ids
        else None,
        "end_reason": episode.end_reason,
        "errors": [t.error[:200] for t in episode.turns if t.error is not None][:3],
    }


# -- resumable episode log -----------------------------------------------------------------------


class EpisodeLog:
    """``episodes.jsonl`` of one benchmark: append-only, one flushed line per episode.

    Every line carries the ``run`` key of the evaluation that wrote it (policy, metric, budget,
    split, store: `run_key`); ``done`` maps the question ids recorded under ``run`` to their
    results, so a rerun of the same evaluation skips them while another policy (a newer
    checkpoint) or split starts afresh. Opening drops a torn last line (a kill mid-append),
    so appends stay whole lines."""

    def __init__(self, directory: Path, run: str = ""):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / EPISODES_FILE
        self.run = run
        self.done: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            data = self.path.read_bytes()
            whole = data[: data.rfind(b"\n") + 1]
            if len(whole) != len(data):
                with open(self.path, "r+b") as handle:
                    handle.truncate(len(whole))
            for line in whole.decode("utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row.get("run", "") == run:
                        self.done[row["id"]] = row

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        rows = [{**row, "run": self.run} for row in rows]
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            handle.flush()
            os.fsync(handle.fileno())
        self.done.update((row["id"], row) for row in rows)


def run_key(policy: str, config: Any, split: str, store: str | os.PathLike) -> str:
    """What makes two evaluations' episodes interchangeable: the policy, the accuracy metric,
    the memory budget, the split and the store."""
    return (
        f"{policy} | {config.reward_metric} | {config.budget} | {split} | {Path(store).resolve()}"
    )


def run_hash(run: str) -> str:
    """A short name for ``run`` (the trajectory shards of different runs do not collide)."""
    return hashlib.sha256(run.encode()).hexdigest()[:8]


def summarize(rows: Sequence[Mapping[str, Any]], *, judged: bool = False) -> dict[str, Any]:
    """The aggregate of a list of episode results (`evaluate.episode_result` lines)."""
    n = len(rows)

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in rows) / max(n, 1)

    searches = sum(int(r["searches"]) for r in rows)
    repeated = sum(int(r["repeated_searches"]) for r in rows)
    hits = [bool(r["evidence_hit"]) for r in rows if r.get("evidence_hit") is not None]
    return {
        "questions": n,
        "accuracy": 100 * mean("reward"),
        "em": 100 * mean("em"),
        "f1": 100 * mean("f1"),
        "judge_failures": sum(r.get("judge") is None for r in rows) if judged else None,
        "answered": 100 * mean("answered"),
        "tokens": mean("tokens"),
        "prompt_tokens": mean("prompt_tokens"),
        "generated_tokens": mean("generated_tokens"),
        "visual_tokens": mean("visual_tokens"),
        "model_calls": mean("model_calls"),
        "searches": mean("searches"),
        "repeated_searches": mean("repeated_searches"),
        "repeated_share": 100 * repeated / searches if searches else 0.0,
        "invalid_actions": mean("invalid_actions"),
        "evidence_hit": 100 * sum(hits) / len(hits) if hits else None,
    }


def _fmt(value: Any, decimals: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{decimals}f}"
    return str(value)


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _csv(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return out.getvalue()


def _delta(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or theirs is None else ours - theirs


# -- one agent -----------------------------------------------------------------------------------


def agent_summary(
    results: Mapping[str, Sequence[Mapping[str, Any]]], meta: Mapping[str, Any]
) -> dict[str, Any]:
    """``results.json``'s content: ``meta``, per-benchmark and overall summaries with the
    paper's accuracy of the same method beside each."""
    agent = str(meta["agent"])
    judged = meta.get("reward_metric") == "judge"
    rows = {label: summarize(r, judged=judged) for label, r in results.items()}
    for label, row in rows.items():
        row["split"] = meta.get("splits", {}).get(label, "")
        row["paper_accuracy"] = paper.paper_accuracy(agent, label)
    pooled = summarize([r for rs in results.values() for r in rs], judged=judged)
    pooled["paper_accuracy"] = paper.paper_accuracy(agent, "overall")
    # The paper's overall pools all nine benchmarks: ours compares with it only when complete.
    pooled["paper_comparable"] = set(paper.BENCHMARKS) <= {paper.base_benchmark(x) for x in rows}
    macro = {
        key: sum(r[key] for r in rows.values()) / max(len(rows), 1)
        for key in ("accuracy", "em", "f1")
    }
    return {
        **meta,
        "benchmarks": rows,
        "overall": pooled,
        "macro": macro,
        "paper_source": paper.SOURCE,
        "definitions": DEFINITIONS,
    }


def agent_table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of one agent's table (module docstring)."""
    judged = summary.get("reward_metric") == "judge"
    headers = ["benchmark", "split", "questions", "accuracy", "paper", "Δ", "EM", "F1"]
    headers += ["judge failures"] if judged else []
    headers += [title for _, title, _ in COST_COLUMNS]
    out = []
    named = [*summary["benchmarks"].items(), ("overall", summary["overall"])]
    for label, row in named:
        values = [label, row.get("split", ""), row["questions"], row["accuracy"]]
        delta = _delta(row["accuracy"], row["paper_accuracy"])
        values += [row["paper_accuracy"], delta if row.get("paper_comparable", True) else None]
        values += [row["em"], row["f1"]] + ([row["judge_failures"]] if judged else [])
        values += [round(row[key], d) if d else int(round(row[key])) for key, _, d in COST_COLUMNS]
        out.append(values)
    macro = summary["macro"]
    blank = [None] * (len(headers) - 8)
    out.append(["macro", "", "", macro["accuracy"], None, None, macro["em"], macro["f1"], *blank])
    return headers, out


def write_agent_results(
    directory: str | Path,
    results: Mapping[str, Sequence[Mapping[str, Any]]],
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """Writes ``directory/results.{json,md,csv}`` for one agent; returns the JSON content."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    summary = agent_summary(results, meta)
    headers, rows = agent_table(summary)
    (directory / f"{RESULTS}.json").write_text(json.dumps(summary, indent=1))
    title = f"## {summary['agent']} — {summary.get('policy', '')}"
    note = (
        f"Accuracy: rollout.reward_metric = {summary.get('reward_metric')}; budget "
        f"{summary.get('budget')}; store {summary.get('store')}. overall: every episode pooled "
        "(Δ only when all nine benchmarks were evaluated: the paper's overall pools them); "
        f"macro: the mean of the benchmark rows.\n\nPaper: {paper.SOURCE}.\n"
    )
    (directory / f"{RESULTS}.md").write_text(f"{title}\n\n{_markdown(headers, rows)}\n\n{note}")
    (directory / f"{RESULTS}.csv").write_text(_csv(headers, rows))
    return summary


# -- every agent ---------------------------------------------------------------------------------


def read_results(eval_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``eval_dir/<agent>/results.json``, by agent name."""
    found = sorted(Path(eval_dir).glob(f"*/{RESULTS}.json"))
    return [json.loads(p.read_text()) for p in found]


def _column_order(label: str) -> tuple[int, str]:
    base = paper.base_benchmark(label)
    return (paper.BENCHMARKS.index(base) if base in paper.BENCHMARKS else 99, label)


def merged_tables(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """(headers, rows) of the accuracy table (ours and the paper's, per benchmark and
    overall) and of the cost table (ours)."""
    labels: list[str] = []
    for s in summaries:
        labels += [label for label in s["benchmarks"] if label not in labels]
    labels.sort(key=_column_order)
    titles = [paper.TITLES.get(x, x) if "." not in x else x for x in labels]
    headers = ["method", "source", *titles, "overall"]
    rows: list[list[Any]] = []
    for s in summaries:
        bench = s["benchmarks"]
        values = [bench[x]["accuracy"] if x in bench else None for x in labels]
        rows.append([s["agent"], f"ours: {s.get('policy', '')}", *values, s["overall"]["accuracy"]])
    for method in paper.methods():
        values = [paper.paper_accuracy(method, x) for x in labels]
        overall = paper.paper_accuracy(method, "overall")
        rows.append([method, f"paper ({paper.DEFAULT_MODEL})", *values, overall])
    cost_headers = ["method", "questions", "accuracy", "EM", "F1"]
    cost_headers += [title for _, title, _ in COST_COLUMNS]
    cost_rows = []
    for s in summaries:
        o = s["overall"]
        cost_rows.append(
            [s["agent"], o["questions"], o["accuracy"], o["em"], o["f1"]]
            + [round(o[key], d) if d else int(round(o[key])) for key, _, d in COST_COLUMNS]
        )
    return {"accuracy": (headers, rows), "cost": (cost_headers, cost_rows), "labels": labels}


def plot_accuracy_vs_visual_tokens(summaries: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """Overall accuracy (%) against visual tokens per trajectory, one color per method, with a
    small mark per benchmark; written as PNG to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for s in summaries:
        o = s["overall"]
        (point,) = ax.plot(
            [o["visual_tokens"]], [o["accuracy"]], "o", markersize=9, label=s["agent"]
        )
        color = point.get_color()
        for label, row in s["benchmarks"].items():
            ax.plot([row["visual_tokens"]], [row["accuracy"]], ".", color=color, alpha=0.5)
            ax.annotate(label, (row["visual_tokens"], row["accuracy"]), fontsize=6, alpha=0.6)
    ax.set_xlabel("visual tokens per trajectory (mean)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs visual tokens (large: overall; small: per benchmark)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def merge(eval_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Writes the merged ``results.md``/``results.csv`` and the plot of every agent evaluated
    under ``eval_dir`` into ``out`` (default ``eval_dir``); returns their paths and tables.
    FileNotFoundError when no agent has results."""
    summaries = read_results(eval_dir)
    if not summaries:
        raise FileNotFoundError(f"no <agent>/{RESULTS}.json under {eval_dir}")
    out = Path(out or eval_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = merged_tables(summaries)
    accuracy, cost = tables["accuracy"], tables["cost"]
    text = "\n\n".join(
        [
            "## Accuracy (%)",
            _markdown(*accuracy),
            "## Cost per trajectory (overall)",
            _markdown(*cost),
            f"overall = every episode pooled. Paper: {paper.SOURCE}.\n",
        ]
    )
    markdown, table_csv = out / f"{RESULTS}.md", out / f"{RESULTS}.csv"
    markdown.write_text(text)
    table_csv.write_text(_csv(*accuracy) + "\n" + _csv(*cost))
    plot = plot_accuracy_vs_visual_tokens(summaries, out / PLOT_FILE)
    return {"markdown": markdown, "csv": table_csv, "plot": plot, "text": text, **tables}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (module docstring); 0 on success, 2 when there is nothing to merge."""
    parser = argparse.ArgumentParser(
        prog="python -m vimrag_jax.benchmarks.table", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--eval_dir", required=True, help="DIR/eval, holding <agent>/results.json")
    parser.add_argument("--out", default="", help="where to write (default: --eval_dir)")
    args = parser.parse_args(argv)
    try:
        merged = merge(args.eval_dir, args.out or None)
    except FileNotFoundError as error:
        print(f"table: error: {error}", file=sys.stderr)
        return 2
    print(merged["text"])
    print(f"written: {merged['markdown']}, {merged['csv']}, {merged['plot']}", file=sys.stderr)
    return 0


__all__ = [
    "COST_COLUMNS",
    "EPISODES_FILE",
    "EpisodeLog",
    "run_hash",
    "run_key",
    "episode_result",
    "episode_searches",
    "repeated_searches",
    "visual_tokens",
    "DEFINITIONS",
    "agent_summary",
    "agent_table",
    "merge",
    "merged_tables",
    "plot_accuracy_vs_visual_tokens",
    "read_results",
    "summarize",
    "write_agent_results",
]

if __name__ == "__main__":
    sys.exit(main())
