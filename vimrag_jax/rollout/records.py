"""Trajectory records (SPEC §6): msgpack codec, validation and atomically published shards.

A record is one rollout, as plain data: scalars, text and padded numpy arrays with fixed
maxima (`RecordDims`); its fields are declared in `vimrag_jax.schema`. It is encoded with
msgpack, each array as ``{dtype, shape, data}`` (little-endian raw bytes, dtype checked against
the schema), so a record is data and never code: no pickle anywhere. `decode_record` validates
everything it reads and raises only `RecordError`, whatever the bytes.

Version 2 adds what a picture of the rollout needs beyond §6: ``node_title``, ``node_query``,
``node_summary`` (N strings: the id the policy gave each node, its sub-query, its summary) and
``item_id`` / ``item_modality`` (int32 / int8 [N, K]: the corpus id and modality of each memory
slot, -1 when empty). Writers always write them (empty defaults when a caller leaves them out);
version-1 records, which shards on disk may still hold, decode with those defaults. Version 3
stores a padding node's kind as the graph does (`NodeKind.EMPTY`, -1; earlier versions wrote 0,
read as -1).

Shards are ArrayRecord files of encoded records under ``WORKDIR/rollouts/``. `ShardWriter`
writes a shard under a hidden temporary name and publishes it with an atomic ``os.replace``
when it closes, so a reader listing the directory sees either nothing or the whole shard.

Group contract (worker → learner): a worker writes all G rollouts of one group (same
``group_id``, ``group_size`` = G) into the same shard, consecutively. The learner computes
group advantages from those consecutive records only; a group with missing members (a crash,
a corrupt record) is dropped. Shard names should carry a zero-padded sequence number
(`shard_name`), so listing order (by name) is stable and follows each worker's write order.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from vimrag_jax.schema import (
    FLOAT_FIELDS,
    INT_FIELDS,
    NODE_TEXT_FIELDS,
    TEXT_FIELDS,
    TRAJECTORY_ARRAYS,
    Modality,
    NodeKind,
    RecordDims,
    shape,
)

SCHEMA = "vimrag.trajectory"
SCHEMA_VERSION = 3
#: Versions `decode_record` reads: version 1 lacks the node texts and memory item ids (§6 extras),
#: which are filled with their empty defaults; versions 1 and 2 wrote padding nodes' kind as 0,
#: read as `NodeKind.EMPTY`.
READABLE_VERSIONS = (1, 2, 3)
SHARD_SUFFIX = ".array_record"
#: Where workers write their shards, under the workdir (unless ``data.shard_dir`` names another).
ROLLOUT_DIR = "rollouts"
_TEMP_MARK = ".tmp-"


class RecordError(ValueError):
    """Bytes or a dict that are not a valid trajectory record (truncated, random, wrong schema)."""


class ShardError(RecordError):
    """A shard file that cannot be opened or read."""


_ARRAYS = {field.name: field for field in TRAJECTORY_ARRAYS}
# Array fields added in version 2 (filled with their padding value in version-1 records).
_V2_ARRAYS = ("item_id", "item_modality")
# Fields a caller may leave out of `encode_record` (defaults filled in; the version-2 fields
# default to "empty", so records built by older code paths still encode).
_DEFAULTS: dict[str, Any] = {
    "env": "",
    "worker_id": "",
    "created_at": None,
    "num_segments": None,
    **{name: None for name in (*_V2_ARRAYS, *NODE_TEXT_FIELDS)},
}
_NODE_KINDS = tuple(int(kind) for kind in NodeKind)
_MODALITIES = tuple(int(modality) for modality in Modality)

_DTYPE_NAMES = {field.dtype.str: field.dtype for field in TRAJECTORY_ARRAYS}
_MAX_TEXT = 1 << 24


def shard_name(worker_id: str, sequence: int) -> str:
    """Canonical shard name ``{worker_id}-{sequence:08d}``: sorts in each worker's write order."""
    if not worker_id or "/" in worker_id or worker_id.startswith("."):
        raise ValueError(f"worker_id must be a plain non-empty name, got {worker_id!r}")
    if sequence < 0:
        raise ValueError(f"sequence must be >= 0, got {sequence}")
    return f"{worker_id}-{sequence:08d}"


