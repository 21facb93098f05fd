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
     "path": "videos/engine", "fps": 30}

- ``id``: int in [0, 2**31), unique; ``modality``: ``text`` | ``image`` | ``video``;
  ``title``: the entity the item is about; ``text``: the passage, or the caption of an image or
  video (non-empty: the default embedder retrieves visual items through their caption).
- ``path`` (image and video only): an image file, or a directory of frame images for a video.
  Relative paths are resolved against ``--media_root`` (default: the item file's directory).
  Images are decoded with PIL, turned upright by their EXIF orientation and converted to RGB
  (an alpha channel is dropped), stored as exact uint8 pixels. A video's frames are the image
  files in its directory (hidden files and other extensions ignored) **sorted by file name** —
  zero-pad frame numbers (``0001.png``) — and the frames kept must all have the same size.
- ``timestamps`` or ``fps`` (video only, at most one): each frame file's time in seconds, one
  per file, strictly increasing, >= 0; or the frame rate, giving file ``i`` the time
  ``i / fps``. Default: 1 fps (``0, 1, 2, ...``).

Videos are stored at 1 fps (``prompts.VIDEO_FPS``, SPEC §3), because the agent and the learner
address a stored video's frame ``i`` as second ``i`` (``round(t)``). A video at any frame rate is
resampled at import (``resample_to_grid``): for each second ``s`` from ``round(t_first)`` to
``round(t_last)`` the frame nearest to ``s`` is kept (ties: the earlier frame), and only the kept
files are decoded (the others are never opened). Every such second must contain a frame — one
whose ``round(t) == s`` — else the import stops with an error naming the second: a video sparser
than 1 fps would leave seconds the agent can name but the store cannot show (frames every 2 s,
``fps: 0.5``, are refused; extract them at 1 fps or more). Stored timestamps: a video already on
the 1 fps grid (every frame ``i`` at ``round(t) == i``, e.g. ``[0, 1.1, 2.2]``; the only kind
earlier versions accepted) keeps all its frames and its timestamps, as before; any other video
is stored with the timestamps ``0, 1, 2, ...`` of the seconds its frames stand for, counted from
its first second (a clip starting at 5 s starts at 0 in the store), so frame ``i`` is at ``i`` s
exactly. So 30 fps keeps every 30th frame, and ``[0, 1.5, 3]`` is refused (no frame in second 1).

Any other key, a malformed line or a bad value stops the import with one error naming the file,
the line and the problem (exit status 2 from the command line); nothing is left at ``--out``
then, nor when a later step (the embedder, the final check against an existing store) fails. The
file is JSON and images are decoded by PIL: nothing is unpickled.

Memory: the import streams. Items are parsed one at a time and written at once to a staging
directory beside ``--out`` (``store_builder.StoreBuilder``): pixels to the store's pixel records,
metadata rows to a spool file, embeddings in batches (``embed_batch`` items, or 256 MiB of pixels,
whichever comes first). What is held in memory is one embedding batch of decoded items — a video
counts with all its kept frames, so one long video is held whole — plus the ids seen so far (with
their line numbers) and the running fingerprint: not the corpus. The staging directory is renamed
to ``--out`` (or its files replace the old store's, with ``--overwrite``) only when every line is
imported; replacing a store needs disk space for both copies meanwhile. The fingerprint is known
only at the end, so re-importing an unchanged corpus writes it once more to staging, finds it
identical and drops the copy (the store's files are not touched).

``--embedder`` is ``hashing`` (default, weight-free), ``hashing:DIM``, ``hf:CHECKPOINT_DIR``
(a local Qwen3-Embedding-style checkpoint: text only, pictures through their captions),
``qwen3_vl:CHECKPOINT_DIR`` (a local Qwen3-VL checkpoint embedding text, pictures and video
frames into one space, `retrieval.vl_embedder.Qwen3VLEmbedder`) or a JSON object: a full
``spec()`` as recorded in a store's manifest, or a partial one (``{"kind": "hashing", "dim":
512}``, ``{"kind": "hf", "path": "/ckpt", "pooling": "mean"}``, ``{"kind": "qwen3_vl", "path":
"/ckpt", "max_frames": 8}``) whose missing settings take the defaults.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vimrag_jax import jsonl
from vimrag_jax.agent.prompts import VIDEO_FPS
from vimrag_jax.retrieval.corpus import CorpusStore
from vimrag_jax.retrieval.embedders import (
    Embedder,
    HashingEmbedder,
    HFEmbedder,
    embedder_from_spec,
)
from vimrag_jax.retrieval.index import RetrievalError
from vimrag_jax.retrieval.store_builder import DEFAULT_EMBED_BATCH, StoreBuilder
from vimrag_jax.retrieval.store_format import MANIFEST, MODALITIES, CorpusItem

#: File extensions read as video frames (lower case).
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
REQUIRED_KEYS = ("id", "modality", "title", "text")
OPTIONAL_KEYS = ("path", "timestamps", "fps")
VIDEO_KEYS = ("timestamps", "fps")
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


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _timestamps(value: Any, frames: int) -> tuple[float, ...]:
    """Validated frame times (ValueError with the reason); ``None`` gives 0, 1, 2, ... (1 fps)."""
    if value is None:
        return tuple(float(t) for t in range(frames))
    if not isinstance(value, list) or not all(_is_number(t) for t in value):
        raise ValueError(f"'timestamps' must be a list of numbers (seconds), got {value!r}")
    times = tuple(float(t) for t in value)
    if len(times) != frames:
        raise ValueError(f"'timestamps' has {len(times)} values but the video has {frames} frames")
    if not all(math.isfinite(t) and t >= 0 for t in times):
        raise ValueError(f"'timestamps' must be finite and >= 0, got {list(times)}")
    if any(b <= a for a, b in zip(times, times[1:], strict=False)):
        raise ValueError(f"'timestamps' must be strictly increasing, got {list(times)}")
    return times


def _source_times(record: dict, frames: int) -> tuple[float, ...]:
    """The times of a video's frame files: its ``timestamps``, ``i / fps``, or 0, 1, 2, ..."""
    if "fps" not in record:
        return _timestamps(record.get("timestamps"), frames)
    if "timestamps" in record:
        raise ValueError("a video gives 'timestamps' or 'fps', not both")
    fps = record["fps"]
    if not _is_number(fps) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"'fps' must be a positive number (frames per second), got {fps!r}")
    return tuple(i / float(fps) for i in range(frames))


