"""Pixels of a prompt's images and videos, made as Qwen3-VL's processors make them.

A record stores each segment's visual inputs as references (corpus item id, frame index,
resized height, width; SPEC §6). Given the corpus loader, `image_patches` turns one into the
``pixel_values`` rows and ``image_grid_thw`` that transformers' Qwen3-VL image processor
(``Qwen2VLImageProcessorPil`` with patch 16, mean = std = 0.5) produces for the same image
resized to that size: PIL bicubic resize of the uint8 image, rescale by 1/255 in float64
then float32, normalise in float32, temporal patch 2 by repeating the frame, 16 px patches
ordered in 2×2 merge blocks.

The video path is `video_patches` / `video_inputs`: the frames of one video item become
``pixel_values_videos`` rows and one ``video_grid_thw`` row as transformers'
``Qwen3VLVideoProcessor`` makes them from frames already at the target size (PIL bicubic
resize as above): rescale and normalise fused in float32 (``(x − 127.5) / 127.5``, the
processor's fused mean/std), consecutive frames paired into temporal patches of 2 (an odd
count repeats the last frame), patches in the same 2×2 merge-block order. A video with
``F`` frames gives ``grid_t = ceil(F / 2)``: as many ``<t seconds>`` blocks as
``prompts.video_placeholder`` writes, each of ``h·w / 32²`` video tokens.

`VisualPatches` turns a prompt's references into its images and videos (`group_refs`: an
image reference is one image, consecutive frames of one video item at one size are one video)
and their patches, with a small cache. It serves both sides: the agent loop hands the sampler
each prompt's processor-style arrays (`VisualPatches.prompt_inputs`: ``pixel_values`` /
``image_grid_thw`` and ``pixel_values_videos`` / ``video_grid_thw``), and the learner's
pipeline stage `VisualInputs` builds each segment's pixels from the same references in the
record, so the learner sees exactly the pixels the sampler saw.

`VisualInputs` adds each segment's patches (images and videos in placeholder order) padded to
a patch bucket, and, given the Qwen3-VL config, the vision tower's tables, the MRoPE
positions and the placeholder-to-feature index the learner's forward pass reads
(`segment_model_inputs`). `visual_stage` builds it for a policy (None for a text-only one).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from vimrag_jax.models.mrope import IMAGE, TEXT, VIDEO, rope_index
from vimrag_jax.models.qwen3_vl_vision import VisionTables, vision_tables

PATCH_SIZE = 16
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1536

LoadVisual = Callable[[int, int], np.ndarray]
ModalityOf = Callable[[int], str]


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8[height, width, 3]: ``image`` (uint8[H, W, 3]) resized with PIL bicubic."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"images must be uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"resize target must be positive, got {height}x{width}")
    resized = Image.fromarray(image).resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized)


def image_patches(
    image: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``(float32[gh·gw, 1536], (1, gh, gw))``: the Qwen3-VL patches of ``image`` resized to
    ``height × width`` (both multiples of 32, as smart resize gives)."""
    _check_size(height, width)
    pixels = resize_image(image, height, width).astype(np.float64) * (1 / 255)
    pixels = pixels.astype(np.float32)
    mean = np.asarray(IMAGE_MEAN, np.float32)
    std = np.asarray(IMAGE_STD, np.float32)
    chw = np.moveaxis((pixels - mean) / std, -1, 0)
    # a still image fills both frames of the temporal patch
    return _patchify(np.repeat(chw[None], TEMPORAL_PATCH_SIZE, axis=0))


def _check_size(height: int, width: int) -> None:
    factor = PATCH_SIZE * MERGE_SIZE
    if height % factor or width % factor or height < factor or width < factor:
        raise ValueError(f"resized size {height}x{width} must be positive multiples of {factor}")