def blank_record(dims: RecordDims, **fields: Any) -> dict[str, Any]:
    """A record with every array zero-padded (no nodes, no segments) and empty text, then
    ``fields`` on top: the starting point for a worker filling in one rollout."""
    record: dict[str, Any] = {
        field.name: np.full(shape(field.axes, dims), field.fill, field.dtype)
        for field in TRAJECTORY_ARRAYS
    }
    record.update({name: "" for name in TEXT_FIELDS})
    record.update({name: [""] * dims.nodes for name in NODE_TEXT_FIELDS})
    record.update(policy_version=0, group_size=1, answer_node=-1, num_invalid_actions=0)
    record.update(reward=0.0, created_at=0.0, dims=dims)
    record.update(fields)
    return record


# --- validation shared by encode and decode -----------------------------------------------


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise RecordError(f"field {name!r} must be an int, got {type(value).__name__}")
    return int(value)


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise RecordError(f"field {name!r} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise RecordError(f"field {name!r} must be finite, got {value}")
    return value


def _check_text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RecordError(f"field {name!r} must be a str, got {type(value).__name__}")
    return value


def _check_texts(name: str, value: Any, count: int) -> list[str]:
    """A list of exactly ``count`` strings (one per node)."""
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise RecordError(
            f"field {name!r} must be a list of {count} str, got {type(value).__name__}"
        )
    if len(value) != count:
        raise RecordError(f"field {name!r} must hold {count} strings, got {len(value)}")
    for index, text in enumerate(value):
        if not isinstance(text, str):
            raise RecordError(f"field {name!r}[{index}] must be a str, got {type(text).__name__}")
    return list(value)


def _check_semantics(record: dict[str, Any], dims: RecordDims) -> None:
    """Cross-field checks: index ranges and the derived segment count."""
    if not -1 <= record["answer_node"] < dims.nodes:
        raise RecordError(f"answer_node {record['answer_node']} outside [-1, {dims.nodes})")
    if record["policy_version"] < 0:
        raise RecordError(f"policy_version must be >= 0, got {record['policy_version']}")
    if record["group_size"] < 1:
        raise RecordError(f"group_size must be >= 1, got {record['group_size']}")
    if record["num_invalid_actions"] < 0:
        raise RecordError(f"num_invalid_actions must be >= 0, got {record['num_invalid_actions']}")
    valid = record["segment_valid"]
    if record["num_segments"] != int(valid.sum()):
        raise RecordError(
            f"num_segments = {record['num_segments']} but segment_valid has {int(valid.sum())}"
        )
    nodes = record["segment_node"][valid]
    if np.any((nodes < -1) | (nodes >= dims.nodes)):
        raise RecordError(f"segment_node of a valid segment outside [-1, {dims.nodes})")
    if not np.all(np.isfinite(record["priority"])):
        raise RecordError("priority holds non-finite values")
    item_id, modality = record["item_id"], record["item_modality"]
    if np.any(item_id < -1):
        raise RecordError(f"item_id holds {int(item_id.min())}; ids are >= 0, or -1 for empty")
    if not np.all(np.isin(modality, _MODALITIES)):
        raise RecordError(f"item_modality holds values other than {_MODALITIES} (Modality)")
    if not np.all(np.isin(record["node_kind"], _NODE_KINDS)):
        raise RecordError(f"node_kind holds values other than {_NODE_KINDS} (NodeKind)")
    if np.any((item_id < 0) != (modality < 0)):
        raise RecordError("item_id and item_modality disagree on which memory slots are empty")


def _as_field_array(name: str, value: Any, dims: RecordDims) -> np.ndarray:
    """Converts a caller's array to the schema dtype, refusing lossy or kind-changing casts."""
    dtype = _ARRAYS[name].dtype
    expected = shape(_ARRAYS[name].axes, dims)
    array = np.asarray(value)
    if array.shape != expected:
        raise RecordError(f"field {name!r} has shape {array.shape}, expected {expected}")
    kind = array.dtype.kind
    if dtype.kind == "f":
        if kind not in "biuf":
            raise RecordError(f"field {name!r} must be numeric, got dtype {array.dtype}")
    elif kind not in "biu":
        raise RecordError(f"field {name!r} must hold integers or bools, got dtype {array.dtype}")
    converted = array.astype(dtype)
    if dtype.kind != "f" and not np.array_equal(converted.astype(array.dtype), array):
        raise RecordError(f"field {name!r} holds values that do not fit {dtype}")
    return converted


def validate_record(record: Mapping[str, Any], dims: RecordDims | None = None) -> dict[str, Any]:
    """A normalised copy of ``record`` (schema dtypes, defaults filled) or RecordError.

    ``dims`` defaults to the record's own ``dims`` entry (a `RecordDims` or its dict).
    """
    if not isinstance(record, Mapping):
        raise RecordError(f"a record must be a mapping, got {type(record).__name__}")
    own = record.get("dims")
    if isinstance(own, Mapping):
        own = _dims_from_dict(own)
    if own is not None and not isinstance(own, RecordDims):
        raise RecordError(f"'dims' must be a RecordDims, got {type(own).__name__}")
    if dims is None:
        if own is None:
            raise RecordError("the record has no 'dims' (RecordDims) and none was given")
        dims = own
    elif own is not None and own != dims:
        raise RecordError(f"record dims {own} differ from the expected {dims}")
    known = set(_ARRAYS) | set(INT_FIELDS) | set(FLOAT_FIELDS) | set(TEXT_FIELDS)
    known |= set(NODE_TEXT_FIELDS)
    unknown = sorted(set(record) - known - {"dims", "schema_version"})
    if unknown:
        raise RecordError(f"unknown record fields {unknown}")
    missing = sorted(known - set(record) - set(_DEFAULTS))
    if missing:
        raise RecordError(f"missing record fields {missing}")
    out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "dims": dims}
    for field in TRAJECTORY_ARRAYS:
        value = record.get(field.name)
        if value is None and field.name in _V2_ARRAYS:
            value = np.full(shape(field.axes, dims), field.fill)
        out[field.name] = _as_field_array(field.name, value, dims)
    for name in TEXT_FIELDS:
        out[name] = _check_text(name, record.get(name, _DEFAULTS.get(name)))
    for name in NODE_TEXT_FIELDS:
        value = record.get(name)
        out[name] = _check_texts(name, [""] * dims.nodes if value is None else value, dims.nodes)
    num_segments = record.get("num_segments")
    if num_segments is None:
        num_segments = int(out["segment_valid"].sum())
    created_at = record.get("created_at")
    out["created_at"] = _check_float(
        "created_at", time.time() if created_at is None else created_at
    )
    out["reward"] = _check_float("reward", record["reward"])
    for name in INT_FIELDS:
        out[name] = _check_int(name, num_segments if name == "num_segments" else record[name])
    _check_semantics(out, dims)
    return out


