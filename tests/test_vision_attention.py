"""Blocked vision attention: equal to the dense masked softmax, lean in memory, remat-safe.

Every kernel test runs at one shape (N=100 rows, 2 heads of 8, tiles of 16 rows, so 7 tiles of
which the last is padded) through module-level jitted functions: each compile costs seconds
here, the layouts are data.
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from vimrag_jax.models.qwen3_vl import Qwen3VLConfig
from vimrag_jax.models.qwen3_vl_vision import Qwen3VLVisionConfig, VisionTower, vision_tables
from vimrag_jax.models.vision_attention import (
    block_ranges,
    blocked_segment_attention,
    dense_segment_attention,
    visited_block_pairs,
)

N, HEADS, HEAD_DIM, BLOCK = 100, 2, 8, 16
# bfloat16 keeps 8 significant bits (relative step 2^-8 = 0.4 %): q, k, v, the probabilities and
# the output are each rounded once, on values of magnitude ~1.
BF16_ATOL = 3e-2


def _blocked(q, k, v, segment):
    return blocked_segment_attention(q, k, v, segment, block=BLOCK)


def _value_and_vjp(attention, q, k, v, segment, cotangent):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, segment), q, k, v)
    return out, vjp(cotangent)


_blocked_jit = jax.jit(_blocked)
_dense_jit = jax.jit(dense_segment_attention)
_blocked_vjp = jax.jit(functools.partial(_value_and_vjp, _blocked))
_dense_vjp = jax.jit(functools.partial(_value_and_vjp, dense_segment_attention))


def _qkv(seed: int, dtype=jnp.float32, n: int = N):
    rng = np.random.default_rng(seed)
    arrays = rng.standard_normal((4, n, HEADS, HEAD_DIM)).astype(np.float32)
    return tuple(jnp.asarray(a, dtype) for a in arrays)


@st.composite
def layouts(draw, n: int = N):
    """`int32[n]` segment ids: contiguous runs (one per frame, as `vision_tables` lays them out)
    of random lengths, then -1 padding rows; sometimes rows shuffled, so segments and padding
    are split into several runs."""
    segment = np.full(n, -1, np.int32)
    row, ident = 0, 0
    while row < n and draw(st.integers(0, 9)):  # stops early (padding) one time in ten
        length = draw(st.sampled_from([1, 2, 3, 5, 16, 17, 40, n]))
        segment[row : row + length] = ident
        row, ident = row + length, ident + 1
    if draw(st.integers(0, 4)) == 0:
        segment = segment[np.asarray(draw(st.permutations(range(n))))]
    return segment


def _named_layouts() -> dict[str, np.ndarray]:
    pad = np.full(N, -1, np.int32)
    spanning = pad.copy()
    spanning[3:90] = 0  # one segment across six tiles, padding at both ends of the tiles
    spanning[:3] = 1
    tiny = np.repeat(np.arange(50), 2).astype(np.int32)  # 50 segments of two rows
    tiny[-13:] = -1
    frames = np.repeat(np.arange(4), 25).astype(np.int32)  # tile borders inside segments
    return {"padding_only": pad, "spanning": spanning, "tiny": tiny, "frames": frames}


def _assert_matches_dense(segment: np.ndarray, seed: int) -> None:
    q, k, v, cotangent = _qkv(seed)
    out, grads = _blocked_vjp(q, k, v, segment, cotangent)
    ref, ref_grads = _dense_vjp(q, k, v, segment, cotangent)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


@settings(max_examples=25)
@given(segment=layouts(), seed=st.integers(0, 2**16))
def test_blocked_equals_dense_on_random_layouts(segment, seed):
    _assert_matches_dense(segment, seed)


@pytest.mark.parametrize("name", sorted(_named_layouts()))
def test_blocked_equals_dense_on_edge_layouts(name):
    _assert_matches_dense(_named_layouts()[name], seed=len(name))


@settings(max_examples=40)
@given(segment=layouts())
def test_block_ranges_are_the_tiles_that_share_a_segment(segment):
    padded = np.concatenate([segment, np.full(-N % BLOCK, -1, np.int32)])
    # Rows meet when their segments are equal, padding rows (-1) only themselves.
    itself = np.eye(len(padded), dtype=bool)
    allowed = (padded[:, None] == padded[None, :]) & ((padded >= 0)[:, None] | itself)
    tiles = len(padded) // BLOCK
    shares = allowed.reshape(tiles, BLOCK, tiles, BLOCK).any(axis=(1, 3))
    lo, hi = block_ranges(jnp.asarray(padded), BLOCK)
    for b, row in enumerate(shares):
        assert (int(lo[b]), int(hi[b])) == (row.argmax(), len(row) - 1 - row[::-1].argmax())


def test_many_rows_of_images_cost_what_each_row_costs():
    # The sampler's prefill runs the images of all prompts of a batch through one tower call:
    # the tiles visited grow with the number of images, not with the square of all patches.
    config = _tower_config()
    row = vision_tables(np.array([[1, 32, 32], [2, 16, 20]]), config).segment  # 1664 patches
    rows = 8
    batch = vision_tables(np.tile([[1, 32, 32], [2, 16, 20]], (rows, 1)), config).segment
    block = 256
    one, many = int(visited_block_pairs(row, block)), int(visited_block_pairs(batch, block))
    # A frame of L patches touches at most ceil(L / block) + 1 tiles wherever it starts, and a
    # tile's range is the union of its frames' tiles: at most the sum of squared spans.
    lengths = np.bincount(batch)
    assert many <= np.sum((-(-lengths // block) + 1) ** 2) <= 2 * rows * one
    assert many < (batch.shape[0] // block + 1) ** 2 / 10  # all tile pairs
    # Padding rows attend only to themselves: a bucket padded far past the patches visits the
    # diagonal tiles only.
    padded = vision_tables(np.array([[1, 8, 8]]), config, pad_to=4096).segment
    assert int(visited_block_pairs(padded, block)) == 4096 // block


def test_vmapped_rows_each_match_dense():
    # visual_hidden_states vmaps the tower over segments: loops of different lengths per row.
    names = ["spanning", "tiny", "padding_only"]
    segments = np.stack([_named_layouts()[name] for name in names])
    q, k, v, cotangent = (jnp.stack([a] * 3) for a in _qkv(3))
    out, grads = jax.jit(jax.vmap(_blocked_vjp))(q, k, v, segments, cotangent)
    for i in range(3):
        ref, ref_grads = _dense_vjp(q[i], k[i], v[i], segments[i], cotangent[i])
        np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5)


def _dot_dtypes(jaxpr) -> set[tuple[str, ...]]:
    """(input dtypes..., output dtype) of every dot_general, sub-jaxprs (loops) included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.add((*(str(x.aval.dtype) for x in eqn.invars), str(eqn.outvars[0].aval.dtype)))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found |= _dot_dtypes(sub)
    return found


