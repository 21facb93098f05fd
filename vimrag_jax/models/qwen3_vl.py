"""Qwen3-VL (`Qwen3VLForConditionalGeneration`) in Flax NNX.

The text decoder is the decoder stack Qwen3 uses (`vimrag_jax.models.decoder.DecoderStack`, the
same parameters, forward pass and KV cache); this module adds what is VL-specific: the vision
tower (`vimrag_jax.models.qwen3_vl_vision`) whose merged features replace the placeholder token
embeddings, interleaved multimodal rotary positions (`vimrag_jax.models.mrope`), and DeepStack:
the tower's intermediate features are added to the visual token positions after each of the
first decoder layers.

Inputs are named and laid out as transformers' processor returns them, so its output can be fed
as is: `model(input_ids, pixel_values=..., image_grid_thw=..., mm_token_type_ids=...,
attention_mask=...)`. Grid sizes are data that decide index tables, so the call has a host part
and a jit-able part:

- `prepare_inputs` (host, NumPy): checks the inputs, builds the vision tables from the grids and
  the MRoPE `position_ids[3, B, L]` (left padding via `attention_mask`).
- the forward pass proper (jit-able): takes the prepared tables and position ids; its shapes
  depend only on `[B, L]` and the number of patch rows.

Calling the model eagerly with grids runs both. Under `jax.jit`/`nnx.jit`, run `prepare_inputs`
outside and pass its dict in: `jitted(model, prepare_inputs(model.config, **processor_out))`.
Text-only calls need no host part (positions are `cumsum(attention_mask) - 1`).

Decoding follows the sampler's protocol (`vimrag_jax.sampling.sampler`): `prefill` takes the
jit-able inputs (`prepare_prefill_inputs` builds them for a left-padded batch with patch rows
padded to a bucket) and returns a `decoder.KVCache` whose `next_position_b` is the text position
after the MRoPE offset; `decode_step` feeds text tokens at that position on all three MRoPE
sections. Checkpoint import (`load_qwen3_vl`, also straight into sharded arrays) and export live
in `vimrag_jax.models.qwen3_vl_hf`.

HF config fields read: top level `image_token_id`, `video_token_id`, `vision_start_token_id`,
`vision_end_token_id`, `tie_word_embeddings`; `text_config`: `vocab_size`, `hidden_size`,
`intermediate_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`,
`head_dim`, `rms_norm_eps`, `max_position_embeddings`, `hidden_act`, `attention_bias`,
`rope_parameters` (or `rope_scaling` + `rope_theta`): `rope_type`, `rope_theta`,
`mrope_section`; `vision_config`: `depth`, `hidden_size`, `intermediate_size`, `num_heads`,
`out_hidden_size`, `num_position_embeddings`, `deepstack_visual_indexes`, `in_channels`,
`patch_size`, `temporal_patch_size`, `spatial_merge_size`, `hidden_act`, `rope_parameters`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimrag_jax.models.decoder import (
    AfterLayer,
    DecoderStack,
    KVCache,
    causal_allowed,
    default_positions,
)
from vimrag_jax.models.mrope import IMAGE, TEXT, VIDEO, host_array, mrope_cos_sin, rope_index
from vimrag_jax.models.qwen3 import Qwen3Config
from vimrag_jax.models.qwen3_vl_vision import (
    Qwen3VLVisionConfig,
    VisionTables,
    VisionTower,
    check_grid_thw,
    vision_tables,
)

_DEFAULT_TEXT_THETA = 500_000.0  # transformers' Qwen3VLTextConfig.default_theta
_DEFAULT_MROPE_SECTION = (24, 20, 20)  # transformers' fallback when the config has none


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    """A Qwen3-VL model: text decoder sizes, vision tower sizes, MRoPE split and special tokens."""

    text: Qwen3Config
    vision: Qwen3VLVisionConfig
    mrope_section: tuple[int, int, int] = _DEFAULT_MROPE_SECTION
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.text.head_dim // 2:
            raise ValueError(
                f"mrope_section={self.mrope_section} must be three numbers summing to "
                f"head_dim / 2 = {self.text.head_dim // 2}."
            )
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"vision out_hidden_size={self.vision.out_hidden_size} differs from the text "
                f"hidden_size={self.text.hidden_size}."
            )
        if self.text.dtype != self.vision.dtype:
            raise ValueError(f"text dtype {self.text.dtype} != vision dtype {self.vision.dtype}.")

    @property
    def dtype(self) -> str:
        return self.text.dtype

    @classmethod
    def from_hf(
        cls,
        hf: dict[str, Any],
        *,
        dtype: str = "float32",
        remat: bool = False,
        scan_layers: bool = False,
        remat_policy: str = "nothing_saveable",
    ) -> Qwen3VLConfig:
        """Reads a `model_type: qwen3_vl` config.json dict (transformers 4.5x or 5.x layout).

        `remat` rematerialises each text decoder layer and each vision block in the backward
        pass; `scan_layers` scans the text decoder's layers and the vision tower's blocks
        between DeepStack taps; `remat_policy` is the text decoder's (see `Qwen3Config`;
        the DeepStack layers run unrolled before the scan). Raises
        NotImplementedError for RoPE types other than "default" and for the text features
        `Qwen3Config.from_hf` refuses.
        """
        if "text_config" not in hf or "vision_config" not in hf:
            raise ValueError("A qwen3_vl config needs both `text_config` and `vision_config`.")
        text_hf = dict(hf["text_config"])
        rope = dict(text_hf.get("rope_scaling") or text_hf.get("rope_parameters") or {})
        if "rope_theta" not in rope and text_hf.get("rope_theta") is None:
            text_hf["rope_theta"] = _DEFAULT_TEXT_THETA  # Qwen3-VL's own default base
        tie = hf.get("tie_word_embeddings", text_hf.get("tie_word_embeddings", False))
        text = Qwen3Config.from_hf(
            {**text_hf, "tie_word_embeddings": bool(tie)},
            dtype=dtype,
            remat=remat,
            scan_layers=scan_layers,
            remat_policy=remat_policy,
        )
        if text.rope.rope_type != "default":
            raise NotImplementedError(
                f"Qwen3-VL text RoPE type {text.rope.rope_type!r} unsupported."
            )
        section = text.rope.mrope_section or _DEFAULT_MROPE_SECTION
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        return cls(
            text=text,
            vision=Qwen3VLVisionConfig.from_hf(
                hf["vision_config"], dtype=dtype, remat=remat, scan_blocks=scan_layers
            ),
            mrope_section=section,
            **{
                key: int(hf.get(key, defaults[key]))
                for key in (
                    "image_token_id",
                    "video_token_id",
                    "vision_start_token_id",
                    "vision_end_token_id",
                )
            },
        )


# --------------------------------------------------------------------------------------------
# Host side: checks, vision tables and MRoPE positions.


_REMEDY = (
    "images/videos need host-side preparation: call `prepare_inputs(model.config, ...)` "
    "outside jit and pass its dict to the jitted call."
)


_host = functools.partial(host_array, remedy=_REMEDY)


def _visual_inputs(
    config: Qwen3VLConfig, ids: np.ndarray, pixels: Any, grid: Any, modality: str
) -> tuple[np.ndarray | None, VisionTables | None]:
    pixels = _host(f"pixel_values ({modality})", pixels)
    token_id = config.image_token_id if modality == "image" else config.video_token_id
    grid_name = f"{modality}_grid_thw"
    placeholders = int(np.sum(ids == token_id))
    if pixels is None:
        if grid is not None:
            raise ValueError(f"{grid_name} was given without its pixel values.")
        if placeholders:
            raise ValueError(
                f"input_ids hold {placeholders} {modality} placeholder tokens (id {token_id}) "
                f"but no {modality} pixel values were given."
            )
        return None, None
    if grid is None:
        raise ValueError(f"{modality} pixel values were given without {grid_name}.")
    grid = check_grid_thw(grid, config.vision, grid_name)
    patches = int(np.prod(grid, axis=-1).sum())
    if pixels.shape != (patches, config.vision.patch_dim):
        raise ValueError(
            f"{modality} pixel values have shape {pixels.shape} but {grid_name}={grid.tolist()} "
            f"needs ({patches}, {config.vision.patch_dim})."
        )
    tokens = patches // config.vision.merge_unit
    if placeholders != tokens:
        raise ValueError(
            f"input_ids hold {placeholders} {modality} placeholder tokens (id {token_id}) but "
            f"{grid_name}={grid.tolist()} gives {tokens} visual tokens."
        )
    return pixels, vision_tables(grid, config.vision)


def prepare_inputs(
    config: Qwen3VLConfig,
    input_ids: Any,
    pixel_values: Any = None,
    image_grid_thw: Any = None,
    pixel_values_videos: Any = None,
    video_grid_thw: Any = None,
    mm_token_type_ids: Any = None,
    attention_mask: Any = None,
    position_ids: Any = None,
) -> dict[str, Any]:
    """Host-side half of the forward pass: checks the processor outputs and builds the tables.

    Returns the keyword arguments of the jit-able call: `input_ids`, `attention_mask`,
    `position_ids` (`int32[3, B, L]`, from `rope_index` unless given), `pixel_values`,
    `image_tables`, `pixel_values_videos`, `video_tables` (NumPy arrays, or None when absent).
    `mm_token_type_ids` defaults to the types implied by the image/video token ids, as the
    processor derives them. Raises ValueError for inconsistent inputs (placeholder counts vs.
    grids, pixel shapes, grids that are not multiples of the merge size), TypeError for traced
    inputs.
    """
    ids = _host("input_ids", input_ids)
    if ids is None or ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got {getattr(ids, 'shape', None)}.")
    mask = _host("attention_mask", attention_mask)
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}.")
    pixels, image_tables = _visual_inputs(config, ids, pixel_values, image_grid_thw, "image")
    videos, video_tables = _visual_inputs(config, ids, pixel_values_videos, video_grid_thw, "video")
    if position_ids is None:
        types = _host("mm_token_type_ids", mm_token_type_ids)
        if types is None:
            types = np.full(ids.shape, TEXT, np.int64)
            types[ids == config.image_token_id] = IMAGE
            types[ids == config.video_token_id] = VIDEO
        positions, _ = rope_index(
            ids,
            types,
            None if pixels is None else image_grid_thw,
            None if videos is None else video_grid_thw,
            mask,
            spatial_merge_size=config.vision.spatial_merge_size,
        )
        position_ids = positions.astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        "pixel_values": pixels,
        "image_tables": image_tables,
        "pixel_values_videos": videos,
        "video_tables": video_tables,
    }


# Keys one prompt may bring to `prepare_prefill_inputs` (the processor's names).
PREFILL_ROW_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "mm_token_type_ids",
)


def default_patch_bucket(patches: int) -> int:
    """Patch rows the vision tower is compiled for: the next power of two, at least 64."""
    return max(64, 1 << max(patches - 1, 0).bit_length())


def prepare_prefill_inputs(
    config: Qwen3VLConfig,
    input_ids: Any,
    attention_mask: Any,
    row_inputs: Sequence[Mapping[str, Any] | None],
    *,
    patch_bucket: Callable[[int], int] | None = None,
) -> dict[str, Any]:
    """Host-side inputs of `Qwen3VLForConditionalGeneration.prefill` for a left-padded batch.

    `input_ids` / `attention_mask` are `[B, P]` with each prompt right-aligned; `row_inputs`
    holds one mapping (or None) per prompt, in row order, with the processor's keys for that
    prompt alone: `pixel_values[n, patch_dim]` + `image_grid_thw[k, 3]`,
    `pixel_values_videos` + `video_grid_thw`, and optionally `mm_token_type_ids` of the
    prompt's tokens (`[n]` or `[1, n]`); rows past `len(row_inputs)` (batch padding) have
    none. The rows' patches are concatenated in row order (the order the placeholders appear
    in) and run through `prepare_inputs`; then the patch rows of each modality are padded with
    zeros to `patch_bucket(n)` (default `default_patch_bucket`; padding rows are inert), so the
    tower compiles once per bucket. One tower call then encodes every row's visuals: attention
    never crosses a frame, and the tower's blocked attention (`vision_attention`) only computes
    tiles of rows that share a frame, padding rows only their own, so the call costs what
    encoding each row separately would, not the square of the batch's total patches. Returns
    `position_ids` (`int32[3, B, P]`), `pixel_values`, `image_tables`, `pixel_values_videos`,
    `video_tables` (None when absent). Raises ValueError for unknown keys and the
    inconsistencies `prepare_inputs` refuses.
    """
    ids = _host("input_ids", input_ids)
    mask = _host("attention_mask", attention_mask)
    if ids is None or ids.ndim != 2 or mask is None or mask.shape != ids.shape:
        raise ValueError("input_ids and attention_mask must both be [batch, length].")
    if len(row_inputs) > ids.shape[0]:
        raise ValueError(f"{len(row_inputs)} row inputs for a batch of {ids.shape[0]} rows.")
    parts: dict[str, list[np.ndarray]] = {key: [] for key in PREFILL_ROW_KEYS[:4]}
    types = np.full(ids.shape, TEXT, np.int64)
    types[ids == config.image_token_id] = IMAGE
    types[ids == config.video_token_id] = VIDEO
    for row, inputs in enumerate(row_inputs):
        inputs = dict(inputs or {})
        unknown = sorted(set(inputs) - set(PREFILL_ROW_KEYS))
        if unknown:
            raise ValueError(
                f"Row {row}: unknown prefill inputs {unknown}; expected some of "
                f"{list(PREFILL_ROW_KEYS)}."
            )
        for key in parts:
            if inputs.get(key) is not None:
                parts[key].append(np.asarray(inputs[key]))
        if inputs.get("mm_token_type_ids") is not None:
            real = mask[row].astype(bool)
            row_types = np.asarray(inputs["mm_token_type_ids"]).reshape(-1)
            if row_types.shape[0] != real.sum():
                raise ValueError(
                    f"Row {row}: mm_token_type_ids has {row_types.shape[0]} entries for a "
                    f"prompt of {real.sum()} tokens."
                )
            types[row, real] = row_types
    merged = {key: np.concatenate(arrays) if arrays else None for key, arrays in parts.items()}
    prepared = prepare_inputs(
        config,
        ids,
        merged["pixel_values"],
        merged["image_grid_thw"],
        merged["pixel_values_videos"],
        merged["video_grid_thw"],
        types,
        mask,
    )
    bucket = patch_bucket or default_patch_bucket
    out: dict[str, Any] = {"position_ids": prepared["position_ids"]}
    for pixels_key, tables_key, grid_key in (
        ("pixel_values", "image_tables", "image_grid_thw"),
        ("pixel_values_videos", "video_tables", "video_grid_thw"),
    ):
        pixels = prepared[pixels_key]
        if pixels is None:
            out[pixels_key] = out[tables_key] = None
            continue
        size = int(bucket(pixels.shape[0]))
        out[tables_key] = vision_tables(merged[grid_key], config.vision, pad_to=size)
        out[pixels_key] = np.pad(pixels.astype(np.float32), ((0, size - pixels.shape[0]), (0, 0)))
    return out


# --------------------------------------------------------------------------------------------
# Device side.


def _placement(input_ids: jax.Array, token_id: int) -> tuple[jax.Array, jax.Array]:
    """Placeholder mask `bool[B, L]` and, per token, its row among the visual features: the
    number of earlier placeholders in row-major order (the order of torch's masked_scatter)."""
    mask_bl = input_ids == token_id
    rank = jnp.cumsum(mask_bl.reshape(-1).astype(jnp.int32)) - 1
    return mask_bl, jnp.maximum(rank, 0).reshape(mask_bl.shape)


def _features_at(rows_md: jax.Array, mask_bl: jax.Array, rank_bl: jax.Array) -> jax.Array:
    # Static-shape scatter: every token gathers "its" feature row, non-placeholders get 0. A
    # rank past the last row is clipped by jnp.take's default mode; prepare_inputs rules that out.
    gathered = jnp.take(rows_md, rank_bl, axis=0, mode="clip")
    return jnp.where(mask_bl[..., None], gathered, jnp.zeros((), rows_md.dtype))


def _normalize_positions(position_ids: Any, b: int, length: int) -> jax.Array:
    position_ids = jnp.asarray(position_ids)
    if position_ids.ndim == 2:
        position_ids = jnp.broadcast_to(position_ids[None], (3, *position_ids.shape))
    elif position_ids.ndim == 3 and position_ids.shape[0] == 4:
        position_ids = position_ids[1:]  # transformers' [text; T; H; W] layout
    if position_ids.shape != (3, b, length):
        raise ValueError(
            f"position_ids must be [3, {b}, {length}] (or [B, L] / [4, B, L]), got "
            f"{position_ids.shape}."
        )
    return position_ids


class Qwen3VLForConditionalGeneration(DecoderStack):
    """Qwen3-VL: vision tower + Qwen3 decoder with MRoPE and DeepStack; logits float32[B, L, V]."""

    def __init__(self, config: Qwen3VLConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.visual = VisionTower(config.vision, rngs=rngs)  # drawn first, as it always was
        super().__init__(config.text, rngs=rngs)

    @property
    def text_config(self) -> Qwen3Config:
        return self.config.text

    def position_tables(self, position_ids_3bl: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Interleaved-MRoPE tables `float32[B, L, head_dim]` of `position_ids[3, B, L]`."""
        c = self.config
        return mrope_cos_sin(position_ids_3bl, c.text.head_dim, c.text.rope_theta, c.mrope_section)

    def hooked_layers(self) -> int:
        """DeepStack adds features after the first `len(deepstack_visual_indexes)` layers."""
        return len(self.config.vision.deepstack_visual_indexes)

    def step_positions(self, next_position_b: jax.Array) -> jax.Array:
        # A text token sits at the same position on all three sections.
        b = next_position_b.shape[0]
        return jnp.broadcast_to(next_position_b[None, :, None], (3, b, 1))

    def __call__(
        self,
        input_ids: Any,
        pixel_values: Any = None,
        image_grid_thw: Any = None,
        pixel_values_videos: Any = None,
        video_grid_thw: Any = None,
        mm_token_type_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        *,
        image_tables: VisionTables | None = None,
        video_tables: VisionTables | None = None,
    ) -> jax.Array:
        """Logits `float32[B, L, V]` for processor-style inputs (see the module docstring).

        `attention_mask[B, L]` (1 real, 0 padding, any side) hides padded keys; logits at padded
        positions are meaningless. `position_ids` may be `[3, B, L]`, `[4, B, L]` or `[B, L]`.
        Visual inputs without `image_tables` / `video_tables`, or without `position_ids`, run
        `prepare_inputs` first, which needs concrete (non-traced) arrays.
        """
        has_visuals = pixel_values is not None or pixel_values_videos is not None
        needs_host = (
            (pixel_values is not None and image_tables is None)
            or (pixel_values_videos is not None and video_tables is None)
            or (has_visuals and position_ids is None)
        )
        if needs_host:
            prepared = prepare_inputs(
                self.config,
                input_ids,
                pixel_values,
                image_grid_thw,
                pixel_values_videos,
                video_grid_thw,
                mm_token_type_ids,
                attention_mask,
                position_ids,
            )
            return self(**prepared)
        x_bld, valid_bl, position_ids, add_deepstack = self._embed_inputs(
            jnp.asarray(input_ids),
            attention_mask,
            position_ids,
            pixel_values,
            image_tables,
            pixel_values_videos,
            video_tables,
        )
        allowed_bqm = causal_allowed(valid_bl)
        return self.logits(self.decode_hidden(x_bld, position_ids, allowed_bqm, add_deepstack))

    def _embed_inputs(
        self,
        input_ids: jax.Array,
        attention_mask: Any,
        position_ids: Any,
        pixel_values: Any,
        image_tables: VisionTables | None,
        pixel_values_videos: Any,
        video_tables: VisionTables | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, AfterLayer]:
        """The decoder's inputs from the jit-able model inputs.

        Returns the token embeddings `[B, L, D]` with the visual features at their
        placeholders, the real-token mask `bool[B, L]` (all true without `attention_mask`), the
        MRoPE ids `int32[3, B, L]` (text positions `cumsum(mask) - 1` without `position_ids`)
        and `add_deepstack(i, x)`, which adds DeepStack level i to the output of layer i.
        """
        b, length = input_ids.shape
        if attention_mask is None:
            valid_bl = jnp.ones((b, length), dtype=bool)
        else:
            valid_bl = jnp.asarray(attention_mask).astype(bool)
        if position_ids is None:
            position_ids = default_positions(valid_bl)
        position_ids = _normalize_positions(position_ids, b, length).astype(jnp.int32)
        c = self.config
        dtype = jnp.dtype(c.dtype)
        x_bld = self.embed(input_ids)
        placed = []  # (mask, rank, deepstack rows) per modality present
        for pixels, tables, token_id in (
            (pixel_values, image_tables, c.image_token_id),
            (pixel_values_videos, video_tables, c.video_token_id),
        ):
            if pixels is None:
                continue
            merged_md, deepstack_kmd = self.visual(jnp.asarray(pixels), tables)
            mask_bl, rank_bl = _placement(input_ids, token_id)
            rows_bld = jnp.take(merged_md.astype(dtype), rank_bl, axis=0, mode="clip")
            x_bld = jnp.where(mask_bl[..., None], rows_bld, x_bld)
            placed.append((mask_bl, rank_bl, deepstack_kmd.astype(dtype)))

        def add_deepstack(i: int, x_bld: jax.Array) -> jax.Array:
            for mask_bl, rank_bl, deepstack_kmd in placed:
                if i < deepstack_kmd.shape[0]:
                    x_bld = x_bld + _features_at(deepstack_kmd[i], mask_bl, rank_bl)
            return x_bld

        return x_bld, valid_bl, position_ids, add_deepstack

    # ---- decoding protocol of `vimrag_jax.sampling.Sampler` ---------------------------------

    def prefill(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        cache_size: int,
        position_ids: Any = None,
        pixel_values: Any = None,
        image_tables: VisionTables | None = None,
        pixel_values_videos: Any = None,
        video_tables: VisionTables | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Runs left-padded prompts `int[B, P]`; returns the next-token logits and a cache.

        The keyword arguments are the jit-able ones `prepare_inputs` (or `prepare_prefill`)
        returns: MRoPE `position_ids[3, B, P]` (default: text positions `cumsum(mask) - 1`)
        and the patch rows with their vision tables. Visual features and DeepStack go in as in
        `__call__`. Returns `float32[B, V]` logits of the last column and a `KVCache` of
        `cache_size >= P` slots whose `next_position_b` is each row's largest MRoPE position
        plus one: the text position generation continues from (`rope_index`'s delta plus the
        number of real tokens).
        """
        x_bld, valid_bl, position_ids, add_deepstack = self._embed_inputs(
            input_ids,
            attention_mask,
            position_ids,
            pixel_values,
            image_tables,
            pixel_values_videos,
            video_tables,
        )
        real_positions_3bl = jnp.where(valid_bl[None], position_ids, -1)
        next_position_b = jnp.max(real_positions_3bl, axis=(0, 2)) + 1
        return self.prefill_embeddings(
            x_bld,
            position_ids,
            valid_bl,
            next_position_b,
            cache_size=cache_size,
            after_layer=add_deepstack,
        )

    def prepare_prefill(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        row_inputs: Sequence[Mapping[str, Any] | None],
        *,
        patch_bucket: Callable[[int], int] | None = None,
    ) -> dict[str, Any]:
        """Host side of `prefill` for a left-padded batch; see `prepare_prefill_inputs`."""
        return prepare_prefill_inputs(
            self.config, input_ids, attention_mask, row_inputs, patch_bucket=patch_bucket
        )
