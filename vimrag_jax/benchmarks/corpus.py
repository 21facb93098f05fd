"""The unified corpus: the nine benchmarks' passages, pictures, pages and videos in ONE store,
with every question's gold evidence mapped to the store's item ids.

    python -m vimrag_jax.benchmarks.corpus --data_dir=OUT --raw=NAME=DIR,... --out=STORE \
        [--benchmarks=all|NAME[:FORMAT],...] [--splits=SPLIT,...] [--embedder=hashing]
        [--work=DIR] [--workers=8] [--image_max_side=1024] [--frame_max_side=448]
        [--max_items=N] [--embed_batch=64]
        [--restart] [--overwrite]

``OUT`` holds the TFDS datasets built by `vimrag_jax.benchmarks.build` (the questions and their
evidence); each ``--raw`` directory is that benchmark's release with its media
(`vimrag_jax.benchmarks.corpus_sources` lists what is read). Three steps:

1. **Prepare** (resumable): each source becomes items of the streaming import's JSON-lines
   format (`vimrag_jax.retrieval.import_corpus`) in the work directory (default
   ``STORE.work``): text passages as they are, pictures shrunk to ``--image_max_side``, PDF
   pages rendered by PDFium, videos cut into 60-s chunks at 1 fps (`media`). A source is
   recorded in ``units.jsonl`` once all its items are written, so a rerun after a kill (or
   after ``--max_items`` stopped it) skips what is done and redoes at most the source it was
   in; item ids are assigned in order, so a resumed build equals an uninterrupted one.
2. **Import** through `import_corpus` into ``STORE`` (staged, published whole). Embeddings are
   cached in the work directory by item content (`CachingEmbedder`), so a rerun after a kill
   in this step embeds only what was not embedded before.
3. **Map evidence**: written beside the store's files, in ``STORE``:
   ``item_keys.jsonl`` (item id -> its key in the benchmarks' terms), ``evidence.jsonl`` (per
   question: benchmark, format, split, id, ``item_ids``, ``status`` and the unmapped
   references with the reason), ``questions/<name>[.<format>].<split>.jsonl`` (the question
   files `vimrag_jax.envs.dataset` reads: ``evidence_ids`` = the mapped items, GGPO's R_val)
   and ``corpus_summary.json`` (counts per benchmark, items and bytes per kind, timings).

A question is ``mapped`` (every reference found), ``partial`` (some), ``unmapped`` (none: left
out of the question files, never given an empty R_val) or ``no_evidence`` (the benchmark gives
none, e.g. MMLongBench-Doc's unanswerable questions: kept, R_val empty by definition). The
counts per benchmark are printed at the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vimrag_jax import benchmarks
from vimrag_jax.benchmarks.corpus_sources import Settings, Sources, evidence_keys
from vimrag_jax.benchmarks.corpus_work import (
    CachingEmbedder,
    CorpusBuildError,
    WorkDir,
    complete_lines,
    prepare,
)
from vimrag_jax.benchmarks.features import as_text
from vimrag_jax.benchmarks.media import MediaError
from vimrag_jax.benchmarks.raw import RAW, MissingRawFiles, RawFormatError
from vimrag_jax.retrieval.embedders import Embedder
from vimrag_jax.retrieval.import_corpus import CorpusImportError, import_corpus, parse_embedder
from vimrag_jax.retrieval.index import RetrievalError

STATUSES = ("mapped", "partial", "unmapped", "no_evidence")
_STATE_VERSION = 1


# -- evidence ------------------------------------------------------------------------------------


class KeyIndex:
    """Item keys -> ids, with ``prefix:`` keys for a whole video's chunks or a document's pages."""

    def __init__(self, keys_file: Path, missing: dict[str, str]):
        self.ids: dict[str, int] = {}
        self.prefixes: dict[str, list[int]] = collections.defaultdict(list)
        for line in complete_lines(keys_file):
            entry = json.loads(line)
            self.ids[entry["key"]] = entry["id"]
            if entry["key"].startswith(("video:", "page:")):
                self.prefixes[entry["key"].rsplit(":", 1)[0] + ":"].append(entry["id"])
        self.missing = missing

    def find(self, key: str) -> list[int]:
        """The ids of ``key``'s item (or of every item under a ``prefix:`` key)."""
        if key.endswith(":"):
            return self.prefixes.get(key, [])
        return [self.ids[key]] if key in self.ids else []

    def why(self, key: str) -> str:
        """Why ``key`` has no item: the recorded reason of it or of its source, else a guess."""
        parent = key if key.endswith(":") else key.rsplit(":", 1)[0] + ":"
        family = ":".join(key.split(":")[:2]) + ":"  # e.g. every WebQA image
        for candidate in (key, parent, family):
            if candidate in self.missing:
                return self.missing[candidate]
        if parent in self.prefixes:
            kind = "chunks" if key.startswith("video:") else "pages"
            return f"{key} is beyond the {len(self.prefixes[parent])} {kind} of its source"
        return f"{key} is not in the corpus (no such source in the raw release)"


