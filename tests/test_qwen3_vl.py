"""Qwen3-VL port: logits parity with transformers, host-side tables, clear input errors."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec
from tiny_models import tiny_qwen3
from transformers import vision_utils

from vimrag_jax.models import from_pretrained, init_model, save_pretrained
from vimrag_jax.models.mrope import rope_index
from vimrag_jax.models.qwen3_vl import Qwen3VLConfig, prepare_inputs
from vimrag_jax.models.qwen3_vl_vision import vision_tables
from vimrag_jax.parallel.mesh import make_mesh
from vimrag_jax.parallel.sharding import logical_to_mesh_spec, param_shardings

IMAGE, VIDEO, START, END = 150, 151, 152, 153
_TEXT = tiny_qwen3(
    vocab_size=160,
    num_hidden_layers=3,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10_000.0,
        "mrope_section": [2, 3, 3],
        "mrope_interleaved": True,
    },
)
_VISION = dict(
    depth=3,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    patch_size=4,
    temporal_patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=64,
    num_position_embeddings=25,  # a 5x5 table, resampled to every grid
    deepstack_visual_indexes=[0, 2],
)
_PATCH_DIM = 3 * 2 * 4 * 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3_vl")
    torch.manual_seed(0)
    config = transformers.Qwen3VLConfig(
        text_config=_TEXT,
        vision_config=_VISION,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    theirs = transformers.Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        # RMSNorm/LayerNorm scales start at 1 and biases at 0: randomise them so a mis-mapped
        # norm cannot go unnoticed.
        for name, param in theirs.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    theirs.save_pretrained(directory, safe_serialization=True)
    return directory, theirs, from_pretrained(directory)


# ---- building processor-style inputs ------------------------------------------------------------


def _text(rng, n):
    return list(rng.integers(0, IMAGE, n))


def _image_tokens(grid):
    return [START] + [IMAGE] * (int(np.prod(grid)) // 4) + [END]


def _video_tokens(rng, grid):
    # transformers 5.23 lays a video out frame by frame: "<t seconds>" text, then the frame's
    # placeholders between vision_start/vision_end. Random text ids stand for the timestamp.
    t, h, w = grid
    tokens = []
    for _ in range(t):
        tokens += _text(rng, 3) + [START] + [VIDEO] * (h * w // 4) + [END]
    return tokens


def _batch(rng, rows, *, pad=0):
    """Left-pads token rows; returns processor-style numpy inputs (pixels added by the caller)."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :] = row
        mask[b, length - len(row) :] = 1
    types = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}


def _pixels(rng, grids):
    grids = np.asarray(grids, np.int64)
    rows = int(grids.prod(-1).sum())
    return rng.standard_normal((rows, _PATCH_DIM)).astype(np.float32), grids


def _case(name):
    rng = np.random.default_rng(len(name))
    if name == "text":
        ids = rng.integers(0, IMAGE, (2, 11))
        return {"input_ids": ids}
    if name == "images":
        # Row 0: two images of different grids; row 1: one other image, left-padded.
        grids = [(1, 4, 6), (1, 6, 4), (1, 4, 4)]
        rows = [
            _text(rng, 4) + _image_tokens(grids[0]) + _text(rng, 2) + _image_tokens(grids[1]),
            _text(rng, 3) + _image_tokens(grids[2]) + _text(rng, 5),
        ]
        inputs = _batch(rng, rows)
        inputs["pixel_values"], inputs["image_grid_thw"] = _pixels(rng, grids)
        return inputs
    if name == "video":
        # Row 0: a two-frame video; row 1 (left-padded): an image, then another video.
        videos, images = [(2, 4, 4), (2, 4, 6)], [(1, 4, 4)]
        rows = [
            _text(rng, 3) + _video_tokens(rng, videos[0]) + _text(rng, 6),
            _text(rng, 2) + _image_tokens(images[0]) + _video_tokens(rng, videos[1]),
        ]
        inputs = _batch(rng, rows)
        inputs["pixel_values"], inputs["image_grid_thw"] = _pixels(rng, images)
        inputs["pixel_values_videos"], inputs["video_grid_thw"] = _pixels(rng, videos)
        return inputs
    raise KeyError(name)


def _torch_logits(model, inputs):
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
    return out.logits.float().numpy()


@nnx.jit
def _jitted(model, prepared):
    return model(**prepared)


_CASES = ("text", "images", "video")


