"""Draws one trajectory's memory graph (PNG or SVG): layout, GGPO masking and memory thumbnails.

    python -m vimrag_jax.rollout.render --shard=PATH --index=I --out=FILE.png [--corpus=DIR]
        [--positive_threshold=R]

The picture shows what the learner makes of a rollout (SPEC §6 record): nodes laid out left to
right by depth (longest path from the root), their id / query / summary text, the edges, the
critical path ``P_ans`` (answer node and its ancestors) outlined in red, and the nodes whose
segments the GGPO mask drops (SPEC §4) greyed (a trajectory is positive, so masked, when its
reward reaches ``positive_threshold``: pass the config's ``loss.positive_threshold``; the default
is ``LossConfig``'s). Each node's kept memory images are drawn at the
size the graph-modulated budget gives them (SPEC §2: `memory_energy` → `allocate_pixels` →
`smart_resize`), all at one scale, so their areas compare across the graph; items outside the
global top-K get no pixels and are drawn as small crossed boxes.

Node texts and per-slot corpus ids are read from the record keys that version-2 records carry
(older ones and hand-made dicts may lack them): ``node_title``, ``node_query``, ``node_summary``
(N strings each), ``item_id`` (int[N, K], corpus id of each memory slot, -1 when empty) and
``item_modality`` (int[N, K]: ``Modality``, 0 image, 1 video, -1 empty). Without ``item_id`` or
a corpus, thumbnails are grey boxes of a square image's allocated size; with both, the real
pixels are drawn and their aspect ratio used. A video slot is drawn as its keyframes side by
side, each at the frame size its share of the slot's budget gives (SPEC §2: keyframes split the
budget evenly). Records do not store keyframes, so they are read back from the prompts
(`memory_frames`); a video whose
keyframes no prompt showed is drawn as its first frame with the whole budget.

`graph_layout` is pure (record → `GraphLayout`) and holds every decision the picture shows;
`render_record` only draws it with matplotlib (Agg backend).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from vimrag_jax.memory.energy import (
    TOTAL_PIXELS,
    allocate_pixels,
    averaged_pixels,
    memory_energy,
    smart_resize,
)
from vimrag_jax.memory.graph import critical_path
from vimrag_jax.rl.ggpo import node_keep_mask
from vimrag_jax.rl.losses import LossConfig

LoadVisual = Callable[[int, int], np.ndarray]
Budget = Literal["energy", "averaged"]

#: The reward at which a trajectory counts as positive, when the caller passes none.
POSITIVE_THRESHOLD = LossConfig().positive_threshold
REQUIRED_KEYS = ("adjacency", "node_valid", "priority", "item_valid", "answer_node", "reward")
_KIND_NAMES = {0: "root", 1: "search", 2: "answer"}
# Drawing units: one unit ≈ 1/1000 of the side of an image holding the whole pixel budget.
_UNITS_PER_PIXEL = 1.2 / math.sqrt(TOTAL_PIXELS)
_TEXT_HEIGHT = 1.25
_MIN_BOX_WIDTH = 3.4
_PAD = 0.12
_GAP = 0.08
_DROPPED_SIDE = 0.18
_FRAME_GAP = 0.03
_VIDEO = 1  # item_modality of a video slot (records.ITEM_VIDEO)
_LEGEND = (
    "red outline: critical path (answer + ancestors)   grey, dashed: segments masked by GGPO   "
    "boxes: memory images at their allocated size (crossed: outside the top-K, not shown)"
)


@dataclasses.dataclass(frozen=True)
class Thumb:
    """One memory item of a node: slot ``k``, its pixel budget and resized size (px).

    ``frames`` are the frame indices drawn (``(0,)`` for an image); for a video, ``height`` and
    ``width`` are each keyframe's size under its share ``pixels // len(frames)`` of the budget.
    """

    slot: int
    pixels: int
    height: int
    width: int
    item_id: int
    frames: tuple[int, ...] = (0,)


@dataclasses.dataclass(frozen=True)
class NodeBox:
    """A drawn node: position (lower-left corner), size, text and styling flags."""

    index: int
    kind: int
    depth: int
    x: float
    y: float
    width: float
    height: float
    lines: tuple[str, ...]
    on_critical_path: bool
    greyed: bool
    thumbs: tuple[Thumb, ...]


@dataclasses.dataclass(frozen=True)
class GraphLayout:
    """Everything the picture shows, computed from a record (see `graph_layout`)."""

    nodes: tuple[NodeBox, ...]
    edges: tuple[tuple[int, int], ...]  # (parent, child)
    critical: frozenset[int]
    greyed: frozenset[int]
    title: str

    def node(self, index: int) -> NodeBox:
        return next(n for n in self.nodes if n.index == index)


def _array(record: Mapping[str, Any], key: str, dtype: Any, ndim: int) -> np.ndarray:
    if key not in record:
        raise KeyError(f"record has no {key!r} field")
    value = np.asarray(record[key]).astype(dtype)
    if value.ndim != ndim:
        raise ValueError(f"record field {key!r} must have {ndim} dims, got shape {value.shape}")
    return value


def _texts(record: Mapping[str, Any], key: str, n: int) -> list[str]:
    values = record.get(key)
    if values is None:
        return [""] * n
    values = [str(v) for v in values]
    if len(values) != n:
        raise ValueError(f"record field {key!r} must hold {n} strings, got {len(values)}")
    return values


def node_depths(adjacency: np.ndarray, node_valid: np.ndarray) -> np.ndarray:
    """int[N]: longest path (in edges) from a parentless node; -1 for invalid nodes."""
    n = node_valid.shape[0]
    edges = (
        adjacency & node_valid[:, None] & node_valid[None, :] & np.triu(np.ones((n, n), bool), 1)
    )
    depth = np.where(node_valid, 0, -1)
    for j in range(n):  # host-side drawing code: index order is a topological order
        parents = np.flatnonzero(edges[:, j])
        if node_valid[j] and parents.size:
            depth[j] = int(depth[parents].max()) + 1
    return depth


def memory_frames(record: Mapping[str, Any]) -> dict[tuple[int, int], tuple[int, ...]]:
    """Frame indices of each video memory slot ``(node, slot)``, as the prompts showed them.

    A node's memory is first shown in the prompt after the node's last segment (its memorize
    call), which holds no fresh retrieval results; the frames of the slot's item in that
    prompt's ``segment_visuals`` are its keyframes (the repeated last frame of an odd count
    counted once). Slots no later prompt showed (no budget, or the episode ended) are left out.
    """
    keys = ("segment_node", "segment_valid", "segment_visuals", "segment_visual_valid")
    if any(key not in record for key in (*keys, "item_id", "item_modality")):
        return {}
    segment_node = np.asarray(record["segment_node"], np.int64)
    segment_valid = np.asarray(record["segment_valid"], bool)
    visuals = np.asarray(record["segment_visuals"], np.int64)
    visual_valid = np.asarray(record["segment_visual_valid"], bool)
    item_ids = np.asarray(record["item_id"], np.int64)
    video = (np.asarray(record["item_modality"]) == _VIDEO) & (item_ids >= 0)
    out = {}
    for i, k in zip(*np.nonzero(video), strict=True):
        own = np.flatnonzero(segment_valid & (segment_node == i))
        later = np.flatnonzero(segment_valid)
        later = later[later > own.max()] if own.size else later[:0]
        if not later.size:
            continue
        s = later[0]
        rows = visuals[s][visual_valid[s] & (visuals[s][:, 0] == item_ids[i, k])]
        if rows.size:
            out[int(i), int(k)] = tuple(sorted({int(f) for f in rows[:, 1]}))
    return out


def _thumbs(
    pixels: np.ndarray,
    item_valid: np.ndarray,
    item_ids: np.ndarray,
    native_sizes: Mapping[tuple[int, int], tuple[int, int]],
    frames: Mapping[tuple[int, int], tuple[int, ...]],
    i: int,
) -> tuple[Thumb, ...]:
    thumbs = []
    for k in np.flatnonzero(item_valid[i]):
        budget = int(pixels[i, k])
        shown = frames.get((i, int(k)), (0,))
        per_frame = budget // len(shown)
        if (i, int(k)) in native_sizes:
            native_h, native_w = native_sizes[i, int(k)]
        else:  # unknown image: a square one, big enough to use its whole budget
            native_h = native_w = max(32, math.ceil(math.sqrt(max(per_frame, 1))))
        h, w = smart_resize(native_h, native_w, per_frame)
        thumbs.append(Thumb(int(k), budget, int(h), int(w), int(item_ids[i, k]), shown))
    return tuple(thumbs)


def _node_lines(i: int, kind: int, title: str, query: str, summary: str, answer: str) -> list[str]:
    head = f"#{i} {_KIND_NAMES.get(kind, f'kind {kind}')}"
    if title:
        head += f": {title}"
    lines = [textwrap.shorten(head, 44, placeholder="…")]
    for label, text in (("q", query), ("s", summary), ("a", answer)):
        if text:
            wrapped = textwrap.wrap(text, 44, max_lines=2, placeholder="…")
            lines += [f"{label}: {wrapped[0]}", *wrapped[1:]]
    return lines[:5]


@functools.partial(jax.jit, static_argnames="budget")
def _graph_arrays(
    adjacency, node_valid, answer_node, reward, relevant, priority, item_valid, threshold, *, budget
):
    """GGPO keep mask, critical path and pixel budgets in one compiled call (fast eager use)."""
    keep = node_keep_mask(
        adjacency, node_valid, answer_node, reward, relevant, positive_threshold=threshold
    )
    on_path = critical_path(adjacency, node_valid, answer_node)
    if budget == "energy":
        omega = memory_energy(adjacency, node_valid, priority, item_valid)
        pixels = allocate_pixels(omega, item_valid)
    else:
        pixels = averaged_pixels(item_valid)
    return keep, on_path, pixels


def graph_layout(
    record: Mapping[str, Any],
    *,
    budget: Budget = "energy",
    positive_threshold: float = POSITIVE_THRESHOLD,
    native_sizes: Mapping[tuple[int, int], tuple[int, int]] | None = None,
) -> GraphLayout:
    """The picture of a record as data: boxes, edges, critical path and GGPO-greyed nodes.

    ``critical`` is `critical_path` and ``greyed`` the valid nodes outside `node_keep_mask`, both
    computed by the project's own functions; thumbnail sizes follow ``budget`` ("energy": the
    evaluation allocation; "averaged": the training-rollout one). ``native_sizes`` maps
    ``(node, slot)`` to the source image's (height, width) when known.
    """
    adjacency = _array(record, "adjacency", bool, 2)
    node_valid = _array(record, "node_valid", bool, 1)
    priority = _array(record, "priority", np.float32, 2)
    item_valid = _array(record, "item_valid", bool, 2)
    n, k_max = item_valid.shape
    if adjacency.shape != (n, n) or node_valid.shape != (n,) or priority.shape != (n, k_max):
        raise ValueError(
            f"record shapes disagree: adjacency {adjacency.shape}, node_valid {node_valid.shape}, "
            f"priority {priority.shape}, item_valid {item_valid.shape}"
        )
    for key in REQUIRED_KEYS:
        if key not in record:
            raise KeyError(f"record has no {key!r} field")
    answer_node = int(record["answer_node"])
    reward = float(record["reward"])
    kinds = np.asarray(record.get("node_kind", np.ones(n)), np.int64)
    relevant = np.asarray(record.get("relevant", np.zeros(n, bool)), bool)
    item_ids = np.asarray(record.get("item_id", np.full((n, k_max), -1)), np.int64)
    modality = np.asarray(record.get("item_modality", np.full((n, k_max), -1)), np.int64)
    if kinds.shape != (n,) or relevant.shape != (n,) or (n, k_max) != item_ids.shape:
        raise ValueError("record fields node_kind, relevant ([N]) or item_id ([N, K]) mis-shaped")
    if modality.shape != (n, k_max):
        raise ValueError(f"record field 'item_modality' must be [N, K], got {modality.shape}")
    item_valid = item_valid & node_valid[:, None]

    if budget not in ("energy", "averaged"):
        raise ValueError(f"budget must be 'energy' or 'averaged', got {budget!r}")
    keep, on_path, pixels = (
        np.asarray(a)
        for a in _graph_arrays(
            adjacency,
            node_valid,
            np.int32(answer_node),
            np.float32(reward),
            relevant,
            priority,
            item_valid,
            np.float32(positive_threshold),
            budget=budget,
        )
    )

    titles, queries = _texts(record, "node_title", n), _texts(record, "node_query", n)
    summaries = _texts(record, "node_summary", n)
    prediction = str(record.get("prediction", "") or "")
    depth = node_depths(adjacency, node_valid)
    frames = memory_frames(record)
    thumbs = {
        i: _thumbs(pixels, item_valid, item_ids, native_sizes or {}, frames, i)
        for i in np.flatnonzero(node_valid)
    }

    def box_size(i: int) -> tuple[float, float]:
        extents = [_thumb_extent(t) for t in thumbs[i]]
        row_w = sum(w for w, _ in extents) + _GAP * max(len(extents) - 1, 0)
        row_h = max((h for _, h in extents), default=0.0)
        return max(_MIN_BOX_WIDTH, row_w + 2 * _PAD), _TEXT_HEIGHT + row_h + 2 * _PAD

    sizes = {i: box_size(i) for i in thumbs}
    column_w = max((w for w, _ in sizes.values()), default=_MIN_BOX_WIDTH) + 1.2
    row_h = max((h for _, h in sizes.values()), default=_TEXT_HEIGHT) + 0.5
    boxes = []
    for d in range(int(depth.max(initial=-1)) + 1):
        level = [int(i) for i in np.flatnonzero(depth == d)]
        for rank, i in enumerate(level):
            w, h = sizes[i]
            y = (len(level) - 1) / 2 * row_h - rank * row_h - h / 2  # levels centred on y = 0
            answer = prediction if i == answer_node else ""
            lines = _node_lines(i, int(kinds[i]), titles[i], queries[i], summaries[i], answer)
            boxes.append(
                NodeBox(
                    index=i,
                    kind=int(kinds[i]),
                    depth=d,
                    x=d * column_w,
                    y=y,
                    width=w,
                    height=h,
                    lines=tuple(lines),
                    on_critical_path=bool(on_path[i]),
                    greyed=not keep[i],
                    thumbs=thumbs[i],
                )
            )
    valid_edges = adjacency & node_valid[:, None] & node_valid[None, :]
    edges = tuple((int(i), int(j)) for i, j in zip(*np.nonzero(valid_edges), strict=True) if i < j)
    question = str(record.get("question", "") or "")
    gold = str(record.get("gold_answer", "") or "")
    title = f"reward {reward:g}" + (f" | Q: {question}" if question else "")
    if gold or prediction:
        title += f" | gold: {gold or '?'} | predicted: {prediction or '—'}"
    return GraphLayout(
        nodes=tuple(boxes),
        edges=edges,
        critical=frozenset(int(i) for i in np.flatnonzero(on_path)),
        greyed=frozenset(int(i) for i in np.flatnonzero(node_valid & ~keep)),
        title=textwrap.shorten(title, 160, placeholder="…"),
    )


def _thumb_extent(t: Thumb) -> tuple[float, float]:
    """Drawn (width, height) of a thumbnail: its frames side by side."""
    if t.pixels == 0:
        return _DROPPED_SIDE, _DROPPED_SIDE
    count = len(t.frames)
    width = count * t.width * _UNITS_PER_PIXEL + (count - 1) * _FRAME_GAP
    return width, t.height * _UNITS_PER_PIXEL


def _load_pixels(
    record: Mapping[str, Any], load_visual: LoadVisual | None
) -> dict[tuple[int, int, int], np.ndarray]:
    """Pixels ``(node, slot, frame)`` of every valid memory slot whose corpus id is known (each
    drawn frame of a video), where loading works."""
    if load_visual is None or "item_id" not in record:
        return {}
    item_ids = np.asarray(record["item_id"], np.int64)
    valid = np.asarray(record["item_valid"], bool) & np.asarray(record["node_valid"], bool)[:, None]
    frames = memory_frames(record)
    out = {}
    for i, k in zip(*np.nonzero(valid & (item_ids >= 0)), strict=True):
        for frame in frames.get((int(i), int(k)), (0,)):
            try:
                image = np.asarray(load_visual(int(item_ids[i, k]), frame))
            except (KeyError, IndexError, ValueError, OSError) as error:
                print(f"render: no pixels for item {item_ids[i, k]}: {error}", file=sys.stderr)
                continue
            if image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0:
                out[int(i), int(k), int(frame)] = image
    return out


def _small(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The image at most ~96 px on a side (keeps SVG files small), aspect of the target size."""
    from PIL import Image

    scale = min(1.0, 96 / max(height, width, 1))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image.astype(np.uint8)).resize(size))