def test_bfloat16_matmuls_with_float32_statistics_stay_close():
    q, k, v, cotangent = _qkv(5)
    segment = _named_layouts()["frames"]
    q16, k16, v16, cot16 = (x.astype(jnp.bfloat16) for x in (q, k, v, cotangent))
    out, grads = _blocked_vjp(q16, k16, v16, segment, cot16)
    ref, ref_grads = _dense_vjp(q, k, v, segment, cotangent)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=BF16_ATOL)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2 * BF16_ATOL)
    # Every matmul, forward and backward, takes bfloat16 operands and accumulates in float32.
    jaxpr = jax.make_jaxpr(_value_and_vjp, static_argnums=0)(
        _blocked, q16, k16, v16, segment, cot16
    )
    assert _dot_dtypes(jaxpr.jaxpr) == {("bfloat16", "bfloat16", "float32")}


def test_memory_grows_with_the_tile_not_the_square_of_patches():
    # Compiled, never run: XLA's own account of the scratch memory at the paper's visual budget.
    n, heads, head_dim = 9_600, 16, 72

    def temp_bytes(attention, n: int = n) -> int:  # forward and backward
        def loss(q, k, v, segment):
            return jnp.sum(attention(q, k, v, segment))

        qkv = jax.ShapeDtypeStruct((n, heads, head_dim), jnp.float32)
        segment = jax.ShapeDtypeStruct((n,), jnp.int32)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(qkv, qkv, qkv, segment).compile().memory_analysis().temp_size_in_bytes

    scores = n * n * heads * 4
    blocked_attention = functools.partial(blocked_segment_attention, block=512)
    dense = temp_bytes(dense_segment_attention)
    blocked = temp_bytes(blocked_attention)
    assert dense >= scores  # the measure sees the [heads, N, N] matrix when there is one
    # What remains is a few [N, heads, head_dim] arrays (inputs padded to whole tiles, outputs,
    # gradients) and one tile's [heads, 512, 512] working set: linear in N.
    assert blocked < scores / 10
    assert temp_bytes(blocked_attention, 2 * n) < 2.2 * blocked


# ---- the tower --------------------------------------------------------------------------------


def _tower_config(**fields) -> Qwen3VLVisionConfig:
    base = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        out_hidden_size=24,
        num_position_embeddings=25,
        deepstack_visual_indexes=(0,),
        patch_size=2,
        attention_block=16,
    )
    return Qwen3VLVisionConfig(**{**base, **fields})


