"""Imports a real multimodal corpus from a JSON-lines item file into a ``CorpusStore``.

    python -m vimrag_jax.retrieval.import_corpus --items=items.jsonl --out=STORE_DIR \
        [--media_root=DIR] [--embedder=SPEC] [--progress_every=1000] [--overwrite]

The store directory is what ``data.corpus`` points at; the trainer and the rollout workers open it
as it is (nothing is copied, rebuilt or downloaded at run time).

Item file: one JSON object per line (blank lines are skipped)::

    {"id": 7, "modality": "text", "title": "Ada Lovelace", "text": "Ada Lovelace was ..."}
    {"id": 8, "modality": "image", "title": "Ada Lovelace", "text": "A portrait of ...",
     "path": "images/ada.png"}
    {"id": 9, "modality": "video", "title": "Analytical Engine", "text": "A clip of ...",
     "path": "videos/engine", "timestamps": [0.0, 2.0, 4.0]}

- ``id``: int in [0, 2**31), unique; ``modality``: ``text`` | ``image`` | ``video``;
  ``title``: the entity the item is about; ``text``: the passage, or the caption of an image or
  video (non-empty: the default embedder retrieves visual items through their caption).
- ``path`` (image and video only): an image file, or a directory of frame images for a video.
  Relative paths are resolved against ``--media_root`` (default: the item file's directory).
  Images are decoded with PIL, turned upright by their EXIF orientation and converted to RGB
  (an alpha channel is dropped), stored as exact uint8 pixels. A video's frames are the image
  files in its directory (hidden files and other extensions ignored) **sorted by file name** —
  zero-pad frame numbers (``0001.png``) — and must all have the same size.
- ``timestamps`` (video only): each frame's time in seconds, one per frame, strictly
  increasing; default ``0, 1, 2, ...``. Frames must be sampled at 1 fps (SPEC §3): the agent
  and the learner address frame ``i`` as ``round(t)`` seconds (``prompts.VIDEO_FPS``), so frame
  ``i`` must have ``round(t) == i`` (``[0, 1.1, 2.2]`` is accepted, ``[0, 1.5, 3]`` is not —
  its frame 1 would be shown as frame 2).

Any other key, a malformed line or a bad value stops the import with one error naming the file,
the line and the problem (exit status 2 from the command line); nothing is written then. The
file is JSON and images are decoded by PIL: nothing is unpickled.

Limit: ``CorpusStore.build`` takes the whole item list, so every decoded image and video frame is
held in memory at once (a 100k-image corpus at 512x512 needs ~80 GB). Corpora larger than the
machine's memory need a streaming store builder, which does not exist yet.

``--embedder`` is ``hashing`` (default, weight-free), ``hashing:DIM``, ``hf:CHECKPOINT_DIR``
(a local Qwen3-Embedding-style checkpoint) or a JSON object: a full ``spec()`` as recorded in a
store's manifest, or a partial one (``{"kind": "hashing", "dim": 512}``,
``{"kind": "hf", "path": "/ckpt", "pooling": "mean"}``) whose missing settings take the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vimrag_jax import jsonl
from vimrag_jax.agent.prompts import VIDEO_FPS
from vimrag_jax.retrieval.corpus import (
    MANIFEST,
    MODALITIES,
    CorpusItem,
    CorpusStore,
    corpus_fingerprint,
)
from vimrag_jax.retrieval.embedders import (
    Embedder,
    HashingEmbedder,
    HFEmbedder,
    embedder_from_spec,
)
from vimrag_jax.retrieval.index import RetrievalError

#: File extensions read as video frames (lower case).
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
REQUIRED_KEYS = ("id", "modality", "title", "text")
OPTIONAL_KEYS = ("path", "timestamps")
DEFAULT_PROGRESS_EVERY = 1000


class CorpusImportError(ValueError):
    """A problem with the item file or its media; the message names the file and line."""


def _fail(source: str, line: int, problem: str) -> CorpusImportError:
    return CorpusImportError(f"{source}:{line}: {problem}")


def _load_image(path: Path) -> np.ndarray:
    """uint8[H, W, 3] of an image file; OSError / ValueError for a missing or unreadable one."""
    from PIL import Image, ImageOps

    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            upright = ImageOps.exif_transpose(image)
            rgb = upright.convert("RGB")
    except Image.DecompressionBombError as error:  # not an OSError: PIL's pixel-count guard
        raise ValueError(f"image {str(path)!r} is too large to decode safely: {error}") from None
    except (OSError, ValueError, SyntaxError) as error:  # SyntaxError: some corrupt headers
        raise ValueError(f"cannot decode image {str(path)!r}: {error}") from None
    pixels = np.asarray(rgb, dtype=np.uint8)
    if 0 in pixels.shape:
        raise ValueError(f"image {str(path)!r} is empty ({pixels.shape[1]}x{pixels.shape[0]})")
    return np.ascontiguousarray(pixels)


def _frame_files(directory: Path) -> list[Path]:
    """The image files of a video directory, sorted by file name."""
    return sorted(
        (
            entry
            for entry in directory.iterdir()
            if entry.is_file()
            and not entry.name.startswith(".")
            and entry.suffix.lower() in FRAME_EXTENSIONS
        ),
        key=lambda entry: entry.name,
    )


def _resolve(raw: str, media_root: Path) -> Path:
    path = Path(raw).expanduser()
    return path if path.is_absolute() else media_root / path


def _timestamps(value: Any, frames: int) -> tuple[float, ...]:
    """Validated frame times (ValueError with the reason); ``None`` gives 0, 1, 2, ... (1 fps)."""
    if value is None:
        return tuple(float(t) for t in range(frames))
    if not isinstance(value, list) or not all(
        isinstance(t, int | float) and not isinstance(t, bool) for t in value
    ):
        raise ValueError(f"'timestamps' must be a list of numbers (seconds), got {value!r}")
    times = tuple(float(t) for t in value)
    if len(times) != frames:
        raise ValueError(f"'timestamps' has {len(times)} values but the video has {frames} frames")
    if not all(math.isfinite(t) and t >= 0 for t in times):
        raise ValueError(f"'timestamps' must be finite and >= 0, got {list(times)}")
    if any(b <= a for a, b in zip(times, times[1:], strict=False)):
        raise ValueError(f"'timestamps' must be strictly increasing, got {list(times)}")
    for frame, t in enumerate(times):
        if round(t * VIDEO_FPS) != frame:
            raise ValueError(
                f"'timestamps' must follow the {VIDEO_FPS:g} fps frame grid the agent addresses "
                f"video frames by (frame i at round(t * {VIDEO_FPS:g}) == i); frame {frame} is at "
                f"{t:g} s: extract the video's frames at {VIDEO_FPS:g} fps"
            )
    return times


def parse_item(record: Any, media_root: Path) -> CorpusItem:
    """One decoded JSON line as a ``CorpusItem`` (pixels loaded); ValueError with the reason."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(map(repr, missing))}")
    unknown = sorted(set(record) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; an item has "
            f"{', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}"
        )
    item_id, modality = record["id"], record["modality"]
    if not isinstance(item_id, int) or isinstance(item_id, bool):
        raise ValueError(f"'id' must be an integer, got {item_id!r}")
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    for key in ("title", "text"):
        if not isinstance(record[key], str):
            raise ValueError(f"{key!r} must be a string, got {record[key]!r}")
    if modality == "text":
        for key in OPTIONAL_KEYS:
            if key in record:
                raise ValueError(f"a text item has no {key!r} (is its modality wrong?)")
        return CorpusItem(item_id, modality, record["title"], record["text"])
    raw_path = record.get("path")
    if not isinstance(raw_path, str) or not raw_path:
        raise ValueError(f"{modality} item needs 'path', a non-empty string, got {raw_path!r}")
    path = _resolve(raw_path, media_root)
    if modality == "image":
        if "timestamps" in record:
            raise ValueError("an image item has no 'timestamps' (is its modality wrong?)")
        return CorpusItem(item_id, modality, record["title"], record["text"], _load_image(path))
    if not path.is_dir():
        raise ValueError(f"video path {str(path)!r} is not a directory of frame images")
    files = _frame_files(path)
    if not files:
        raise ValueError(
            f"video directory {str(path)!r} holds no frame images ({', '.join(FRAME_EXTENSIONS)})"
        )
    frames = [_load_image(file) for file in files]
    for file, frame in zip(files, frames, strict=True):
        if frame.shape != frames[0].shape:
            raise ValueError(
                f"video frames differ in size: {files[0].name} is "
                f"{frames[0].shape[1]}x{frames[0].shape[0]}, {file.name} is "
                f"{frame.shape[1]}x{frame.shape[0]} (resize them to one size)"
            )
    times = _timestamps(record.get("timestamps"), len(frames))
    return CorpusItem(item_id, modality, record["title"], record["text"], np.stack(frames), times)


