"""What each benchmark's raw release adds to the unified corpus, and how its evidence maps to it.

Every corpus item has a *key* naming what it is in the benchmarks' terms; evidence references
(`vimrag_jax.benchmarks.features`) are turned into the same keys, then into item ids:

==========================================  ==================================================
key                                         item
==========================================  ==================================================
``text:hotpotqa:<title>``                   a HotpotQA paragraph (its sentences joined)
``text:squad:<title>:<p>``                  SQuAD paragraph ``p`` (0-based) of an article
``text:webqa:<snippet_id>``                 a WebQA text fact (positive or negative)
``image:webqa:<image_id>``                  a WebQA image (from ``imgs.tsv``)
``page:slidevqa:<deck>:<p>``                SlideVQA slide ``p`` (1-based)
``page:mmlongbench_doc:<doc_id>:<p>``       page ``p`` of an MMLongBench-Doc PDF, rendered
``video:<video_id>:<c>``                    60-s chunk ``c`` of a video, 1 fps
``transcript:<video_id>``                   a VideoRAG transcript of a HowTo100M video
==========================================  ==================================================

A source is read from the raw directory given for its benchmark (``--raw=NAME=DIR``), in the
published layout the TFDS builders read, plus media: WebQA's ``imgs.tsv``/``imgs.lineidx``,
SlideVQA's ``images/<split>/<deck>/<file>``, MMLongBench-Doc's ``data/documents/<doc_id>``,
and for the video benchmarks ``frames/<id>/`` or ``videos/<id>.<ext>`` (`media.find_video`)
and VideoRAG's ``datasets/scripts/{original,asr}/<id>.txt`` transcripts. A source whose media
is absent adds no item; the reason is kept (`Sources.missing`) and reported for every question
whose evidence needed it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vimrag_jax.benchmarks import BUILDERS, media
from vimrag_jax.benchmarks.raw import (
    RawFormatError,
    clock,
    find_split_files,
    json_list,
    read_json,
    read_jsonl,
)

_CLIP = re.compile(r"^(?P<video>.+)_chunk_(?P<index>\d+)(\.\w+)?$")
_SLIDE_SPLITS = {"train": "train", "validation": "dev", "test": "test"}


@dataclass(frozen=True)
class Planned:
    """One corpus item as the import's JSON-lines record (without its id) and its key."""

    key: str
    record: dict[str, Any]


@dataclass(frozen=True)
class Unit:
    """A piece of work the corpus builder does in one go and records as done: one passage or
    picture, or one whole PDF or video (which become several items). ``make`` writes its
    media under the given directory and returns its items."""

    key: str
    make: Callable[[Path], list[Planned]]


@dataclass(frozen=True)
class Settings:
    """Size budgets: the longer side of stored pictures and PDF pages, and of video frames."""

    image_max_side: int = 1024
    frame_max_side: int = 448


def safe_name(name: str) -> str:
    """A file name for ``name``: its safe characters and a short hash (names may collide)."""
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:80]}-{digest}"