def map_question(
    name: str, config: str, evidence: dict[str, list[Any]], index: KeyIndex
) -> tuple[list[int], list[dict[str, Any]], str]:
    """(item ids, unmapped references with reasons, status) of one question's evidence."""
    ids: list[int] = []
    unmapped = []
    refs = list(zip(*(evidence[f] for f in ("kind", "source", "ref", "start", "end")), strict=True))
    for kind, source, ref, start, end in refs:
        kind, source, ref = as_text(kind), as_text(source), as_text(ref)
        keys, reason = evidence_keys(name, config, kind, source, ref, float(start), float(end))
        found = [i for key in keys for i in index.find(key)]
        if found:
            ids += found
            continue
        if keys and not reason:
            reason = index.why(keys[0])
        unmapped.append({"kind": kind, "source": source, "ref": ref, "reason": reason})
    ids = list(dict.fromkeys(ids))
    if not refs:
        status = "no_evidence"
    else:
        status = "unmapped" if not ids else "partial" if unmapped else "mapped"
    return ids, unmapped, status


def _mapped_split(
    name: str, config: str, split: str, data_dir: Path, index: KeyIndex
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(evidence.jsonl rows, question-file rows) of one built split."""
    rows, questions = [], []
    for example in benchmarks.load(name, data_dir=data_dir, split=split, config=config):
        qid = as_text(example["id"])
        ids, unmapped, status = map_question(name, config, example["evidence"], index)
        rows.append(
            {"benchmark": name, "format": config, "split": split, "id": qid, "item_ids": ids}
            | {"status": status, "unmapped": unmapped}
        )
        answers = [as_text(a) for a in example["answers"] if as_text(a).strip()]
        if status != "unmapped" and answers:  # unmapped: no R_val to give; no answer: no reward
            question = as_text(example["question"])
            questions.append(
                {"id": qid, "question": question, "answer": answers[0], "answers": answers[1:]}
                | {"evidence_ids": ids}
            )
    return rows, questions


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_mapping(
    out: Path,
    work: WorkDir,
    selected: list[tuple[str, str]],
    data_dir: Path,
    splits: list[str] | None,
    missing: dict[str, str],
) -> dict[str, Any]:
    """Writes item_keys.jsonl, evidence.jsonl and the question files (none for a split without a
    usable question) into ``out``; the counts per benchmark."""
    index = KeyIndex(work.keys, missing)
    shutil.copyfile(work.keys, out / "item_keys.jsonl")
    shutil.rmtree(out / "questions", ignore_errors=True)
    (out / "questions").mkdir()
    counts: dict[str, Any] = {}
    evidence: list[dict[str, Any]] = []
    for name, config in selected:
        label = name if config == RAW else f"{name}.{config}"
        tally = collections.Counter({status: 0 for status in STATUSES})
        reasons: collections.Counter[str] = collections.Counter()
        for split in benchmarks.builder(name, data_dir=data_dir, config=config).info.splits:
            if splits and split not in splits:
                continue
            rows, questions = _mapped_split(name, config, split, data_dir, index)
            evidence += rows
            tally.update(row["status"] for row in rows)
            reasons.update(u["reason"] for row in rows for u in row["unmapped"])
            if questions:
                _write_jsonl(out / "questions" / f"{label}.{split}.jsonl", questions)
        counts[label] = {"questions": sum(tally.values()), **tally, "reasons": dict(reasons)}
    _write_jsonl(out / "evidence.jsonl", evidence)
    return counts


# -- the whole build -----------------------------------------------------------------------------


def _selection(spec: str) -> list[tuple[str, str]]:
    if spec.strip() in ("", "all"):
        return [(name, RAW) for name in benchmarks.NAMES]
    selected = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, config = part.partition(":")
        if name not in benchmarks.BUILDERS:
            raise CorpusBuildError(
                f"unknown benchmark {name!r}; expected one of {', '.join(benchmarks.NAMES)}"
            )
        formats = [RAW, *benchmarks.BUILDERS[name].DERIVED]
        if (config or RAW) not in formats:
            raise CorpusBuildError(
                f"{name} has no format {config!r}; it reads {', '.join(formats)}"
            )
        selected.append((name, config or RAW))
    return selected


def parse_raw(spec: str) -> dict[str, Path]:
    """``NAME=DIR,NAME=DIR`` as {name: directory}; CorpusBuildError for a bad entry."""
    raw = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, directory = part.partition("=")
        if not sep or name not in benchmarks.BUILDERS:
            raise CorpusBuildError(
                f"--raw entry {part!r} is not NAME=DIR with NAME one of "
                f"{', '.join(benchmarks.NAMES)}"
            )
        if not Path(directory).is_dir():
            raise CorpusBuildError(f"--raw: {name}'s directory {directory!r} does not exist")
        raw[name] = Path(directory).resolve()
    return raw


def _store_bytes(store) -> dict[str, dict[str, float]]:
    """Items, pixel bytes and embedding bytes per modality of an opened store."""
    sizes: dict[str, dict[str, float]] = {}
    for info in store:
        entry = sizes.setdefault(info.modality, {"items": 0, "pixel_bytes": 0, "frames": 0})
        entry["items"] += 1
        entry["pixel_bytes"] += int(np.prod(info.shape)) if info.shape else 0
        entry["frames"] += info.num_frames
    for entry in sizes.values():
        entry["embedding_bytes"] = entry["items"] * store.embedder.dim * 4
    return sizes


def build_corpus(
    *,
    data_dir: str | os.PathLike,
    raw: dict[str, Path],
    out: str | os.PathLike,
    selection: str = "all",
    splits: list[str] | None = None,
    embedder: Embedder | None = None,
    work: str | os.PathLike | None = None,
    settings: Settings | None = None,
    workers: int = 1,
    max_items: int = 0,
    embed_batch: int = 64,
    restart: bool = False,
    overwrite: bool = False,
    progress_every: int = 1000,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Builds the unified store in ``out`` (see the module docstring); returns the summary,
    whose ``finished`` is False when ``max_items`` stopped the preparation."""
    data_dir, out = Path(data_dir), Path(out)
    selected = _selection(selection)
    absent = sorted({name for name, _ in selected} - set(raw))
    if absent:
        raise CorpusBuildError(f"no --raw directory for {', '.join(absent)} (NAME=DIR)")
    for name, config in selected:  # every dataset must be built before anything is written
        if not benchmarks.builder(name, data_dir=data_dir, config=config).is_prepared():
            raise CorpusBuildError(
                f"{name} ({config}) is not built in {data_dir}; build it with python -m "
                f"vimrag_jax.benchmarks.build --benchmark={name} --format={config} "
                f"--manual_dir=RAW --data_dir={data_dir}"
            )
    used = {name: raw[name] for name, _ in selected}
    settings = settings or Settings()
    sources = Sources(used, {n: splits for n in used} if splits else {}, settings)
    state = {
        "version": _STATE_VERSION,
        "raw": {name: str(path) for name, path in sorted(used.items())},
        "splits": splits or [],
        "image_max_side": settings.image_max_side,
        "frame_max_side": settings.frame_max_side,
    }
    work_dir = WorkDir(Path(work) if work else out.with_name(out.name + ".work"), state, restart)
    log(f"preparing items in {work_dir.root} ({work_dir.num_items} already prepared)")
    began = time.perf_counter()
    finished, errors, seconds = prepare(
        work_dir,
        sources.units(),
        workers=workers,
        max_items=max_items,
        progress_every=progress_every,
        log=log,
    )
    prepared_s = time.perf_counter() - began
    summary: dict[str, Any] = {"finished": finished, "items_prepared": work_dir.num_items}
    if not finished:
        return summary
    missing = {**sources.missing, **{_prefix(unit): error for unit, error in errors.items()}}
    cache = CachingEmbedder(embedder or parse_embedder("hashing"), work_dir.root / "embeddings")
    began = time.perf_counter()
    store = import_corpus(
        work_dir.items,
        out,
        media_root=work_dir.root,
        embedder=cache,
        overwrite=overwrite,
        log=log,
        embed_batch=embed_batch,
        progress_every=progress_every,
    )
    imported_s = time.perf_counter() - began
    counts = write_mapping(out, work_dir, selected, data_dir, splits, missing)
    summary.update(
        benchmarks=counts,
        items=_store_bytes(store),
        files={p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
        seconds={"prepare_by_kind": seconds, "prepare": prepared_s, "import": imported_s},
        embedded_now=cache.computed,
        media_errors=errors,
        store=str(out),
    )
    (out / "corpus_summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    log(report(summary))
    return summary


def _prefix(unit_key: str) -> str:
    """The key prefix of the items a failed unit would have made (for the unmapped reason)."""
    kind, _, rest = unit_key.partition(":")
    return {"pdf": f"page:mmlongbench_doc:{rest}:", "video": f"video:{rest}:"}.get(kind, unit_key)


def report(summary: dict[str, Any]) -> str:
    """The per-benchmark counts as a small table."""
    lines = [f"{'benchmark':<28}{'questions':>10}" + "".join(f"{s:>12}" for s in STATUSES)]
    for label, count in summary["benchmarks"].items():
        lines.append(
            f"{label:<28}{count['questions']:>10}" + "".join(f"{count[s]:>12}" for s in STATUSES)
        )
        for reason, n in count["reasons"].items():
            lines.append(f"    {n} x {reason}")
    items = ", ".join(f"{v['items']} {k}" for k, v in summary["items"].items())
    lines.append(f"corpus {summary['store']}: {items}; summary in corpus_summary.json")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (module docstring); 0 on success, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m vimrag_jax.benchmarks.corpus", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data_dir", required=True, help="TFDS datasets (benchmarks.build)")
    parser.add_argument("--raw", required=True, help="NAME=DIR,... raw releases with their media")
    parser.add_argument("--out", required=True, help="the corpus store directory")
    parser.add_argument("--benchmarks", default="all", help="all | NAME[:FORMAT],...")
    parser.add_argument("--splits", default="", help="only these splits (default: every built one)")
    parser.add_argument(
        "--embedder", default="hashing", help="hashing | hf:DIR | qwen3_vl:DIR | JSON"
    )
    parser.add_argument("--work", default="", help="work directory (default: OUT.work)")
    parser.add_argument("--image_max_side", type=int, default=Settings.image_max_side)
    parser.add_argument("--frame_max_side", type=int, default=Settings.frame_max_side)
    parser.add_argument(
        "--max_items", type=int, default=0, help="stop after N items (resume later)"
    )
    parser.add_argument("--embed_batch", type=int, default=64)
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads preparing media"
    )
    parser.add_argument("--progress_every", type=int, default=1000)
    parser.add_argument("--restart", action="store_true", help="discard the work directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a different store")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        summary = build_corpus(
            data_dir=args.data_dir,
            raw=parse_raw(args.raw),
            out=args.out,
            selection=args.benchmarks,
            splits=[s for s in args.splits.split(",") if s] or None,
            embedder=parse_embedder(args.embedder),
            work=args.work or None,
            settings=Settings(args.image_max_side, args.frame_max_side),
            workers=args.workers,
            max_items=args.max_items,
            embed_batch=args.embed_batch,
            restart=args.restart,
            overwrite=args.overwrite,
            progress_every=args.progress_every,
            log=log,
        )
    except (
        CorpusBuildError,
        CorpusImportError,
        MediaError,
        MissingRawFiles,
        RawFormatError,
        RetrievalError,
        ValueError,
        OSError,
    ) as error:
        print(f"corpus: error: {error}", file=sys.stderr)
        return 2
    if summary["finished"]:
        print(json.dumps({k: summary[k] for k in ("benchmarks", "items")}, indent=1))
    return 0


__all__ = [
    "CachingEmbedder",
    "CorpusBuildError",
    "KeyIndex",
    "build_corpus",
    "main",
    "map_question",
    "prepare",
    "report",
]

if __name__ == "__main__":
    sys.exit(main())
