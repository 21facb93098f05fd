"""Visual inputs: our patches equal transformers' Qwen3-VL (Qwen2-VL PIL) image processor."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
    smart_resize,
)

from vimrag_jax.data.vision import PATCH_DIM, VisualInputs, image_patches, num_patches

MIN_PIXELS = 32 * 32


def qwen3vl_oracle(image: np.ndarray, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' processor configured as Qwen3-VL's preprocessor_config.json."""
    processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": MIN_PIXELS, "longest_edge": max_pixels},
    )
    out = processor(images=Image.fromarray(image), return_tensors="np")
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def random_image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "height, width, max_pixels",
    [
        (64, 64, 64 * 64),  # already the target size
        (100, 150, 128 * 128),  # upscale to the nearest multiples of 32
        (480, 640, 256 * 32 * 32),  # downscale under a 256-token budget
        (300, 97, 64 * 32 * 32),  # tall and odd-sized
        (37, 211, 40 * 32 * 32),
    ],
)
def test_patches_equal_the_transformers_processor(height, width, max_pixels):
    image = random_image(height * width, height, width)
    resized_h, resized_w = smart_resize(height, width, 32, MIN_PIXELS, max_pixels)
    expected_values, expected_grid = qwen3vl_oracle(image, max_pixels)
    values, grid = image_patches(image, resized_h, resized_w)
    assert values.dtype == np.float32 and values.shape == (num_patches(resized_h, resized_w), 1536)
    np.testing.assert_array_equal(values, expected_values)
    assert list(grid) == expected_grid[0].tolist()


def test_visual_inputs_pads_each_segment_and_matches_the_oracle():
    images = {(7, 0): random_image(1, 120, 90), (9, 3): random_image(2, 64, 200)}
    sizes = {(7, 0): 64 * 32 * 32, (9, 3): 20 * 32 * 32}
    loads = []

    def load_visual(item, frame):
        loads.append((item, frame))
        return images[(item, frame)]

    refs = []
    for (item, frame), budget in sizes.items():
        h, w = smart_resize(*images[(item, frame)].shape[:2], 32, MIN_PIXELS, budget)
        refs.append([item, frame, h, w])
    batch = {
        "segment_valid": np.array([True, True, False]),
        "segment_visuals": np.array([[refs[0], refs[1]], [refs[1], refs[0]], [refs[0], refs[1]]]),
        "segment_visual_valid": np.array([[True, True], [True, False], [True, True]]),
    }
    stage = VisualInputs(load_visual, max_patches=400)
    out = stage(batch)
    assert out["pixel_values"].shape == (3, 400, PATCH_DIM)
    oracle = {key: qwen3vl_oracle(images[key], sizes[key]) for key in sizes}
    first = np.concatenate([oracle[(7, 0)][0], oracle[(9, 3)][0]])
    np.testing.assert_array_equal(out["pixel_values"][0, : len(first)], first)
    assert out["pixel_valid"][0].sum() == len(first)
    assert out["image_grid_thw"][0].tolist() == [
        oracle[(7, 0)][1][0].tolist(),
        oracle[(9, 3)][1][0].tolist(),
    ]
    second = oracle[(9, 3)][0]
    np.testing.assert_array_equal(out["pixel_values"][1, : len(second)], second)
    assert out["pixel_valid"][1].sum() == len(second)
    assert out["image_grid_thw"][1, 1].tolist() == [0, 0, 0]
    assert not out["pixel_valid"][2].any() and not out["pixel_values"][2].any()
    assert not out["pixel_values"][0][~out["pixel_valid"][0]].any()
    assert sorted(loads) == [(7, 0), (9, 3)]  # cached across segments
    assert out["segment_valid"] is batch["segment_valid"]  # the rest of the batch passes through


def test_visual_inputs_rejects_overflow_and_bad_sizes():
    stage = VisualInputs(lambda item, frame: random_image(0, 64, 64), max_patches=8)
    with pytest.raises(ValueError, match="max_patches"):
        stage.segment(np.array([[1, 0, 64, 64]]), np.array([True]))
    with pytest.raises(ValueError, match="multiples of 32"):
        image_patches(random_image(0, 64, 64), 48, 64)
    with pytest.raises(ValueError, match="uint8"):
        image_patches(np.zeros((64, 64, 3), np.float32), 64, 64)
    with pytest.raises(ValueError, match="max_patches"):
        VisualInputs(lambda item, frame: None, max_patches=0)
