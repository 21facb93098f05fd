"""Trajectory records: exact msgpack round trips, RecordError on any bad bytes, atomic shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vimrag_jax.rollout.records import (
    SCHEMA_VERSION,
    RecordDims,
    RecordError,
    ShardError,
    ShardWriter,
    blank_record,
    decode_record,
    encode_record,
    list_shards,
    read_shard,
    shard_name,
    validate_record,
)
from vimrag_jax.schema import NODE_TEXT_FIELDS, NodeKind, trajectory_array

DIMS = RecordDims(nodes=5, items=3, segments=4, tokens=6, visuals=2)


def random_record(rng: np.random.Generator, dims: RecordDims = DIMS, **fields) -> dict:
    """A valid record with random content; ``fields`` override (e.g. group ids)."""
    n, s = dims.nodes, dims.segments
    num_nodes = int(rng.integers(1, n + 1))
    node_valid = np.arange(n) < num_nodes
    upper = np.triu(rng.random((n, n)) < 0.4, k=1)
    adjacency = upper & node_valid[:, None] & node_valid[None, :]
    num_segments = int(rng.integers(1, s + 1))
    segment_valid = np.arange(s) < num_segments
    record = blank_record(
        dims,
        question_id=f"q{rng.integers(1000)}",
        group_id=f"g{rng.integers(1000)}",
        group_size=1,
        policy_version=int(rng.integers(0, 10)),
        reward=float(rng.integers(0, 2)),
        answer_node=int(rng.integers(-1, num_nodes)),
        adjacency=adjacency,
        node_valid=node_valid,
        node_kind=np.where(node_valid, rng.integers(0, 3, n), NodeKind.EMPTY).astype(np.int8),
        relevant=rng.random(n) < 0.5,
        priority=rng.integers(1, 6, (n, dims.items)).astype(np.float32),
        item_valid=rng.random((n, dims.items)) < 0.5,
        tokens=rng.integers(0, 50_000, (s, dims.tokens)).astype(np.int32),
        loss_mask=rng.random((s, dims.tokens)) < 0.5,
        behavior_logprobs=-rng.random((s, dims.tokens)).astype(np.float32),
        segment_node=np.where(segment_valid, rng.integers(-1, num_nodes, s), 0).astype(np.int32),
        segment_valid=segment_valid,
        num_invalid_actions=int(rng.integers(0, 3)),
        segment_visuals=rng.integers(0, 100, (s, dims.visuals, 4)).astype(np.int32),
        segment_visual_valid=rng.random((s, dims.visuals)) < 0.5,
        question="what is ünïcode?",
        gold_answer="42",
        prediction="forty-two",
        env="synthetic",
        worker_id="w0",
        created_at=float(rng.random() * 1e9),
        node_title=["root", *(f"n{i}-é" for i in range(1, num_nodes)), *[""] * (n - num_nodes)],
        node_query=[f"query {i}" if i else "" for i in range(n)],
        node_summary=["sum ✓" * int(i) for i in rng.integers(0, 3, n)],
    )
    kept = rng.random((n, dims.items)) < 0.5
    record["item_id"] = np.where(kept, rng.integers(0, 1000, kept.shape), -1).astype(np.int32)
    record["item_modality"] = np.where(kept, rng.integers(0, 2, kept.shape), -1).astype(np.int8)
    record.update(fields)
    return record


def assert_same_record(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert actual[key].dtype == trajectory_array(key).dtype, key
            np.testing.assert_array_equal(actual[key], value, err_msg=key)
        else:
            assert actual[key] == value, key
            assert type(actual[key]) is type(value), key


@given(seed=st.integers(0, 2**32 - 1), nodes=st.integers(1, 6), tokens=st.integers(1, 9))
def test_round_trip_is_exact(seed, nodes, tokens):
    dims = RecordDims(nodes=nodes, items=2, segments=3, tokens=tokens, visuals=1)
    record = random_record(np.random.default_rng(seed), dims)
    decoded = decode_record(encode_record(record), dims)
    assert_same_record(decoded, validate_record(record))
    assert decoded["num_segments"] == int(record["segment_valid"].sum())
    assert encode_record(decoded) == encode_record(record)


@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_record_error(data):
    with pytest.raises(RecordError):
        decode_record(data)


_VALID = encode_record(random_record(np.random.default_rng(0)))


@given(cut=st.integers(0, len(_VALID) - 1))
def test_truncated_encodings_raise_record_error(cut):
    with pytest.raises(RecordError):
        decode_record(_VALID[:cut])


@given(position=st.integers(0, len(_VALID) - 1), value=st.integers(0, 255))
def test_corrupted_bytes_decode_or_raise_record_error(position, value):
    data = bytearray(_VALID)
    data[position] = value
    try:
        record = decode_record(bytes(data))
    except RecordError:
        return
    encode_record(record)  # whatever decodes is a valid record again


def test_wrong_dims_and_schema_are_refused():
    with pytest.raises(RecordError, match="dims"):
        decode_record(_VALID, RecordDims(nodes=6, items=3, segments=4, tokens=6, visuals=2))
    import msgpack

    body = msgpack.unpackb(_VALID)
    for change in ({"schema_version": 99}, {"schema": "other"}, {"tokens": [1, 2]}):
        with pytest.raises(RecordError):
            decode_record(msgpack.packb({**body, **change}))
    body["tokens"] = {**body["tokens"], "dtype": "<f4"}
    with pytest.raises(RecordError, match="dtype"):
        decode_record(msgpack.packb(body))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokens": np.zeros((4, 5), np.int32)}, "shape"),
        ({"tokens": np.full((4, 6), 0.5)}, "integers"),
        ({"tokens": np.full((4, 6), 2**40)}, "fit"),
        ({"answer_node": 5}, "answer_node"),
        ({"reward": float("nan")}, "finite"),
        ({"question": 3}, "str"),
        ({"num_segments": 0}, "num_segments"),
        ({"extra_field": 1}, "unknown"),
    ],
)
def test_encode_rejects_invalid_records(change, message):
    record = random_record(np.random.default_rng(1))
    with pytest.raises(RecordError, match=message):
        encode_record({**record, **change})


def test_encode_rejects_missing_fields():
    record = random_record(np.random.default_rng(1))
    del record["reward"]
    with pytest.raises(RecordError, match="missing"):
        encode_record(record)


def test_shard_writer_publishes_atomically_in_name_order(tmp_path):
    rng = np.random.default_rng(2)
    records = [random_record(rng) for _ in range(5)]
    with ShardWriter(tmp_path, name=shard_name("w1", 2)) as writer:
        for record in records[:3]:
            writer.write(record)
        assert list_shards(tmp_path) == []  # only the temporary file exists so far
        assert len(list(tmp_path.iterdir())) == 1
    with ShardWriter(tmp_path, name=shard_name("w1", 10)) as writer:
        for record in records[3:]:
            writer.write(record)
    shards = list_shards(tmp_path)
    assert [p.name for p in shards] == ["w1-00000002.array_record", "w1-00000010.array_record"]
    decoded = [r for shard in shards for r in read_shard(shard, DIMS)]
    for actual, expected in zip(decoded, records, strict=True):
        assert_same_record(actual, validate_record(expected))
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path, name=shard_name("w1", 2))


def test_failed_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, name="w-00000000") as writer:
        writer.write(random_record(np.random.default_rng(3)))
        raise RuntimeError("worker crashed")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_shard_raises_shard_error(tmp_path):
    bad = tmp_path / "w-00000000.array_record"
    bad.write_bytes(b"not an array record file" * 10)
    with pytest.raises(ShardError):
        list(read_shard(bad))
    assert list_shards(tmp_path) == [bad]
    assert list_shards(tmp_path / "missing") == []


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from vimrag_jax.rollout.records import RecordDims, ShardWriter, blank_record
    dims = RecordDims(nodes=5, items=3, segments=4, tokens=6, visuals=2)
    record = blank_record(dims, question_id="q", group_id="g")
    with ShardWriter(sys.argv[1], name="w-00000000") as writer:
        writer.write(record)
    with ShardWriter(sys.argv[1], name="w-00000001") as writer:
        while True:
            writer.write(record)
            print("wrote", flush=True)
            time.sleep(0.01)
    """
)


