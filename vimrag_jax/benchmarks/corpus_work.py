"""The unified corpus builder's resumable parts: the work directory of prepared items and the
embedding cache (`vimrag_jax.benchmarks.corpus` drives them).

The streaming import (`vimrag_jax.retrieval.import_corpus`) publishes a store only when every
item is in and a killed import's staging directory is deleted by the next one, so resuming is
done around it: the items are prepared into a work directory one source (*unit*) at a time,
each recorded as done once all its items are written (`WorkDir`, `prepare`), and the item
vectors the import asks for are cached by item content (`CachingEmbedder`), so a rerun
re-reads the prepared items but embeds only the ones never embedded.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from vimrag_jax.benchmarks.corpus_sources import Planned, Unit
from vimrag_jax.benchmarks.media import MediaError
from vimrag_jax.retrieval.embedders import Embedder
from vimrag_jax.retrieval.index import RetrievalError
from vimrag_jax.retrieval.store_format import CorpusItem, item_frames, metadata_row


class CorpusBuildError(ValueError):
    """Bad arguments or a work directory that cannot be resumed; the message says which."""


# -- the embedding cache -------------------------------------------------------------------------


def item_digest(item: CorpusItem) -> str:
    """sha256 of an item's metadata row and pixels: what its embedding depends on."""
    digest = hashlib.sha256(msgpack.packb(metadata_row(item, 0)))
    for frame in item_frames(item):
        digest.update(np.ascontiguousarray(frame).tobytes())
    return digest.hexdigest()


class CachingEmbedder:
    """An embedder that keeps every item vector it computes in ``directory`` (append-only
    ``keys.txt`` + ``vectors.f32``, one directory per embedder spec) and serves items it has
    seen from there, so a store build killed while embedding resumes where it stopped. It
    records the wrapped embedder's ``spec``: the store is the one the wrapped embedder builds."""

    def __init__(self, inner: Embedder, directory: str | os.PathLike):
        self.inner, self.dim = inner, int(inner.dim)
        spec = json.dumps(inner.spec(), sort_keys=True).encode()
        self.directory = Path(directory) / hashlib.sha256(spec).hexdigest()[:16]
        self.directory.mkdir(parents=True, exist_ok=True)
        self._keys, self._vectors = self.directory / "keys.txt", self.directory / "vectors.f32"
        keys = self._keys.read_text().split("\n") if self._keys.exists() else []
        keys = [k for k in keys[:-1] if len(k) == 64]  # a torn last line is dropped
        rows = self._vectors.stat().st_size // (4 * self.dim) if self._vectors.exists() else 0
        count = min(len(keys), rows)
        with open(self._keys, "w") as handle:  # both files cut to the rows they share
            handle.write("".join(f"{k}\n" for k in keys[:count]))
        with open(self._vectors, "ab") as handle:
            handle.truncate(count * 4 * self.dim)
        self._row = {key: row for row, key in enumerate(keys[:count])}
        self.computed = 0  # items the wrapped embedder embedded in this process

    @property
    def cached(self) -> int:
        """Item vectors held in the cache."""
        return len(self._row)

    def spec(self) -> dict[str, Any]:
        return self.inner.spec()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner.embed_texts(texts)

    def embed_items(self, items: Sequence[CorpusItem]) -> np.ndarray:
        keys = [item_digest(item) for item in items]
        fresh = {key: i for i, key in enumerate(keys) if key not in self._row}  # first of each
        if fresh:
            vectors = np.asarray(self.inner.embed_items([items[i] for i in fresh.values()]))
            vectors = np.ascontiguousarray(vectors, np.float32)
            if vectors.shape != (len(fresh), self.dim):
                raise RetrievalError(
                    f"embedder returned shape {vectors.shape} for {len(fresh)} items, "
                    f"expected ({len(fresh)}, {self.dim})"
                )
            with open(self._vectors, "ab") as handle:  # vectors first: a key never lacks one
                handle.write(vectors.tobytes())
            with open(self._keys, "a") as handle:
                handle.write("".join(f"{k}\n" for k in fresh))
            for key in fresh:
                self._row[key] = len(self._row)
            self.computed += len(fresh)
        table = np.memmap(self._vectors, np.float32, "r", shape=(len(self._row), self.dim))
        return np.array(table[[self._row[k] for k in keys]])


# -- the work directory --------------------------------------------------------------------------


def complete_lines(path: Path) -> list[str]:
    """The newline-terminated lines of ``path`` (a torn last line from a kill is dropped)."""
    if not path.exists():
        return []
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def _keep_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


