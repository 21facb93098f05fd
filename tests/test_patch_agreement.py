"""The visual patch bucket agreed across processes: `learner.pad_patches` pads a process's
vision inputs to a larger bucket without changing what the policy computes, and the planner's
`Learner.lower` takes vision inputs as shapes alone.

(The two-process run with images in different buckets is in `test_multiprocess.py`.)"""

from __future__ import annotations

import jax
import multiprocess_learner as job
import numpy as np
import pytest
from flax import nnx

from vimrag_jax.learner import (
    PATCH_AXIS_PADDING,
    loss_inputs,
    pad_patches,
    patch_rows,
    trim_tokens,
)
from vimrag_jax.parallel.step import policy_logprobs, visual_inputs
from vimrag_jax.sampling.logprobs import VISUAL_KEYS


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    """Process 0's loss inputs of the two-process VL job: its images fit the 64-patch
    bucket."""
    batch = job.vl_stage()(job.vl_local_rows(job.vl_global_batch(0), 0))
    return loss_inputs(batch, visual=True)


def test_pad_patches_adds_inert_rows_to_every_vision_array(inputs):
    assert patch_rows(inputs) == 64
    padded = pad_patches(inputs, 128)
    assert patch_rows(padded) == 128 and set(padded) == set(inputs)
    for key, value in inputs.items():
        if key not in PATCH_AXIS_PADDING:  # tokens, MRoPE positions, the placeholder index
            assert padded[key] is value
            continue
        assert padded[key].dtype == value.dtype
        np.testing.assert_array_equal(padded[key][:, :64], value)
        assert (padded[key][:, 64:] == PATCH_AXIS_PADDING[key]).all(), key
    assert (padded["vision_segment"][:, 64:] == -1).all()
    # Already the agreed size, or a text-only batch: unchanged.
    assert all(pad_patches(padded, 128)[key] is padded[key] for key in padded)
    text = {key: value for key, value in inputs.items() if key not in VISUAL_KEYS}
    assert patch_rows(text) == 0 and pad_patches(text, 128).keys() == text.keys()
    with pytest.raises(ValueError, match="cannot pad 128 patch rows down to 64"):
        pad_patches(padded, 64)
    with pytest.raises(ValueError, match="disagree"):
        patch_rows({**inputs, "vision_segment": padded["vision_segment"]})


@nnx.jit
def _logprobs(model, tokens, visual):
    return policy_logprobs(model, tokens, visual)


def test_padding_patches_leave_the_policys_logprobs_unchanged(inputs):
    # The learner's forward on the rows as their own pipeline padded them (64 patches) and in
    # the bucket another process needed (128): the same log-probs, even when the padding
    # rows hold arbitrary pixels and interpolation weights (nothing reads them).
    model = job.vl_model()
    inputs = trim_tokens(inputs, job.LENGTH_BUCKET)
    mask = inputs["loss_mask"]
    own = np.asarray(_logprobs(model, inputs["tokens"], visual_inputs(inputs)))
    padded = pad_patches(inputs, 128)
    rng = np.random.default_rng(0)
    for key in ("pixel_values", "vision_interp_weight"):
        padded[key][:, 64:] = rng.standard_normal(padded[key][:, 64:].shape)
    theirs = np.asarray(_logprobs(model, padded["tokens"], visual_inputs(padded)))
    np.testing.assert_allclose(theirs[mask], own[mask], rtol=1e-5, atol=1e-6)
    # The real patches are read: other pixels there give other log-probs.
    changed = {**padded, "pixel_values": padded["pixel_values"].copy()}
    changed["pixel_values"][:, :64] *= -1
    other = np.asarray(_logprobs(model, changed["tokens"], visual_inputs(changed)))
    assert np.abs(other[mask] - own[mask]).max() > 1e-3


def test_the_planners_lower_takes_vision_inputs_as_shapes(inputs):
    learner = job.vl_learner()
    assert learner.takes_visuals and learner.state is None  # no parameters are ever made
    abstract = {
        key: jax.ShapeDtypeStruct(value.shape, value.dtype)
        for key, value in trim_tokens(inputs, job.LENGTH_BUCKET).items()
    }
    lowered = learner.lower(abstract)
    _, batch = lowered.args_info[0]
    assert batch["pixel_values"].shape == inputs["pixel_values"].shape
    assert batch["vision_segment"].shape == inputs["vision_segment"].shape
    assert batch["ref_logprobs"].shape == batch["tokens"].shape  # the KL reference's input