def read_items(
    items_path: str | os.PathLike,
    media_root: str | os.PathLike | None = None,
    *,
    progress_every: int = DEFAULT_PROGRESS_EVERY,
    log: Callable[[str], None] | None = None,
) -> list[CorpusItem]:
    """Every item of a JSON-lines item file, pixels loaded, in file order.

    Raises ``CorpusImportError`` (``FILE:LINE: problem``) at the first bad line. ``log`` gets a
    progress line every ``progress_every`` items (0: never).
    """
    source = Path(items_path)
    root = Path(media_root) if media_root else source.parent
    if not source.is_file():
        raise CorpusImportError(f"{source}: the item file does not exist")
    if media_root and not root.is_dir():
        raise CorpusImportError(f"--media_root={str(root)!r} is not a directory")
    items: list[CorpusItem] = []
    seen: dict[int, int] = {}  # item id -> line
    frames = 0
    began = time.perf_counter()
    for line_no, record in jsonl.records(source, CorpusImportError):
        try:
            item = parse_item(record, root)
        except (OSError, ValueError) as error:
            raise _fail(str(source), line_no, str(error)) from None
        if item.item_id in seen:
            raise _fail(
                str(source),
                line_no,
                f"duplicate id {item.item_id} (first used on line {seen[item.item_id]})",
            )
        seen[item.item_id] = line_no
        items.append(item)
        frames += item.num_frames
        if log and progress_every > 0 and len(items) % progress_every == 0:
            log(
                f"read {len(items)} items ({frames} images/frames) "
                f"in {time.perf_counter() - began:.1f}s"
            )
    if not items:
        raise CorpusImportError(f"{source}: no items (the file is empty)")
    return items