def video_patches(
    frames: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``(float32[t·gh·gw, 1536], (t, gh, gw))``: Qwen3-VL video patches of ``frames``
    (uint8[F, H, W, 3], in time order) each resized to ``height × width``; t = ceil(F / 2)."""
    _check_size(height, width)
    frames = np.asarray(frames)
    if frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"a video must be uint8[F, H, W, 3] with F >= 1, got {list(frames.shape)}")
    resized = np.stack([resize_image(frame, height, width) for frame in frames])
    if pad := -len(resized) % TEMPORAL_PATCH_SIZE:  # the processor repeats the last frame
        resized = np.concatenate([resized, np.repeat(resized[-1:], pad, axis=0)])
    # Rescale and normalise fused as the video processor does: mean and std scaled by 255.
    mean = np.asarray(IMAGE_MEAN, np.float32) * np.float32(255)
    std = np.asarray(IMAGE_STD, np.float32) * np.float32(255)
    fchw = np.moveaxis((resized.astype(np.float32) - mean) / std, -1, 1)
    return _patchify(fchw)


def _patchify(fchw: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``(float32[t·gh·gw, 1536], (t, gh, gw))`` of normalised frames float32[F, 3, H, W] (F a
    multiple of the temporal patch): rows in the processor's order, 2×2 merge blocks together."""
    grid_t = len(fchw) // TEMPORAL_PATCH_SIZE
    grid_h, grid_w = fchw.shape[2] // PATCH_SIZE, fchw.shape[3] // PATCH_SIZE
    blocks = fchw.reshape(
        grid_t,
        TEMPORAL_PATCH_SIZE,
        3,
        grid_h // MERGE_SIZE,
        MERGE_SIZE,
        PATCH_SIZE,
        grid_w // MERGE_SIZE,
        MERGE_SIZE,
        PATCH_SIZE,
    )
    # (t, block row, block col, row in block, col in block, channel, frame in pair, y, x)
    blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return blocks.reshape(grid_t * grid_h * grid_w, PATCH_DIM), (grid_t, grid_h, grid_w)


def video_inputs(
    load_visual: LoadVisual, refs: np.ndarray
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``video_patches`` of one video's ``segment_visuals`` rows ``int[F, 4]`` (item id, frame
    index, height, width; one item, one size), frames read with ``load_visual``."""
    refs = np.asarray(refs)
    if refs.ndim != 2 or refs.shape[1] != 4 or len(refs) == 0:
        raise ValueError(f"video refs must be int[F, 4] with F >= 1, got {list(refs.shape)}")
    items, sizes = {int(i) for i in refs[:, 0]}, {(int(h), int(w)) for h, w in refs[:, 2:]}
    if len(items) != 1 or len(sizes) != 1:
        raise ValueError(
            f"video refs must share one item and size, got items {items} sizes {sizes}"
        )
    ((height, width),) = sizes
    item = items.pop()
    frames = np.stack([np.asarray(load_visual(item, int(f))) for f in refs[:, 1]])
    return video_patches(frames, height, width)


def num_patches(height: int, width: int) -> int:
    """Patch rows an image resized to ``height × width`` takes."""
    return (height // PATCH_SIZE) * (width // PATCH_SIZE)


# --- a prompt's visual references -> images and videos ---------------------------------------


@dataclasses.dataclass(frozen=True)
class VisualItem:
    """One image or video of a prompt (in placeholder order) with its Qwen3-VL patches.

    ``refs`` are its ``segment_visuals`` rows (one for an image, one per fed frame for a
    video); ``patches`` are ``float32[t·gh·gw, 1536]`` and ``grid`` is ``(t, gh, gw)``.
    """

    modality: str
    refs: tuple[tuple[int, int, int, int], ...]
    patches: np.ndarray
    grid: tuple[int, int, int]


def group_refs(refs: np.ndarray, modality_of: ModalityOf) -> list[tuple[str, np.ndarray]]:
    """A prompt's visual references ``int[V, 4]`` (placeholder order) as its images and videos.

    An image reference is one image. Consecutive references to frames of one video item at
    one size are one video: ``prompts.video_placeholder`` writes a video's frames as
    consecutive pairs, so a run always holds whole pairs (two adjacent placeholders of the
    same video at the same size form one run, which gives the same patches, grid rows and
    placeholder tokens as two). ``modality_of(item_id)`` says ``"image"`` or ``"video"``.
    Raises ValueError for malformed references or an item that is not an image or video.
    """
    refs = np.asarray(refs)
    if refs.size == 0:
        return []
    if refs.ndim != 2 or refs.shape[1] != 4 or not np.issubdtype(refs.dtype, np.integer):
        raise ValueError(f"visual references must be int[V, 4], got {refs.dtype}{list(refs.shape)}")
    groups: list[tuple[str, list[np.ndarray]]] = []
    for ref in refs:
        item = int(ref[0])
        modality = modality_of(item)
        if modality not in ("image", "video"):
            raise ValueError(
                f"a visual reference names item {item}, which is a {modality!r} item, not an "
                "image or video"
            )
        if modality == "video" and groups:
            kind, last = groups[-1]
            if kind == "video" and last[-1][0] == item and tuple(last[-1][2:]) == tuple(ref[2:]):
                last.append(ref)
                continue
        groups.append((modality, [ref]))
    return [(kind, np.stack(rows)) for kind, rows in groups]


class VisualPatches:
    """Patches of a prompt's images and videos, shared by the rollout and learner sides.

    The sampler (through the agent loop) and the learner's `VisualInputs` stage both build
    their pixels here from the same ``segment_visuals`` references, so the learner sees
    exactly the pixels the sampler saw. ``load_visual(item_id, frame) -> uint8[H, W, 3]``
    reads the corpus; ``modality_of(item_id)`` names an item's modality. The last
    ``cache_size`` images / videos are kept, since consecutive prompts of an episode mostly
    show the same memory bank.
    """

    def __init__(self, load_visual: LoadVisual, modality_of: ModalityOf, *, cache_size: int = 256):
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self._load = load_visual
        self._modality_of = modality_of
        self._cache: collections.OrderedDict[tuple, VisualItem] = collections.OrderedDict()
        self._cache_size = cache_size

    @classmethod
    def from_store(cls, store: Any, *, cache_size: int = 256) -> VisualPatches:
        """Over a ``retrieval.corpus.CorpusStore`` (``load_visual`` and ``item().modality``)."""
        return cls(store.load_visual, lambda item: store.item(item).modality, cache_size=cache_size)

    def _item(self, modality: str, refs: np.ndarray) -> VisualItem:
        key = (modality, tuple(tuple(int(v) for v in ref) for ref in refs))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if modality == "image":
            ((item, frame, height, width),) = key[1]
            patches, grid = image_patches(self._load(item, frame), height, width)
        else:
            patches, grid = video_inputs(self._load, refs)
        value = VisualItem(modality, key[1], patches, tuple(int(g) for g in grid))
        if self._cache_size:
            self._cache[key] = value
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return value

    def items(self, refs: np.ndarray) -> list[VisualItem]:
        """The images and videos of references ``int[V, 4]``, in placeholder order."""
        return [self._item(kind, rows) for kind, rows in group_refs(refs, self._modality_of)]

    def prompt_inputs(self, refs: np.ndarray) -> dict[str, np.ndarray]:
        """The Qwen3-VL processor's arrays for one prompt's references: ``pixel_values`` and
        ``image_grid_thw`` of its images, ``pixel_values_videos`` and ``video_grid_thw`` of
        its videos (keys only for the modalities present; ``{}`` for a text-only prompt). The
        sampler's ``prefill_inputs`` take one such mapping per prompt."""
        out: dict[str, np.ndarray] = {}
        items = self.items(refs)
        for modality, pixels_key, grid_key in (
            ("image", "pixel_values", "image_grid_thw"),
            ("video", "pixel_values_videos", "video_grid_thw"),
        ):
            chosen = [item for item in items if item.modality == modality]
            if chosen:
                out[pixels_key] = np.concatenate([item.patches for item in chosen])
                out[grid_key] = np.array([item.grid for item in chosen], np.int64)
        return out


# --- the learner's pipeline stage ---------------------------------------------------------


class VisualInputs:
    """Pipeline stage adding each segment's pixels (and, for a model, its vision inputs).

    Per batch row (segment) it looks up the images and videos of ``segment_visuals`` with
    `VisualPatches` and adds:

    - ``pixel_values float32[B, P, 1536]``: the row's image and video patches in placeholder
      order, zero-padded to ``P`` rows; ``pixel_valid bool[B, P]``;
    - ``visual_grid_thw int32[B, V, 3]``: each image's / video's grid in placeholder order,
      zero rows after.

    With ``model_config`` (a ``Qwen3VLConfig``) it also adds what the learner's forward pass
    (``sampling.logprobs.visual_sequence_logprobs``) reads, all built on the host here:

    - ``vision_interp_index int32[B, P, 4]``, ``vision_interp_weight float32[B, P, 4]``,
      ``vision_rotary_hw int32[B, P, 2]``, ``vision_segment int32[B, P]``: the vision
      tower's tables of each row's patches (``qwen3_vl_vision.vision_tables``; padding rows
      have segment -1);
    - ``position_ids int32[B, 3, L]``: MRoPE positions of the row's tokens (``rope_index``);
    - ``visual_token_index int32[B, L]``: for each image / video placeholder token of the
      prompt, its row among the row's merged visual tokens; -1 for every other token.
      Placeholder ids inside the sampled tokens are text, as the sampler fed them.

    ``P`` is the smallest power of two (at least 64) that holds the batch's largest row,
    capped at ``max_patches`` (so a few shapes compile); with ``bucketed=False`` it is always
    ``max_patches``. A row needing more than ``max_patches`` patches raises ValueError, as
    does a prompt whose placeholders do not match its references. Leave the stage out for
    a text-only policy.
    """

    def __init__(
        self,
        patches: VisualPatches,
        *,
        max_patches: int,
        model_config: Any | None = None,
        bucketed: bool = True,
    ):
        unit = MERGE_SIZE * MERGE_SIZE
        if max_patches < unit or max_patches % unit:
            raise ValueError(
                f"max_patches must be a positive multiple of {unit}, got {max_patches}"
            )
        self.patches = patches
        self.max_patches = int(max_patches)
        self.model_config = model_config
        self.bucketed = bucketed

    def patch_rows(self, needed: int) -> int:
        """``P`` for a batch whose largest row needs ``needed`` patches."""
        if needed > self.max_patches:
            raise ValueError(
                f"a segment's images and videos need {needed} patches, more than max_patches = "
                f"{self.max_patches}; raise max_patches (data.max_patches) to at least the "
                "largest number of pixels a prompt shows / 256"
            )
        if not self.bucketed:
            return self.max_patches
        return min(self.max_patches, max(64, 1 << max(needed - 1, 0).bit_length()))

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        visuals = np.asarray(batch["segment_visuals"])
        valid = (
            np.asarray(batch["segment_visual_valid"], bool)
            & np.asarray(batch["segment_valid"], bool)[:, None]
        )
        rows, refs = valid.shape
        items = [self.patches.items(visuals[row][valid[row]]) for row in range(rows)]
        used = [sum(len(item.patches) for item in row_items) for row_items in items]
        size = self.patch_rows(max(used, default=0))
        pixel_values = np.zeros((rows, size, PATCH_DIM), np.float32)
        grid_thw = np.zeros((rows, refs, 3), np.int32)
        for row, row_items in enumerate(items):
            if row_items:
                pixel_values[row, : used[row]] = np.concatenate([i.patches for i in row_items])
                grid_thw[row, : len(row_items)] = [item.grid for item in row_items]
        out = {
            **batch,
            "pixel_values": pixel_values,
            "pixel_valid": np.arange(size)[None, :] < np.asarray(used)[:, None],
            "visual_grid_thw": grid_thw,
        }
        if self.model_config is not None:
            out.update(self._model_inputs(batch, items, size))
        return out

    def _model_inputs(
        self, batch: Mapping[str, np.ndarray], items: list[list[VisualItem]], size: int
    ) -> dict[str, np.ndarray]:
        tokens = np.asarray(batch["tokens"])
        loss_mask = np.asarray(batch["loss_mask"], bool)
        rows, length = tokens.shape
        out = {
            "vision_interp_index": np.zeros((rows, size, 4), np.int32),
            "vision_interp_weight": np.zeros((rows, size, 4), np.float32),
            "vision_rotary_hw": np.zeros((rows, size, 2), np.int32),
            "vision_segment": np.full((rows, size), -1, np.int32),
            "position_ids": np.broadcast_to(
                np.arange(length, dtype=np.int32), (rows, 3, length)
            ).copy(),
            "visual_token_index": np.full((rows, length), -1, np.int32),
        }
        for row, row_items in enumerate(items):
            sampled = np.flatnonzero(loss_mask[row])
            prompt_length = int(sampled[0]) if sampled.size else length
            try:
                positions, index, tables = segment_model_inputs(
                    self.model_config, tokens[row], prompt_length, row_items, size
                )
            except ValueError as err:
                raise ValueError(f"batch row {row}: {err}") from None
            out["position_ids"][row] = positions
            out["visual_token_index"][row] = index
            if tables is not None:
                out["vision_interp_index"][row] = tables.interp_index
                out["vision_interp_weight"][row] = tables.interp_weight
                out["vision_rotary_hw"][row] = tables.rotary_hw
                out["vision_segment"][row] = tables.segment
        return out


def segment_model_inputs(
    config: Any, tokens: np.ndarray, prompt_length: int, items: list[VisualItem], size: int
) -> tuple[np.ndarray, np.ndarray, VisionTables | None]:
    """One segment's MRoPE ``positions int[3, L]``, ``visual_token_index int[L]`` and vision
    tables padded to ``size`` patches (None without images or videos).

    ``config`` is a ``Qwen3VLConfig``; only the image / video placeholder tokens among the
    first ``prompt_length`` tokens (the prompt) take visual features, as in the sampler,
    which feeds every sampled token as text. Raises ValueError when the placeholders do not
    match the items' grids.
    """
    tokens = np.asarray(tokens)
    length = tokens.shape[0]
    types = np.full((length,), TEXT, np.int64)
    prompt = np.arange(length) < prompt_length
    types[prompt & (tokens == config.image_token_id)] = IMAGE
    types[prompt & (tokens == config.video_token_id)] = VIDEO
    placeholders = np.flatnonzero(types != TEXT)
    merged = sum(len(item.patches) for item in items) // config.vision.merge_unit
    if len(placeholders) != merged:
        raise ValueError(
            f"the prompt holds {len(placeholders)} image/video placeholder tokens but its "
            f"{len(items)} visual inputs give {merged} visual tokens"
        )
    index = np.full((length,), -1, np.int32)
    index[placeholders] = np.arange(len(placeholders), dtype=np.int32)
    if not items:
        return np.broadcast_to(np.arange(length), (3, length)).astype(np.int32), index, None
    grids = {
        modality: np.array([item.grid for item in items if item.modality == modality], np.int64)
        for modality in ("image", "video")
    }
    positions, _ = rope_index(
        tokens[None],
        types[None],
        grids["image"] if len(grids["image"]) else None,
        grids["video"] if len(grids["video"]) else None,
        spatial_merge_size=config.vision.spatial_merge_size,
    )
    tables = vision_tables(
        np.array([item.grid for item in items], np.int64), config.vision, pad_to=size
    )
    return positions[:, 0].astype(np.int32), index, tables


def visual_stage(
    model: Any, store: Any, *, max_patches: int, bucketed: bool = True
) -> VisualInputs | None:
    """The learner's `VisualInputs` for ``model`` (None for a text-only policy: a model
    without ``prepare_prefill``), reading pixels from the corpus ``store``."""
    if not hasattr(model, "prepare_prefill"):
        return None
    return VisualInputs(
        VisualPatches.from_store(store),
        max_patches=max_patches,
        model_config=model.config,
        bucketed=bucketed,
    )
