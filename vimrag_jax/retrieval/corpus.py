"""The corpus store reader: item metadata in memory, pixels and embeddings read on demand, search.

``CorpusStore.open`` memory-maps or reads a store directory (its format: ``store_format``) —
nothing is rebuilt at start-up. ``CorpusStore.build`` writes one from an in-memory item list with
``store_builder.StoreBuilder``; building on a directory that already holds the same corpus (same
fingerprint) reuses it instead of writing it again. Search returns item ids, best first, equal
scores by lower row first.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import msgpack
import numpy as np
from array_record.python import array_record_module

from vimrag_jax.retrieval.embedders import Embedder, HashingEmbedder, embedder_from_spec
from vimrag_jax.retrieval.index import RetrievalError, TopKIndex
from vimrag_jax.retrieval.store_builder import StoreBuilder, _host_tag  # noqa: F401 (tests)
from vimrag_jax.retrieval.store_format import (
    EMBEDDINGS,
    MANIFEST,
    METADATA,
    MODALITIES,
    PIXELS,
    CorpusItem,
    ItemInfo,
    corpus_fingerprint,
    files_intact,
    read_manifest,
    stored_fingerprint,
)


class CorpusStore:
    """A built corpus on disk: item metadata in memory, pixels and embeddings read on demand."""

    def __init__(self, directory: str, embedder: Embedder | None = None, *, mesh=None):
        """Opens ``directory`` (see ``open``)."""
        manifest = read_manifest(directory)
        problem = files_intact(directory, manifest)
        if problem:
            raise RetrievalError(f"corpus store {directory!r} is incomplete or corrupt: {problem}")
        if embedder is None:
            try:
                embedder = embedder_from_spec(manifest["embedder"])
            except ValueError as error:
                raise RetrievalError(f"corpus store {directory!r}: {error}") from error
        elif embedder.spec() != manifest["embedder"]:
            raise RetrievalError(
                f"corpus store {directory!r} was embedded with {manifest['embedder']}, "
                f"not with the given embedder {embedder.spec()}"
            )
        try:
            with open(os.path.join(directory, METADATA), "rb") as f:
                rows = msgpack.unpackb(f.read())
            infos = [
                ItemInfo(
                    int(row["id"]),
                    str(row["modality"]),
                    str(row["title"]),
                    str(row["text"]),
                    tuple(float(t) for t in row["timestamps"]),
                    tuple(int(s) for s in row["shape"]),
                )
                for row in rows
            ]
            records = [int(row["record"]) for row in rows]
            embeddings = np.load(
                os.path.join(directory, EMBEDDINGS), mmap_mode="r", allow_pickle=False
            )
        except (ValueError, KeyError, TypeError, msgpack.ExtraData) as error:
            raise RetrievalError(f"corrupt corpus store {directory!r}: {error}") from error
        if embeddings.dtype != np.float32 or embeddings.shape != (len(infos), embedder.dim):
            raise RetrievalError(
                f"corpus store {directory!r}: {EMBEDDINGS} holds {embeddings.dtype}"
                f"{list(embeddings.shape)}, expected float32[{len(infos)}, {embedder.dim}]"
            )
        self.directory = directory
        self.embedder = embedder
        self.fingerprint: str = manifest["fingerprint"]
        self.embeddings = embeddings
        self.reused = False
        self._infos = infos
        self._records = records
        self._row = {info.item_id: row for row, info in enumerate(infos)}
        self.ids = np.array([info.item_id for info in infos], np.int32)
        self._mesh = mesh
        self._index: TopKIndex | None = None
        self._reader = None
        self._num_records = int(manifest.get("num_pixel_records", 0))

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str, embedder: Embedder | None = None, *, mesh=None) -> CorpusStore:
        """Opens a built store. ``embedder`` defaults to the one recorded in the manifest (only
        weight-free embedders can be rebuilt from it); ``mesh`` is passed to ``TopKIndex``."""
        return cls(directory, embedder, mesh=mesh)

    @classmethod
    def build(
        cls,
        items: Sequence[CorpusItem],
        directory: str,
        embedder: Embedder | None = None,
        *,
        mesh=None,
    ) -> CorpusStore:
        """Writes ``items`` and their embeddings to ``directory`` and opens the result.

        When the directory already holds a complete store with the same fingerprint nothing is
        written and the returned store has ``reused = True``. The items are already in memory
        here, so the fingerprint is checked before anything is written; the writing itself is
        ``StoreBuilder``'s (the same bytes an importer streaming the same items writes).
        """
        if not items:
            raise RetrievalError("cannot build a corpus store from an empty corpus (no items)")
        ids = [int(item.item_id) for item in items]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise RetrievalError(f"item ids must be unique; id {duplicate} appears twice")
        embedder = embedder or HashingEmbedder()
        if stored_fingerprint(directory) == corpus_fingerprint(items, embedder):
            store = cls(directory, embedder, mesh=mesh)
            store.reused = True
            return store
        with StoreBuilder(directory, embedder) as builder:
            for item in items:
                builder.add(item)
            return builder.finish(mesh=mesh)

    # -- items ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[ItemInfo]:
        return iter(self._infos)

    def item(self, item_id: int) -> ItemInfo:
        """Metadata of one item (no pixels)."""
        return self._infos[self._row_of(item_id)]

    def _row_of(self, item_id: int) -> int:
        try:
            return self._row[int(item_id)]
        except KeyError:
            raise RetrievalError(f"item id {item_id} is not in the corpus store") from None

    def _pixel_reader(self):
        if self._reader is None:
            path = os.path.join(self.directory, PIXELS)
            try:
                reader = array_record_module.ArrayRecordReader(
                    path, "readahead_buffer_size:0,max_parallelism:0"
                )
            except Exception as error:  # the C++ reader raises generic errors on bad files
                raise RetrievalError(f"cannot read pixel records {path!r}: {error}") from error
            if reader.num_records() != self._num_records:
                raise RetrievalError(
                    f"pixel records {path!r} hold {reader.num_records()} records, "
                    f"the manifest says {self._num_records}"
                )
            self._reader = reader
        return self._reader

    def load_visual(self, item_id: int, frame: int = 0) -> np.ndarray:
        """uint8[H, W, 3]: the exact pixels of an image, or of frame ``frame`` of a video."""
        row = self._row_of(item_id)
        info = self._infos[row]
        if info.modality == "text":
            raise RetrievalError(f"item {item_id} is a text passage and has no pixels")
        if not 0 <= frame < info.num_frames:
            raise RetrievalError(
                f"frame {frame} is out of range for {info.modality} item {item_id} "
                f"with {info.num_frames} frame(s)"
            )
        (data,) = self._pixel_reader().read([self._records[row] + frame])
        frame_shape = info.shape[-3:]
        if len(data) != int(np.prod(frame_shape)):
            raise RetrievalError(
                f"pixel record of item {item_id} frame {frame} has {len(data)} bytes, "
                f"expected {int(np.prod(frame_shape))}"
            )
        return np.frombuffer(data, np.uint8).reshape(frame_shape)

    def load_item(self, item_id: int) -> CorpusItem:
        """The full item, pixels included (all frames of a video)."""
        info = self.item(item_id)
        pixels = None
        if info.modality != "text":
            frames = [self.load_visual(item_id, f) for f in range(info.num_frames)]
            pixels = frames[0] if info.modality == "image" else np.stack(frames)
        return CorpusItem(
            info.item_id, info.modality, info.title, info.text, pixels, info.timestamps
        )

    # -- search ---------------------------------------------------------------------------------

    def search(self, queries: Sequence[str], k: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """(item ids int32[q, k], scores float32[q, k]) of the best items for each query.

        Best first; equal scores list the item stored earlier first.
        """
        if isinstance(queries, str):
            raise RetrievalError("search takes a list of query strings, got a single string")
        if len(queries) == 0:
            raise RetrievalError("search needs at least one query (got an empty list)")
        for position, query in enumerate(queries):
            if not isinstance(query, str) or not query.strip():
                raise RetrievalError(f"query {position} is empty or not a string: {query!r}")
        if not 1 <= k <= len(self):
            raise RetrievalError(f"k={k} must be between 1 and the corpus size {len(self)}")
        if self._index is None:
            self._index = TopKIndex(np.asarray(self.embeddings), mesh=self._mesh)
        rows, scores = self._index.search(self.embedder.embed_texts(list(queries)), k)
        return self.ids[rows], scores


__all__ = [
    "MANIFEST",
    "MODALITIES",
    "CorpusItem",
    "CorpusStore",
    "ItemInfo",
    "RetrievalError",
    "StoreBuilder",
    "corpus_fingerprint",
]