def _dims_from_dict(value: Any) -> RecordDims:
    if not isinstance(value, Mapping):
        raise RecordError(f"'dims' must be a map, got {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(RecordDims)}
    if set(value) != names:
        raise RecordError(f"'dims' must have exactly the keys {sorted(names)}, got {list(value)}")
    try:
        return RecordDims(**{k: _check_int(f"dims.{k}", v) for k, v in value.items()})
    except ValueError as err:
        raise RecordError(str(err)) from None


# --- encoding -----------------------------------------------------------------------------


def encode_record(record: Mapping[str, Any], dims: RecordDims | None = None) -> bytes:
    """msgpack bytes of a validated record (see `validate_record`); RecordError if invalid."""
    valid = validate_record(record, dims)
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "dims": valid["dims"].to_dict(),
    }
    for name in (*INT_FIELDS, *FLOAT_FIELDS, *TEXT_FIELDS, *NODE_TEXT_FIELDS):
        body[name] = valid[name]
    for name in _ARRAYS:
        array = np.ascontiguousarray(valid[name])
        body[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}
    return msgpack.packb(body, use_bin_type=True)


def _decode_array(name: str, value: Any, dims: RecordDims) -> np.ndarray:
    dtype = _ARRAYS[name].dtype
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        raise RecordError(f"field {name!r} is not an encoded array")
    stored = _DTYPE_NAMES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
    if stored is None or stored != dtype:
        raise RecordError(f"field {name!r} has dtype {value['dtype']!r}, expected {dtype.str!r}")
    expected = shape(_ARRAYS[name].axes, dims)
    if not isinstance(value["shape"], list) or value["shape"] != list(expected):
        raise RecordError(f"field {name!r} has shape {value['shape']!r}, expected {list(expected)}")
    data = value["data"]
    if not isinstance(data, bytes) or len(data) != dtype.itemsize * math.prod(expected):
        raise RecordError(f"field {name!r} has the wrong number of bytes")
    array = np.frombuffer(data, dtype=dtype).reshape(expected).copy()
    if dtype == np.dtype(bool) and not np.all(np.frombuffer(data, np.uint8) <= 1):
        raise RecordError(f"field {name!r} holds bool bytes other than 0 and 1")
    return array


