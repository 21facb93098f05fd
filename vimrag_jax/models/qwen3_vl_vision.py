"""The Qwen3-VL vision tower in Flax NNX: patch rows in, merged visual tokens and DeepStack out.

The tower is split in two so that it compiles once per patch count rather than once per image
layout:

- **host side** (`vision_tables`, NumPy): everything that depends on the grid sizes
  `grid_thw[n] = (t, h, w)` — the bilinear resampling of the learned position table to each
  grid, the (row, column) of every patch for the 2D rotary embedding, and the attention segment
  of every patch (one segment per frame, as transformers' `cu_seqlens`). The processor returns
  `grid_thw` as concrete arrays, so this costs nothing at trace time.
- **device side** (`VisionTower.__call__`, jit-able): patch embedding, blocks whose attention
  stays within each patch's segment, the 2x2 spatial merger and the DeepStack mergers. All
  shapes depend only on the number of patch rows.

Attention is `vimrag_jax.models.vision_attention.blocked_segment_attention` by default: flash
attention over tiles of `attention_block` rows that visits only tiles whose rows can share a
segment, so memory is O(block²·heads) instead of an `[heads, N, N]` score matrix (≈5.8 GB per
layer at ~9.5k patches), and a call holding the images of many prompts costs what encoding them
one by one would. `attention="dense"` keeps the plain masked softmax (tiny inputs, reference).
With `remat`, each vision block is recomputed in the backward pass (as the decoder's layers
with the text config's `remat`), so the tower keeps one `[N, hidden]` activation per block.

Patch rows arrive as transformers' processor lays them out: `pixel_values[N, C*T*P*P]`, images
and frames concatenated, patches of each frame in spatial-merge-block order (the four patches of
one merged token are consecutive).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimrag_jax.models.params import dense_init, param
from vimrag_jax.models.vision_attention import blocked_segment_attention, dense_segment_attention

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}
_LAYER_NORM_EPS = 1e-6  # hard-coded in transformers' Qwen3-VL vision blocks and mergers
_PAD_SEGMENT = -1
_ATTENTION = ("blocked", "dense")


def _single_size(name: str, value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise NotImplementedError(f"Qwen3-VL port needs a square {name}, got {value}.")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class Qwen3VLVisionConfig:
    """Sizes of the Qwen3-VL vision tower; `from_hf` reads a `vision_config` dict."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...] = ()
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10_000.0
    dtype: str = "float32"  # compute dtype; parameters stay float32
    # "blocked": tiled attention, O(block²) memory (default); "dense": [heads, N, N] scores.
    attention: str = "blocked"
    attention_block: int = 512  # rows per tile of the blocked attention
    remat: bool = False  # recompute each vision block's activations in the backward pass
    # Run the blocks between DeepStack taps as one lax.scan each (compile time and, under
    # remat, the backward's memory no longer grow with depth; `_scan_blocks`).
    scan_blocks: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision hidden_size={self.hidden_size} is not a multiple of "
                f"num_heads={self.num_heads}."
            )
        if self.head_dim % 4:
            raise ValueError(f"2D vision RoPE needs head_dim % 4 == 0, got {self.head_dim}.")
        side = self.num_grid_per_side
        if side * side != self.num_position_embeddings:
            raise ValueError(
                f"num_position_embeddings={self.num_position_embeddings} is not a square."
            )
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"deepstack_visual_indexes {bad} are outside 0..{self.depth - 1}.")
        if self.hidden_act not in _ACTIVATIONS:
            raise NotImplementedError(
                f"vision hidden_act={self.hidden_act!r} unsupported; known: {sorted(_ACTIVATIONS)}."
            )
        if self.attention not in _ATTENTION:
            raise ValueError(f"vision attention={self.attention!r} is not one of {_ATTENTION}.")
        if self.attention_block < 1:
            raise ValueError(f"vision attention_block must be >= 1, got {self.attention_block}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_grid_per_side(self) -> int:
        return int(round(self.num_position_embeddings**0.5))

    @property
    def patch_dim(self) -> int:
        """Width of one `pixel_values` row: channels x temporal patch x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches per merged visual token (spatial_merge_size squared)."""
        return self.spatial_merge_size**2

    @classmethod
    def from_hf(
        cls,
        hf: dict[str, Any],
        *,
        dtype: str = "float32",
        remat: bool = False,
        scan_blocks: bool = False,
    ) -> Qwen3VLVisionConfig:
        """Reads the `vision_config` dict of a `qwen3_vl` config.json; `remat` recomputes each
        vision block in the backward pass, `scan_blocks` scans the runs of blocks between
        DeepStack taps. Attention settings keep their defaults."""
        rope = hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "axial")
        if rope_type != "axial":
            raise NotImplementedError(f"Vision RoPE type {rope_type!r} unsupported (axial only).")
        return cls(
            depth=hf["depth"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_heads=hf["num_heads"],
            out_hidden_size=hf["out_hidden_size"],
            num_position_embeddings=hf["num_position_embeddings"],
            deepstack_visual_indexes=tuple(hf.get("deepstack_visual_indexes") or ()),
            in_channels=hf.get("in_channels", 3),
            patch_size=_single_size("patch_size", hf.get("patch_size", 16)),
            temporal_patch_size=_single_size(
                "temporal_patch_size", hf.get("temporal_patch_size", 2)
            ),
            spatial_merge_size=hf.get("spatial_merge_size", 2),
            hidden_act=hf.get("hidden_act", "gelu_pytorch_tanh"),
            rope_theta=float(rope.get("rope_theta", 10_000.0)),
            dtype=dtype,
            remat=remat,
            scan_blocks=scan_blocks,
        )


# --------------------------------------------------------------------------------------------
# Host side: grid-dependent index tables.


class VisionTables(NamedTuple):
    """Per-patch tables from `vision_tables`, inputs of the jitted tower (a pytree).

    interp_index: int32[N, 4] rows of the learned position table to blend (bilinear taps).
    interp_weight: float32[N, 4] their weights.
    rotary_hw: int32[N, 2] (row, column) of the patch inside its frame, for the 2D rotary.
    segment: int32[N] attention segment (one per frame); -1 marks padding rows, which attend
      only to themselves.
    """

    interp_index: np.ndarray
    interp_weight: np.ndarray
    rotary_hw: np.ndarray
    segment: np.ndarray


def check_grid_thw(grid_thw: Any, config: Qwen3VLVisionConfig, name: str) -> np.ndarray:
    """`grid_thw` as int64[n, 3]; ValueError unless every (t, h, w) is positive, h and w whole
    multiples of the merge size."""
    if isinstance(grid_thw, jax.core.Tracer):
        raise TypeError(
            f"{name} is traced: grid sizes decide the model's index tables, so they must be "
            "concrete. Call `prepare_inputs` on the host and pass its tables into jit."
        )
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array [n, 3], got {grid.dtype}{grid.shape}.")
    merge = config.spatial_merge_size
    bad = [
        tuple(int(v) for v in row)
        for row in grid
        if min(row) < 1 or row[1] % merge or row[2] % merge
    ]
    if bad:
        raise ValueError(
            f"{name} rows {bad} are invalid: t, h, w must be >= 1 and h, w multiples of "
            f"spatial_merge_size={merge}."
        )
    return grid.astype(np.int64)


def _block_order_rows_cols(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the h*w patches of one frame in spatial-merge-block order."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return rows, cols


def _bilinear_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two taps and weights per target index: `F.interpolate(bilinear, align_corners=True)` of a
    `side`-long axis to `size`, in float32 with the same operation order as transformers."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    weights = np.maximum(np.float32(1) - distance, np.float32(0))
    return taps, weights.astype(np.float32)


def vision_tables(
    grid_thw: Any, config: Qwen3VLVisionConfig, *, pad_to: int | None = None
) -> VisionTables:
    """Host-side per-patch tables for the images or videos of `grid_thw` (int[n, 3]).

    With `pad_to`, the tables get padding rows up to that many patches (segment -1, each
    attending only to itself), so callers can keep the tower's input shape fixed; the padded
    `pixel_values` rows are then ignored. Raises ValueError for a bad grid or a `pad_to` below
    the patch count.
    """
    grid = check_grid_thw(grid_thw, config, "grid_thw")
    side, merge = config.num_grid_per_side, config.spatial_merge_size
    index, weight, rotary, segment = [], [], [], []
    first_segment = 0
    for t, h, w in grid.tolist():
        rows, cols = _block_order_rows_cols(h, w, merge)
        row_taps, row_weights = _bilinear_taps(rows, h, side)
        col_taps, col_weights = _bilinear_taps(cols, w, side)
        frame_index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
        frame_weight = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
        index.append(np.tile(frame_index, (t, 1)))
        weight.append(np.tile(frame_weight, (t, 1)))
        rotary.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
        segment.append(np.repeat(np.arange(first_segment, first_segment + t), h * w))
        first_segment += t
    tables = VisionTables(
        np.concatenate(index).astype(np.int32),
        np.concatenate(weight).astype(np.float32),
        np.concatenate(rotary).astype(np.int32),
        np.concatenate(segment).astype(np.int32),
    )
    num_patches = tables.segment.shape[0]
    if pad_to is None or pad_to == num_patches:
        return tables
    if pad_to < num_patches or pad_to % config.merge_unit:
        raise ValueError(
            f"pad_to={pad_to} must be >= the {num_patches} patches of grid_thw and a multiple "
            f"of {config.merge_unit}."
        )
    extra = pad_to - num_patches
    return VisionTables(
        np.concatenate([tables.interp_index, np.zeros((extra, 4), np.int32)]),
        np.concatenate([tables.interp_weight, np.zeros((extra, 4), np.float32)]),
        np.concatenate([tables.rotary_hw, np.zeros((extra, 2), np.int32)]),
        np.concatenate([tables.segment, np.full((extra,), _PAD_SEGMENT, np.int32)]),
    )


# --------------------------------------------------------------------------------------------
# Device side: the tower.


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias (eps 1e-6), computed in float32."""

    def __init__(self, dim: int, axis_name: str, *, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), (axis_name,))
        self.bias = param(rngs, nnx.initializers.zeros_init(), (dim,), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + _LAYER_NORM_EPS)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def _linear(
    rngs: nnx.Rngs, d_in: int, d_out: int, axes: tuple[str, str]
) -> tuple[nnx.Param, nnx.Param]:
    kernel = param(rngs, dense_init((0,), (1,)), (d_in, d_out), axes)
    bias = param(rngs, nnx.initializers.zeros_init(), (d_out,), (axes[1],))
    return kernel, bias


def vision_rotary(rotary_hw: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2D rotary tables `cos, sin: float32[N, head_dim]`: a quarter of the frequencies per axis,
    laid out [row freqs, col freqs] twice, as transformers' axial vision rotary."""
    quarter = head_dim // 4
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    freqs = rotary_hw.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, quarter]
    freqs = freqs.reshape(freqs.shape[0], 2 * quarter)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x_nhk: jax.Array, cos_nk: jax.Array, sin_nk: jax.Array) -> jax.Array:
    # In float32 whatever the compute dtype, as transformers' apply_rotary_pos_emb_vision.
    x = x_nhk.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_nk[:, None, :] + rotated * sin_nk[:, None, :]
    return out.astype(x_nhk.dtype)