def test_sigkilled_writer_publishes_no_partial_shard(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        env=env,
        cwd=root,
    )
    try:
        for _ in range(3):  # the second shard is being written
            assert proc.stdout.readline() == b"wrote\n"
        time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in list_shards(tmp_path)] == ["w-00000000.array_record"]
    assert len(list(read_shard(list_shards(tmp_path)[0], DIMS))) == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0]  # ignored by readers


def test_dims_are_positive_ints():
    with pytest.raises(ValueError, match="tokens"):
        RecordDims(nodes=1, items=1, segments=1, tokens=0, visuals=1)


def _body(record: dict) -> dict:
    import msgpack

    return msgpack.unpackb(encode_record(record))


def _pack(body: dict) -> bytes:
    import msgpack

    return msgpack.packb(body, use_bin_type=True)


def test_version_1_records_decode_with_empty_node_texts_and_item_ids():
    record = random_record(np.random.default_rng(4))
    assert SCHEMA_VERSION == 3
    body = _body(record)
    for name in ("item_id", "item_modality", *NODE_TEXT_FIELDS):
        del body[name]
    body["schema_version"] = 1
    decoded = decode_record(_pack(body), DIMS)
    assert decoded["schema_version"] == 1
    assert decoded["item_id"].dtype == np.int32 and decoded["item_modality"].dtype == np.int8
    assert np.all(decoded["item_id"] == -1) and np.all(decoded["item_modality"] == -1)
    assert all(decoded[name] == [""] * DIMS.nodes for name in NODE_TEXT_FIELDS)
    np.testing.assert_array_equal(decoded["tokens"], record["tokens"])
    np.testing.assert_array_equal(decoded["node_kind"], record["node_kind"])
    again = decode_record(encode_record(decoded), DIMS)  # re-encoded as the current version
    assert (
        again["schema_version"] == SCHEMA_VERSION and again["node_title"] == decoded["node_title"]
    )
    # A version-1 body carrying version-2 fields, or a version-2 body without them, is refused.
    with pytest.raises(RecordError, match="extra"):
        decode_record(_pack({**_body(record), "schema_version": 1}))
    for name in ("item_id", "node_query"):
        broken = _body(record)
        del broken[name]
        with pytest.raises(RecordError, match="missing"):
            decode_record(_pack(broken))
    for version in (0, 4, True, 2.0, "2"):
        with pytest.raises(RecordError, match="schema_version"):
            decode_record(_pack({**_body(record), "schema_version": version}))