def _facts(record: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """A WebQA record's ``img`` or ``txt`` facts: positive and negative ones (train/val) or the
    unlabelled candidates of the test file (``img_Facts`` / ``txt_Facts``)."""
    return [
        f
        for suffix in ("posFacts", "negFacts", "Facts")
        for f in record.get(f"{kind}_{suffix}", [])
    ]


def _text(key: str, title: str, text: str) -> Unit:
    record = {"modality": "text", "title": title, "text": text}
    return Unit(key, lambda _media: [Planned(key, record)])


@dataclass
class Sources:
    """The units of the selected benchmarks' corpora, in a fixed order, without repeats; the
    reason each absent source could not be added (``missing``: key or key prefix -> why)."""

    raw: dict[str, Path]
    splits: dict[str, list[str]]  # benchmark -> selected splits of the raw release
    settings: Settings = field(default_factory=Settings)
    missing: dict[str, str] = field(default_factory=dict)
    _searched: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def units(self) -> Iterator[Unit]:
        """Every unit, benchmark by benchmark in `vimrag_jax.benchmarks.NAMES` order."""
        seen: set[str] = set()
        for name in BUILDERS:
            if name not in self.raw:
                continue
            try:
                for unit in getattr(self, f"_{name}")(self.raw[name]):
                    if unit.key not in seen:
                        seen.add(unit.key)
                        yield unit
            except (KeyError, TypeError, AttributeError, ValueError) as error:
                if isinstance(error, RawFormatError | media.MediaError):
                    raise
                raise RawFormatError(
                    self.raw[name],
                    "(corpus sources)",
                    f"{name}: a raw file lacks a field the corpus reads ({error!r}); building "
                    "its TFDS dataset from the same directory names the file and record",
                ) from error

    def _files(self, name: str, root: Path) -> Iterator[tuple[str, Path]]:
        """(split, raw file) of the selected splits present in ``root``."""
        found = find_split_files(name, root, BUILDERS[name].SPLIT_FILES)
        for split in self.splits.get(name, list(found)):
            if split in found:
                yield split, found[split]

    # -- text ----------------------------------------------------------------------------------

    def _hotpotqa(self, root: Path) -> Iterator[Unit]:
        for _, path in self._files("hotpotqa", root):
            for record in json_list(path):
                for title, sentences in record.get("context", []):
                    text = "".join(sentences).strip()
                    if text:
                        yield _text(f"text:hotpotqa:{title}", title, text)

    def _squad(self, root: Path) -> Iterator[Unit]:
        for _, path in self._files("squad", root):
            for article in read_json(path)["data"]:
                title = article["title"]
                for p, paragraph in enumerate(article["paragraphs"]):
                    if paragraph["context"].strip():
                        key = f"text:squad:{title}:{p}"
                        yield _text(key, title.replace("_", " "), paragraph["context"])

    # -- pictures ------------------------------------------------------------------------------

    def _webqa(self, root: Path) -> Iterator[Unit]:
        tsv, lineidx = root / "imgs.tsv", root / "imgs.lineidx"
        images = media.WebQAImages(tsv, lineidx) if tsv.is_file() and lineidx.is_file() else None
        if images is None:
            self.missing["image:webqa:"] = f"no imgs.tsv and imgs.lineidx in {root}"
        files: dict[Path, list[str]] = {}
        for split, path in self._files("webqa", root):
            files.setdefault(path, []).append({"validation": "val"}.get(split, split))
        for path, splits in files.items():
            for record in read_json(path).values():
                if record.get("split", "test") not in splits:
                    continue
                for fact in _facts(record, "img"):
                    image_id = str(fact["image_id"])
                    key = f"image:webqa:{image_id}"
                    if images is not None and image_id in images:
                        caption = fact.get("caption") or fact.get("title") or f"image {image_id}"
                        yield self._webqa_image(
                            key, images, image_id, fact.get("title", ""), caption
                        )
                    elif images is not None:
                        self.missing[key] = f"{lineidx} has no line for image_id {image_id}"
                for fact in _facts(record, "txt"):
                    if fact.get("fact", "").strip():
                        key = f"text:webqa:{fact['snippet_id']}"
                        yield _text(key, fact.get("title", ""), fact["fact"])

    def _webqa_image(
        self, key: str, images: media.WebQAImages, image_id: str, title: str, caption: str
    ) -> Unit:
        def make(media_dir: Path) -> list[Planned]:
            target = media_dir / "webqa" / f"{image_id}.png"
            media.image_bytes_to_file(
                images.read(image_id),
                target,
                self.settings.image_max_side,
                f"WebQA image {image_id} ({images.tsv})",
            )
            record = {"modality": "image", "title": title, "text": caption, "path": str(target)}
            return [Planned(key, record)]

        return Unit(key, make)

    def _slidevqa(self, root: Path) -> Iterator[Unit]:
        for split, path in self._files("slidevqa", root):
            for _, record in read_jsonl(path):
                deck = record["deck_name"]
                files = [u.rsplit("/", 1)[-1] for u in record.get("image_urls", [])]
                deck_dir = root / "images" / _SLIDE_SPLITS[split] / deck
                if not files and deck_dir.is_dir():  # no URLs: the deck's files in name order
                    files = sorted(e.name for e in deck_dir.iterdir() if e.is_file())
                if not files:
                    self.missing[f"page:slidevqa:{deck}:"] = f"no slide images in {deck_dir}"
                for page, name in enumerate(files, 1):
                    key = f"page:slidevqa:{deck}:{page}"
                    if (deck_dir / name).is_file():
                        yield self._slide(key, deck, page, deck_dir / name)
                    else:
                        self.missing[key] = f"slide image {deck_dir / name} not found"

    def _slide(self, key: str, deck: str, page: int, path: Path) -> Unit:
        def make(media_dir: Path) -> list[Planned]:
            target = media_dir / "slides" / safe_name(deck) / f"{page:02d}.png"
            used = media.image_within(path, target, self.settings.image_max_side)
            text = f"{deck}, slide {page}"
            return [
                Planned(
                    key,
                    {"modality": "image", "title": deck, "text": text, "path": str(used.resolve())},
                )
            ]

        return Unit(key, make)

    def _mmlongbench_doc(self, root: Path) -> Iterator[Unit]:
        documents = root / "data" / "documents"
        doc_ids: list[str] = []
        for _, path in self._files("mmlongbench_doc", root):
            doc_ids += [record["doc_id"] for record in json_list(path)]
        if documents.is_dir():
            doc_ids += sorted(e.name for e in documents.iterdir() if e.suffix.lower() == ".pdf")
        for doc_id in dict.fromkeys(doc_ids):
            if (documents / doc_id).is_file():
                yield self._pdf(doc_id, documents / doc_id)
            else:
                self.missing[f"page:mmlongbench_doc:{doc_id}:"] = (
                    f"PDF {documents / doc_id} not found"
                )

    def _pdf(self, doc_id: str, path: Path) -> Unit:
        def make(media_dir: Path) -> list[Planned]:
            pages = media.render_pdf(
                path, media_dir / "pdf" / safe_name(doc_id), self.settings.image_max_side
            )
            return [
                Planned(
                    f"page:mmlongbench_doc:{doc_id}:{number}",
                    {
                        "modality": "image",
                        "title": doc_id,
                        "text": f"{doc_id}, page {number}",
                        "path": str(page),
                    },
                )
                for number, page in enumerate(pages, 1)
            ]

        return Unit(f"pdf:{doc_id}", make)

    # -- videos --------------------------------------------------------------------------------

    def _video(self, root: Path, video_id: str) -> Iterator[Unit]:
        source = media.find_video([root], video_id)
        if source is None:  # the reason names every raw directory searched for it
            searched = self._searched.setdefault(video_id, [])
            searched.append(str(root))
            self.missing[f"video:{video_id}:"] = (
                f"no frames/{video_id}/ or videos/{video_id}.* under {' or '.join(searched)}"
            )
            return

        def make(media_dir: Path) -> list[Planned]:
            out = media_dir / "video" / safe_name(video_id)
            return [
                Planned(
                    f"video:{video_id}:{chunk.index}",
                    {
                        "modality": "video",
                        "title": video_id,
                        "text": f"video {video_id}, {clock(chunk.start)}-{clock(chunk.end + 1)}",
                        "path": str(chunk.directory),
                    },
                )
                for chunk in media.write_chunks(source, out, self.settings.frame_max_side)
            ]

        yield Unit(f"video:{video_id}", make)

    def _transcript(self, root: Path, video_id: str) -> Iterator[Unit]:
        for base in (root / "datasets" / "scripts", root / "scripts"):
            for kind in ("original", "asr"):
                path = base / kind / f"{video_id}.txt"
                if path.is_file():
                    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
                    text = " ".join(line.strip() for line in lines if line.strip())
                    if text:
                        yield _text(f"transcript:{video_id}", video_id, text)
                    return

    def _videos(self, root: Path, ids: list[str], transcripts: bool) -> Iterator[Unit]:
        for video_id in dict.fromkeys(ids + media.listed_videos([root])):
            yield from self._video(root, video_id)
            if transcripts:
                yield from self._transcript(root, video_id)

    def _lvbench(self, root: Path) -> Iterator[Unit]:
        ids = [r["key"] for _, p in self._files("lvbench", root) for _, r in read_jsonl(p)]
        yield from self._videos(root, ids, transcripts=False)

    def _wikihowqa(self, root: Path, name: str = "wikihowqa") -> Iterator[Unit]:
        ids = [
            video["video_id"]
            for _, path in self._files(name, root)
            for record in json_list(path)
            for video in record.get("videos", [])
        ]
        yield from self._videos(root, ids, transcripts=True)

    def _syntheticqa(self, root: Path) -> Iterator[Unit]:
        yield from self._wikihowqa(root, "syntheticqa")

    def _xvbench(self, root: Path) -> Iterator[Unit]:
        ids = []
        for _, path in self._files("xvbench", root):
            for _, record in read_jsonl(path):
                ids.append(record["video_name"])
                references = record.get("reference", [])
                for clip in [references] if isinstance(references, str) else references:
                    if match := _CLIP.match(clip):
                        ids.append(match["video"])
        yield from self._videos(root, ids, transcripts=False)


# -- evidence -> keys ----------------------------------------------------------------------------


def evidence_keys(
    benchmark: str, config: str, kind: str, source: str, ref: str, start: float, end: float
) -> tuple[list[str], str]:
    """The item keys one evidence reference stands for, or ``([], why not)``.

    A key ending in ``:`` is a prefix standing for every item under it (a whole video's chunks,
    with its transcript looked up beside them by the caller)."""
    if config == "universalrag" and benchmark in ("hotpotqa", "squad"):
        return [], (
            f"UniversalRAG corpus id {source!r}: its text corpus is not part of the unified "
            "corpus (the raw release's paragraphs are)"
        )
    if kind == "sentence":
        return [f"text:hotpotqa:{source}"], ""
    if kind == "passage":
        if benchmark == "squad":
            return [f"text:squad:{source}:{ref}"], ""
        return [f"text:{benchmark}:{source}"], ""
    if kind == "image":
        return [f"image:{benchmark}:{source}"], ""
    if kind == "page":
        return [f"page:{benchmark}:{source}:{ref}"], ""
    if kind == "video":
        if start >= 0 and end >= 0:
            return [f"video:{source}:{c}" for c in media.chunks_over(start, end)], ""
        return [f"video:{source}:", f"transcript:{source}"], ""
    if kind == "clip":
        match = _CLIP.match(ref)
        if not match:
            return [], f"clip name {ref!r} is not <video>_chunk_<n>.<ext> (split_video.sh's chunks)"
        return [f"video:{match['video']}:{int(match['index'])}"], ""
    return [], f"evidence kind {kind!r} has no corpus items"


__all__ = ["Planned", "Settings", "Sources", "Unit", "evidence_keys", "safe_name"]