@pytest.fixture(scope="module")
def jitted_logits(pair):
    _, _, ours = pair
    cache = {}

    def get(name):
        if name not in cache:
            prepared = prepare_inputs(ours.config, **_case(name))
            cache[name] = np.asarray(_jitted(ours, prepared))
        return cache[name]

    return get


# ---- parity -----------------------------------------------------------------------------------


def test_config_reads_hf_dict(pair):
    directory, theirs, ours = pair
    config = Qwen3VLConfig.from_hf(json.loads((directory / "config.json").read_text()))
    assert config == ours.config
    assert config.mrope_section == (2, 3, 3)
    assert config.text.rope_theta == 10_000.0
    assert config.vision.deepstack_visual_indexes == (0, 2)
    assert (config.image_token_id, config.video_token_id) == (IMAGE, VIDEO)
    assert config.vision.num_grid_per_side == 5


def test_config_reads_transformers4_layout():
    # Hub checkpoints written by transformers 4.5x keep MRoPE in `rope_scaling` and the theta
    # at the top of text_config; the vision config has no rope entry.
    text = {k: v for k, v in _TEXT.items() if k != "rope_parameters"}
    text |= {
        "rope_theta": 5_000_000.0,
        "rope_scaling": {
            "mrope_interleaved": True,
            "mrope_section": [2, 3, 3],
            "rope_type": "default",
        },
    }
    hf = {"text_config": text, "vision_config": _VISION, "tie_word_embeddings": True}
    config = Qwen3VLConfig.from_hf(hf, dtype="bfloat16")
    assert config.text.rope_theta == 5_000_000.0 and config.mrope_section == (2, 3, 3)
    assert config.text.tie_word_embeddings and config.vision.rope_theta == 10_000.0
    assert config.dtype == config.vision.dtype == "bfloat16"
    assert config.image_token_id == 151655  # transformers' default
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen3VLConfig.from_hf(
            hf | {"text_config": text | {"rope_scaling": {"mrope_section": [2, 2, 2]}}}
        )


def test_tied_checkpoint_loads_without_head(tmp_path):
    # Qwen3-VL 2B/4B tie the LM head to the embeddings.
    torch.manual_seed(1)
    config = transformers.Qwen3VLConfig(
        text_config=_TEXT, vision_config=_VISION, tie_word_embeddings=True
    )
    theirs = transformers.Qwen3VLForConditionalGeneration(config)
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    ours = from_pretrained(tmp_path)
    assert ours.lm_head_dv is None and ours.config.text.tie_word_embeddings
    np.testing.assert_array_equal(ours.embed_vd[...], theirs.lm_head.weight.detach().numpy())


def test_every_param_has_known_logical_axes(pair):
    _, _, ours = pair
    for path, variable in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == variable.get_value().ndim, path
        logical_to_mesh_spec(axes)  # raises on an unknown name


@pytest.mark.parametrize("name", _CASES)
def test_logits_match_transformers(pair, jitted_logits, name):
    _, theirs, _ = pair
    inputs = _case(name)
    expected = _torch_logits(theirs, inputs)
    got = jitted_logits(name)
    assert got.shape == expected.shape and got.dtype == np.float32
    valid = np.asarray(inputs.get("attention_mask", np.ones(got.shape[:2]))).astype(bool)
    error = np.abs(got - expected)[valid].max() / np.abs(expected[valid]).max()
    assert error < 1e-4, f"{name}: relative error {error:.2e}"


def test_bfloat16_compute_stays_close(pair, jitted_logits):
    directory, _, _ = pair
    ours_bf16 = from_pretrained(directory, dtype="bfloat16")
    got = np.asarray(_jitted(ours_bf16, prepare_inputs(ours_bf16.config, **_case("images"))))
    expected = jitted_logits("images")
    valid = _case("images")["attention_mask"].astype(bool)
    error = np.abs(got - expected)[valid].max() / np.abs(expected[valid]).max()
    assert got.dtype == np.float32 and error < 3e-2, f"bf16 relative error {error:.2e}"


def test_jit_equals_eager(pair, jitted_logits):
    _, _, ours = pair
    eager = np.asarray(ours(**_case("text")))
    np.testing.assert_allclose(eager, jitted_logits("text"), rtol=1e-5, atol=1e-5)


# ---- host-side tables -------------------------------------------------------------------------