class VisionAttention(nnx.Module):
    """Bidirectional multi-head attention of each patch over the patches of its segment."""

    def __init__(self, config: Qwen3VLVisionConfig, *, rngs: nnx.Rngs):
        d, h, k = config.hidden_size, config.num_heads, config.head_dim
        self.attention = config.attention
        self.block = config.attention_block
        # The fused checkpoint tensor is [3*d, d]; the 3 (q, k, v) axis is never sharded.
        self.qkv_d3hk = param(
            rngs,
            dense_init((0,), (1, 2, 3)),
            (d, 3, h, k),
            ("vision_embed", None, "vision_heads", "head_dim"),
        )
        self.qkv_bias_3hk = param(
            rngs, nnx.initializers.zeros_init(), (3, h, k), (None, "vision_heads", "head_dim")
        )
        self.proj_hkd = param(
            rngs, dense_init((0, 1), (2,)), (h, k, d), ("vision_heads", "head_dim", "vision_embed")
        )
        self.proj_bias = param(rngs, nnx.initializers.zeros_init(), (d,), ("vision_embed",))

    def __call__(
        self, x_nd: jax.Array, cos_nk: jax.Array, sin_nk: jax.Array, segment_n: jax.Array
    ) -> jax.Array:
        """`[N, hidden]` in x's dtype; `segment_n: int32[N]`: rows with equal ids attend to each
        other, a padding row (-1) only to itself."""
        dtype = x_nd.dtype
        qkv_n3hk = jnp.einsum("nd,dthk->nthk", x_nd, self.qkv_d3hk[...].astype(dtype))
        qkv_n3hk = qkv_n3hk + self.qkv_bias_3hk[...].astype(dtype)
        q_nhk = _rotate(qkv_n3hk[:, 0], cos_nk, sin_nk)
        k_nhk = _rotate(qkv_n3hk[:, 1], cos_nk, sin_nk)
        v_nhk = qkv_n3hk[:, 2]
        if self.attention == "dense":
            out_nhk = dense_segment_attention(q_nhk, k_nhk, v_nhk, segment_n)
        else:
            out_nhk = blocked_segment_attention(q_nhk, k_nhk, v_nhk, segment_n, block=self.block)
        out_nd = jnp.einsum("nhk,hkd->nd", out_nhk, self.proj_hkd[...].astype(dtype))
        return out_nd + self.proj_bias[...].astype(dtype)