def parse_embedder(spec: str) -> Embedder:
    """The embedder named by ``--embedder`` (see the module docstring); ValueError if unknown."""
    spec = spec.strip()
    if spec in ("", "hashing"):
        return HashingEmbedder()
    if spec.startswith("hashing:"):
        try:
            return HashingEmbedder(int(spec.removeprefix("hashing:")))
        except ValueError as error:
            raise ValueError(f"--embedder={spec!r}: expected hashing:DIM ({error})") from None
    if spec.startswith("hf:"):
        return HFEmbedder(spec.removeprefix("hf:"))
    if not spec.startswith("{"):
        raise ValueError(
            f"--embedder={spec!r}: expected hashing, hashing:DIM, hf:CHECKPOINT_DIR "
            "or a JSON object"
        )
    try:
        fields = json.loads(spec)
    except json.JSONDecodeError as error:
        raise ValueError(f"--embedder: malformed JSON ({error})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"--embedder: expected a JSON object, got {fields!r}")
    kind = fields.get("kind")
    if kind == "hashing":
        return embedder_from_spec({**HashingEmbedder().spec(), **fields})
    if kind == "hf":
        if "config_sha256" in fields:  # a full recorded spec: checked against the checkpoint
            return embedder_from_spec(fields)
        if "path" not in fields:
            raise ValueError("--embedder: an 'hf' embedder needs 'path' (a checkpoint directory)")
        settings = {k: fields[k] for k in ("pooling", "max_length", "batch_size") if k in fields}
        return HFEmbedder(fields["path"], **settings)
    raise ValueError(f"--embedder: 'kind' must be 'hashing' or 'hf', got {kind!r}")


def import_corpus(
    items_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    media_root: str | os.PathLike | None = None,
    embedder: Embedder | None = None,
    progress_every: int = DEFAULT_PROGRESS_EVERY,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> CorpusStore:
    """Reads ``items_path`` and writes (or reuses, when identical) the store in ``out_dir``.

    ``out_dir`` must be absent, empty, or hold a store; a store of a different corpus is replaced
    only with ``overwrite`` (a running experiment may be reading it).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CorpusImportError(f"--out={str(out)!r} exists and is not a directory")
    has_store = (out / MANIFEST).is_file()
    if out.is_dir() and not has_store and any(out.iterdir()):
        raise CorpusImportError(
            f"--out={str(out)!r} is not empty and holds no corpus store; "
            "pick a new or empty directory"
        )
    items = read_items(items_path, media_root, progress_every=progress_every, log=log)
    embedder = embedder or HashingEmbedder()
    if has_store and not overwrite:
        with open(out / MANIFEST, encoding="utf-8") as handle:
            try:
                old = json.load(handle).get("fingerprint")
            except (json.JSONDecodeError, AttributeError):
                old = None
        if old != corpus_fingerprint(items, embedder):
            raise CorpusImportError(
                f"--out={str(out)!r} holds a different corpus store; pass --overwrite to replace "
                "it (stop runs that use it first)"
            )
    if log:
        frames = sum(item.num_frames for item in items)
        log(f"read {len(items)} items ({frames} images/frames); embedding and writing {out}")
    began = time.perf_counter()
    store = CorpusStore.build(items, str(out), embedder)
    if log:
        seconds = time.perf_counter() - began
        done = "already up to date" if store.reused else f"written in {seconds:.1f}s"
        log(f"corpus store {out}: {len(store)} items, {done}")
    return store


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); 0 on success, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m vimrag_jax.retrieval.import_corpus",
        description="Import a JSON-lines multimodal corpus into a vimrag_jax corpus store.",
    )
    parser.add_argument("--items", required=True, help="JSON-lines item file")
    parser.add_argument("--out", required=True, help="store directory (data.corpus)")
    parser.add_argument(
        "--media_root", default="", help="base of relative paths (default: the item file's dir)"
    )
    parser.add_argument(
        "--embedder", default="hashing", help="hashing | hashing:DIM | hf:DIR | JSON spec"
    )
    parser.add_argument(
        "--progress_every", type=int, default=DEFAULT_PROGRESS_EVERY, help="items per progress line"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a store of a different corpus in --out"
    )
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        embedder = parse_embedder(args.embedder)
        import_corpus(
            args.items,
            args.out,
            media_root=args.media_root or None,
            embedder=embedder,
            progress_every=args.progress_every,
            overwrite=args.overwrite,
            log=log,
        )
    except (CorpusImportError, RetrievalError, ValueError, OSError) as error:
        print(f"import_corpus: error: {error}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "CorpusImportError",
    "import_corpus",
    "main",
    "parse_embedder",
    "parse_item",
    "read_items",
]

if __name__ == "__main__":
    sys.exit(main())