def _their_rope_index(theirs, inputs):
    tensors = {
        k: torch.from_numpy(np.asarray(inputs[k]))
        for k in ("image_grid_thw", "video_grid_thw", "attention_mask")
        if k in inputs
    }
    positions, deltas = theirs.model.get_rope_index(
        torch.from_numpy(inputs["input_ids"]),
        torch.from_numpy(inputs["mm_token_type_ids"]),
        **tensors,
    )
    return positions.numpy(), deltas.numpy()


def _our_rope_index(inputs):
    return rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"),
        inputs.get("attention_mask"),
        spatial_merge_size=2,
    )


@pytest.mark.parametrize("name", ["images", "video"])
def test_rope_index_matches_transformers_on_cases(pair, name):
    _, theirs, _ = pair
    inputs = _case(name)
    ours, our_deltas = _our_rope_index(inputs)
    expected, their_deltas = _their_rope_index(theirs, inputs)
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(our_deltas, their_deltas)


_piece = st.one_of(
    st.tuples(st.just("text"), st.integers(1, 4)),
    st.tuples(st.just("image"), st.sampled_from([(1, 2, 2), (1, 4, 2), (1, 2, 6), (2, 4, 4)])),
    st.tuples(st.just("video"), st.sampled_from([(1, 2, 2), (3, 2, 4), (2, 6, 2)])),
)


@settings(max_examples=25)
@given(layout=st.lists(st.lists(_piece, min_size=1, max_size=5), min_size=1, max_size=3))
def test_rope_index_matches_transformers_on_random_layouts(pair, layout):
    _, theirs, _ = pair
    rng = np.random.default_rng(0)
    rows, images, videos = [], [], []
    for pieces in layout:
        row = []
        for kind, arg in pieces:
            if kind == "text":
                row += _text(rng, arg)
            elif kind == "image":
                row += _image_tokens(arg)
                images.append(arg)
            else:
                row += _video_tokens(rng, arg)
                videos.append(arg)
        rows.append(row)
    inputs = _batch(rng, rows)
    if images:
        inputs["image_grid_thw"] = np.asarray(images, np.int64)
    if videos:
        inputs["video_grid_thw"] = np.asarray(videos, np.int64)
    ours, our_deltas = _our_rope_index(inputs)
    expected, their_deltas = _their_rope_index(theirs, inputs)
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(our_deltas, their_deltas)


def test_vision_tables_match_transformers(pair):
    _, _, ours = pair
    grid = np.array([[1, 4, 6], [2, 6, 4], [1, 2, 2], [1, 10, 8]], np.int64)
    tables = vision_tables(grid, ours.config.vision)
    index, weight = vision_utils.get_vision_interpolation_indices_and_weights(
        torch.from_numpy(grid),
        num_grid_per_side=5,
        mode="bilinear",
        align_corners=True,
        spatial_merge_size=2,
    )
    np.testing.assert_array_equal(tables.interp_index, index.numpy())
    np.testing.assert_array_equal(tables.interp_weight, weight.numpy())
    hw = vision_utils.get_vision_position_ids(torch.from_numpy(grid), 2)
    np.testing.assert_array_equal(tables.rotary_hw, hw.numpy())
    # One attention segment per frame, as transformers' cu_seqlens.
    cu_seqlens = vision_utils.get_vision_cu_seqlens(torch.from_numpy(grid)).numpy()
    expected_segment = np.repeat(np.arange(len(cu_seqlens) - 1), np.diff(cu_seqlens))
    np.testing.assert_array_equal(tables.segment, expected_segment)


def test_padded_vision_tower_matches_transformers(pair):
    # Padding rows (segment -1) keep the tower's input shape fixed without touching the features.
    _, theirs, ours = pair
    pixels, grid = _pixels(np.random.default_rng(1), [(1, 4, 4), (2, 2, 6)])
    with torch.no_grad():
        out = theirs.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid))
    padded_pixels = np.concatenate([pixels, np.ones((12, _PATCH_DIM), np.float32)])
    padded = vision_tables(grid, ours.config.vision, pad_to=pixels.shape[0] + 12)
    assert padded.segment[-1] == -1
    tower = nnx.jit(lambda tower, x, tables: tower(x, tables))
    merged, deepstack = tower(ours.visual, padded_pixels, padded)
    rows = pixels.shape[0] // 4
    assert merged.shape == (rows + 3, 64) and deepstack.shape == (2, rows + 3, 64)
    np.testing.assert_allclose(merged[:rows], out.pooler_output.numpy(), rtol=1e-4, atol=1e-5)
    for ours_k, theirs_k in zip(deepstack, out.deepstack_features, strict=True):
        np.testing.assert_allclose(ours_k[:rows], theirs_k.numpy(), rtol=1e-4, atol=1e-5)