def render_record(
    record: Mapping[str, Any],
    out_path: str | Path,
    *,
    load_visual: LoadVisual | None = None,
    budget: Budget = "energy",
    positive_threshold: float = POSITIVE_THRESHOLD,
) -> GraphLayout:
    """Draws ``record``'s memory graph to ``out_path`` (``.png`` or ``.svg``); returns the layout.

    ``load_visual(item_id, frame) -> uint8[H, W, 3]`` (e.g. ``CorpusStore.load_visual``) fills
    the thumbnails when the record has ``item_id``; otherwise they are grey boxes.
    """
    out_path = Path(out_path)
    suffix = out_path.suffix.lower()
    if suffix not in (".png", ".svg"):
        raise ValueError(f"out path must end in .png or .svg, got {out_path.name!r}")
    images = _load_pixels(record, load_visual)
    native = {key[:2]: (int(im.shape[0]), int(im.shape[1])) for key, im in images.items()}
    layout = graph_layout(
        record, budget=budget, positive_threshold=positive_threshold, native_sizes=native
    )

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

    xs = [b.x for b in layout.nodes] + [b.x + b.width for b in layout.nodes] or [0.0, 4.0]
    ys = [b.y for b in layout.nodes] + [b.y + b.height for b in layout.nodes] or [0.0, 2.0]
    x0, x1, y0, y1 = min(xs) - 0.4, max(xs) + 0.4, min(ys) - 0.6, max(ys) + 0.9
    scale = 1.1  # inches per unit
    fig = plt.figure(figsize=(max(4.0, (x1 - x0) * scale), max(3.0, (y1 - y0) * scale)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.text((x0 + x1) / 2, y1 - 0.35, layout.title, ha="center", va="center", fontsize=9)
    ax.text((x0 + x1) / 2, y0 + 0.15, _LEGEND, ha="center", va="center", fontsize=6, color="#555")

    by_index = {b.index: b for b in layout.nodes}
    for parent, child in layout.edges:
        a, b = by_index[parent], by_index[child]
        critical = parent in layout.critical and child in layout.critical
        span = b.depth - a.depth  # edges that skip a level bend around the boxes in between
        ax.add_patch(
            FancyArrowPatch(
                (a.x + a.width, a.y + a.height / 2),
                (b.x, b.y + b.height / 2),
                arrowstyle="-|>",
                mutation_scale=12,
                color="#c0392b" if critical else "#7f8c8d",
                linewidth=2.2 if critical else 1.0,
                connectionstyle=f"arc3,rad={0.05 if span <= 1 else -0.3}",
                zorder=4,
                alpha=0.85,
            )
        )
    face = {0: "#d6eaf8", 1: "#ffffff", 2: "#d5f5e3"}
    for box in layout.nodes:
        ax.add_patch(
            FancyBboxPatch(
                (box.x, box.y),
                box.width,
                box.height,
                boxstyle="round,pad=0.02,rounding_size=0.1",
                facecolor="#e5e5e5" if box.greyed else face.get(box.kind, "#ffffff"),
                edgecolor="#c0392b" if box.on_critical_path else "#555555",
                linewidth=2.4 if box.on_critical_path else 0.8,
                linestyle="--" if box.greyed else "-",
            )
        )
        text_colour = "#8a8a8a" if box.greyed else "#111111"
        ax.text(
            box.x + _PAD,
            box.y + box.height - _PAD,
            "\n".join(box.lines),
            ha="left",
            va="top",
            fontsize=7,
            color=text_colour,
            family="monospace",
        )
        x = box.x + _PAD
        for thumb in box.thumbs:
            if thumb.pixels == 0:
                side = _DROPPED_SIDE
                ax.add_patch(Rectangle((x, box.y + _PAD), side, side, fill=False, hatch="xx"))
                x += side + _GAP
                continue
            w, h = thumb.width * _UNITS_PER_PIXEL, thumb.height * _UNITS_PER_PIXEL
            for frame in thumb.frames:
                extent = (x, x + w, box.y + _PAD, box.y + _PAD + h)
                image = images.get((box.index, thumb.slot, frame))
                if image is not None:
                    ax.imshow(
                        _small(image, thumb.height, thumb.width),
                        extent=extent,
                        alpha=0.45 if box.greyed else 1.0,
                        zorder=3,
                    )
                else:
                    ax.add_patch(
                        Rectangle((x, box.y + _PAD), w, h, facecolor="#9e9e9e", edgecolor="#616161")
                    )
                label = f"{thumb.height}×{thumb.width}"
                if len(thumb.frames) > 1:
                    label += f"\nf{frame}"
                ax.text(
                    x + w / 2, box.y + _PAD + h / 2, label, ha="center", va="center", fontsize=5
                )
                x += w + _FRAME_GAP
            x += _GAP - _FRAME_GAP
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format=suffix[1:], dpi=110)
    plt.close(fig)
    return layout


def _corpus_loader(directory: str | None) -> LoadVisual | None:
    if not directory:
        return None
    try:
        from vimrag_jax.retrieval.corpus import CorpusStore

        return CorpusStore.open(directory).load_visual
    except Exception as error:  # any failure: fall back to grey boxes and say why
        print(
            f"render: corpus {directory} unavailable ({error}); drawing grey boxes", file=sys.stderr
        )
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: draws record ``--index`` of ``--shard`` to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", required=True, help="trajectory shard (ArrayRecord)")
    parser.add_argument("--index", type=int, default=0, help="record number in the shard")
    parser.add_argument("--out", required=True, help="output file, .png or .svg")
    parser.add_argument("--corpus", default=None, help="corpus store directory for pixels")
    parser.add_argument("--budget", choices=("energy", "averaged"), default="energy")
    parser.add_argument(
        "--positive_threshold",
        type=float,
        default=POSITIVE_THRESHOLD,
        help="reward at which GGPO masks a trajectory's dead ends (the config's "
        "loss.positive_threshold)",
    )
    args = parser.parse_args(argv)
    if args.index < 0:
        parser.error(f"--index must be >= 0, got {args.index}")
    from vimrag_jax.rollout.records import read_shard

    record = next(itertools.islice(read_shard(args.shard), args.index, None), None)
    if record is None:
        parser.error(f"--index {args.index} is past the end of {args.shard}")
    layout = render_record(
        record,
        args.out,
        load_visual=_corpus_loader(args.corpus),
        budget=args.budget,
        positive_threshold=args.positive_threshold,
    )
    print(
        f"wrote {args.out}: {len(layout.nodes)} nodes, critical {sorted(layout.critical)}, "
        f"greyed {sorted(layout.greyed)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
