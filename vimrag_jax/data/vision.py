"""Pixels for the learner: rebuild each segment's images as Qwen3-VL's image processor does.

A record stores each segment's visual inputs as references (corpus item id, frame index,
resized height, width; SPEC §6). Given the corpus loader, `image_patches` turns one into the
``pixel_values`` rows and ``image_grid_thw`` that transformers' Qwen3-VL image processor
(``Qwen2VLImageProcessorPil`` with patch 16, mean = std = 0.5) produces for the same image
resized to that size: PIL bicubic resize of the uint8 image, rescale by 1/255 in float64
then float32, normalise in float32, temporal patch 2 by repeating the frame, 16 px patches
ordered in 2×2 merge blocks. Each reference is one image (a video keyframe included, chosen
by its frame index).

The video path is `video_patches` / `video_inputs`: the frames of one video item become
``pixel_values_videos`` rows and one ``video_grid_thw`` row as transformers'
``Qwen3VLVideoProcessor`` makes them from frames already at the target size (PIL bicubic
resize as above): rescale and normalise fused in float32 (``(x − 127.5) / 127.5``, the
processor's fused mean/std), consecutive frames paired into temporal patches of 2 (an odd
count repeats the last frame), patches in the same 2×2 merge-block order. A video with
``F`` frames gives ``grid_t = ceil(F / 2)``: as many ``<t seconds>`` blocks as
``prompts.video_placeholder`` writes, each of ``h·w / 32²`` video tokens.

`VisualInputs` is the pipeline stage: it adds ``pixel_values float32[B, P, 1536]``,
``pixel_valid bool[B, P]`` and ``image_grid_thw int32[B, V, 3]`` to a batch, with each row's
patches padded to a static ``max_patches`` (P). Leave it out for a text-only policy.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

PATCH_SIZE = 16
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1536

LoadVisual = Callable[[int, int], np.ndarray]


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
    grid_h, grid_w = height // PATCH_SIZE, width // PATCH_SIZE
    blocks = chw.reshape(
        3,
        grid_h // MERGE_SIZE,
        MERGE_SIZE,
        PATCH_SIZE,
        grid_w // MERGE_SIZE,
        MERGE_SIZE,
        PATCH_SIZE,
    )
    # (block row, block col, row in block, col in block, channel, y, x)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)
    # a still image fills both frames of the temporal patch
    frames = np.repeat(blocks[:, :, :, :, :, None], TEMPORAL_PATCH_SIZE, axis=5)
    return frames.reshape(grid_h * grid_w, PATCH_DIM), (1, grid_h, grid_w)


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
    grid_t = len(fchw) // TEMPORAL_PATCH_SIZE
    grid_h, grid_w = height // PATCH_SIZE, width // PATCH_SIZE
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


class VisualInputs:
    """Pipeline stage adding each segment's pixels to a batch (see the module docstring).

    ``load_visual(item_id, frame) -> uint8[H, W, 3]`` reads the corpus. The last
    ``cache_size`` patchified images are kept, since consecutive segments of a trajectory
    mostly show the same memory bank.
    """

    def __init__(self, load_visual: LoadVisual, *, max_patches: int, cache_size: int = 256):
        if max_patches < 1:
            raise ValueError(f"max_patches must be >= 1, got {max_patches}")
        self._load = load_visual
        self.max_patches = max_patches
        self._cache: collections.OrderedDict[tuple[int, ...], tuple[np.ndarray, tuple]] = (
            collections.OrderedDict()
        )
        self._cache_size = cache_size

    def _patches(self, item: int, frame: int, height: int, width: int):
        key = (item, frame, height, width)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = image_patches(self._load(item, frame), height, width)
        self._cache[key] = value
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return value

    def segment(
        self, visuals: np.ndarray, visual_valid: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(pixel_values[P, 1536], pixel_valid[P], image_grid_thw[V, 3])`` of one segment."""
        pixel_values = np.zeros((self.max_patches, PATCH_DIM), np.float32)
        grid_thw = np.zeros((len(visuals), 3), np.int32)
        used = 0
        for v, (item, frame, height, width) in enumerate(np.asarray(visuals).tolist()):
            if not visual_valid[v]:
                continue
            patches, grid = self._patches(item, frame, height, width)
            if used + len(patches) > self.max_patches:
                raise ValueError(
                    f"a segment's images need more than max_patches = {self.max_patches} patches; "
                    "raise max_patches to at least the largest total pixel budget / 256"
                )
            pixel_values[used : used + len(patches)] = patches
            grid_thw[v] = grid
            used += len(patches)
        return pixel_values, np.arange(self.max_patches) < used, grid_thw

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        rows = len(batch["segment_valid"])
        visuals_valid = batch["segment_visual_valid"] & batch["segment_valid"][:, None]
        pixel_values = np.zeros((rows, self.max_patches, PATCH_DIM), np.float32)
        pixel_valid = np.zeros((rows, self.max_patches), bool)
        grid_thw = np.zeros((rows, visuals_valid.shape[1], 3), np.int32)
        for row in np.flatnonzero(visuals_valid.any(axis=1)):
            pixel_values[row], pixel_valid[row], grid_thw[row] = self.segment(
                batch["segment_visuals"][row], visuals_valid[row]
            )
        return {
            **batch,
            "pixel_values": pixel_values,
            "pixel_valid": pixel_valid,
            "image_grid_thw": grid_thw,
        }
