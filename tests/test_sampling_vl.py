"""KV-cache decoding of Qwen3-VL with images/videos in the prompt, against the full forward pass."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vimrag_jax.models import init_model
from vimrag_jax.models.mrope import rope_index
from vimrag_jax.models.qwen3_vl import prepare_inputs, prepare_prefill_inputs
from vimrag_jax.sampling import Sampler, token_logprobs

_MAX_NEW, _MAX_PROMPT = 6, 32


@pytest.fixture(scope="module")
def model():
    # The "tiny-vl" preset, filled from NumPy: eager random init of every shape takes seconds.
    model = nnx.eval_shape(lambda: init_model("tiny-vl", rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        center = 1.0 if path[-1] == "scale" else 0.0  # norm scales near 1
        var.set_value(jnp.asarray(center + 0.08 * rng.standard_normal(shape), jnp.float32))
    return model


def _prompts(config):
    """Three prompts: an image, a larger image, a two-frame video; with their pixel inputs."""
    rng = np.random.default_rng(1)
    start, end = config.vision_start_token_id, config.vision_end_token_id
    patch_dim = config.vision.patch_dim

    def text(n):
        return rng.integers(1, 1000, n).tolist()

    def visual(token, grid):
        t, h, w = grid
        return [start] + [token] * (h * w // 4) + [end]

    def pixels(grid):
        return rng.standard_normal((int(np.prod(grid)), patch_dim)).astype(np.float32)

    image_a, image_b, video = (1, 4, 4), (1, 4, 6), (2, 4, 4)
    prompts = [
        text(3) + visual(config.image_token_id, image_a) + text(2),
        text(5) + visual(config.image_token_id, image_b) + text(4),
        text(2)
        + sum((text(3) + visual(config.video_token_id, (1, 4, 4)) for _ in range(2)), [])
        + text(1),
    ]
    inputs = [
        {"pixel_values": pixels(image_a), "image_grid_thw": np.array([image_a])},
        {"pixel_values": pixels(image_b), "image_grid_thw": np.array([image_b])},
        {"pixel_values_videos": pixels(video), "video_grid_thw": np.array([video])},
    ]
    return prompts, inputs


@pytest.fixture(scope="module")
def case(model):
    prompts, inputs = _prompts(model.config)
    sampler = Sampler(
        model,
        max_prompt_len=_MAX_PROMPT,
        max_new_tokens=_MAX_NEW,
        eos_token_ids=(),
        pad_token_id=0,
        batch_buckets=(1, 4),
        length_buckets=(16, 32),
    )
    together = sampler.generate(prompts, greedy=True, prefill_inputs=inputs)
    return sampler, prompts, inputs, together


@nnx.jit
def _forward(model, prepared):
    return model(**prepared)


def _full_forward_logits(model, rows, inputs):
    """Logits of right-padded `rows` with every row's visual inputs, MRoPE from `rope_index`."""
    length = _MAX_PROMPT + _MAX_NEW
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    merged = {}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [x[key] for x in inputs if key in x]
        merged[key] = np.concatenate(parts) if parts else None
    prepared = prepare_inputs(model.config, ids, attention_mask=mask, **merged)
    return ids, np.asarray(_forward(model, prepared))


def test_greedy_equals_step_by_step_full_forward(model, case):
    _, prompts, inputs, together = case
    rows = [list(p) for p in prompts]
    for _ in range(_MAX_NEW):
        _, logits = _full_forward_logits(model, rows, inputs)
        for i, row in enumerate(rows):
            row.append(int(np.argmax(logits[i, len(row) - 1])))
    for prompt, row, completion in zip(prompts, rows, together, strict=True):
        assert completion.tokens == row[len(prompt) :]
        assert completion.finish_reason == "length"


def test_sampler_logprobs_equal_full_forward_logprobs(model, case):
    _, prompts, inputs, together = case
    rows = [p + c.tokens for p, c in zip(prompts, together, strict=True)]
    ids, logits = _full_forward_logits(model, rows, inputs)
    reference = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(ids)))
    for i, (prompt, completion) in enumerate(zip(prompts, together, strict=True)):
        span = slice(len(prompt), len(rows[i]))
        np.testing.assert_allclose(completion.logprobs, reference[i, span], atol=1e-4, rtol=0)
    # The images matter: other pixels give other log-probs for the same tokens.
    other = [dict(x) for x in inputs]
    other[0]["pixel_values"] = -other[0]["pixel_values"]
    _, changed = _full_forward_logits(model, rows, other)
    assert np.abs(changed[0] - logits[0]).max() > 1e-3


def test_rows_with_different_images_and_padding_equal_each_row_alone(case):
    # Alone, the first prompt lands in the 16-token bucket: other left padding, other patch rows.
    sampler, prompts, inputs, together = case
    for prompt, row_inputs, joint in zip(prompts[:2], inputs[:2], together[:2], strict=True):
        (alone,) = sampler.generate([prompt], greedy=True, prefill_inputs=[row_inputs])
        assert alone.tokens == joint.tokens
        np.testing.assert_allclose(alone.logprobs, joint.logprobs, atol=1e-5, rtol=0)


def test_prefill_positions_continue_after_the_mrope_offset(model):
    prompts, inputs = _prompts(model.config)
    length = max(map(len, prompts))
    ids = np.zeros((3, length), np.int32)
    mask = np.zeros((3, length), np.int32)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt) :], mask[i, length - len(prompt) :] = prompt, 1
    prepared = prepare_prefill_inputs(model.config, ids, mask, inputs)
    assert prepared["pixel_values"].shape == (64, model.config.vision.patch_dim)
    assert prepared["image_tables"].segment.shape == (64,)

    # The positions alone decide `next_position_b`, so the prefill can leave the pixels out.
    @nnx.jit
    def prefill(model, ids, mask, positions):
        return model.prefill(ids, mask, cache_size=length + 2, position_ids=positions)

    _, cache = prefill(model, ids, mask, prepared["position_ids"])
    # rope_index's delta plus the number of real tokens: where transformers continues.
    c = model.config
    types = np.where(ids == c.image_token_id, 1, np.where(ids == c.video_token_id, 2, 0))
    _, deltas = rope_index(
        ids,
        types,
        np.concatenate([inputs[0]["image_grid_thw"], inputs[1]["image_grid_thw"]]),
        inputs[2]["video_grid_thw"],
        mask,
    )
    expected = deltas[:, 0] + mask.sum(-1)
    np.testing.assert_array_equal(np.asarray(cache.next_position_b), expected)
    assert (expected < mask.sum(-1)).all()  # visual tokens advance positions by less than one


def test_prefill_inputs_are_checked(case):
    sampler, prompts, inputs, _ = case
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        sampler.generate(prompts, prefill_inputs=inputs[:2])
    with pytest.raises(ValueError, match="unknown prefill inputs"):
        sampler.generate(prompts[:1], prefill_inputs=[{**inputs[0], "pixels": 1}])
    with pytest.raises(ValueError, match="no image pixel values"):
        sampler.generate(prompts[:1], prefill_inputs=[None])