def resample_to_grid(times: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Which frames of a video at ``times`` to store, and their stored timestamps (at 1 fps).

    ``times`` are the frames' seconds, strictly increasing. On the ``VIDEO_FPS`` grid (1 fps:
    the step is one second), each step ``s`` from ``round(t_first)`` to ``round(t_last)`` keeps
    the frame nearest to it, ties to the earlier frame. Each step must contain a frame (one with
    ``round(t) == s``), else ``ValueError`` naming the step: the video is sparser than the grid
    there and the agent, which addresses stored frame ``i`` as second ``i``, would get a frame
    from another second. Under that rule the frame kept for ``s`` is itself one with
    ``round(t) == s`` (a nearest frame is at most half a step away, and Python's round-half-even
    sends both ``s ± 0.5`` to ``s`` exactly when a frame there can round to ``s``), so the kept
    frames are distinct and in order.

    Returns ``(indices, stored)``: ``indices`` into ``times`` of the kept frames; ``stored`` is
    ``times`` itself when the video is already on the grid (frame ``i`` at ``round(t) == i``:
    every frame is kept, as earlier versions stored it), else ``0, 1, 2, ...`` steps from the
    first one, so stored frame ``i`` is at second ``i`` exactly.
    """
    grid = [float(t) * VIDEO_FPS for t in times]
    if not grid:
        raise ValueError("a video needs at least one frame")
    if all(round(u) == i for i, u in enumerate(grid)):
        return tuple(range(len(grid))), tuple(float(t) for t in times)
    first, last = round(grid[0]), round(grid[-1])
    covered = {round(u) for u in grid}
    for step in range(first, last + 1):
        if step not in covered:
            after = bisect.bisect_left(grid, step)
            raise ValueError(
                f"the video has no frame in second {step / VIDEO_FPS:g} (none rounds to it; the "
                f"nearest are at {times[after - 1]:g} s and {times[after]:g} s): it is sparser "
                f"than {VIDEO_FPS:g} fps there, and the agent addresses stored frame i as second "
                f"i; extract the frames at {VIDEO_FPS:g} fps or more"
            )
    kept = []
    for step in range(first, last + 1):
        after = bisect.bisect_left(grid, step)  # first frame at or after the step
        if after == len(grid) or (
            after > 0 and abs(grid[after - 1] - step) <= abs(grid[after] - step)
        ):
            after -= 1
        kept.append(after)
    return tuple(kept), tuple(i / VIDEO_FPS for i in range(len(kept)))


def _load_video(path: Path, record: dict) -> tuple[np.ndarray, tuple[float, ...]]:
    """(uint8[F, H, W, 3] of the kept frames, their stored timestamps) of a video directory."""
    if not path.is_dir():
        raise ValueError(f"video path {str(path)!r} is not a directory of frame images")
    files = _frame_files(path)
    if not files:
        raise ValueError(
            f"video directory {str(path)!r} holds no frame images ({', '.join(FRAME_EXTENSIONS)})"
        )
    indices, stored = resample_to_grid(_source_times(record, len(files)))
    first = _load_image(files[indices[0]])
    pixels = np.empty((len(indices), *first.shape), np.uint8)  # no list-then-stack double copy
    pixels[0] = first
    for slot, index in enumerate(indices[1:], start=1):
        frame = _load_image(files[index])
        if frame.shape != first.shape:
            raise ValueError(
                f"video frames differ in size: {files[indices[0]].name} is "
                f"{first.shape[1]}x{first.shape[0]}, {files[index].name} is "
                f"{frame.shape[1]}x{frame.shape[0]} (resize them to one size)"
            )
        pixels[slot] = frame
    return pixels, stored


def parse_item(record: Any, media_root: Path) -> CorpusItem:
    """One decoded JSON line as a ``CorpusItem`` (pixels loaded, a video resampled to 1 fps);
    ValueError with the reason."""
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
        for key in VIDEO_KEYS:
            if key in record:
                raise ValueError(f"an image item has no {key!r} (is its modality wrong?)")
        return CorpusItem(item_id, modality, record["title"], record["text"], _load_image(path))
    pixels, times = _load_video(path, record)
    return CorpusItem(item_id, modality, record["title"], record["text"], pixels, times)


def _item_source(
    items_path: str | os.PathLike, media_root: str | os.PathLike | None
) -> tuple[Path, Path]:
    """(item file, media root), checked before anything is written."""
    source = Path(items_path)
    root = Path(media_root) if media_root else source.parent
    if not source.is_file():
        raise CorpusImportError(f"{source}: the item file does not exist")
    if media_root and not root.is_dir():
        raise CorpusImportError(f"--media_root={str(root)!r} is not a directory")
    return source, root


def _parsed(source: Path, root: Path) -> Iterator[tuple[int, CorpusItem]]:
    """(line, item) of every item of a checked item file, one at a time; unique ids."""
    seen: dict[int, int] = {}  # item id -> line
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
        yield line_no, item


def iter_items(
    items_path: str | os.PathLike, media_root: str | os.PathLike | None = None
) -> Iterator[tuple[int, CorpusItem]]:
    """``(line number, item)`` of every item of a JSON-lines item file, in file order, each
    parsed (pixels loaded) only when asked for, so a caller can stream a corpus of any size.

    Raises ``CorpusImportError`` (``FILE:LINE: problem``) at the first bad line or repeated id.
    """
    source, root = _item_source(items_path, media_root)
    yield from _parsed(source, root)


def _progress(count: int, frames: int, began: float) -> str:
    return f"read {count} items ({frames} images/frames) in {time.perf_counter() - began:.1f}s"


def read_items(
    items_path: str | os.PathLike,
    media_root: str | os.PathLike | None = None,
    *,
    progress_every: int = DEFAULT_PROGRESS_EVERY,
    log: Callable[[str], None] | None = None,
) -> list[CorpusItem]:
    """Every item of a JSON-lines item file, pixels loaded, in file order — all in memory, so
    for small corpora and tests; ``import_corpus`` streams instead.

    Raises ``CorpusImportError`` (``FILE:LINE: problem``) at the first bad line. ``log`` gets a
    progress line every ``progress_every`` items (0: never).
    """
    source, root = _item_source(items_path, media_root)
    items: list[CorpusItem] = []
    frames, began = 0, time.perf_counter()
    for _, item in _parsed(source, root):
        items.append(item)
        frames += item.num_frames
        if log and progress_every > 0 and len(items) % progress_every == 0:
            log(_progress(len(items), frames, began))
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
    if spec.startswith("qwen3_vl:"):
        from vimrag_jax.retrieval.vl_embedder import Qwen3VLEmbedder

        return Qwen3VLEmbedder(spec.removeprefix("qwen3_vl:"))
    if not spec.startswith("{"):
        raise ValueError(
            f"--embedder={spec!r}: expected hashing, hashing:DIM, hf:CHECKPOINT_DIR, "
            "qwen3_vl:CHECKPOINT_DIR or a JSON object"
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
    if kind == "qwen3_vl":
        if "config_sha256" in fields:  # a full recorded spec: checked against the checkpoint
            return embedder_from_spec(fields)
        if "path" not in fields:
            raise ValueError(
                "--embedder: a 'qwen3_vl' embedder needs 'path' (a checkpoint directory)"
            )
        from vimrag_jax.retrieval.vl_embedder import Qwen3VLEmbedder

        names = (*Qwen3VLEmbedder._SPEC_ARGS, "batch_size")
        unknown = sorted(set(fields) - {"kind", "path", *names})
        if unknown:
            raise ValueError(f"--embedder: unknown 'qwen3_vl' setting(s) {unknown}")
        settings = {k: fields[k] for k in names if k in fields}
        return Qwen3VLEmbedder(fields["path"], **settings)
    raise ValueError(
        f"--embedder: 'kind' must be 'hashing' or 'hf' (text) or 'qwen3_vl' (multimodal), "
        f"got {kind!r}"
    )


def _old_fingerprint(out: Path) -> str | None:
    try:
        with open(out / MANIFEST, encoding="utf-8") as handle:
            return json.load(handle).get("fingerprint")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def import_corpus(
    items_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    media_root: str | os.PathLike | None = None,
    embedder: Embedder | None = None,
    progress_every: int = DEFAULT_PROGRESS_EVERY,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    embed_batch: int = DEFAULT_EMBED_BATCH,
) -> CorpusStore:
    """Streams ``items_path`` into the store in ``out_dir`` (or reuses it, when identical).

    ``out_dir`` must be absent, empty, or hold a store; a store of a different corpus is replaced
    only with ``overwrite`` (a running experiment may be reading it). Items are parsed, written
    and embedded (``embed_batch`` at a time) as they are read, in a staging directory beside
    ``out_dir`` that becomes the store only once every line is in: any error, however late,
    leaves ``out_dir`` as it was. ``log`` gets a progress line every ``progress_every`` items.
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
    source, root = _item_source(items_path, media_root)
    began = time.perf_counter()
    frames = 0
    with StoreBuilder(out, embedder or HashingEmbedder(), embed_batch=embed_batch) as builder:
        for _, item in _parsed(source, root):
            builder.add(item)
            frames += item.num_frames
            if log and progress_every > 0 and builder.num_items % progress_every == 0:
                log(_progress(builder.num_items, frames, began))
        if builder.num_items == 0:
            raise CorpusImportError(f"{source}: no items (the file is empty)")
        if has_store and not overwrite and _old_fingerprint(out) != builder.fingerprint:
            raise CorpusImportError(
                f"--out={str(out)!r} holds a different corpus store; pass --overwrite to replace "
                "it (stop runs that use it first)"
            )
        if log:
            log(f"{_progress(builder.num_items, frames, began)}; finishing {out}")
        store = builder.finish()
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
    "iter_items",
    "main",
    "parse_embedder",
    "parse_item",
    "read_items",
    "resample_to_grid",
]

if __name__ == "__main__":
    sys.exit(main())
