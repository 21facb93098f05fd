"""Visual inputs: our patches equal transformers' Qwen3-VL image and video processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
    smart_resize,
)

from vimrag_jax.agent import prompts
from vimrag_jax.data.vision import (
    PATCH_DIM,
    VisualInputs,
    VisualPatches,
    group_refs,
    image_patches,
    num_patches,
    resize_image,
    video_inputs,
    video_patches,
)

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
    stage = VisualInputs(
        VisualPatches(load_visual, lambda item: "image"), max_patches=400, bucketed=False
    )
    out = stage(batch)
    assert out["pixel_values"].shape == (3, 400, PATCH_DIM)
    oracle = {key: qwen3vl_oracle(images[key], sizes[key]) for key in sizes}
    first = np.concatenate([oracle[(7, 0)][0], oracle[(9, 3)][0]])
    np.testing.assert_array_equal(out["pixel_values"][0, : len(first)], first)
    assert out["pixel_valid"][0].sum() == len(first)
    assert out["visual_grid_thw"][0].tolist() == [
        oracle[(7, 0)][1][0].tolist(),
        oracle[(9, 3)][1][0].tolist(),
    ]
    second = oracle[(9, 3)][0]
    np.testing.assert_array_equal(out["pixel_values"][1, : len(second)], second)
    assert out["pixel_valid"][1].sum() == len(second)
    assert out["visual_grid_thw"][1, 1].tolist() == [0, 0, 0]
    assert not out["pixel_valid"][2].any() and not out["pixel_values"][2].any()
    assert not out["pixel_values"][0][~out["pixel_valid"][0]].any()
    assert sorted(loads) == [(7, 0), (9, 3)]  # cached across segments
    assert out["segment_valid"] is batch["segment_valid"]  # the rest of the batch passes through
    # Bucketed (the default): the smallest power of two >= 64 that holds the largest row.
    bucketed = VisualInputs(VisualPatches(load_visual, lambda item: "image"), max_patches=400)
    size = max(64, 1 << (len(first) - 1).bit_length())
    assert bucketed(batch)["pixel_values"].shape == (3, size, PATCH_DIM) and size < 400
    np.testing.assert_array_equal(bucketed(batch)["pixel_values"], out["pixel_values"][:, :size])


def _one_row(refs):
    return {
        "segment_valid": np.array([True]),
        "segment_visuals": np.array([refs]),
        "segment_visual_valid": np.ones((1, len(refs)), bool),
    }


def test_visual_inputs_rejects_overflow_and_bad_sizes():
    patches = VisualPatches(lambda item, frame: random_image(0, 64, 64), lambda item: "image")
    stage = VisualInputs(patches, max_patches=8)
    with pytest.raises(ValueError, match="max_patches"):
        stage(_one_row([[1, 0, 64, 64]]))
    with pytest.raises(ValueError, match="multiples of 32"):
        image_patches(random_image(0, 64, 64), 48, 64)
    with pytest.raises(ValueError, match="uint8"):
        image_patches(np.zeros((64, 64, 3), np.float32), 64, 64)
    for bad in (0, 6):
        with pytest.raises(ValueError, match="max_patches"):
            VisualInputs(patches, max_patches=bad)
    text = VisualPatches(lambda item, frame: None, lambda item: "text")
    with pytest.raises(ValueError, match="not an image or video"):
        VisualInputs(text, max_patches=64)(_one_row([[1, 0, 64, 64]]))


# --- videos ---------------------------------------------------------------------------------


def _normalize(image, mean, std, inplace=False):
    """torchvision's ``functional.normalize`` (sub then div, per channel), which the video
    processor calls; torchvision itself must not be installed (it breaks Qwen3-VL imports)."""
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return image.sub_(mean).div_(std) if inplace else image.sub(mean).div(std)


def video_oracle(frames: np.ndarray, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """transformers' ``Qwen3VLVideoProcessor`` on frames already at the target size. Its only
    torchvision call on this path (normalize) is supplied by ``_normalize``."""
    import types

    from transformers import image_processing_backends
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    shim = types.SimpleNamespace(normalize=_normalize)
    monkeypatch.setattr(image_processing_backends, "tvF", shim, raising=False)
    processor = Qwen3VLVideoProcessor()
    out = processor(
        videos=[frames],
        do_resize=False,
        do_convert_rgb=False,
        do_sample_frames=False,
        cap_pixels_per_frame=False,
        return_tensors="np",
    )
    return np.asarray(out["pixel_values_videos"]), np.asarray(out["video_grid_thw"])


def loop_reference(frames: np.ndarray) -> np.ndarray:
    """Loop-level layout: row (t, block row, block col, y in block, x in block), column
    (channel, frame in pair, y, x); an odd frame count repeats the last frame."""
    frames = list(frames) + [frames[-1]] * (len(frames) % 2)
    h, w = frames[0].shape[:2]
    rows = []
    for t in range(len(frames) // 2):
        for by in range(h // 32):
            for bx in range(w // 32):
                for my in range(2):
                    for mx in range(2):
                        y0, x0 = (by * 2 + my) * 16, (bx * 2 + mx) * 16
                        row = [
                            (np.float32(frames[2 * t + f][y0 + y, x0 + x, c]) - np.float32(127.5))
                            / np.float32(127.5)
                            for c in range(3)
                            for f in range(2)
                            for y in range(16)
                            for x in range(16)
                        ]
                        rows.append(row)
    return np.array(rows, np.float32)


@pytest.mark.parametrize(
    "frames, source, size",
    [
        (2, (64, 64), (64, 64)),
        (3, (90, 70), (96, 64)),  # odd: the last frame is repeated
        (1, (50, 50), (32, 32)),
        (4, (100, 160), (64, 128)),
        (5, (64, 48), (128, 96)),
    ],
)
def test_video_patches_equal_the_transformers_video_processor(frames, source, size, monkeypatch):
    video = np.random.default_rng(frames).integers(0, 256, (frames, *source, 3), dtype=np.uint8)
    height, width = size
    values, grid = video_patches(video, height, width)
    resized = np.stack([resize_image(frame, height, width) for frame in video])
    expected_values, expected_grid = video_oracle(resized, monkeypatch)
    assert values.dtype == np.float32 and values.shape[1] == PATCH_DIM
    np.testing.assert_array_equal(values, expected_values)
    assert list(grid) == expected_grid[0].tolist() == [(frames + 1) // 2, height // 16, width // 16]
    if frames <= 3:
        np.testing.assert_array_equal(values, loop_reference(resized))


def test_video_grid_matches_the_prompt_placeholder():
    video = np.random.default_rng(0).integers(0, 256, (8, 40, 60, 3), dtype=np.uint8)
    loads = []

    def load_visual(item, frame):
        loads.append((item, frame))
        return video[frame]

    for count in (1, 2, 3, 4):
        times = [float(t) for t in np.linspace(0, 7, count).round()]
        shown = prompts.video_placeholder(5, times, 64, 96)
        refs = np.array([ref.as_row() for ref in shown.visuals])
        values, (grid_t, grid_h, grid_w) = video_inputs(load_visual, refs)
        blocks = shown.text.count(" seconds>")
        assert grid_t == blocks == (count + 1) // 2 and len(refs) == 2 * grid_t
        tokens = shown.text.count(prompts.VIDEO_PAD)
        assert tokens == grid_t * grid_h * grid_w // 4 == len(values) // 4
        # The placeholder's repeated last frame gives the same patches as the processor's padding.
        frames = video[[int(t) for t in times]]
        np.testing.assert_array_equal(values, video_patches(frames, 64, 96)[0])
    assert {item for item, _ in loads} == {5}
    with pytest.raises(ValueError, match="one item and size"):
        video_inputs(load_visual, np.array([[5, 0, 64, 96], [6, 1, 64, 96]]))
    with pytest.raises(ValueError, match="multiples of 32"):
        video_patches(video[:2], 48, 64)
    with pytest.raises(ValueError, match="F >= 1"):
        video_patches(video[:0], 64, 64)


# --- images and videos of one prompt, and the learner's model inputs ----------------------


def _world():
    """Two images and a video item, with a loader counting reads."""
    pictures = {3: random_image(3, 70, 50), 4: random_image(4, 40, 90)}
    video = np.random.default_rng(9).integers(0, 256, (6, 48, 64, 3), dtype=np.uint8)
    loads = []

    def load_visual(item, frame):
        loads.append((item, frame))
        return video[frame] if item == 8 else pictures[item]

    return load_visual, {3: "image", 4: "image", 8: "video"}.get, video, loads


def test_group_refs_splits_images_and_videos_in_placeholder_order():
    _, modality_of, _, _ = _world()
    clip = [ref.as_row() for ref in prompts.video_placeholder(8, [0.0, 2.0, 5.0], 32, 64).visuals]
    refs = np.array([[3, 0, 64, 32], *clip, *clip[:2], [4, 0, 32, 64], [3, 0, 32, 32]])
    groups = group_refs(refs, modality_of)
    assert [(kind, len(rows)) for kind, rows in groups] == [
        ("image", 1),
        ("video", 6),  # two adjacent placeholders of one video at one size: one run of pairs
        ("image", 1),
        ("image", 1),
    ]
    # Frames of one video at another size are another video.
    other = [ref.as_row() for ref in prompts.video_placeholder(8, [1.0], 64, 64).visuals]
    assert [len(rows) for _, rows in group_refs(np.array(clip + other), modality_of)] == [4, 2]
    assert group_refs(np.zeros((0, 4), np.int64), modality_of) == []
    with pytest.raises(ValueError, match="int\\[V, 4\\]"):
        group_refs(np.zeros((2, 3), np.int64), modality_of)


def test_prompt_inputs_are_the_processors_arrays_per_modality():
    load_visual, modality_of, video, loads = _world()
    patches = VisualPatches(load_visual, modality_of)
    clip = prompts.video_placeholder(8, [0.0, 2.0, 5.0], 32, 64)
    refs = np.array(
        [[3, 0, 64, 32], *(ref.as_row() for ref in clip.visuals), [4, 0, 32, 64], [3, 0, 64, 32]]
    )
    out = patches.prompt_inputs(refs)
    images = [image_patches(load_visual(3, 0), 64, 32), image_patches(load_visual(4, 0), 32, 64)]
    expected = np.concatenate([images[0][0], images[1][0], images[0][0]])
    np.testing.assert_array_equal(out["pixel_values"], expected)
    assert out["image_grid_thw"].tolist() == [[1, 4, 2], [1, 2, 4], [1, 4, 2]]
    frames, grid = video_patches(video[[0, 2, 5, 5]], 32, 64)
    np.testing.assert_array_equal(out["pixel_values_videos"], frames)
    assert out["video_grid_thw"].tolist() == [list(grid)] == [[2, 2, 4]]
    # The placeholder text asks for exactly these many tokens of each kind.
    assert clip.text.count(prompts.VIDEO_PAD) == len(frames) // 4
    assert patches.prompt_inputs(np.zeros((0, 4), np.int64)) == {}
    reads = len(loads)
    patches.prompt_inputs(refs)
    assert len(loads) == reads  # every item came from the cache


def _vl_config():
    from vimrag_jax.models.presets import preset_config
    from vimrag_jax.models.qwen3_vl import Qwen3VLConfig

    return Qwen3VLConfig.from_hf(preset_config("tiny-vl"))


def _segment(config, rng):
    """Tokens of a prompt with an image, a three-frame video and another image, then sampled
    tokens (one of them the image placeholder id); its visual references."""
    start, end = config.vision_start_token_id, config.vision_end_token_id
    clip = prompts.video_placeholder(8, [0.0, 2.0, 5.0], 32, 64)

    def text(n):
        return rng.integers(1, 1000, n).tolist()

    def image(h, w):
        return [start] + [config.image_token_id] * (h * w // 1024) + [end]

    video = []
    for _ in range(2):  # one timestamped block per frame pair
        video += text(3) + [start] + [config.video_token_id] * 2 + [end]
    prompt = text(4) + image(64, 32) + text(2) + video + text(3) + image(32, 64) + text(2)
    sampled = text(3) + [config.image_token_id] + text(2)
    refs = [[3, 0, 64, 32], *(ref.as_row() for ref in clip.visuals), [4, 0, 32, 64]]
    return prompt, sampled, refs


def test_model_inputs_equal_the_models_own_preparation():
    from vimrag_jax.models.qwen3_vl import prepare_inputs
    from vimrag_jax.models.qwen3_vl_vision import vision_tables

    config = _vl_config()
    load_visual, modality_of, _, _ = _world()
    prompt, sampled, refs = _segment(config, np.random.default_rng(0))
    length = 64
    tokens = np.zeros((2, length), np.int32)
    tokens[0, : len(prompt) + len(sampled)] = prompt + sampled
    loss_mask = np.zeros((2, length), bool)
    loss_mask[0, len(prompt) : len(prompt) + len(sampled)] = True
    visuals = np.zeros((2, 8, 4), np.int32)
    visuals[0, : len(refs)] = refs
    valid = np.zeros((2, 8), bool)
    valid[0, : len(refs)] = True
    batch = {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "segment_valid": np.array([True, False]),
        "segment_visuals": visuals,
        "segment_visual_valid": valid,
    }
    patches = VisualPatches(load_visual, modality_of)
    out = VisualInputs(patches, max_patches=128, model_config=config)(batch)
    inputs = patches.prompt_inputs(np.array(refs))
    # The model's own host preparation of the prompt alone (sampled tokens are text to it).
    reference = prepare_inputs(config, np.array([prompt]), **inputs)
    span = slice(0, len(prompt))
    np.testing.assert_array_equal(out["position_ids"][0][:, span], reference["position_ids"][:, 0])
    after = out["position_ids"][0][:, len(prompt) :]
    top = reference["position_ids"].max() + 1  # text continues after the MRoPE offset
    np.testing.assert_array_equal(
        after, np.broadcast_to(np.arange(top, top + after.shape[1]), after.shape)
    )
    index = out["visual_token_index"][0]
    placeholders = np.isin(prompt, [config.image_token_id, config.video_token_id])
    assert (index[: len(prompt)] >= 0).tolist() == placeholders.tolist()
    assert index[placeholders.nonzero()[0]].tolist() == list(range(placeholders.sum()))
    assert (index[len(prompt) :] == -1).all()  # the sampled placeholder id is text
    # Patches in placeholder order (image, video, image) and their tables, padded to 64 rows.
    grids = np.array([[1, 4, 2], [2, 2, 4], [1, 2, 4]])
    order = [inputs["pixel_values"][:8], inputs["pixel_values_videos"], inputs["pixel_values"][8:]]
    np.testing.assert_array_equal(out["pixel_values"][0, :32], np.concatenate(order))
    assert out["pixel_values"].shape == (2, 64, PATCH_DIM)
    tables = vision_tables(grids, config.vision, pad_to=64)
    np.testing.assert_array_equal(out["vision_segment"][0], tables.segment)
    np.testing.assert_array_equal(out["vision_interp_index"][0], tables.interp_index)
    np.testing.assert_array_equal(out["vision_interp_weight"][0], tables.interp_weight)
    np.testing.assert_array_equal(out["vision_rotary_hw"][0], tables.rotary_hw)
    assert out["visual_grid_thw"][0, :3].tolist() == grids.tolist()
    # The padding row: no pixels, text positions, no visual tokens.
    assert (out["vision_segment"][1] == -1).all() and (out["visual_token_index"][1] == -1).all()
    np.testing.assert_array_equal(
        out["position_ids"][1], np.broadcast_to(np.arange(length), (3, length))
    )


def test_model_inputs_refuse_placeholders_that_do_not_match_the_references():
    config = _vl_config()
    load_visual, modality_of, _, _ = _world()
    prompt, _, refs = _segment(config, np.random.default_rng(1))
    batch = {
        "tokens": np.array([prompt], np.int32),
        "loss_mask": np.zeros((1, len(prompt)), bool),
        "segment_valid": np.array([True]),
        "segment_visuals": np.array([refs[:-1]], np.int32),  # the last image is missing
        "segment_visual_valid": np.ones((1, len(refs) - 1), bool),
    }
    stage = VisualInputs(
        VisualPatches(load_visual, modality_of), max_patches=64, model_config=config
    )
    with pytest.raises(ValueError, match="batch row 0: the prompt holds 8 image/video placeholder"):
        stage(batch)
