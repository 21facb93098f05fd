"""Input pipeline: shards → segment batches, exact ledger, following, drops and process split."""

from __future__ import annotations

import json
import logging
import threading
import time

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_records import random_record

from vimrag_jax.data import segments
from vimrag_jax.data.pipeline import (
    PipelineOptions,
    PolicyVersion,
    drop_late_segments,
    is_late,
    make_pipeline,
    pipeline_metrics,
)
from vimrag_jax.data.shards import Ledger, owned_shards
from vimrag_jax.data.vision import VisualInputs, VisualPatches, image_patches
from vimrag_jax.rl import ggpo, losses
from vimrag_jax.rollout.records import RecordDims, ShardWriter, encode_record, shard_name
from vimrag_jax.schema import segment_field
from vimrag_jax.timeline import Timeline

DIMS = RecordDims(nodes=5, items=2, segments=4, tokens=6, visuals=2)
_NEXT_ID = iter(range(1, 10**9))


def make_group(rng, size, *, version=0, rewards=None, written=None):
    """``size`` records of one group; token 0 of each segment is a unique id."""
    group_id = f"g{next(_NEXT_ID)}"
    records = []
    for member in range(size):
        record = random_record(
            rng, DIMS, group_id=group_id, group_size=size, policy_version=version
        )
        if rewards is not None:
            record["reward"] = float(rewards[member])
        uid = next(_NEXT_ID)
        record["tokens"][:, 0] = uid * 10 + np.arange(DIMS.segments)
        records.append(record)
    return records[: size if written is None else written]


def write_shard(directory, name, groups):
    with ShardWriter(directory, name=name, dims=DIMS) as writer:
        for group in groups:
            for record in group:
                writer.write(record)


def reference_rows(groups, advantage="group"):
    """Plain-Python flattening: every valid segment of every complete group, in order."""
    rows = []
    for group in groups:
        rewards = np.array([r["reward"] for r in group])
        if advantage == "group":
            centered = rewards - rewards.mean()
            adv = centered / (np.sqrt(np.mean(centered**2)) + 1e-6)
        else:
            adv = np.ones(len(group))
        for record, a in zip(group, adv, strict=True):
            for s in range(DIMS.segments):
                if record["segment_valid"][s]:
                    rows.append(
                        {
                            "tokens": record["tokens"][s],
                            "loss_mask": record["loss_mask"][s],
                            "behavior_logprobs": record["behavior_logprobs"][s],
                            "segment_valid": True,
                            "segment_node": record["segment_node"][s],
                            "advantage": a,
                            "reward": record["reward"],
                            "answer_node": record["answer_node"],
                            "adjacency": record["adjacency"],
                            "node_valid": record["node_valid"],
                            "relevant": record["relevant"],
                            "policy_version": record["policy_version"],
                            "segment_index": s,
                            "segment_visuals": record["segment_visuals"][s],
                            "segment_visual_valid": record["segment_visual_valid"][s],
                        }
                    )
    return rows


def options(directory, batch=5, **kw):
    kw.setdefault("follow", False)
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return PipelineOptions(directory=directory, dims=DIMS, batch_segments=batch, **kw)


def valid_rows(batches):
    """Valid rows of the batches as dicts, in order."""
    rows = []
    for batch in batches:
        for i in np.flatnonzero(batch["segment_valid"]):
            rows.append({key: value[i] for key, value in batch.items()})
    return rows


def ids(rows):
    return [int(row["tokens"][0]) for row in rows]


