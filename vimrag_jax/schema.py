"""The data that flows from a rollout to the loss, declared once.

Two shapes of the same facts:

- a **trajectory record** (SPEC §6): one rollout as written by a worker, padded to fixed maxima
  (`RecordDims`: N nodes, K memory items per node, S segments, L tokens per segment, V visual
  references per segment). `TRAJECTORY_ARRAYS` lists its arrays, the ``*_FIELDS`` tuples its
  scalars and texts. `vimrag_jax.rollout.records` encodes and validates it;
- a **segment batch**: the learner's input, one row per segment (model call) of B rows.
  `SEGMENT_FIELDS` lists its keys; each names where a row's value comes from: the segment's own
  slice of a record array (``"segment"``), the whole trajectory's value, copied into every row
  so rows stay independent (``"trajectory"``), or the row itself (``"row"``: validity, the
  group advantage, the segment's index). `vimrag_jax.data.segments` builds rows from records;
  `LOSS_KEYS` are the keys the update reads.

Axes are letters (``"N"``, ``"K"``, ``"S"``, ``"L"``, ``"V"``) or fixed sizes (``"4"``);
`shape` turns them into a shape for given dims. Node kinds and memory-slot modalities are the
memory graph's own enums (`NodeKind`, `Modality`), padding included (``EMPTY`` = -1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, TypedDict

import numpy as np

from vimrag_jax.memory.graph import Modality, NodeKind

__all__ = [
    "FLOAT_FIELDS",
    "INT_FIELDS",
    "LOSS_KEYS",
    "NODE_TEXT_FIELDS",
    "SEGMENT_FIELDS",
    "TEXT_FIELDS",
    "TRAJECTORY_ARRAYS",
    "Field",
    "Modality",
    "NodeKind",
    "RecordDims",
    "SegmentBatch",
    "segment_field",
    "shape",
    "trajectory_array",
]


@dataclasses.dataclass(frozen=True)
class RecordDims:
    """Fixed maxima of a record's padded arrays.

    nodes (N), items per node (K), segments (S), tokens per segment (L), visual
    references per segment (V).
    """

    nodes: int
    items: int
    segments: int
    tokens: int
    visuals: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RecordDims.{field.name} must be an int >= 1, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def size(self, axis: str) -> int:
        """The length of one axis letter (``"N"``, ``"K"``, ``"S"``, ``"L"``, ``"V"``) or digit."""
        if axis.isdigit():
            return int(axis)
        sizes = {
            "N": self.nodes,
            "K": self.items,
            "S": self.segments,
            "L": self.tokens,
            "V": self.visuals,
        }
        if axis not in sizes:
            raise ValueError(f"unknown axis {axis!r}; axes are N, K, S, L, V or a size")
        return sizes[axis]


@dataclasses.dataclass(frozen=True)
class Field:
    """One array: its name, dtype, axes and the value of padding (an empty slot or row).

    ``source`` (segment-batch fields only) says where a row's value comes from: ``"segment"``
    (the record array of the same name at the row's segment), ``"trajectory"`` (the record's
    value of the same name, whole) or ``"row"`` (made for the row: validity, advantage, index).
    ``loss`` marks the batch keys the update reads.
    """

    name: str
    dtype: np.dtype
    axes: tuple[str, ...]
    fill: Any = 0
    source: str = ""
    loss: bool = False


def shape(axes: Iterable[str], dims: RecordDims, *, lead: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The shape of ``axes`` for ``dims``, after the leading sizes ``lead`` (e.g. a batch)."""
    return (*lead, *(dims.size(axis) for axis in axes))


_BOOL, _I8, _I32, _F32 = np.dtype(bool), np.dtype(np.int8), np.dtype(np.int32), np.dtype(np.float32)