class VisionMLP(nnx.Module):
    """fc2(act(fc1(x))) with biases; the activation comes from the config (tanh GELU)."""

    def __init__(self, config: Qwen3VLVisionConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.act = config.hidden_act
        self.fc1_df, self.fc1_bias = _linear(rngs, d, f, ("vision_embed", "vision_mlp"))
        self.fc2_fd, self.fc2_bias = _linear(rngs, f, d, ("vision_mlp", "vision_embed"))

    def __call__(self, x_nd: jax.Array) -> jax.Array:
        dtype = x_nd.dtype
        hidden = x_nd @ self.fc1_df[...].astype(dtype) + self.fc1_bias[...].astype(dtype)
        hidden = _ACTIVATIONS[self.act](hidden)
        return hidden @ self.fc2_fd[...].astype(dtype) + self.fc2_bias[...].astype(dtype)


class VisionBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: Qwen3VLVisionConfig, *, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(config.hidden_size, "vision_embed", rngs=rngs)
        self.attn = VisionAttention(config, rngs=rngs)
        self.norm2 = LayerNorm(config.hidden_size, "vision_embed", rngs=rngs)
        self.mlp = VisionMLP(config, rngs=rngs)

    def __call__(
        self, x_nd: jax.Array, cos_nk: jax.Array, sin_nk: jax.Array, segment_n: jax.Array
    ) -> jax.Array:
        x_nd = x_nd + self.attn(self.norm1(x_nd), cos_nk, sin_nk, segment_n)
        return x_nd + self.mlp(self.norm2(x_nd))


def _block_forward(
    block: VisionBlock, x_nd: jax.Array, cos_nk: jax.Array, sin_nk: jax.Array, segment: jax.Array
) -> jax.Array:
    return block(x_nd, cos_nk, sin_nk, segment)


@functools.partial(jax.checkpoint, static_argnums=(0,))
def _remat_block_pure(graphdef, state, x_nd, cos_nk, sin_nk, segment):
    return nnx.merge(graphdef, state)(x_nd, cos_nk, sin_nk, segment)


def _scan_blocks(
    blocks: list[VisionBlock],
    x_nd: jax.Array,
    cos_nk: jax.Array,
    sin_nk: jax.Array,
    segment: jax.Array,
    *,
    remat: bool,
) -> jax.Array:
    """``blocks`` (one structure) over ``x[N, D]`` as one `jax.lax.scan`, their parameters
    stacked on the fly (storage, checkpoints and the HF layout stay per block, as the
    decoder's `scan_decoder_layers`); with ``remat`` the body is checkpointed, so the backward
    pass keeps one block input per step and a loop, unlike unrolled blocks, makes every
    compiler recompute one block at a time."""
    graphdef, first = nnx.split(blocks[0])
    leaves, treedef = jax.tree.flatten(first)
    columns = [leaves, *(jax.tree.leaves(nnx.split(block)[1]) for block in blocks[1:])]
    stacked = [jnp.stack(column) for column in zip(*columns, strict=True)]

    def body(x: jax.Array, block_leaves: list[jax.Array]) -> tuple[jax.Array, None]:
        block = nnx.merge(graphdef, jax.tree.unflatten(treedef, block_leaves))
        return block(x, cos_nk, sin_nk, segment), None

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    x_nd, _ = jax.lax.scan(body, x_nd, stacked)
    return x_nd


def _remat_block_forward(
    block: VisionBlock, x_nd: jax.Array, cos_nk: jax.Array, sin_nk: jax.Array, segment: jax.Array
) -> jax.Array:
    """`_block_forward` recomputed in the backward pass instead of kept (config.remat).

    A plain `jax.checkpoint` over the block's split state, not `nnx.remat`: the learner runs
    the tower under `jax.vmap` (one segment per row), where the block's variables belong to
    the outer trace and `nnx.remat` could not update them."""
    graphdef, state = nnx.split(block)
    return _remat_block_pure(graphdef, state, x_nd, cos_nk, sin_nk, segment)


class PatchMerger(nnx.Module):
    """Concatenates each 2x2 block of patches and projects it to the decoder width.

    The main merger normalises each patch before concatenating; the DeepStack mergers
    (`postshuffle_norm=True`) normalise the concatenation.
    """

    def __init__(self, config: Qwen3VLVisionConfig, *, postshuffle_norm: bool, rngs: nnx.Rngs):
        d = config.hidden_size
        wide = d * config.merge_unit
        self.wide = wide
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(wide if postshuffle_norm else d, "vision_embed", rngs=rngs)
        self.fc1_ww, self.fc1_bias = _linear(rngs, wide, wide, ("vision_embed", "vision_mlp"))
        self.fc2_we, self.fc2_bias = _linear(
            rngs, wide, config.out_hidden_size, ("vision_mlp", "embed")
        )

    def __call__(self, x_nd: jax.Array) -> jax.Array:
        dtype = x_nd.dtype
        if self.postshuffle_norm:
            x_mw = self.norm(x_nd.reshape(-1, self.wide))
        else:
            x_mw = self.norm(x_nd).reshape(-1, self.wide)
        hidden = x_mw @ self.fc1_ww[...].astype(dtype) + self.fc1_bias[...].astype(dtype)
        hidden = jax.nn.gelu(hidden, approximate=False)  # nn.GELU(): the exact (erf) form
        return hidden @ self.fc2_we[...].astype(dtype) + self.fc2_bias[...].astype(dtype)


class VisionTower(nnx.Module):
    """Patch rows -> (merged tokens `[N/4, out]`, DeepStack features `[n_deep, N/4, out]`)."""

    def __init__(self, config: Qwen3VLVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        # A Conv3d whose stride equals its kernel is a matmul over flattened (C, T, P, P) rows.
        self.patch_kernel, self.patch_bias = _linear(
            rngs, config.patch_dim, d, ("vision_patch", "vision_embed")
        )
        self.pos_embed = param(
            rngs,
            nnx.initializers.normal(0.02),
            (config.num_position_embeddings, d),
            ("vision_position", "vision_embed"),
        )
        self.blocks = nnx.List([VisionBlock(config, rngs=rngs) for _ in range(config.depth)])
        self.merger = PatchMerger(config, postshuffle_norm=False, rngs=rngs)
        self.deepstack_mergers = nnx.List(
            [
                PatchMerger(config, postshuffle_norm=True, rngs=rngs)
                for _ in config.deepstack_visual_indexes
            ]
        )

    def __call__(
        self, pixel_values: jax.Array, tables: VisionTables
    ) -> tuple[jax.Array, jax.Array]:
        """Runs the tower on `pixel_values[N, patch_dim]` with host `tables` for those N rows.

        Returns `merged[N/4, out_hidden]` and `deepstack[len(deepstack_visual_indexes), N/4,
        out_hidden]` in the compute dtype.
        """
        c = self.config
        n = pixel_values.shape[0]
        if pixel_values.ndim != 2 or pixel_values.shape[1] != c.patch_dim:
            raise ValueError(
                f"pixel_values must be [patches, {c.patch_dim}], got {pixel_values.shape}."
            )
        if tables.segment.shape[0] != n:
            raise ValueError(
                f"pixel_values has {n} patch rows but the vision tables describe "
                f"{tables.segment.shape[0]}."
            )
        if n % c.merge_unit:
            raise ValueError(f"{n} patch rows are not a multiple of {c.merge_unit}.")
        dtype = jnp.dtype(c.dtype)
        x_nd = pixel_values.astype(dtype) @ self.patch_kernel[...].astype(dtype)
        x_nd = x_nd + self.patch_bias[...].astype(dtype)
        taps_nkd = jnp.take(self.pos_embed[...], jnp.asarray(tables.interp_index), axis=0)
        pos_nd = jnp.einsum("nkd,nk->nd", taps_nkd, jnp.asarray(tables.interp_weight))
        x_nd = x_nd + pos_nd.astype(dtype)

        cos_nk, sin_nk = vision_rotary(jnp.asarray(tables.rotary_hw), c.head_dim, c.rope_theta)
        segment_n = jnp.asarray(tables.segment)
        forward = _remat_block_forward if c.remat else _block_forward
        deepstack = []
        # Runs of blocks, each ending at a DeepStack tap or at the last block.
        ends = sorted({*c.deepstack_visual_indexes, c.depth - 1})
        start = 0
        for end in ends:
            run = list(self.blocks[start : end + 1])
            if c.scan_blocks and len(run) > 1:
                x_nd = _scan_blocks(run, x_nd, cos_nk, sin_nk, segment_n, remat=c.remat)
            else:
                for block in run:
                    x_nd = forward(block, x_nd, cos_nk, sin_nk, segment_n)
            if end in c.deepstack_visual_indexes:
                merger = self.deepstack_mergers[c.deepstack_visual_indexes.index(end)]
                deepstack.append(merger(x_nd))
            start = end + 1
        merged = self.merger(x_nd)
        if deepstack:
            deepstack_kmo = jnp.stack(deepstack)
        else:
            deepstack_kmo = jnp.zeros((0, *merged.shape), merged.dtype)
        return merged, deepstack_kmo