@pytest.fixture
def three_shards(tmp_path):
    rng = np.random.default_rng(0)
    shards = [[make_group(rng, 3) for _ in range(2)] for _ in range(3)]
    for i, groups in enumerate(shards):
        write_shard(tmp_path, shard_name("w0", i), groups)
    return tmp_path, [g for groups in shards for g in groups]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_batches_equal_plain_flattening(three_shards, prefetch):
    directory, groups = three_shards
    batches = list(make_pipeline(options(directory), prefetch=prefetch))
    expected = reference_rows(groups)
    spec = segments.batch_spec(5, DIMS)
    for batch in batches:  # static shapes and dtypes, as the learner declares them up front
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
    assert spec["adjacency"][0] == (5, DIMS.nodes, DIMS.nodes)
    assert len(batches) == -(-len(expected) // 5)
    actual = valid_rows(batches)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert set(got) == set(want)
        for key in want:
            dtype = segment_field(key).dtype
            assert got[key].dtype == dtype, key
            np.testing.assert_allclose(got[key], np.asarray(want[key]).astype(dtype), atol=1e-6)
    last = batches[-1]
    pad = ~last["segment_valid"]
    assert pad.any()  # the final batch is padded to the static size
    assert np.all(last["segment_node"][pad] == -1) and not last["loss_mask"][pad].any()


def test_batch_is_what_policy_objective_consumes(three_shards):
    directory, _ = three_shards
    batch = next(iter(make_pipeline(options(directory, batch=8), prefetch=0)))
    config = losses.LossConfig.for_algorithm("ggpo")
    loss, metrics = jax.jit(lambda b: ggpo.policy_objective(b["behavior_logprobs"], b, config))(
        batch
    )
    assert np.isfinite(float(loss))
    assert int(ggpo.num_valid_segments(batch)) == int(
        (batch["segment_valid"] & batch["loss_mask"].any(-1)).sum()
    )


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_from_state_neither_repeats_nor_skips(three_shards, prefetch):
    directory, groups = three_shards
    expected = ids(reference_rows(groups))
    total_batches = -(-len(expected) // 4)
    for stop in range(total_batches + 1):
        first = iter(make_pipeline(options(directory, batch=4), prefetch=prefetch))
        before = [next(first) for _ in range(stop)]
        state = json.loads(json.dumps(first.get_state()))
        first.close()
        ledger = Ledger.from_state(state)
        seen = set(ids(valid_rows(before)))
        for group in groups:  # the ledger's "consumed" matches what was emitted
            for record in group:
                record_ids = [int(t) for t in record["tokens"][record["segment_valid"], 0]]
                shard, index = _where(record, groups)
                consumed = ledger.is_consumed(
                    shard, index, int(np.flatnonzero(record["segment_valid"])[-1])
                )
                assert consumed == all(i in seen for i in record_ids)
        second = iter(make_pipeline(options(directory, batch=4), prefetch=prefetch))
        second.set_state(state)
        after = list(second)
        assert ids(valid_rows(before)) + ids(valid_rows(after)) == expected, stop
        metrics = pipeline_metrics(second.get_state())
        assert metrics["records_consumed"] == 18 and metrics["segments_emitted"] == len(expected)


def _where(record, groups):
    """(shard name, record index) of a record of the three_shards fixture."""
    flat = [r for g in groups for r in g]
    position = next(i for i, r in enumerate(flat) if r is record)
    return f"{shard_name('w0', position // 6)}.array_record", position % 6


def test_growing_directory_is_followed(tmp_path):
    rng = np.random.default_rng(1)
    first, second = [make_group(rng, 2)], [make_group(rng, 2)]
    write_shard(tmp_path, shard_name("w0", 0), first)
    it = iter(
        make_pipeline(
            options(tmp_path, batch=64, follow=True, poll_interval_s=0.01, idle_timeout_s=1.0),
            prefetch=0,
        )
    )
    batch = next(it)  # idles, then returns the partial batch of the first shard
    assert ids(valid_rows([batch])) == ids(reference_rows(first))
    writer = threading.Timer(0.1, write_shard, (tmp_path, shard_name("w1", 0), second))
    writer.start()
    start = time.monotonic()
    batch = next(it)  # blocks until the new shard appears, then idles again
    writer.join()
    assert time.monotonic() - start < 5
    assert ids(valid_rows([batch])) == ids(reference_rows(second))
    quiet = iter(make_pipeline(options(tmp_path, follow=True, idle_timeout_s=0.05), prefetch=0))
    quiet.set_state(it.get_state())
    with pytest.raises(StopIteration):  # nothing new: ends after the idle timeout
        next(quiet)


def test_stale_groups_are_counted_and_left_to_the_update(tmp_path):
    rng = np.random.default_rng(2)
    old, fresh, newer = make_group(rng, 2, version=2), make_group(rng, 2, version=3), None
    newer = make_group(rng, 2, version=5)
    write_shard(tmp_path, shard_name("w0", 0), [old, fresh, newer])
    version = PolicyVersion(5)
    opts = options(tmp_path, batch=64, max_policy_lag=2, current_version=version)
    it = iter(make_pipeline(opts, prefetch=0))
    (batch,) = list(it)
    assert ids(valid_rows([batch])) == ids(reference_rows([old, fresh, newer]))
    metrics = pipeline_metrics(it.get_state())
    assert metrics["stale_groups"] == 1 and metrics["stale_records"] == 2
    kept, late = drop_late_segments(batch, trained_version=5, max_policy_lag=2)  # the one drop
    assert ids(valid_rows([kept])) == ids(reference_rows([fresh, newer]))
    assert late == len(reference_rows([old]))
    version.set(7)
    it = iter(make_pipeline(opts, prefetch=0))
    assert len(valid_rows(list(it))) == len(reference_rows([old, fresh, newer]))
    assert pipeline_metrics(it.get_state())["stale_records"] == 4
    assert is_late(4, 7, 2) and not is_late(5, 7, 2)
    with pytest.raises(ValueError, match="current_version"):
        options(tmp_path, max_policy_lag=2)


def test_groups_of_lost_versions_are_dropped_and_counted(tmp_path):
    # A restart lost versions 3..4: a group with a rollout of either is dropped (counted), the
    # others are kept, and lags count only the versions that survived.
    rng = np.random.default_rng(7)
    before, lost, mixed, after = (make_group(rng, 2, version=v) for v in (2, 4, 2, 5))
    mixed[1]["policy_version"] = 3
    write_shard(tmp_path, shard_name("w0", 0), [before, lost, mixed, after])
    timeline = Timeline(((3, 4),))
    lag = dict(max_policy_lag=1, current_version=PolicyVersion(5))
    it = iter(make_pipeline(options(tmp_path, batch=64, timeline=timeline, **lag), prefetch=0))
    (batch,) = list(it)
    assert ids(valid_rows([batch])) == ids(reference_rows([before, after]))
    metrics = pipeline_metrics(it.get_state())
    assert (metrics["lost_groups"], metrics["lost_records"]) == (2, 4)
    assert metrics["stale_groups"] == 0  # v2 is one surviving version behind v5
    kept, late = drop_late_segments(batch, 5, 1, timeline)
    assert late == 0 and np.array_equal(kept["segment_valid"], batch["segment_valid"])
    _, late = drop_late_segments(batch, 5, 1)  # counted without the timeline: v2 is 3 behind
    assert late == len(reference_rows([before]))


def test_segments_lagging_at_the_update_are_dropped_and_counted(tmp_path):
    # A group read while fresh can wait in the prefetch buffer while the policy moves on.
    rng = np.random.default_rng(5)
    write_shard(tmp_path, shard_name("w0", 0), [make_group(rng, 2, version=v) for v in (3, 5)])
    version = PolicyVersion(5)
    opts = options(tmp_path, batch=64, max_policy_lag=2, current_version=version)
    (batch,) = list(make_pipeline(opts, prefetch=0))
    valid = np.asarray(batch["segment_valid"], bool)
    versions = np.asarray(batch["policy_version"])
    assert set(versions[valid]) == {3, 5}
    kept, late = drop_late_segments(batch, trained_version=6, max_policy_lag=2)
    assert late == int(np.sum(valid & (versions == 3)))
    np.testing.assert_array_equal(kept["segment_valid"], valid & (versions == 5))
    assert kept["tokens"] is batch["tokens"] and batch["segment_valid"] is not kept["segment_valid"]
    np.testing.assert_array_equal(batch["segment_valid"], valid)  # the input is left alone
    same, none = drop_late_segments(batch, trained_version=5, max_policy_lag=2)  # lag 2: kept
    assert none == 0 and np.array_equal(same["segment_valid"], valid)


@pytest.mark.parametrize("skip", [False, True])
def test_uniform_reward_groups_are_skipped_and_counted(tmp_path, skip):
    rng = np.random.default_rng(3)
    wins, losses_, mixed = (make_group(rng, 3, rewards=r) for r in ([1] * 3, [0] * 3, [0, 1, 1]))
    stale = make_group(rng, 3, version=0, rewards=[1, 0, 0])
    for group in (wins, losses_, mixed):
        for record in group:
            record["policy_version"] = 4
    write_shard(tmp_path, shard_name("w0", 0), [wins, stale, losses_, mixed])
    opts = options(
        tmp_path,
        batch=64,
        max_policy_lag=2,
        current_version=PolicyVersion(4),
        skip_uniform_groups=skip,
    )
    it = iter(make_pipeline(opts, prefetch=0))
    kept = [stale, mixed] if skip else [wins, stale, losses_, mixed]  # stale: the update's
    assert ids(valid_rows(list(it))) == ids(reference_rows(kept))
    metrics = pipeline_metrics(it.get_state())
    # Every complete group is read and scored, stale or uniform: the workers' own reward.
    assert (metrics["groups_read"], metrics["records_read"], metrics["rewarded_records"]) == (
        4, 12, 6
    )  # fmt: skip
    assert metrics["stale_groups"] == 1
    assert (metrics["uniform_groups"], metrics["uniform_records"]) == ((2, 6) if skip else (0, 0))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_progress_counts_what_was_read_before_any_batch(tmp_path, prefetch):
    # Only groups with one reward for all, skipped: no batch ever comes. Through a prefetch
    # thread get_state() (the last batch's) then says nothing was read; `progress` says what
    # was read and dropped either way.
    rng = np.random.default_rng(4)
    write_shard(tmp_path, shard_name("w0", 0), [make_group(rng, 3, rewards=[0] * 3)] * 2)
    opts = options(tmp_path, skip_uniform_groups=True, progress={})
    it = iter(make_pipeline(opts, prefetch=prefetch))
    assert list(it) == []
    assert (opts.progress["records_read"], opts.progress["uniform_records"]) == (6, 6)


def test_states_saved_before_the_reward_counters_still_resume(three_shards):
    directory, groups = three_shards
    it = iter(make_pipeline(options(directory, batch=4), prefetch=0))
    next(it)
    state = it.get_state()
    new = ("groups_read", "records_read", "rewarded_records", "uniform_groups", "uniform_records")
    old = {**state, "counters": {k: v for k, v in state["counters"].items() if k not in new}}
    resumed = iter(make_pipeline(options(directory, batch=4), prefetch=0))
    resumed.set_state(old)
    rest = valid_rows(list(resumed))
    assert ids(rest) == ids(reference_rows(groups))[4:]
    metrics = pipeline_metrics(resumed.get_state())
    assert metrics["segments_emitted"] == len(reference_rows(groups))
    assert 0 < metrics["records_read"] < 3 * len(groups)  # counted from the resume on


def test_corrupt_shards_and_records_are_skipped_and_counted(tmp_path, caplog):
    rng = np.random.default_rng(3)
    good, broken, after = make_group(rng, 3), make_group(rng, 3), make_group(rng, 2)
    write_shard(tmp_path, shard_name("w0", 0), [good])
    (tmp_path / f"{shard_name('w0', 1)}.array_record").write_bytes(b"garbage" * 100)
    with ShardWriter(tmp_path, name=shard_name("w0", 2)) as writer:
        writer.write_bytes(encode_record(broken[0]))
        writer.write_bytes(encode_record(broken[1])[:-7])  # truncated record
        writer.write_bytes(encode_record(broken[2]))
        for record in after:
            writer.write(record)
    incomplete = make_group(rng, 3, written=2)  # a worker died mid-group
    write_shard(tmp_path, shard_name("w0", 3), [incomplete])
    with caplog.at_level(logging.ERROR):
        it = iter(make_pipeline(options(tmp_path), prefetch=0))
        rows = valid_rows(list(it))
    assert ids(rows) == ids(reference_rows([good, after]))
    metrics = pipeline_metrics(it.get_state())
    assert metrics["corrupt_shards"] == 1 and metrics["corrupt_records"] == 1
    assert metrics["incomplete_groups"] == 3  # broken[:1], broken[2:] and the cut group
    assert metrics["incomplete_records"] == 4 and metrics["shards_done"] == 4
    assert "unreadable shard" in caplog.text and "corrupt record" in caplog.text


def _numpy_advantages(rewards):
    rewards = np.asarray(rewards, np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-6)


@given(rewards=st.lists(st.floats(0, 1, width=32), min_size=1, max_size=8))
def test_group_advantages_match_numpy(rewards):
    actual = losses.group_advantages(rewards)
    np.testing.assert_allclose(actual, _numpy_advantages(rewards), rtol=1e-5, atol=1e-4)
    if len(set(rewards)) == 1:
        assert np.all(actual == 0.0)


def test_pipeline_advantages_and_sft_mode(tmp_path):
    rng = np.random.default_rng(4)
    groups = [make_group(rng, 4, rewards=[1, 0, 0, 1]), make_group(rng, 2, rewards=[1, 1])]
    write_shard(tmp_path, shard_name("w0", 0), groups)
    rows = valid_rows(make_pipeline(options(tmp_path), prefetch=0))
    by_id = {int(t): adv for t, adv in zip(ids(rows), [r["advantage"] for r in rows], strict=True)}
    for group in groups:
        adv = _numpy_advantages([r["reward"] for r in group]).astype(np.float32)
        for record, a in zip(group, adv, strict=True):
            for t in record["tokens"][record["segment_valid"], 0]:
                assert by_id[int(t)] == pytest.approx(a, abs=1e-6)
    assert all(
        r["advantage"] == 0.0 for r in rows[-sum(g["segment_valid"].sum() for g in groups[1]) :]
    )
    sft = valid_rows(make_pipeline(options(tmp_path, advantage="one"), prefetch=0))
    assert all(r["advantage"] == 1.0 for r in sft)


@pytest.mark.parametrize("follow", [False, True])
def test_process_split_is_disjoint_and_covering(tmp_path, follow):
    rng = np.random.default_rng(5)
    groups = [make_group(rng, 2) for _ in range(7)]
    for i, group in enumerate(groups):
        write_shard(tmp_path, shard_name(f"w{i % 2}", i), [group])
    expected = sorted(ids(reference_rows(groups)))
    for count in (1, 2, 3):
        seen = []
        for index in range(count):
            opts = options(
                tmp_path,
                process_index=index,
                process_count=count,
                follow=follow,
                idle_timeout_s=0.0,
            )
            seen += ids(valid_rows(make_pipeline(opts, prefetch=0)))
        assert sorted(seen) == expected
    names = [f"s{i}" for i in range(50)]
    shares = [owned_shards(names, i, 4, follow=follow) for i in range(4)]
    assert sorted(n for share in shares for n in share) == sorted(names)
    with pytest.raises(ValueError, match="valid split"):
        owned_shards(names, 4, 4, follow=follow)


def test_malformed_states_are_refused(three_shards):
    directory, _ = three_shards
    it = iter(make_pipeline(options(directory), prefetch=0))
    state = it.get_state()
    for bad in (
        {**state, "ledger_version": 0},
        {**state, "done_shards": "x"},
        {**state, "cursor": {"shard": "a"}},
        {**state, "counters": {}},
    ):
        with pytest.raises(ValueError):
            it.set_state(bad)


def test_visual_stage_runs_inside_the_pipeline(tmp_path):
    rng = np.random.default_rng(6)
    group = make_group(rng, 2)
    for record in group:
        record["segment_visuals"][:] = [3, 0, 32, 64]
        record["segment_visual_valid"][:] = [True, False]
    write_shard(tmp_path, shard_name("w0", 0), [group])
    image = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    stage = VisualInputs(
        VisualPatches(lambda item, frame: image, lambda item: "image"), max_patches=16
    )
    it = iter(make_pipeline(options(tmp_path, batch=4), visual_inputs=stage, prefetch=2))
    batches = list(it)
    patches, _ = image_patches(image, 32, 64)
    for batch in batches:
        assert batch["pixel_values"].shape == (4, 16, 1536)
        for row in np.flatnonzero(batch["segment_valid"]):
            np.testing.assert_array_equal(batch["pixel_values"][row, :8], patches)
            assert batch["pixel_valid"][row].sum() == 8
            assert batch["visual_grid_thw"][row].tolist() == [[1, 2, 4], [0, 0, 0]]
    assert pipeline_metrics(it.get_state())["records_consumed"] == 2
