"""Media for the unified corpus: PDF pages rendered to images, videos cut into 60-second chunks
at 1 fps, pictures shrunk to a size budget, WebQA's base64 image table.

Everything here writes plain image files (PNG for rendered pages, JPEG for video frames) into
the corpus builder's work directory, because the streaming import
(`vimrag_jax.retrieval.import_corpus`) reads items from a JSON-lines file of paths. Two optional
libraries are imported only when their input appears, each with an error naming the package:

* ``pypdfium2`` renders PDF pages (MMLongBench-Doc's ``data/documents/<doc_id>``);
* ``av`` (PyAV) decodes video files (``videos/<id>.mp4`` and the like). Without it, videos are
  read from pre-extracted frame directories ``frames/<id>/<second>.jpg`` (one frame per
  second, the file name the second counted from 0, zero padding allowed), e.g. written by
  ``ffmpeg -i V.mp4 -vf fps=1 -start_number 0 frames/V/%05d.jpg``.

A video is stored as the authors' index stores it: chunks of ``CHUNK_SECONDS`` (60) seconds
sampled at 1 fps, chunk ``c`` holding seconds ``[60 c, 60 c + 60)``; each chunk becomes one
video item of its frames.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

CHUNK_SECONDS = 60
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PDF_POINTS_PER_INCH = 72.0
_SECOND = re.compile(r"^\d+$")
_PDFIUM = threading.Lock()  # PDFium is not thread-safe


class MediaError(ValueError):
    """A media file or directory that cannot be used; the message names it."""


def _import(package: str, purpose: str, install: str):
    """``import package`` with an error that says what needs it and how to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise MediaError(
            f"{purpose} needs the Python package {install!r}, which is not installed "
            f"(pip install {install}): {error}"
        ) from None


# -- pictures ----------------------------------------------------------------------------------


