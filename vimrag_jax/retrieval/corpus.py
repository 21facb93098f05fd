"""Multimodal corpus items and their on-disk store: metadata, pixels, embeddings and search.

A store directory holds four files, written once by ``StoreBuilder`` (``CorpusStore.build`` wraps
it for an in-memory item list) and memory-mapped or read on demand by ``CorpusStore.open`` —
nothing is rebuilt at start-up:

- ``manifest.json``: format version, corpus fingerprint, embedder spec, item count, file sizes;
- ``metadata.msgpack``: one map per item (id, modality, title, text, frame timestamps, pixel shape,
  first pixel record), no pixels;
- ``pixels.array_record``: the raw uint8 bytes of every image and of every video frame, one record
  per frame, so a single frame is read without touching the rest of its video;
- ``embeddings.npy``: float32[items, dim], memory-mapped (``allow_pickle=False``).

Nothing is pickled: records are plain bytes and msgpack maps of strings and numbers. The fingerprint
hashes the items (text and pixels, in order) and the embedder spec, one item after the other, so a
streaming build computes it as items go by; building on a directory that already holds the same
corpus reuses it instead of writing it again. Rows of the index follow item order; search returns
item ids, best first, equal scores by lower row first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
from array_record.python import array_record_module

from vimrag_jax.retrieval.embedders import Embedder, HashingEmbedder, embedder_from_spec
from vimrag_jax.retrieval.index import RetrievalError, TopKIndex

_LOG = logging.getLogger(__name__)

MODALITIES = ("text", "image", "video")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "metadata.msgpack"
PIXELS = "pixels.array_record"
EMBEDDINGS = "embeddings.npy"
#: Items (and bytes of their pixels) gathered before ``StoreBuilder`` embeds them as one batch.
DEFAULT_EMBED_BATCH = 64
DEFAULT_EMBED_BATCH_BYTES = 256 << 20
_ROWS_SPOOL = "metadata.rows"  # msgpack rows, one after the other, until the count is known
_VECTORS_SPOOL = "embeddings.f32"  # raw float32 rows, until the count is known
_COPY_ROWS = 4096  # embedding rows copied at a time from the spool into embeddings.npy
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


def _fingerprint_start(embedder: Embedder):
    digest = hashlib.sha256()
    digest.update(f"vimrag-corpus-v{FORMAT_VERSION}".encode())
    digest.update(json.dumps(embedder.spec(), sort_keys=True).encode())
    return digest


def corpus_fingerprint(items: Sequence[CorpusItem], embedder: Embedder) -> str:
    """sha256 over the format version, the embedder spec and every item's metadata and pixels.

    The hash is fed item by item in order, which is what lets ``StoreBuilder`` compute the same
    value incrementally without holding the corpus.
    """
    digest = _fingerprint_start(embedder)
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


def _stored_fingerprint(directory: str) -> str | None:
    """The fingerprint of the intact store in ``directory``, None when there is none."""
    try:
        manifest = _read_manifest(directory)
    except RetrievalError:
        return None
    return manifest["fingerprint"] if _files_intact(directory, manifest) is None else None


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
        if _stored_fingerprint(directory) == corpus_fingerprint(items, embedder):
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


def _host_tag() -> str:
    """This machine's name as it may appear in a file name."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def remove_dead_staging(parent: str, name: str, host: str) -> list[str]:
    """Deletes the staging directories of killed builds of store ``name`` in ``parent`` that ran
    on ``host`` (``StoreBuilder`` names them ``.NAME.building-HOST-PID-HEX``); returns their paths.
    Staging directories of live processes and of other hosts are kept."""
    pattern = re.compile(rf"\.{re.escape(name)}\.building-{re.escape(host)}-(\d+)-[0-9a-f]+")
    removed = []
    for entry in sorted(os.listdir(parent)):
        match = pattern.fullmatch(entry)
        if match and not _process_alive(int(match.group(1))):
            path = os.path.join(parent, entry)
            shutil.rmtree(path, ignore_errors=True)
            _LOG.warning("removed %s, left behind by a killed build of %s", path, name)
            removed.append(path)
    return removed