# ---- errors -----------------------------------------------------------------------------------


def test_placeholder_count_must_match_grid(pair):
    _, _, ours = pair
    inputs = _case("images")
    inputs["image_grid_thw"] = inputs["image_grid_thw"].copy()
    # Same patch and token totals, but the first placeholder run no longer fits its grid.
    inputs["image_grid_thw"][:2] = [(1, 4, 4), (1, 4, 8)]
    with pytest.raises(ValueError, match="does not match grid"):
        prepare_inputs(ours.config, **inputs)
    inputs = _case("images")
    inputs["input_ids"] = inputs["input_ids"].copy()
    inputs["input_ids"][0, -2] = 5  # one placeholder fewer than the grids need
    with pytest.raises(ValueError, match=r"hold 15 image placeholder tokens .* gives 16"):
        prepare_inputs(ours.config, **inputs)


def test_bad_grids_and_pixels_are_refused(pair):
    _, _, ours = pair
    inputs = _case("images")
    bad_grid = dict(inputs, image_grid_thw=np.array([[1, 4, 6], [1, 6, 4], [1, 3, 4]]))
    with pytest.raises(ValueError, match=r"\(1, 3, 4\).*spatial_merge_size=2"):
        prepare_inputs(ours.config, **bad_grid)
    short = dict(inputs, pixel_values=inputs["pixel_values"][:-4])
    with pytest.raises(ValueError, match="needs \\(64, 96\\)"):
        prepare_inputs(ours.config, **short)
    no_grid = {k: v for k, v in inputs.items() if k != "image_grid_thw"}
    with pytest.raises(ValueError, match="without image_grid_thw"):
        prepare_inputs(ours.config, **no_grid)
    no_pixels = {k: v for k, v in inputs.items() if k not in ("image_grid_thw", "pixel_values")}
    with pytest.raises(ValueError, match="no image pixel values"):
        prepare_inputs(ours.config, **no_pixels)


def test_traced_grids_ask_for_host_preparation(pair):
    _, _, ours = pair
    inputs = _case("images")

    @nnx.jit
    def unprepared(model, inputs):
        return model(**inputs)

    with pytest.raises(TypeError, match="prepare_inputs"):
        unprepared(ours, inputs)


# ---- export, sharded load, remat ----------------------------------------------------------------


def _flat_params(model) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, path)): np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def test_export_loads_in_transformers_with_equal_logits(pair, jitted_logits, tmp_path):
    _, theirs, ours = pair
    save_pretrained(ours, tmp_path, dtype="float32", extra_config={"pad_token_id": 0})
    reread = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32
    ).eval()
    assert reread.config.text_config.rope_parameters == theirs.config.text_config.rope_parameters
    inputs = _case("images")
    expected = _torch_logits(reread, inputs)
    got = jitted_logits("images")
    valid = inputs["attention_mask"].astype(bool)
    error = np.abs(got - expected)[valid].max() / np.abs(expected[valid]).max()
    assert error < 1e-4, f"relative error {error:.2e}"
    back = from_pretrained(tmp_path)
    assert back.config == ours.config
    for key, value in _flat_params(ours).items():
        np.testing.assert_array_equal(_flat_params(back)[key], value, err_msg=key)


def test_sharded_load_equals_unsharded(pair):
    directory, _, ours = pair
    mesh = make_mesh(1, 4, 2)
    sharded = from_pretrained(directory, mesh=mesh)
    expected = dict(nnx.to_flat_state(param_shardings(nnx.state(sharded, nnx.Param), mesh)))
    plain = _flat_params(ours)
    split = 0
    for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        key, array = "/".join(map(str, path)), var.get_value()
        assert array.sharding == expected[path].get_value(), key
        np.testing.assert_array_equal(np.asarray(array), plain[key], err_msg=key)
        split += array.sharding.spec != PartitionSpec()
    assert split >= 10


def test_remat_reaches_the_vl_decoder():
    ids = np.arange(6, dtype=np.int32)[None]
    for remat in (False, True):

        def build(remat=remat):
            return init_model("tiny-vl", rngs=nnx.Rngs(0), remat=remat)

        model = nnx.eval_shape(build)
        assert model.config.text.remat == remat
        assert ("remat" in str(jax.make_jaxpr(lambda m: m(ids))(model))) == remat