def _tower_inputs():
    grid = np.array([[1, 6, 4], [2, 4, 4], [1, 2, 2], [1, 4, 8]])  # 24 + 32 + 4 + 32 patches
    tables = vision_tables(grid, _tower_config(), pad_to=100)  # 8 padding rows
    pixels = np.random.default_rng(0).standard_normal((100, _tower_config().patch_dim))
    return jnp.asarray(pixels, jnp.float32), tables


def _tower_loss(tower, pixels, tables):
    merged, deepstack = tower(pixels, tables)
    return jnp.sum(jnp.sin(merged[:23])) + jnp.sum(jnp.cos(deepstack[:, :23])), (merged, deepstack)


_tower_grad = nnx.jit(nnx.value_and_grad(_tower_loss, has_aux=True))


def _tower(**fields) -> VisionTower:
    return VisionTower(_tower_config(**fields), rngs=nnx.Rngs(0))


def test_tower_blocked_equals_dense():
    pixels, tables = _tower_inputs()
    (_, (merged, deep)), grads = _tower_grad(_tower(), pixels, tables)
    (_, (ref_merged, ref_deep)), ref_grads = _tower_grad(_tower(attention="dense"), pixels, tables)
    np.testing.assert_allclose(merged[:23], ref_merged[:23], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(deep[:, :23], ref_deep[:, :23], rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_tower_remat_gives_identical_values_and_gradients():
    pixels, tables = _tower_inputs()
    (loss, _), grads = _tower_grad(_tower(), pixels, tables)
    remat = _tower(remat=True)
    (remat_loss, _), remat_grads = _tower_grad(remat, pixels, tables)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    # The same operations, recomputed: only XLA's fusion (so float summation order) may differ.
    for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    # The checkpoint is really there (one per block), and only with remat.
    jaxpr = str(jax.make_jaxpr(lambda m: m(pixels, tables))(remat))
    assert jaxpr.count("remat") + jaxpr.count("checkpoint") >= 2
    plain = str(jax.make_jaxpr(lambda m: m(pixels, tables))(_tower()))
    assert "remat" not in plain and "checkpoint" not in plain


def test_tower_remat_shrinks_what_the_backward_keeps():
    # Traced only: the residuals jax.vjp hands from the forward to the backward pass, at 4,096
    # patches. Without remat every block keeps its attention and MLP activations.
    def residual_bytes(remat: bool) -> int:
        config = _tower_config(remat=remat, depth=4)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: VisionTower(config, rngs=nnx.Rngs(0))))
        tables = vision_tables(np.array([[1, 64, 64]]), config)
        pixels = jax.ShapeDtypeStruct((4096, config.patch_dim), jnp.float32)

        def loss(state, pixels):
            merged, deepstack = nnx.merge(graphdef, state)(pixels, tables)
            return jnp.sum(merged) + jnp.sum(deepstack)

        vjp = jax.eval_shape(lambda s, p: jax.vjp(loss, s, p)[1], state, pixels)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp))

    assert residual_bytes(remat=True) < residual_bytes(remat=False) / 4


def test_model_remat_flag_reaches_the_vision_tower():
    from vimrag_jax.models.presets import PRESETS  # noqa: PLC0415 - only this test needs it

    hf = PRESETS["tiny-vl"]
    assert Qwen3VLConfig.from_hf(hf, remat=True).vision.remat
    assert not Qwen3VLConfig.from_hf(hf).vision.remat


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"attention": "sparse"}, "attention='sparse'"), ({"attention_block": 0}, "attention_block")],
)
def test_bad_attention_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        _tower_config(**fields)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_blocks_equal_unrolled(remat):
    # 5 blocks with DeepStack taps after blocks 1 and 2: runs [0, 1] (scanned), [2] (one
    # block), [3, 4] (scanned); under vmap as the learner runs the tower, one row per segment.
    fields = dict(depth=5, deepstack_visual_indexes=(1, 2), remat=remat)
    pixels, tables = _tower_inputs()
    (loss, (merged, deep)), grads = _tower_grad(_tower(**fields), pixels, tables)
    scanned = _tower(**fields, scan_blocks=True)
    (got_loss, (got_merged, got_deep)), got_grads = _tower_grad(scanned, pixels, tables)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    np.testing.assert_allclose(got_merged, merged, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_deep, deep, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    def two_block_scans(tower) -> int:  # the attention's own loops run over 7 tiles
        traced = jax.make_jaxpr(lambda m: jax.vmap(m, in_axes=(0, None))(pixels[None], tables))
        return str(traced(tower)).count("length=2")

    assert two_block_scans(scanned) == 2 and two_block_scans(_tower(**fields)) == 0