#: The record's arrays (SPEC §6, plus the memory items' corpus ids and modalities).
TRAJECTORY_ARRAYS: tuple[Field, ...] = (
    Field("adjacency", _BOOL, ("N", "N")),  # [i, j]: node j lists node i as a parent
    Field("node_valid", _BOOL, ("N",)),
    Field("node_kind", _I8, ("N",), int(NodeKind.EMPTY)),
    Field("relevant", _BOOL, ("N",)),  # the node's retrieval found gold evidence
    Field("priority", _F32, ("N", "K")),
    Field("item_valid", _BOOL, ("N", "K")),
    Field("item_id", _I32, ("N", "K"), -1),  # corpus id of a kept memory item
    Field("item_modality", _I8, ("N", "K"), int(Modality.EMPTY)),
    Field("tokens", _I32, ("S", "L")),  # prompt ids then sampled ids
    Field("loss_mask", _BOOL, ("S", "L")),  # the sampled ids
    Field("behavior_logprobs", _F32, ("S", "L")),  # the sampler's log-probs of them
    Field("segment_node", _I32, ("S",)),  # the node the model call acted on (-1: none)
    Field("segment_valid", _BOOL, ("S",)),
    Field("segment_visuals", _I32, ("S", "V", "4")),  # item id, frame, height, width
    Field("segment_visual_valid", _BOOL, ("S", "V")),
)
INT_FIELDS = ("policy_version", "group_size", "answer_node", "num_invalid_actions", "num_segments")
FLOAT_FIELDS = ("reward", "created_at")
TEXT_FIELDS = (
    "question_id",
    "group_id",
    "question",
    "gold_answer",
    "prediction",
    "env",
    "worker_id",
)
#: One string per node (N): the id the policy gave the node ("root" for node 0), its sub-query
#: and its summary; "" for padding nodes and where there is none.
NODE_TEXT_FIELDS = ("node_title", "node_query", "node_summary")

#: The learner's segment batch, one row per segment (axes after the batch axis B).
SEGMENT_FIELDS: tuple[Field, ...] = (
    Field("tokens", _I32, ("L",), 0, "segment", loss=True),
    Field("loss_mask", _BOOL, ("L",), False, "segment", loss=True),
    Field("behavior_logprobs", _F32, ("L",), 0.0, "segment", loss=True),
    Field("segment_valid", _BOOL, (), False, "row", loss=True),
    Field("segment_node", _I32, (), -1, "segment", loss=True),
    Field("advantage", _F32, (), 0.0, "row", loss=True),
    Field("reward", _F32, (), 0.0, "trajectory", loss=True),
    Field("answer_node", _I32, (), -1, "trajectory", loss=True),
    Field("adjacency", _BOOL, ("N", "N"), False, "trajectory", loss=True),
    Field("node_valid", _BOOL, ("N",), False, "trajectory", loss=True),
    Field("relevant", _BOOL, ("N",), False, "trajectory", loss=True),
    Field("policy_version", _I32, (), 0, "trajectory"),
    Field("segment_index", _I32, (), -1, "row"),  # the row's segment within its trajectory
    Field("segment_visuals", _I32, ("V", "4"), 0, "segment"),
    Field("segment_visual_valid", _BOOL, ("V",), False, "segment"),
)
#: The batch keys the update reads; the others (version, index, visual references) stay on
#: the host.
LOSS_KEYS = tuple(field.name for field in SEGMENT_FIELDS if field.loss)

_TRAJECTORY = {field.name: field for field in TRAJECTORY_ARRAYS}
_SEGMENT = {field.name: field for field in SEGMENT_FIELDS}


def trajectory_array(name: str) -> Field:
    """The record array ``name`` (KeyError naming the known ones)."""
    if name not in _TRAJECTORY:
        raise KeyError(f"no record array {name!r}; the record has {sorted(_TRAJECTORY)}")
    return _TRAJECTORY[name]


def segment_field(name: str) -> Field:
    """The segment-batch field ``name`` (KeyError naming the known ones)."""
    if name not in _SEGMENT:
        raise KeyError(f"no segment-batch field {name!r}; the batch has {sorted(_SEGMENT)}")
    return _SEGMENT[name]


def _check_sources() -> None:
    """Every ``segment`` / ``trajectory`` field reads a record array of its name and dtype."""
    for field in SEGMENT_FIELDS:
        if field.source == "row":
            continue
        record = _TRAJECTORY.get(field.name)
        scalar = field.name in INT_FIELDS + FLOAT_FIELDS
        if field.source not in ("segment", "trajectory") or (record is None and not scalar):
            raise AssertionError(f"segment field {field.name!r}: bad source {field.source!r}")
        if record is not None:
            axes = record.axes[1:] if field.source == "segment" else record.axes
            if (record.dtype, axes) != (field.dtype, field.axes):
                raise AssertionError(f"segment field {field.name!r} disagrees with the record")


_check_sources()

#: The segment batch as the learner and the objective take it: a dict of ``[B, ...]`` arrays
#: keyed by `SEGMENT_FIELDS`, plus what the learner adds (``ref_logprobs``, ``old_logprobs``
#: float32[B, L]; a Qwen3-VL policy's vision inputs, `sampling.logprobs.VISUAL_KEYS`).
SegmentBatch = TypedDict(
    "SegmentBatch",
    {**{field.name: Any for field in SEGMENT_FIELDS}, "ref_logprobs": Any, "old_logprobs": Any},
    total=False,
)
