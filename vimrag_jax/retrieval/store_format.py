"""Corpus items and the on-disk format of a corpus store: file names, metadata rows, fingerprint.

A store directory holds four files:

- ``manifest.json``: format version, corpus fingerprint, embedder spec, item count, file sizes;
- ``metadata.msgpack``: one map per item (id, modality, title, text, frame timestamps, pixel shape,
  first pixel record), no pixels;
- ``pixels.array_record``: the raw uint8 bytes of every image and of every video frame, one record
  per frame, so a single frame is read without touching the rest of its video;
- ``embeddings.npy``: float32[items, dim], memory-mapped (``allow_pickle=False``).

Nothing is pickled: records are plain bytes and msgpack maps of strings and numbers. The fingerprint
hashes the items (text and pixels, in order) and the embedder spec, one item after the other, so a
streaming build computes it as items go by. Rows of the index follow item order. The writer is
``store_builder.StoreBuilder``, the reader ``corpus.CorpusStore``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

from vimrag_jax.retrieval.embedders import Embedder
from vimrag_jax.retrieval.index import RetrievalError

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


def metadata_row(item: CorpusItem, record: int) -> dict:
    """The item's row in ``metadata.msgpack``; ``record`` is its first pixel record (-1: none)."""
    return {
        "id": int(item.item_id),
        "modality": item.modality,
        "title": item.title,
        "text": item.text,
        "timestamps": [float(t) for t in item.timestamps],
        "shape": [] if item.pixels is None else [int(s) for s in item.pixels.shape],
        "record": record,
    }


def item_frames(item: CorpusItem) -> list[np.ndarray]:
    """The item's pixel records in order: an image, each frame of a video, none for text."""
    if item.pixels is None:
        return []
    return [item.pixels] if item.modality == "image" else list(item.pixels)


def start_fingerprint(embedder: Embedder):
    """The sha256 state every fingerprint starts from: format version and embedder spec."""
    digest = hashlib.sha256()
    digest.update(f"vimrag-corpus-v{FORMAT_VERSION}".encode())
    digest.update(json.dumps(embedder.spec(), sort_keys=True).encode())
    return digest


def corpus_fingerprint(items: Sequence[CorpusItem], embedder: Embedder) -> str:
    """sha256 over the format version, the embedder spec and every item's metadata and pixels.

    The hash is fed item by item in order, which is what lets ``StoreBuilder`` compute the same
    value incrementally without holding the corpus.
    """
    digest = start_fingerprint(embedder)
    for item in items:
        digest.update(msgpack.packb(metadata_row(item, 0)))
        for frame in item_frames(item):
            digest.update(np.ascontiguousarray(frame).tobytes())
    return digest.hexdigest()


def read_manifest(directory: str) -> dict:
    """The store's manifest; ``RetrievalError`` when it is missing, corrupt or of another format."""
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


def files_intact(directory: str, manifest: dict) -> str | None:
    """None when every file the manifest lists exists with its recorded size, else the problem."""
    for name, size in manifest["files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, the manifest says {size}"
    return None


def stored_fingerprint(directory: str) -> str | None:
    """The fingerprint of the intact store in ``directory``, None when there is none."""
    try:
        manifest = read_manifest(directory)
    except RetrievalError:
        return None
    return manifest["fingerprint"] if files_intact(directory, manifest) is None else None


__all__ = [
    "EMBEDDINGS",
    "FORMAT_VERSION",
    "MANIFEST",
    "METADATA",
    "MODALITIES",
    "PIXELS",
    "CorpusItem",
    "ItemInfo",
    "corpus_fingerprint",
    "files_intact",
    "item_frames",
    "metadata_row",
    "read_manifest",
    "start_fingerprint",
    "stored_fingerprint",
]
