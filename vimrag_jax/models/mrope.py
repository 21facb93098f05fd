"""Qwen3-VL multimodal rotary positions (MRoPE): host-side position ids and in-jit cos/sin tables.

Every token gets three position ids (temporal, height, width). Text tokens use the same running
index on all three; the merged visual tokens of an image or video frame get their (t, row, col)
in the merged grid, offset by the running index, and the index then jumps by the larger grid
side. `rope_index` computes this on the host with NumPy (it walks the token types of each row,
like transformers' `get_rope_index`, which the processor's concrete outputs allow); inside jit
the caller passes the resulting `position_ids[3, B, L]`.

`mrope_cos_sin` turns the ids into rotary tables: each of the head_dim/2 frequencies reads one
of the three axes, interleaved (T H W T H W ... then T for the rest) as set by `mrope_section`.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2  # values of transformers' `mm_token_type_ids`


def host_array(name: str, value: Any, remedy: str) -> np.ndarray | None:
    """`value` as a NumPy array (None stays None); TypeError `"{name} is traced, but {remedy}"`
    for a traced value, since host-side tables need concrete inputs."""
    if value is None:
        return None
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} is traced, but {remedy}")
    return np.asarray(value)


_REMEDY = (
    "MRoPE positions are computed on the host: call `rope_index` (or `prepare_inputs`) "
    "outside jit and pass `position_ids` in."
)


_as_host = functools.partial(host_array, remedy=_REMEDY)


def rope_index(
    input_ids: Any,
    mm_token_type_ids: Any,
    image_grid_thw: Any = None,
    video_grid_thw: Any = None,
    attention_mask: Any = None,
    *,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """MRoPE ids `int64[3, B, L]` and deltas `int64[B, 1]`, as transformers' `get_rope_index`.

    `mm_token_type_ids[B, L]` marks text (0), image (1) and video (2) placeholder tokens; each
    run of image tokens consumes the next row of `image_grid_thw`, each run of video tokens one
    frame of the next video (the processor separates frames by timestamp text). Padding
    (`attention_mask == 0`, any side) gets position 0 and is skipped. The delta of a row is
    `max position + 1 - number of real tokens` (the offset generation continues from).
    Raises ValueError when the placeholder runs do not match the grids.
    """
    ids = _as_host("input_ids", input_ids)
    types = _as_host("mm_token_type_ids", mm_token_type_ids)
    if ids.ndim != 2 or types is None or types.shape != ids.shape:
        raise ValueError(
            f"input_ids [B, L] and mm_token_type_ids of the same shape are needed, got "
            f"{ids.shape} and {None if types is None else types.shape}."
        )
    mask = _as_host("attention_mask", attention_mask)
    mask = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    grids = {
        IMAGE: _grid_rows(_as_host("image_grid_thw", image_grid_thw), split_frames=False),
        VIDEO: _grid_rows(_as_host("video_grid_thw", video_grid_thw), split_frames=True),
    }
    used = {IMAGE: 0, VIDEO: 0}
    positions = np.zeros((3, *ids.shape), np.int64)
    deltas = np.zeros((ids.shape[0], 1), np.int64)
    for b in range(ids.shape[0]):
        row_types = types[b][mask[b]]
        pieces, current = [], 0
        start = 0
        for kind, run in itertools.groupby(row_types.tolist()):
            length = len(list(run))
            if kind == TEXT:
                pieces.append(np.broadcast_to(np.arange(length) + current, (3, length)))
                current += length
            elif kind in grids:
                grid = _next_grid(grids[kind], used, kind, b, start)
                ids_3n = _visual_positions(grid, current, spatial_merge_size)
                if ids_3n.shape[1] != length:
                    raise ValueError(
                        f"Row {b}: a run of {length} {_NAMES[kind]} placeholder tokens at "
                        f"position {start} does not match grid {tuple(grid)}, which gives "
                        f"{ids_3n.shape[1]} merged tokens."
                    )
                pieces.append(ids_3n)
                current += max(grid[1], grid[2]) // spatial_merge_size
            else:
                raise ValueError(f"Row {b}: unknown mm_token_type_ids value {kind}.")
            start += length
        row_positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, b, mask[b]] = row_positions
        top = row_positions.max() + 1 if row_positions.size else 0
        deltas[b, 0] = top - row_positions.shape[1]
    for kind, rows in grids.items():
        if rows is not None and used[kind] != len(rows):
            raise ValueError(
                f"{_NAMES[kind]}_grid_thw describes {len(rows)} {_NAMES[kind]} items (frames "
                f"for video) but the inputs hold {used[kind]} placeholder runs."
            )
    return positions, deltas


_NAMES = {IMAGE: "image", VIDEO: "video"}


def _grid_rows(grid: np.ndarray | None, *, split_frames: bool) -> np.ndarray | None:
    if grid is None:
        return None
    grid = grid.astype(np.int64).reshape(-1, 3)
    if split_frames:
        # Each video frame is its own placeholder run (timestamps sit between frames).
        grid = np.repeat(grid, grid[:, 0], axis=0)
        grid[:, 0] = 1
    return grid


def _next_grid(
    rows: np.ndarray | None, used: dict[int, int], kind: int, b: int, start: int
) -> np.ndarray:
    if rows is None or used[kind] >= len(rows):
        have = 0 if rows is None else len(rows)
        raise ValueError(
            f"Row {b}: {_NAMES[kind]} placeholder tokens at position {start} have no grid left "
            f"({_NAMES[kind]}_grid_thw holds {have} items/frames)."
        )
    grid = rows[used[kind]]
    used[kind] += 1
    return grid


def _visual_positions(grid: np.ndarray, start: int, merge: int) -> np.ndarray:
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt, hh, ww]).reshape(3, -1) + start


def axis_of_frequency(head_dim: int, mrope_section: tuple[int, int, int]) -> np.ndarray:
    """Which position axis (0 T, 1 H, 2 W) each of the head_dim/2 frequencies rotates by."""
    j = np.arange(head_dim // 2)
    axis = np.zeros_like(j)
    axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    return axis


def mrope_cos_sin(
    position_ids_3bl: jax.Array,
    head_dim: int,
    theta: float,
    mrope_section: tuple[int, int, int],
) -> tuple[jax.Array, jax.Array]:
    """Interleaved-MRoPE tables `cos, sin: float32[B, L, head_dim]` from ids `[3, B, L]`."""
    inv_freq_k = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    axis_k = jnp.asarray(axis_of_frequency(head_dim, mrope_section))
    positions_blk = jnp.moveaxis(position_ids_3bl.astype(jnp.float32), 0, -1)[..., axis_k]
    freqs_blk = positions_blk * inv_freq_k
    angles = jnp.concatenate([freqs_blk, freqs_blk], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)
