"""Writing a corpus store: ``StoreBuilder`` streams items into a staging directory, then publishes.

The files it writes are those ``store_format`` describes, byte for byte the same whether the items
come from memory (``CorpusStore.build``) or from an importer streaming them
(``import_corpus``). A killed build's staging directory is removed by the next build on the same
host (``remove_dead_staging``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from typing import TYPE_CHECKING

import msgpack
import numpy as np
from array_record.python import array_record_module

from vimrag_jax.retrieval.embedders import Embedder, HashingEmbedder
from vimrag_jax.retrieval.index import RetrievalError
from vimrag_jax.retrieval.store_format import (
    EMBEDDINGS,
    FORMAT_VERSION,
    MANIFEST,
    METADATA,
    PIXELS,
    CorpusItem,
    item_frames,
    metadata_row,
    start_fingerprint,
    stored_fingerprint,
)

if TYPE_CHECKING:
    from vimrag_jax.retrieval.corpus import CorpusStore

_LOG = logging.getLogger(__name__)

#: Items (and bytes of their pixels) gathered before ``StoreBuilder`` embeds them as one batch.
DEFAULT_EMBED_BATCH = 64
DEFAULT_EMBED_BATCH_BYTES = 256 << 20
_ROWS_SPOOL = "metadata.rows"  # msgpack rows, one after the other, until the count is known
_VECTORS_SPOOL = "embeddings.f32"  # raw float32 rows, until the count is known
_COPY_ROWS = 4096  # embedding rows copied at a time from the spool into embeddings.npy


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
        self._digest = start_fingerprint(self.embedder)
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
        row = metadata_row(item, self.num_records if item.pixels is not None else -1)
        self._rows.write(self._packer.pack(row))
        self._digest.update(msgpack.packb(metadata_row(item, 0)))
        for frame in item_frames(item):
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
        from vimrag_jax.retrieval.corpus import CorpusStore  # corpus imports this module

        if not self._open:
            raise RetrievalError("this StoreBuilder is finished or aborted; start a new one")
        try:
            manifest = self._seal()
            if stored_fingerprint(self.directory) == manifest["fingerprint"]:
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
    "DEFAULT_EMBED_BATCH",
    "DEFAULT_EMBED_BATCH_BYTES",
    "StoreBuilder",
    "remove_dead_staging",
]
