"""The VimRAG paper's published accuracies, as data, to print beside our own results.

Source: "VimRAG: Navigating Massive Visual Context in Retrieval-Augmented Generation via
Multimodal Memory Graph", arXiv 2602.12735, main results table (Qwen3-VL-8B-Instruct policy,
accuracy in %), as transcribed in this project's specification (``SPEC.md`` §8). Public copies
of that table print the last columns with uncertain alignment; the overall figures (VimRAG 50.1,
Mem1 43.6) and SlideVQA (62.4 vs 55.7) are confirmed. The paper's "overall" is not the mean of
the nine columns (that would be 51.2 / 42.7 / 34.5 for VimRAG / Mem1 / ReAct), so it is read as
the accuracy over all questions pooled; our tables print the pooled accuracy as ``overall`` and
the column mean as ``macro`` to compare like with like.

The paper evaluates ReAct, Mem1 and VimRAG on every benchmark; our ``summary`` baseline
(iterative summarisation) has no published row. With the 4B policy only the overall numbers are
given (VimRAG 45.2, Mem1 40.6).
"""

from __future__ import annotations

#: Where the numbers come from (printed under every table that shows them).
SOURCE = (
    "VimRAG (arXiv 2602.12735), main results, Qwen3-VL-8B-Instruct, accuracy %; "
    "transcribed in SPEC.md section 8 (alignment of the last columns uncertain in public copies)"
)

#: The paper's benchmark columns, in its order, by our benchmark names (`benchmarks.NAMES`).
BENCHMARKS: tuple[str, ...] = (
    "hotpotqa",
    "squad",
    "webqa",
    "slidevqa",
    "mmlongbench_doc",
    "lvbench",
    "wikihowqa",
    "syntheticqa",
    "xvbench",
)
#: How the paper heads each column.
TITLES: dict[str, str] = {
    "hotpotqa": "HotpotQA",
    "squad": "SQuAD",
    "webqa": "WebQA",
    "slidevqa": "SlideVQA",
    "mmlongbench_doc": "MMLongBench",
    "lvbench": "LVBench",
    "wikihowqa": "WikiHowQA",
    "syntheticqa": "SyntheticQA",
    "xvbench": "XVBench",
    "overall": "overall",
}

_ROWS_8B: dict[str, tuple[float, ...]] = {
    # method: (the nine benchmarks in BENCHMARKS order..., overall)
    "react": (70.8, 65.5, 40.0, 15.4, 15.9, 23.0, 35.0, 24.0, 21.3, 37.7),
    "mem1": (73.0, 68.4, 44.5, 55.7, 22.4, 24.5, 19.9, 43.4, 32.2, 43.6),
    "vimrag": (79.1, 76.4, 53.9, 62.4, 33.4, 29.7, 54.5, 37.1, 34.2, 50.1),
}

#: ``ACCURACY[model][method][benchmark or "overall"]`` in %; methods by our agent names.
ACCURACY: dict[str, dict[str, dict[str, float]]] = {
    "qwen3-vl-8b": {
        method: dict(zip((*BENCHMARKS, "overall"), row, strict=True))
        for method, row in _ROWS_8B.items()
    },
    "qwen3-vl-4b": {"vimrag": {"overall": 45.2}, "mem1": {"overall": 40.6}},
}
DEFAULT_MODEL = "qwen3-vl-8b"

#: The paper's pilot study of memory strategies (image / video accuracy %, tokens in thousands).
PILOT_STUDY: dict[str, dict[str, float]] = {
    "pre-caption": {"image": 14.5, "video": 17.2, "tokens_k": 0.9},
    "raw visual tokens": {"image": 45.6, "video": 30.4, "tokens_k": 15.8},
    "context-aware caption": {"image": 52.8, "video": 39.5, "tokens_k": 1.5},
    "semantically-related visual memory": {"image": 58.2, "video": 43.7, "tokens_k": 2.7},
}


def base_benchmark(label: str) -> str:
    """The benchmark of a question-file label: ``mmlongbench_doc.vrag`` -> ``mmlongbench_doc``."""
    return label.split(".", 1)[0]


def paper_accuracy(method: str, benchmark: str, model: str = DEFAULT_MODEL) -> float | None:
    """The paper's accuracy (%) of ``method`` (our agent name) on ``benchmark`` (a benchmark
    name, a derived label such as ``mmlongbench_doc.vrag``, or ``"overall"``); None where the
    paper gives none (e.g. the ``summary`` baseline)."""
    return ACCURACY.get(model, {}).get(method, {}).get(base_benchmark(benchmark))


def methods(model: str = DEFAULT_MODEL) -> list[str]:
    """The methods the paper reports for ``model``."""
    return list(ACCURACY.get(model, {}))


__all__ = [
    "ACCURACY",
    "BENCHMARKS",
    "DEFAULT_MODEL",
    "PILOT_STUDY",
    "SOURCE",
    "TITLES",
    "base_benchmark",
    "methods",
    "paper_accuracy",
]