class StoreBuilder:
    """Writes a corpus store one item at a time, so memory holds a batch of items, not the corpus.

    Items go into a staging directory beside ``directory`` (``.NAME.building-HOST-PID-HEX``, on
    the same filesystem so publishing is a rename): each item's pixels straight into the pixel
    records, its metadata row into a spool file, its bytes into the running fingerprint, and its
    embedding once ``embed_batch`` items or ``embed_batch_bytes`` bytes of pixels have gathered
    (whichever comes first, so one big video ends its batch at once). ``finish`` writes
    ``metadata.msgpack`` and ``embeddings.npy`` from the spools, then the manifest, and publishes:
    the staging directory is renamed to ``directory`` when that does not exist, else its files
    replace the old store's (manifest removed first and written last, so a crash in between leaves
    a directory ``open`` rejects rather than one mixing two corpora). When ``directory`` already
    holds an intact store with the same fingerprint, the staging copy is dropped and that store is
    opened (``reused``). ``abort`` — also run when a ``with`` block is left by an exception or
    without ``finish`` — deletes the staging directory: a failed build leaves nothing behind. A
    killed build cannot clean up after itself: the next build of the same store deletes the staging
    directories of this host's builds whose process is gone (other hosts' are left alone, their
    process ids mean nothing here).

    Held in memory: the items of one embedding batch (with their pixels), the set of item ids
    seen (for the uniqueness check) and a sha256 state. The files are byte-for-byte those an
    in-memory build of the same items writes, and the fingerprint is ``corpus_fingerprint``'s.
    Publishing over an existing store needs disk space for both copies until the rename.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        embedder: Embedder | None = None,
        *,
        embed_batch: int = DEFAULT_EMBED_BATCH,
        embed_batch_bytes: int = DEFAULT_EMBED_BATCH_BYTES,
    ):
        if embed_batch < 1:
            raise ValueError(f"embed_batch must be positive, got {embed_batch}")
        self.directory = os.fspath(directory)  # as given: the opened store reports it so
        self.embedder = embedder or HashingEmbedder()
        self.num_items = 0
        self.num_records = 0  # pixel records: images plus video frames
        self._embed_batch = embed_batch
        self._embed_batch_bytes = embed_batch_bytes
        self._digest = _fingerprint_start(self.embedder)
        self._ids: set[int] = set()
        self._pending: list[CorpusItem] = []
        self._pending_bytes = 0
        self._packer = msgpack.Packer()
        self._open = True
        parent, name = os.path.split(os.path.normpath(os.path.abspath(self.directory)))
        os.makedirs(parent, exist_ok=True)
        host = _host_tag()
        remove_dead_staging(parent, name, host)
        self.staging = os.path.join(
            parent, f".{name}.building-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        os.makedirs(self.staging)
        try:
            self._rows = open(os.path.join(self.staging, _ROWS_SPOOL), "wb")
            self._vectors = open(os.path.join(self.staging, _VECTORS_SPOOL), "wb")
            self._pixels = array_record_module.ArrayRecordWriter(
                os.path.join(self.staging, PIXELS), "group_size:1"
            )
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> StoreBuilder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.abort()  # a no-op after finish

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the items added so far (``corpus_fingerprint`` of that list)."""
        return self._digest.copy().hexdigest()

    def add(self, item: CorpusItem) -> None:
        """Writes one item's pixels and metadata and queues it for embedding.

        ``RetrievalError`` when its id was added before (the build is then unusable: abort it).
        """
        if not self._open:
            raise RetrievalError("this StoreBuilder is finished or aborted; start a new one")
        item_id = int(item.item_id)
        if item_id in self._ids:
            raise RetrievalError(f"item ids must be unique; id {item_id} appears twice")
        self._ids.add(item_id)
        row = _metadata(item, self.num_records if item.pixels is not None else -1)
        self._rows.write(self._packer.pack(row))
        self._digest.update(msgpack.packb(_metadata(item, 0)))
        for frame in _frames(item):
            data = np.ascontiguousarray(frame).tobytes()
            self._pixels.write(data)
            self._digest.update(data)
            self.num_records += 1
        self.num_items += 1
        self._pending.append(item)
        self._pending_bytes += 0 if item.pixels is None else item.pixels.nbytes
        if (
            len(self._pending) >= self._embed_batch
            or self._pending_bytes >= self._embed_batch_bytes
        ):
            self._embed_pending()

    def _embed_pending(self) -> None:
        if not self._pending:
            return
        count, dim = len(self._pending), self.embedder.dim
        vectors = np.asarray(self.embedder.embed_items(self._pending), np.float32)
        if vectors.shape != (count, dim):
            raise RetrievalError(
                f"embedder returned shape {vectors.shape} for {count} items, "
                f"expected ({count}, {dim})"
            )
        self._vectors.write(np.ascontiguousarray(vectors).tobytes())
        self._pending, self._pending_bytes = [], 0

    def _seal(self) -> dict:
        """Writes the final files and the manifest into the staging directory; the manifest."""
        self._embed_pending()
        if self.num_items == 0:
            raise RetrievalError("cannot build a corpus store from an empty corpus (no items)")
        self._pixels.close()
        self._rows.close()
        self._vectors.close()
        rows_path = os.path.join(self.staging, _ROWS_SPOOL)
        with open(os.path.join(self.staging, METADATA), "wb") as out, open(rows_path, "rb") as src:
            out.write(self._packer.pack_array_header(self.num_items))  # = msgpack.packb(rows)
            shutil.copyfileobj(src, out)
        os.remove(rows_path)
        vectors_path = os.path.join(self.staging, _VECTORS_SPOOL)
        shape = (self.num_items, self.embedder.dim)
        spool = np.memmap(vectors_path, np.float32, "r", shape=shape)
        # open_memmap writes the header np.save writes, so the file is np.save's byte for byte.
        table = np.lib.format.open_memmap(
            os.path.join(self.staging, EMBEDDINGS), "w+", np.float32, shape
        )
        for start in range(0, self.num_items, _COPY_ROWS):
            table[start : start + _COPY_ROWS] = spool[start : start + _COPY_ROWS]
        table.flush()
        del table, spool
        os.remove(vectors_path)
        files = {
            name: os.path.getsize(os.path.join(self.staging, name))
            for name in (METADATA, PIXELS, EMBEDDINGS)
        }
        manifest = {
            "format": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "num_items": self.num_items,
            "num_pixel_records": self.num_records,
            "embedder": self.embedder.spec(),
            "files": files,
        }
        with open(os.path.join(self.staging, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        return manifest

    def finish(self, *, mesh=None) -> CorpusStore:
        """Completes the store, publishes it in ``directory`` (or reuses an identical one there)
        and opens it; ``RetrievalError`` for an empty corpus or a failing embedder."""
        if not self._open:
            raise RetrievalError("this StoreBuilder is finished or aborted; start a new one")
        try:
            manifest = self._seal()
            if _stored_fingerprint(self.directory) == manifest["fingerprint"]:
                self.abort()
                store = CorpusStore(self.directory, self.embedder, mesh=mesh)
                store.reused = True
                return store
            self._publish(manifest)
        finally:
            self.abort()
        return CorpusStore(self.directory, self.embedder, mesh=mesh)

    def _publish(self, manifest: dict) -> None:
        if not os.path.lexists(self.directory):
            try:
                os.rename(self.staging, self.directory)
                return
            except OSError:
                pass  # created meanwhile (or not renamable): move the files in instead
        os.makedirs(self.directory, exist_ok=True)
        manifest_path = os.path.join(self.directory, MANIFEST)
        if os.path.exists(manifest_path):
            os.remove(manifest_path)
        for name in manifest["files"]:
            os.replace(os.path.join(self.staging, name), os.path.join(self.directory, name))
        os.replace(os.path.join(self.staging, MANIFEST), manifest_path)

    def abort(self) -> None:
        """Stops the build and deletes the staging directory (safe to call more than once)."""
        if self._open:
            self._open = False
            for handle in ("_rows", "_vectors", "_pixels"):
                with contextlib.suppress(Exception):
                    getattr(self, handle).close()
        shutil.rmtree(self.staging, ignore_errors=True)


__all__ = [
    "MODALITIES",
    "CorpusItem",
    "CorpusStore",
    "ItemInfo",
    "RetrievalError",
    "StoreBuilder",
    "corpus_fingerprint",
]