def test_new_workers_always_write_node_texts_and_item_ids():
    record = random_record(np.random.default_rng(5))
    for name in ("item_id", "item_modality", *NODE_TEXT_FIELDS):
        del record[name]
    body = _body(record)  # defaults filled in, written anyway
    assert body["schema_version"] == SCHEMA_VERSION
    assert body["node_title"] == [""] * DIMS.nodes
    decoded = decode_record(_pack(body))
    assert np.all(decoded["item_id"] == -1)
    assert blank_record(DIMS)["item_modality"].tolist() == [[-1] * DIMS.items] * DIMS.nodes


@pytest.mark.parametrize(
    "change, message",
    [
        ({"node_title": ["a"] * 4}, "5 strings"),
        ({"node_query": "root"}, "list of 5 str"),
        ({"node_summary": ["", "", 3, "", ""]}, r"node_summary'\[2\] must be a str"),
        ({"item_id": np.full((5, 3), -2)}, "item_id holds -2"),
        ({"item_modality": np.full((5, 3), 2)}, "item_modality holds"),
        ({"item_id": np.zeros((5, 3), np.int32)}, "disagree"),
        ({"item_modality": np.zeros((5, 3), np.float32)}, "integers"),
    ],
)
def test_bad_node_texts_and_item_ids_are_refused(change, message):
    record = random_record(np.random.default_rng(6))
    with pytest.raises(RecordError, match=message):
        encode_record({**record, **change})
    body = _body(record)  # the same damage in encoded bytes is refused by the decoder too
    for name, value in change.items():
        if name in NODE_TEXT_FIELDS:
            body[name] = value
        else:
            array = np.asarray(value).astype(trajectory_array(name).dtype)
            body[name] = {**body[name], "data": array.tobytes()}
    with pytest.raises(RecordError):
        decode_record(_pack(body))


def test_padding_nodes_of_older_versions_read_as_empty_kind():
    record = random_record(np.random.default_rng(8))
    body = _body(record)
    kinds = np.where(record["node_valid"], record["node_kind"], 0).astype(np.int8)
    body["node_kind"] = {**body["node_kind"], "data": kinds.tobytes()}  # how v2 wrote padding
    for version, want in ((2, record["node_kind"]), (3, kinds)):
        decoded = decode_record(_pack({**body, "schema_version": version}), DIMS)
        np.testing.assert_array_equal(decoded["node_kind"], want)
    assert blank_record(DIMS)["node_kind"].tolist() == [NodeKind.EMPTY] * DIMS.nodes
    with pytest.raises(RecordError, match="node_kind"):
        encode_record({**record, "node_kind": np.full(DIMS.nodes, 3, np.int8)})
