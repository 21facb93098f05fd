"""Multimodal corpus items and their on-disk store: metadata, pixels, embeddings and search.

A store directory holds four files, written once by ``CorpusStore.build`` and memory-mapped or read
on demand by ``CorpusStore.open`` — nothing is rebuilt at start-up:

- ``manifest.json``: format version, corpus fingerprint, embedder spec, item count, file sizes;
- ``metadata.msgpack``: one map per item (id, modality, title, text, frame timestamps, pixel shape,
  first pixel record), no pixels;
- ``pixels.array_record``: the raw uint8 bytes of every image and of every video frame, one record
  per frame, so a single frame is read without touching the rest of its video;
- ``embeddings.npy``: float32[items, dim], memory-mapped (``allow_pickle=False``).

Nothing is pickled: records are plain bytes and msgpack maps of strings and numbers. The fingerprint
hashes the items (text and pixels) and the embedder spec, so ``build`` on a directory that already
holds the same corpus reuses it instead of writing it again. Rows of the index follow item order;
search returns item ids, best first, equal scores by lower row first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
from array_record.python import array_record_module

from vimrag_jax.retrieval.embedders import Embedder, HashingEmbedder, embedder_from_spec
from vimrag_jax.retrieval.index import RetrievalError, TopKIndex

MODALITIES = ("text", "image", "video")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "metadata.msgpack"
PIXELS = "pixels.array_record"
EMBEDDINGS = "embeddings.npy"
_INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True, eq=False)
class CorpusItem:
    """One retrievable item: a text passage, an image or a video (a stack of frames at 1 fps).

    ``text`` is the passage itself, or the caption of an image or video; ``title`` names the
    entity the item is about. ``pixels`` is uint8[H, W, 3] for an image, uint8[F, H, W, 3] for a
    video (then ``timestamps`` gives each frame's time in seconds), None for text.
    """

    item_id: int
    modality: str
    title: str
    text: str
    pixels: np.ndarray | None = None
    timestamps: tuple[float, ...] = ()

    def __post_init__(self):
        if not isinstance(self.item_id, int | np.integer) or not 0 <= self.item_id <= _INT32_MAX:
            raise ValueError(f"item_id must be an int in [0, 2**31), got {self.item_id!r}")
        if self.modality not in MODALITIES:
            raise ValueError(
                f"item {self.item_id}: modality must be one of {MODALITIES}, got {self.modality!r}"
            )
        if not self.text.strip():
            raise ValueError(f"item {self.item_id}: text/caption must not be empty")
        expected_ndim = {"text": None, "image": 3, "video": 4}[self.modality]
        if expected_ndim is None:
            if self.pixels is not None or self.timestamps:
                raise ValueError(f"text item {self.item_id} must have no pixels or timestamps")
            return
        pixels = self.pixels
        if (
            not isinstance(pixels, np.ndarray)
            or pixels.dtype != np.uint8
            or pixels.ndim != expected_ndim
            or pixels.shape[-1] != 3
            or 0 in pixels.shape
        ):
            described = None if pixels is None else (getattr(pixels, "dtype", "?"), pixels.shape)
            raise ValueError(
                f"{self.modality} item {self.item_id}: pixels must be uint8 with "
                f"{expected_ndim} dims ending in 3 channels, got {described}"
            )
        if self.modality == "video" and len(self.timestamps) != pixels.shape[0]:
            raise ValueError(
                f"video item {self.item_id}: {pixels.shape[0]} frames but "
                f"{len(self.timestamps)} timestamps"
            )
        if self.modality == "image" and self.timestamps:
            raise ValueError(f"image item {self.item_id} must have no timestamps")

    @property
    def num_frames(self) -> int:
        """Frames of a video, 1 for an image, 0 for text."""
        if self.pixels is None:
            return 0
        return self.pixels.shape[0] if self.modality == "video" else 1


@dataclass(frozen=True)
class ItemInfo:
    """What a store knows about an item without reading its pixels.

    ``shape`` is the pixel shape ([H, W, 3] or [F, H, W, 3]; () for text).
    """

    item_id: int
    modality: str
    title: str
    text: str
    timestamps: tuple[float, ...]
    shape: tuple[int, ...]

    @property
    def num_frames(self) -> int:
        """Frames of a video, 1 for an image, 0 for text."""
        return {"text": 0, "image": 1, "video": self.shape[0] if self.shape else 0}[self.modality]


def _metadata(item: CorpusItem, record: int) -> dict:
    return {
        "id": int(item.item_id),
        "modality": item.modality,
        "title": item.title,
        "text": item.text,
        "timestamps": [float(t) for t in item.timestamps],
        "shape": [] if item.pixels is None else [int(s) for s in item.pixels.shape],
        "record": record,
    }


def _frames(item: CorpusItem) -> list[np.ndarray]:
    if item.pixels is None:
        return []
    return [item.pixels] if item.modality == "image" else list(item.pixels)


def corpus_fingerprint(items: Sequence[CorpusItem], embedder: Embedder) -> str:
    """sha256 over the format version, the embedder spec and every item's metadata and pixels."""
    digest = hashlib.sha256()
    digest.update(f"vimrag-corpus-v{FORMAT_VERSION}".encode())
    digest.update(json.dumps(embedder.spec(), sort_keys=True).encode())
    for item in items:
        digest.update(msgpack.packb(_metadata(item, 0)))
        for frame in _frames(item):
            digest.update(np.ascontiguousarray(frame).tobytes())
    return digest.hexdigest()


def _read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise RetrievalError(f"no corpus store at {directory!r}: {MANIFEST} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        manifest["fingerprint"], manifest["files"], manifest["embedder"]  # noqa: B018
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise RetrievalError(f"corrupt corpus store manifest {path!r}: {error}") from error
    if manifest.get("format") != FORMAT_VERSION:
        raise RetrievalError(
            f"corpus store {directory!r} has format {manifest.get('format')!r}, "
            f"this code reads format {FORMAT_VERSION}; rebuild it"
        )
    return manifest


def _files_intact(directory: str, manifest: dict) -> str | None:
    """None when every file the manifest lists exists with its recorded size, else the problem."""
    for name, size in manifest["files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, the manifest says {size}"
    return None


class CorpusStore:
    """A built corpus on disk: item metadata in memory, pixels and embeddings read on demand."""

    def __init__(self, directory: str, embedder: Embedder | None = None, *, mesh=None):
        """Opens ``directory`` (see ``open``)."""
        manifest = _read_manifest(directory)
        problem = _files_intact(directory, manifest)
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
        written and the returned store has ``reused = True``.
        """
        if not items:
            raise RetrievalError("cannot build a corpus store from an empty corpus (no items)")
        ids = [int(item.item_id) for item in items]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise RetrievalError(f"item ids must be unique; id {duplicate} appears twice")
        embedder = embedder or HashingEmbedder()
        fingerprint = corpus_fingerprint(items, embedder)
        try:
            manifest = _read_manifest(directory)
            same = manifest["fingerprint"] == fingerprint
            if same and _files_intact(directory, manifest) is None:
                store = cls(directory, embedder, mesh=mesh)
                store.reused = True
                return store
        except RetrievalError:
            pass  # nothing usable there: build it

        os.makedirs(directory, exist_ok=True)
        staging = os.path.join(directory, f".building-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        try:
            writer = array_record_module.ArrayRecordWriter(
                os.path.join(staging, PIXELS), "group_size:1"
            )
            rows, record = [], 0
            for item in items:
                rows.append(_metadata(item, record if item.pixels is not None else -1))
                for frame in _frames(item):
                    writer.write(np.ascontiguousarray(frame).tobytes())
                    record += 1
            writer.close()
            with open(os.path.join(staging, METADATA), "wb") as f:
                f.write(msgpack.packb(rows))
            embeddings = np.asarray(embedder.embed_items(items), np.float32)
            if embeddings.shape != (len(items), embedder.dim):
                raise RetrievalError(
                    f"embedder returned shape {embeddings.shape} for {len(items)} items, "
                    f"expected ({len(items)}, {embedder.dim})"
                )
            np.save(os.path.join(staging, EMBEDDINGS), embeddings, allow_pickle=False)
            files = {
                name: os.path.getsize(os.path.join(staging, name))
                for name in (METADATA, PIXELS, EMBEDDINGS)
            }
            manifest = {
                "format": FORMAT_VERSION,
                "fingerprint": fingerprint,
                "num_items": len(items),
                "num_pixel_records": record,
                "embedder": embedder.spec(),
                "files": files,
            }
            # The old manifest goes first and the new one last, so a crash in between leaves a
            # directory that open() rejects instead of one that mixes two corpora.
            manifest_path = os.path.join(directory, MANIFEST)
            if os.path.exists(manifest_path):
                os.remove(manifest_path)
            for name in files:
                os.replace(os.path.join(staging, name), os.path.join(directory, name))
            with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
            os.replace(os.path.join(staging, MANIFEST), manifest_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return cls(directory, embedder, mesh=mesh)

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
    "MODALITIES",
    "CorpusItem",
    "CorpusStore",
    "ItemInfo",
    "RetrievalError",
    "corpus_fingerprint",
]