class WorkDir:
    """The prepared items of an unfinished or finished build, and what is done."""

    def __init__(self, root: Path, state: dict[str, Any], restart: bool):
        self.root = root.resolve()
        if restart and self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.media = self.root / "media"
        self.items, self.keys = self.root / "items.jsonl", self.root / "keys.jsonl"
        self.units = self.root / "units.jsonl"
        state_file = self.root / "state.json"
        if state_file.exists():
            old = json.loads(state_file.read_text())
            if old != state:
                raise CorpusBuildError(
                    f"{self.root} holds a build started with other inputs or settings "
                    f"({_difference(old, state)}); pass --restart to start afresh"
                )
        else:
            state_file.write_text(json.dumps(state, indent=1, sort_keys=True))
        self.done = [json.loads(line) for line in complete_lines(self.units)]
        count = sum(unit["items"] for unit in self.done)
        items, keys = complete_lines(self.items), complete_lines(self.keys)
        if len(items) < count or len(keys) < count:
            raise CorpusBuildError(
                f"{self.root}: units.jsonl records {count} items but items.jsonl has "
                f"{len(items)} and keys.jsonl {len(keys)}; pass --restart to start afresh"
            )
        _keep_lines(self.units, [json.dumps(unit) for unit in self.done])
        _keep_lines(self.items, items[:count])  # items of a source left half-done are dropped
        _keep_lines(self.keys, keys[:count])
        self.num_items = count


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)


def _make(unit: Unit, media_dir: Path) -> tuple[list[Planned], str, float]:
    """(items, media error or "", seconds) of one unit."""
    start = time.perf_counter()
    try:
        return unit.make(media_dir), "", time.perf_counter() - start
    except MediaError as failure:  # one unreadable file must not end a 200k-item build
        return [], str(failure), time.perf_counter() - start


def _made(
    units: Iterable[Unit], media_dir: Path, workers: int
) -> Iterator[tuple[Unit, list[Planned], str, float]]:
    """Each unit with its `_make` result, in order; ``workers`` threads make up to twice as
    many units ahead (PIL, PDFium and PyAV do their work outside the GIL)."""
    if workers <= 1:
        for unit in units:
            yield unit, *_make(unit, media_dir)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="corpus") as pool:
        window: collections.deque = collections.deque()
        for unit in units:
            window.append((unit, pool.submit(_make, unit, media_dir)))
            if len(window) >= 2 * workers:
                unit, future = window.popleft()
                yield unit, *future.result()
        while window:
            unit, future = window.popleft()
            yield unit, *future.result()


def prepare(
    work: WorkDir,
    units: Iterable[Unit],
    *,
    workers: int = 1,
    max_items: int = 0,
    progress_every: int = 1000,
    log: Callable[[str], None] = print,
) -> tuple[bool, dict[str, str], dict[str, dict[str, float]]]:
    """Writes the items of every unit not done yet, in unit order whatever ``workers`` is.

    Returns (finished, media errors by unit, {unit kind: units, items, seconds}). Stops at a
    unit boundary once ``max_items`` (> 0) items were written in this call (finished False).
    """
    began, written = time.perf_counter(), 0
    errors = {unit["unit"]: unit["error"] for unit in work.done if unit.get("error")}
    kinds: dict[str, dict[str, float]] = {}

    def pending() -> Iterator[Unit]:
        for position, unit in enumerate(units):
            if position >= len(work.done):
                yield unit
            elif work.done[position]["unit"] != unit.key:
                raise CorpusBuildError(
                    f"{work.root}: source {position} was {work.done[position]['unit']!r} "
                    f"and is now {unit.key!r}: the raw inputs changed; pass --restart"
                )

    with (
        open(work.items, "a") as items,
        open(work.keys, "a") as keys,
        open(work.units, "a") as done,
    ):
        for unit, planned, error, seconds in _made(pending(), work.media, workers):
            if max_items and written >= max_items:
                log(f"stopped after {written} items (--max_items); rerun to continue")
                return False, errors, kinds
            if error:
                errors[unit.key] = error
                log(f"skipped {unit.key}: {error}")
            for item in planned:
                record = dict(item.record, id=work.num_items)
                path = record.get("path")
                if path and Path(path).is_relative_to(work.root):
                    record["path"] = str(Path(path).relative_to(work.root))
                items.write(json.dumps(record, ensure_ascii=False) + "\n")
                keys.write(json.dumps({"id": work.num_items, "key": item.key}) + "\n")
                work.num_items += 1
                written += 1
                if progress_every and work.num_items % progress_every == 0:
                    rate = written / max(time.perf_counter() - began, 1e-9)
                    log(f"prepared {work.num_items} items ({rate:.1f}/s)")
            kind = kinds.setdefault(
                "failed" if error else unit.key.split(":", 1)[0],
                {"units": 0, "items": 0, "seconds": 0.0},
            )
            kind["units"] += 1
            kind["items"] += len(planned)
            kind["seconds"] += seconds
            items.flush()
            keys.flush()
            done.write(json.dumps({"unit": unit.key, "items": len(planned), "error": error}))
            done.write("\n")
            done.flush()
    return True, errors, kinds


__all__ = [
    "CachingEmbedder",
    "CorpusBuildError",
    "WorkDir",
    "complete_lines",
    "item_digest",
    "prepare",
]