def decode_record(data: bytes, dims: RecordDims | None = None) -> dict[str, Any]:
    """The record dict of ``encode_record`` bytes; RecordError for anything else.

    With ``dims``, the record must have exactly those maxima (a learner configured for
    other shapes cannot use it). The result has ``dims`` as a `RecordDims`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RecordError(f"a record must be bytes, got {type(data).__name__}")
    try:
        body = msgpack.unpackb(
            bytes(data), raw=False, strict_map_key=True, max_str_len=_MAX_TEXT, use_list=True
        )
    except Exception as err:  # msgpack raises many types on garbage; all mean "not a record"
        raise RecordError(f"not a msgpack record: {type(err).__name__}: {err}") from None
    if not isinstance(body, dict) or body.get("schema") != SCHEMA:
        raise RecordError(f"not a {SCHEMA} record")
    version = body.get("schema_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise RecordError(
            f"record schema_version {version!r}, this reader reads {READABLE_VERSIONS}"
        )
    stored_dims = _dims_from_dict(body.get("dims"))
    if dims is not None and stored_dims != dims:
        raise RecordError(f"record dims {stored_dims} differ from the expected {dims}")
    expected = {"schema", "schema_version", "dims", *_ARRAYS}
    expected |= {*INT_FIELDS, *FLOAT_FIELDS, *TEXT_FIELDS, *NODE_TEXT_FIELDS}
    if version == 1:  # written before the node texts and memory item ids: filled below
        expected -= {*_V2_ARRAYS, *NODE_TEXT_FIELDS}
    if set(body) != expected:
        extra, missing = sorted(set(body) - expected), sorted(expected - set(body))
        raise RecordError(f"record fields differ from the schema: extra {extra}, missing {missing}")
    record: dict[str, Any] = {"schema_version": version, "dims": stored_dims}
    for field in TRAJECTORY_ARRAYS:
        if field.name in body:
            record[field.name] = _decode_array(field.name, body[field.name], stored_dims)
        else:
            record[field.name] = np.full(shape(field.axes, stored_dims), field.fill, field.dtype)
    if version < 3:  # padding nodes were written as kind 0
        record["node_kind"][~record["node_valid"]] = NodeKind.EMPTY
    for name in NODE_TEXT_FIELDS:
        texts = body.get(name, [""] * stored_dims.nodes)
        record[name] = _check_texts(name, texts, stored_dims.nodes)
    for name in INT_FIELDS:
        record[name] = _check_int(name, body[name])
    for name in FLOAT_FIELDS:
        record[name] = _check_float(name, body[name])
    for name in TEXT_FIELDS:
        record[name] = _check_text(name, body[name])
    _check_semantics(record, stored_dims)
    return record


# --- shards -------------------------------------------------------------------------------


class ShardWriter:
    """Writes one ArrayRecord shard, visible to readers only once complete.

    Records go to ``.{name}.array_record.tmp-{pid}`` in ``directory``; `close` flushes,
    fsyncs and renames it to ``{name}.array_record`` with ``os.replace`` (atomic on POSIX).
    Used as a context manager, an exception inside the block removes the temporary file
    and publishes nothing. Publishing over an existing shard of the same name is refused.
    """

    def __init__(self, directory: str | os.PathLike, *, name: str, dims: RecordDims | None = None):
        if not name or "/" in name or name.startswith(".") or _TEMP_MARK in name:
            raise ValueError(f"shard name must be a plain name without '/' or {_TEMP_MARK!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{name}{SHARD_SUFFIX}"
        if self.path.exists():
            raise FileExistsError(f"shard {self.path} already exists")
        self._temp = self.directory / f".{name}{SHARD_SUFFIX}{_TEMP_MARK}{os.getpid()}"
        self._dims = dims
        self._writer: ArrayRecordWriter | None = ArrayRecordWriter(str(self._temp), "")
        self.num_records = 0

    def write(self, record: Mapping[str, Any]) -> None:
        """Encodes and appends one record (RecordError if it is invalid)."""
        self.write_bytes(encode_record(record, self._dims))

    def write_bytes(self, data: bytes) -> None:
        """Appends already encoded bytes as they are."""
        if self._writer is None:
            raise ValueError(f"shard writer for {self.path} is closed")
        self._writer.write(data)
        self.num_records += 1

    def close(self) -> Path:
        """Finishes the file and publishes it atomically; returns the shard's path."""
        if self._writer is None:
            return self.path
        writer, self._writer = self._writer, None
        writer.close()
        with open(self._temp, "rb") as handle:
            os.fsync(handle.fileno())
        if self.path.exists():
            self._temp.unlink(missing_ok=True)
            raise FileExistsError(f"shard {self.path} appeared while writing; not replaced")
        os.replace(self._temp, self.path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path

    def abort(self) -> None:
        """Drops the shard: nothing is published and the temporary file is removed."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            finally:
                self._temp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def is_shard_path(path: str | os.PathLike) -> bool:
    """True for a published shard file name (never a writer's temporary file)."""
    name = Path(path).name
    return name.endswith(SHARD_SUFFIX) and not name.startswith(".") and _TEMP_MARK not in name


def list_shards(directory: str | os.PathLike) -> list[Path]:
    """Published shards in ``directory`` sorted by name; [] when it does not exist yet."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        (path for path in directory.iterdir() if is_shard_path(path) and path.is_file()),
        key=lambda path: path.name,
    )


def shard_size(path: str | os.PathLike) -> int:
    """Number of records in a shard; ShardError if it cannot be opened."""
    with ShardReader(path) as reader:
        return reader.num_records


def _open(path: str | os.PathLike) -> ArrayRecordReader:
    try:
        reader = ArrayRecordReader(str(path), "readahead_buffer_size:0,max_parallelism:0")
    except Exception as err:  # the reader raises RuntimeError/ValueError on damaged files
        raise ShardError(f"cannot open shard {path}: {err}") from None
    if not reader.ok():  # a damaged file opens "successfully" in a failed state
        _close_quietly(reader)
        raise ShardError(f"cannot open shard {path}: not a readable ArrayRecord file")
    return reader


def _close_quietly(reader: ArrayRecordReader) -> None:
    try:
        reader.close()
    except Exception:  # a failed reader reports its failure again on close; already handled
        pass


class ShardReader:
    """Random access to the raw records of one shard (bytes); ShardError on damage."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._reader = _open(path)
        try:
            self.num_records = int(self._reader.num_records())
        except Exception as err:
            _close_quietly(self._reader)
            raise ShardError(f"cannot read the index of shard {path}: {err}") from None

    def read(self, index: int) -> bytes:
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} outside shard {self.path} of {self.num_records}")
        try:
            (data,) = self._reader.read([index])
        except Exception as err:
            raise ShardError(f"cannot read record {index} of shard {self.path}: {err}") from None
        return data

    def close(self) -> None:
        _close_quietly(self._reader)

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def read_shard(path: str | os.PathLike, dims: RecordDims | None = None) -> Iterator[dict[str, Any]]:
    """The decoded records of one shard, in write order (SPEC §5).

    Raises ShardError if the shard cannot be read and RecordError on a bad record; the
    learner's pipeline uses `ShardReader` and `decode_record` to skip such records instead.
    """
    with ShardReader(path) as reader:
        for index in range(reader.num_records):
            yield decode_record(reader.read(index), dims)
