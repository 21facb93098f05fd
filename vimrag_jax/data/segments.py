"""From trajectory records to segment-major learner batches (the input of `policy_objective`).

A trajectory of S model calls becomes one row per valid segment. Every row carries its own
copy of the trajectory's graph arrays, reward, answer node and group advantage, so rows are
independent: they can be split across batches and devices in any order and the GGPO mask
(`vimrag_jax.rl.ggpo.batch_segment_keep`) still sees the whole graph.

Batch keys (B = batch segments, L tokens, N nodes, V visual references):
``tokens int32[B, L]``, ``loss_mask bool[B, L]``, ``behavior_logprobs float32[B, L]``,
``segment_valid bool[B]``, ``segment_node int32[B]``, ``advantage float32[B]``,
``reward float32[B]``, ``answer_node int32[B]``, ``adjacency bool[B, N, N]``,
``node_valid bool[B, N]``, ``relevant bool[B, N]``, ``policy_version int32[B]``,
``segment_index int32[B]`` (the row's segment within its trajectory), ``segment_visuals
int32[B, V, 4]`` and ``segment_visual_valid bool[B, V]``. Padding rows are all zero with
``segment_valid = False``, ``segment_node = answer_node = segment_index = -1``.

For SFT the same batch is built with advantage 1 for every row (``advantage="one"``):
the GSPO objective with ratio 1 and advantage 1 is then plain likelihood on policy tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vimrag_jax.rollout.records import RecordDims

ADVANTAGE_MODES = ("group", "one")
_EPS = 1e-6

# key -> (dtype, trailing shape letters, padding value)
ROW_FIELDS: dict[str, tuple[np.dtype, tuple[str, ...], Any]] = {
    "tokens": (np.dtype(np.int32), ("L",), 0),
    "loss_mask": (np.dtype(bool), ("L",), False),
    "behavior_logprobs": (np.dtype(np.float32), ("L",), 0.0),
    "segment_valid": (np.dtype(bool), (), False),
    "segment_node": (np.dtype(np.int32), (), -1),
    "advantage": (np.dtype(np.float32), (), 0.0),
    "reward": (np.dtype(np.float32), (), 0.0),
    "answer_node": (np.dtype(np.int32), (), -1),
    "adjacency": (np.dtype(bool), ("N", "N"), False),
    "node_valid": (np.dtype(bool), ("N",), False),
    "relevant": (np.dtype(bool), ("N",), False),
    "policy_version": (np.dtype(np.int32), (), 0),
    "segment_index": (np.dtype(np.int32), (), -1),
    "segment_visuals": (np.dtype(np.int32), ("V", "4"), 0),
    "segment_visual_valid": (np.dtype(bool), ("V",), False),
}


def group_advantages(rewards: Sequence[float] | np.ndarray, *, eps: float = _EPS) -> np.ndarray:
    """float32[G]: ``(r − mean r) / (std r + eps)`` over one group's rewards.

    Same semantics as `vimrag_jax.rl.losses.group_advantages`: population std (ddof 0), and
    deviations are taken from the group's largest reward first so equal rewards give exactly
    0 (a float mean would leave a residue that ``eps`` magnifies). Computed in float64.
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 1 or rewards.size == 0:
        raise ValueError(f"rewards must be a non-empty 1-D array, got shape {rewards.shape}")
    if not np.all(np.isfinite(rewards)):
        raise ValueError("rewards must be finite")
    deviation = rewards - rewards.max()
    centered = deviation - deviation.mean()
    return (centered / (np.sqrt(np.mean(centered**2)) + eps)).astype(np.float32)


def record_advantages(records: Sequence[Mapping[str, Any]], mode: str) -> np.ndarray:
    """float32[G] advantages of one group's records: group-normalised, or all 1 for SFT."""
    if mode == "group":
        return group_advantages([record["reward"] for record in records])
    if mode == "one":
        return np.ones(len(records), np.float32)
    raise ValueError(f"unknown advantage mode {mode!r}; choose one of {ADVANTAGE_MODES}")


def valid_segments(record: Mapping[str, Any]) -> np.ndarray:
    """int[...]: indices of the record's valid segments, in order."""
    return np.flatnonzero(record["segment_valid"])


def segment_row(record: Mapping[str, Any], segment: int, advantage: float) -> dict[str, Any]:
    """One batch row: segment ``segment`` of ``record`` with the trajectory's GGPO inputs."""
    return {
        "tokens": record["tokens"][segment],
        "loss_mask": record["loss_mask"][segment],
        "behavior_logprobs": record["behavior_logprobs"][segment],
        "segment_valid": True,
        "segment_node": record["segment_node"][segment],
        "advantage": advantage,
        "reward": record["reward"],
        "answer_node": record["answer_node"],
        "adjacency": record["adjacency"],
        "node_valid": record["node_valid"],
        "relevant": record["relevant"],
        "policy_version": record["policy_version"],
        "segment_index": segment,
        "segment_visuals": record["segment_visuals"][segment],
        "segment_visual_valid": record["segment_visual_valid"][segment],
    }


def _trailing(letters: tuple[str, ...], dims: RecordDims) -> tuple[int, ...]:
    sizes = {"L": dims.tokens, "N": dims.nodes, "V": dims.visuals}
    return tuple(int(letter) if letter.isdigit() else sizes[letter] for letter in letters)


def batch_spec(batch_segments: int, dims: RecordDims) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``key -> (shape, dtype)`` of a batch: what the learner can build abstract shapes from."""
    return {
        key: ((batch_segments, *_trailing(letters, dims)), dtype)
        for key, (dtype, letters, _) in ROW_FIELDS.items()
    }


def stack_rows(
    rows: Sequence[Mapping[str, Any]], batch_segments: int, dims: RecordDims
) -> dict[str, np.ndarray]:
    """A batch of exactly ``batch_segments`` rows: ``rows`` then padding rows."""
    if len(rows) > batch_segments:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_segments} segments")
    batch = {}
    for key, (dtype, letters, pad) in ROW_FIELDS.items():
        array = np.full((batch_segments, *_trailing(letters, dims)), pad, dtype)
        for i, row in enumerate(rows):
            array[i] = row[key]
        batch[key] = array
    return batch
