"""From trajectory records to segment-major learner batches (the input of `policy_objective`).

A trajectory of S model calls becomes one row per valid segment. Every row carries its own
copy of the trajectory's graph arrays, reward, answer node and group advantage, so rows are
independent: they can be split across batches and devices in any order and the GGPO mask
(`vimrag_jax.rl.ggpo.batch_segment_keep`) still sees the whole graph.

The batch's keys, dtypes, axes and padding values are `vimrag_jax.schema.SEGMENT_FIELDS`
(B = batch segments): padding rows are all zero with ``segment_valid = False`` and
``segment_node = answer_node = segment_index = -1``.

For SFT the same batch is built with advantage 1 for every row (``advantage="one"``):
the GSPO objective with ratio 1 and advantage 1 is then plain likelihood on policy tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vimrag_jax.rl.losses import group_advantages
from vimrag_jax.schema import SEGMENT_FIELDS, RecordDims, shape

ADVANTAGE_MODES = ("group", "one")


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
    made = {"segment_valid": True, "advantage": advantage, "segment_index": segment}
    row = {}
    for field in SEGMENT_FIELDS:
        if field.source == "row":
            row[field.name] = made[field.name]
        elif field.source == "segment":
            row[field.name] = record[field.name][segment]
        else:
            row[field.name] = record[field.name]
    return row


def batch_spec(batch_segments: int, dims: RecordDims) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``key -> (shape, dtype)`` of a batch: what the learner can build abstract shapes from."""
    return {
        field.name: (shape(field.axes, dims, lead=(batch_segments,)), field.dtype)
        for field in SEGMENT_FIELDS
    }


def stack_rows(
    rows: Sequence[Mapping[str, Any]], batch_segments: int, dims: RecordDims
) -> dict[str, np.ndarray]:
    """A batch of exactly ``batch_segments`` rows: ``rows`` then padding rows."""
    if len(rows) > batch_segments:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_segments} segments")
    batch = {}
    for field in SEGMENT_FIELDS:
        array = np.full(shape(field.axes, dims, lead=(batch_segments,)), field.fill, field.dtype)
        for i, row in enumerate(rows):
            array[i] = row[field.name]
        batch[field.name] = array
    return batch