def fit(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` in RGB, shrunk (aspect kept) so its longer side is at most ``max_side``."""
    image = image.convert("RGB")
    size = _fitted(image.size, max_side)
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


def _fitted(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The size `fit` shrinks an image of ``size`` to."""
    width, height = size
    if max_side <= 0 or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def image_within(source: Path, target: Path, max_side: int) -> Path:
    """``source`` itself when its longer side is within ``max_side``, else a shrunk PNG copy at
    ``target`` (so the store does not hold pixels no model looks at)."""
    try:
        with Image.open(source) as image:
            if max(image.size) <= max_side or max_side <= 0:
                return source
            image.load()
            small = fit(image, max_side)
    except (OSError, ValueError, SyntaxError) as error:
        raise MediaError(f"cannot read image {str(source)!r}: {error}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    small.save(target, "PNG", compress_level=1)
    return target


def image_bytes_to_file(data: bytes, target: Path, max_side: int, what: str) -> Path:
    """Encoded image bytes (e.g. from WebQA's ``imgs.tsv``) written to ``target`` as PNG, shrunk
    to ``max_side``; ``what`` names the image in errors."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            small = fit(image, max_side)
    except (OSError, ValueError, SyntaxError) as error:
        raise MediaError(f"cannot decode {what}: {error}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    small.save(target, "PNG", compress_level=1)
    return target


class WebQAImages:
    """WebQA's image table: ``imgs.tsv`` lines ``<image_id>\\t<base64 image>`` found through
    ``imgs.lineidx`` (byte offset of line ``image_id % 10_000_000``), as the official notebook
    reads it."""

    def __init__(self, tsv: Path, lineidx: Path):
        self.tsv, self.lineidx = tsv, lineidx
        try:
            self.offsets = [int(line) for line in lineidx.read_text().split()]
        except ValueError as error:
            raise MediaError(f"{lineidx}: not one byte offset per line ({error})") from None

    def __contains__(self, image_id: str) -> bool:
        return image_id.isdigit() and int(image_id) % 10_000_000 < len(self.offsets)

    def read(self, image_id: str) -> bytes:
        """The encoded image bytes of ``image_id``; MediaError when its line does not hold it."""
        if image_id not in self:
            raise MediaError(f"{self.lineidx}: no line for image_id {image_id}")
        offset = self.offsets[int(image_id) % 10_000_000]
        with self.tsv.open("rb") as handle:
            handle.seek(offset)
            line = handle.readline().rstrip(b"\r\n")
        found, _, payload = line.partition(b"\t")
        if found.decode(errors="replace").strip() != image_id or not payload:
            raise MediaError(
                f"{self.tsv}: the line at byte {offset} (from {self.lineidx}) is not image "
                f"{image_id} (found {found[:40]!r})"
            )
        try:
            return base64.b64decode(payload, validate=False)
        except ValueError as error:
            raise MediaError(f"{self.tsv}: image {image_id} is not base64 ({error})") from None


# -- PDF pages ---------------------------------------------------------------------------------


def render_pdf(path: Path, out_dir: Path, max_side: int) -> list[Path]:
    """Every page of the PDF ``path`` rendered with PDFium (``pypdfium2``) to
    ``out_dir/<page:04d>.png`` (1-based), scaled so the page's longer side is ``max_side``
    pixels; the page files in order. PDFium is not thread-safe: its calls hold `_PDFIUM`,
    and only the PNG writing runs beside other threads."""
    pdfium = _import("pypdfium2", f"rendering the PDF {str(path)!r}", "pypdfium2")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _PDFIUM:
        try:
            document = pdfium.PdfDocument(str(path))
            count = len(document)
        except pdfium.PdfiumError as error:
            raise MediaError(f"cannot open the PDF {str(path)!r}: {error}") from None
    files = []
    try:
        for number in range(1, count + 1):
            with _PDFIUM:
                try:
                    page = document[number - 1]
                    width, height = page.get_size()
                    image = page.render(scale=max_side / max(width, height, 1.0)).to_pil()
                    page.close()
                except pdfium.PdfiumError as error:
                    raise MediaError(
                        f"cannot render page {number} of {str(path)!r}: {error}"
                    ) from None
            target = out_dir / f"{number:04d}.png"
            image.convert("RGB").save(target, "PNG", compress_level=1)
            files.append(target)
    finally:
        with _PDFIUM:
            document.close()
    if not files:
        raise MediaError(f"the PDF {str(path)!r} has no pages")
    return files


# -- videos ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One 60-s chunk written as a frame directory: ``index`` (0-based), its first and last
    second in the source video, and the directory (frames ``0000.jpg``, ... at 1 fps)."""

    index: int
    start: int
    end: int
    directory: Path


def find_video(roots: list[Path], video_id: str) -> Path | None:
    """A frame directory ``<root>/frames/<id>/`` or a file ``<root>/videos/<id>.<ext>`` for the
    video, first root first (frame directories before files); None when there is neither."""
    for root in roots:
        frames = root / "frames" / video_id
        if frames.is_dir():
            return frames
        for extension in VIDEO_EXTENSIONS:
            candidate = root / "videos" / f"{video_id}{extension}"
            if candidate.is_file():
                return candidate
    return None


def listed_videos(roots: list[Path]) -> list[str]:
    """The ids of every video under the roots' ``frames/`` and ``videos/`` (sorted, unique)."""
    ids: set[str] = set()
    for root in roots:
        if (root / "frames").is_dir():
            ids.update(e.name for e in (root / "frames").iterdir() if e.is_dir())
        if (root / "videos").is_dir():
            ids.update(
                e.stem
                for e in (root / "videos").iterdir()
                if e.is_file() and e.suffix.lower() in VIDEO_EXTENSIONS
            )
    return sorted(ids)


def frame_seconds(directory: Path) -> list[Path]:
    """The frames of a pre-extracted directory in second order (file ``<second>.<ext>``);
    MediaError unless they are seconds 0, 1, ..., n-1 with none missing."""
    by_second: dict[int, Path] = {}
    for entry in directory.iterdir():
        if entry.suffix.lower() in FRAME_EXTENSIONS and _SECOND.match(entry.stem):
            second = int(entry.stem)
            if second in by_second:
                raise MediaError(
                    f"{directory}: two frames for second {second} ({by_second[second].name}, "
                    f"{entry.name})"
                )
            by_second[second] = entry
    if not by_second:
        raise MediaError(
            f"{directory}: no frames named <second>{'|'.join(FRAME_EXTENSIONS)} (1 fps, from 0)"
        )
    missing = sorted(set(range(max(by_second) + 1)) - set(by_second))
    if missing:
        raise MediaError(
            f"{directory}: no frame for second(s) {missing[:5]} (frames must be at 1 fps, named "
            "by their second from 0 with none missing)"
        )
    return [by_second[s] for s in range(len(by_second))]


def _decoded_seconds(path: Path) -> Iterator[Image.Image]:
    """A video file's frames at 1 fps decoded with PyAV: for each second ``s`` from 0, the first
    frame shown at or after ``s`` (a frame repeats when the video is sparser than 1 fps)."""
    av = _import("av", f"decoding the video {str(path)!r}", "av")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            second = 0
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                while frame.time >= second - 1e-6:
                    yield frame.to_image()
                    second += 1
    except av.FFmpegError as error:  # type: ignore[attr-defined]
        raise MediaError(f"cannot decode the video {str(path)!r}: {error}") from None


def _frames(source: Path) -> Iterator[tuple[Path | None, Image.Image | None]]:
    """(frame file, None) of a frame directory, or (None, decoded image) of a video file."""
    if source.is_dir():
        for file in frame_seconds(source):
            yield file, None
    else:
        for image in _decoded_seconds(source):
            yield None, image


def write_chunks(source: Path, out_dir: Path, max_side: int) -> list[Chunk]:
    """The video at ``source`` (frame directory or file) cut into 60-s chunks at 1 fps, each a
    directory ``out_dir/<chunk:05d>/`` of frames ``0000.jpg``... (zero-padded: the import sorts
    frame files by name). A frame that fits ``max_side`` is linked, else written shrunk (JPEG,
    quality 95); every frame of a chunk has the first frame's size."""
    chunks: list[Chunk] = []
    size: tuple[int, int] | None = None
    second = -1
    for second, (file, image) in enumerate(_frames(source)):
        index, slot = divmod(second, CHUNK_SECONDS)
        directory = out_dir / f"{index:05d}"
        if slot == 0:
            if directory.exists():  # left by an interrupted run: rewritten whole
                for stale in directory.iterdir():
                    stale.unlink()
            directory.mkdir(parents=True, exist_ok=True)
            chunks.append(Chunk(index, second, second, directory))
        chunks[-1] = Chunk(index, chunks[-1].start, second, directory)
        target = directory / f"{slot:04d}.jpg"
        if file is not None:
            try:
                with Image.open(file) as opened:
                    size = size or _fitted(opened.size, max_side)
                    if opened.size == size and opened.format == "JPEG":
                        os.symlink(os.path.abspath(file), target)
                        continue
                    opened.load()
                    image = opened.convert("RGB")
            except (OSError, ValueError, SyntaxError) as error:
                raise MediaError(f"cannot read frame {str(file)!r}: {error}") from None
        assert image is not None
        small = fit(image, max_side)
        size = size or small.size
        if small.size != size:
            small = small.resize(size, Image.Resampling.LANCZOS)
        small.save(target, "JPEG", quality=95)
    if second < 0:
        raise MediaError(f"the video {str(source)!r} has no frames")
    return chunks


def chunk_span(index: int) -> tuple[int, int]:
    """The seconds ``[start, end)`` chunk ``index`` covers."""
    return index * CHUNK_SECONDS, (index + 1) * CHUNK_SECONDS


def chunks_over(start: float, end: float) -> range:
    """The indices of the chunks a time span ``[start, end]`` (seconds, inclusive) touches."""
    first = max(0, math.floor(start / CHUNK_SECONDS))
    return range(first, max(first, math.floor(end / CHUNK_SECONDS)) + 1)


__all__ = [
    "CHUNK_SECONDS",
    "Chunk",
    "MediaError",
    "WebQAImages",
    "chunk_span",
    "chunks_over",
    "find_video",
    "fit",
    "frame_seconds",
    "image_bytes_to_file",
    "image_within",
    "listed_videos",
    "render_pdf",
    "write_chunks",
]
