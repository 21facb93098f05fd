"""The learner's grain input pipeline: rollout shards in, segment-major batches out.

`SegmentBatches` is a grain ``IterDataset`` whose iterator reads this process's shards
(`shards.ShardSource`) record by record, decodes them (msgpack, no pickle), assembles each
group of G consecutive rollouts (the records.py contract), drops incomplete groups (and, on
request, groups whose rollouts all got one reward), counts stale ones, computes group
advantages, flattens the trajectories into segment rows and stacks them into padded batches
(`segments.stack_rows`). Its state is the `shards.Ledger` of the last row it returned, so
``get_state()`` / ``set_state()`` resume without repeating or skipping a segment, even when a
trajectory's segments straddle batches.

`make_pipeline` adds the optional visual stage (`vision.VisualInputs`; for a vision-language
policy `visual_stage_from_config` builds it) and grain's thread prefetch. Everything runs in
threads of the learner process (no grain worker processes): decoding is cheap next to a
learner step, and the iterator's ledger is not sliceable across processes.

Policy lag is enforced in one place, just before the update (`drop_late_segments`, by the rule
`is_late`): a segment can wait in the prefetch buffer, so only the update knows the lag it is
trained at. The reader only counts the groups that are already too old when read
(``stale_groups``), so a run shows how much of its workers' output arrives late.

Following a directory: when no unread shard exists, the iterator polls every
``poll_interval_s``; after ``idle_timeout_s`` without progress it returns the partial batch
it holds, or raises ``StopIteration`` when it holds nothing. Calling ``next`` again later
resumes the polling (the learner checks for shutdown in between). A finite timeout also
bounds how long closing a prefetching iterator can take.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grain
import numpy as np

from vimrag_jax.data.segments import ADVANTAGE_MODES, record_advantages, segment_row, stack_rows
from vimrag_jax.data.shards import COUNTERS, Cursor, Ledger, ShardSource, default_process
from vimrag_jax.rl.ggpo import is_positive
from vimrag_jax.rollout.records import RecordError, ShardReader, decode_record
from vimrag_jax.schema import RecordDims
from vimrag_jax.timeline import NO_LOSS, Timeline

log = logging.getLogger(__name__)


class PolicyVersion:
    """The learner's current policy version, settable from the training loop (thread-safe)."""

    def __init__(self, version: int = 0):
        self._version = int(version)
        self._lock = threading.Lock()

    def set(self, version: int) -> None:
        with self._lock:
            self._version = int(version)

    def __call__(self) -> int:
        with self._lock:
            return self._version


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Settings of `SegmentBatches` (see the module docstring for following and timeouts).

    ``max_policy_lag``: count (``stale_groups``) a group whose oldest record has
    ``policy_version`` more than this many versions behind ``current_version()`` when read;
    dropping late segments is the update's (`drop_late_segments`). ``advantage``:
    ``"group"`` (GGPO / GSPO) or ``"one"`` (SFT). ``skip_uniform_groups``: drop a group whose
    rollouts all got the same reward; its advantages are all 0, so it adds nothing to the
    policy gradient but dilutes the batch (DAPO's dynamic sampling). ``process_index`` /
    ``process_count`` default to ``jax.process_index()`` / ``jax.process_count()``.
    ``progress``: a dict the reader keeps equal to its counters as it reads — ahead of
    ``get_state()``, which (through a prefetch thread too) describes the last batch handed
    out; for messages about a learner that waits, never for checkpoints.
    ``positive_threshold``: a rollout counts in ``rewarded_records`` when its reward is positive
    by GGPO's rule (`rl.ggpo.is_positive`, the config's ``loss.positive_threshold``).
    ``timeline``: the policy versions restarts lost (`vimrag_jax.timeline`); a group with a
    rollout sampled by one is dropped and counted (``lost_groups``), and lags are counted on
    the surviving timeline.
    """

    directory: str | Path
    dims: RecordDims
    batch_segments: int
    follow: bool = True
    poll_interval_s: float = 0.5
    idle_timeout_s: float | None = 30.0
    max_policy_lag: int | None = None
    current_version: Callable[[], int] | None = None
    advantage: str = "group"
    skip_uniform_groups: bool = False
    process_index: int | None = None
    process_count: int | None = None
    progress: dict[str, int] | None = dataclasses.field(default=None, compare=False)
    positive_threshold: float = 1.0
    timeline: Timeline = NO_LOSS

    def __post_init__(self):
        if not isinstance(self.dims, RecordDims):
            raise TypeError(f"dims must be a RecordDims, got {type(self.dims).__name__}")
        if self.batch_segments < 1:
            raise ValueError(f"batch_segments must be >= 1, got {self.batch_segments}")
        if self.poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {self.poll_interval_s}")
        if self.idle_timeout_s is not None and self.idle_timeout_s < 0:
            raise ValueError(f"idle_timeout_s must be >= 0 or None, got {self.idle_timeout_s}")
        if self.max_policy_lag is not None:
            if self.max_policy_lag < 0:
                raise ValueError(f"max_policy_lag must be >= 0, got {self.max_policy_lag}")
            if self.current_version is None:
                raise ValueError("max_policy_lag needs current_version (e.g. a PolicyVersion)")
        if self.advantage not in ADVANTAGE_MODES:
            raise ValueError(f"advantage must be one of {ADVANTAGE_MODES}, got {self.advantage!r}")
        if (self.process_index is None) != (self.process_count is None):
            raise ValueError("set both process_index and process_count, or neither")


def pipeline_metrics(state: dict[str, Any]) -> dict[str, int]:
    """The drop / progress counters of a pipeline state (from ``iterator.get_state()``)."""
    return {key: int(state["counters"].get(key, 0)) for key in COUNTERS}


class SegmentBatches(grain.IterDataset):
    """grain dataset of segment-major batches read from trajectory shards."""

    def __init__(self, options: PipelineOptions):
        super().__init__()
        self.options = options

    def __iter__(self) -> _SegmentBatchIterator:
        return _SegmentBatchIterator(self.options)

    def __str__(self) -> str:
        return f"SegmentBatches(directory={self.options.directory!s})"


@dataclasses.dataclass
class _Row:
    fields: dict[str, Any]
    ledger: Ledger  # the state once this row has been emitted


class _SegmentBatchIterator(grain.DatasetIterator):
    """Reads groups in ledger order and hands out batches; see `SegmentBatches`."""

    def __init__(self, options: PipelineOptions):
        super().__init__()
        self._opt = options
        if options.process_index is None:
            index, count = default_process()
        else:
            index, count = options.process_index, options.process_count
        self._source = ShardSource(
            options.directory, process_index=index, process_count=count, follow=options.follow
        )
        self._live = Ledger()  # position of everything read so far
        self._emitted = self._live  # position of the rows already handed out
        self._pending: collections.deque[_Row] = collections.deque()
        self._reader: ShardReader | None = None
        self._position = 0  # next record of the open shard
        self._resume: tuple[int, int] | None = None  # skip rows before (record, segment)
        self._peeked: tuple[int, dict[str, Any] | None] | None = None

    # -- grain iterator API ----------------------------------------------------------

    def __next__(self) -> dict[str, np.ndarray]:
        opt = self._opt
        idle_since: float | None = None
        while len(self._pending) < opt.batch_segments:
            if self._advance():
                idle_since = None
                continue
            if not opt.follow:
                break
            now = time.monotonic()
            idle_since = now if idle_since is None else idle_since
            if opt.idle_timeout_s is not None and now - idle_since >= opt.idle_timeout_s:
                break
            time.sleep(opt.poll_interval_s)
        if not self._pending:
            self._emitted = self._live  # drops after the last row are consumed too
            raise StopIteration
        take = min(opt.batch_segments, len(self._pending))
        rows = [self._pending.popleft() for _ in range(take)]
        # With nothing left pending, whatever was read after the last row was dropped.
        self._emitted = self._live if not self._pending else rows[-1].ledger
        return stack_rows([row.fields for row in rows], opt.batch_segments, opt.dims)

    def get_state(self) -> dict[str, Any]:
        return self._emitted.to_state()

    def set_state(self, state: dict[str, Any]) -> None:
        ledger = Ledger.from_state(state)
        self._close_reader()
        self._pending.clear()
        self._live = self._emitted = ledger
        self._resume = None
        self._report()

    def close(self) -> None:
        self._close_reader()
        super().close()

    # -- reading -------------------------------------------------------------------------

    def _count(self, **increments: int) -> None:
        counters = dict(self._live.counters)
        for key, value in increments.items():
            counters[key] += value
        self._live = dataclasses.replace(self._live, counters=counters)
        self._report()

    def _report(self) -> None:
        if self._opt.progress is not None:
            self._opt.progress.update(self._live.counters)

    def _move(self, cursor: Cursor | None) -> None:
        self._live = dataclasses.replace(self._live, cursor=cursor)

    def _close_reader(self) -> None:
        self._peeked = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _advance(self) -> bool:
        """Processes one step (open a shard, one group, or a shard's end); False if idle."""
        if self._reader is None:
            return self._open_shard()
        if self._position >= self._reader.num_records:
            self._finish_shard(self._live.cursor.shard)
        else:
            self._read_group()
        return True

    def _open_shard(self) -> bool:
        cursor = self._live.cursor
        if cursor is None:
            name = self._source.next_shard(self._live.done)
            if name is None:
                return False
            cursor = Cursor(name, 0, 0, 0)
            self._move(cursor)
        else:  # resuming inside a shard: replay its group, skipping the rows already emitted
            self._resume = (cursor.record, cursor.segment)
        try:
            self._reader = ShardReader(self._source.path(cursor.shard))
        except (RecordError, OSError) as err:
            log.error("skipping unreadable shard %s: %s", cursor.shard, err)
            self._count(corrupt_shards=1)
            self._finish_shard(cursor.shard)
            return True
        self._position = cursor.group_start
        return True

    def _finish_shard(self, name: str) -> None:
        self._close_reader()
        self._resume = None
        self._live = dataclasses.replace(self._live, done=self._live.done | {name}, cursor=None)
        self._count(shards_done=1)

    def _decode(self, index: int) -> dict[str, Any] | None:
        """Record ``index`` of the open shard, None (logged once) when it is corrupt."""
        if self._peeked is not None and self._peeked[0] == index:
            return self._peeked[1]  # the look-ahead that ended the previous group
        try:
            record = decode_record(self._reader.read(index), self._opt.dims)
        except RecordError as err:
            log.error("skipping corrupt record %d of %s: %s", index, self._reader.path, err)
            record = None
        self._peeked = (index, record)
        return record

    def _read_group(self) -> None:
        """Reads the group starting at the current position and emits or drops it."""
        shard, start, reader = self._live.cursor.shard, self._position, self._reader
        group: list[tuple[int, dict[str, Any]]] = []
        index = start
        while index < reader.num_records:
            record = self._decode(index)
            if record is None:
                if group:  # the group ends before the damaged record, which is counted next
                    break
                self._count(corrupt_records=1)
                index += 1
                self._set_position(shard, index)
                return
            if group and record["group_id"] != group[0][1]["group_id"]:
                break
            group.append((index, record))
            index += 1
            if len(group) == group[0][1]["group_size"]:
                break
        resume, self._resume = self._resume, None
        resumed = resume is not None and resume != (start, 0)
        records = [record for _, record in group]
        size = records[0]["group_size"]
        if len(records) != size or any(r["group_size"] != size for r in records):
            log.warning("dropping incomplete group %r of %s", records[0]["group_id"], shard)
            self._count(incomplete_groups=1, incomplete_records=len(records))
        elif resumed:  # counted and checked before the state was saved
            self._emit(shard, start, group, resume)
        else:
            threshold = self._opt.positive_threshold
            rewarded = sum(bool(is_positive(float(r["reward"]), threshold)) for r in records)
            self._count(groups_read=1, records_read=len(records), rewarded_records=rewarded)
            lost = any(self._opt.timeline.is_lost(r["policy_version"]) for r in records)
            if not lost and self._stale(records):
                self._count(stale_groups=1, stale_records=len(records))
            if lost:
                self._count(lost_groups=1, lost_records=len(records))
            elif self._opt.skip_uniform_groups and _uniform(records):
                self._count(uniform_groups=1, uniform_records=len(records))
            else:
                self._emit(shard, start, group, resume)
        self._set_position(shard, index)

    def _set_position(self, shard: str, index: int) -> None:
        self._position = index
        self._move(Cursor(shard, index, index, 0))

    def _stale(self, records: list[dict[str, Any]]) -> bool:
        opt = self._opt
        if opt.max_policy_lag is None:
            return False
        oldest = min(record["policy_version"] for record in records)
        return bool(is_late(oldest, opt.current_version(), opt.max_policy_lag, opt.timeline))

    def _emit(
        self,
        shard: str,
        start: int,
        group: list[tuple[int, dict[str, Any]]],
        resume: tuple[int, int] | None,
    ) -> None:
        advantages = record_advantages([record for _, record in group], self._opt.advantage)
        for (index, record), advantage in zip(group, advantages, strict=True):
            segments = np.flatnonzero(record["segment_valid"])
            if resume is not None and index < resume[0]:
                continue  # consumed before the state was saved
            if segments.size == 0:
                self._count(records_consumed=1)
                continue
            for segment in segments.tolist():
                if resume is not None and (index, segment) < resume:
                    continue
                last = segment == segments[-1]
                self._count(segments_emitted=1, records_consumed=int(last))
                self._move(Cursor(shard, start, index, segment + 1))
                fields = segment_row(record, segment, float(advantage))
                self._pending.append(_Row(fields, self._live))


def _uniform(records: list[dict[str, Any]]) -> bool:
    rewards = [float(record["reward"]) for record in records]
    return max(rewards) - min(rewards) == 0.0


def is_late(
    sampled_version: int | np.ndarray,
    trained_version: int,
    max_policy_lag: int,
    timeline: Timeline = NO_LOSS,
) -> bool | np.ndarray:
    """The policy-lag rule: sampled more than ``max_policy_lag`` versions of the surviving
    ``timeline`` before the policy that ``trained_version`` names (the one about to be
    updated)."""
    return timeline.surviving_lag(sampled_version, trained_version) > max_policy_lag


def drop_late_segments(
    batch: Mapping[str, np.ndarray],
    trained_version: int,
    max_policy_lag: int,
    timeline: Timeline = NO_LOSS,
) -> tuple[dict[str, np.ndarray], int]:
    """``batch`` with every segment sampled more than ``max_policy_lag`` versions before
    ``trained_version`` (the policy the batch is about to update) marked invalid, and how many
    valid segments that dropped.

    The one place the lag is enforced: a segment can wait after the pipeline read it, in the
    prefetch buffer or behind its group's other segments when they fill more than one batch,
    so only here is its lag known. A dropped segment stays consumed (the checkpoint's position
    moves past it).
    """
    valid = np.asarray(batch["segment_valid"], bool)
    versions = np.asarray(batch["policy_version"])
    late = valid & is_late(versions, trained_version, max_policy_lag, timeline)
    count = int(late.sum())
    if not count:
        return dict(batch), 0
    return {**batch, "segment_valid": valid & ~late}, count


def make_pipeline(
    options: PipelineOptions,
    *,
    visual_inputs: Callable[[dict[str, np.ndarray]], dict[str, Any]] | None = None,
    prefetch: int = 2,
) -> grain.IterDataset:
    """The learner's input: `SegmentBatches`, then pixels (only for a policy with a vision
    tower: pass a `vision.VisualInputs`), then ``prefetch`` batches prepared in a thread.

    ``iter(dataset)`` gives an iterator with grain's ``get_state()`` / ``set_state()``;
    the prefetching iterator reports the state of the last batch it returned.
    """
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    dataset: grain.IterDataset = SegmentBatches(options)
    if visual_inputs is not None:
        dataset = dataset.map(visual_inputs)
    if prefetch:
        dataset = grain.experimental.ThreadPrefetchIterDataset(
            dataset, prefetch_buffer_size=prefetch
        )
    return dataset


def rows_per_process(global_rows: int, process_count: int | None = None) -> int:
    """This process's share of a global batch of ``global_rows`` segments (each process's
    pipeline builds its own rows; ``config_checks`` requires an even split)."""
    count = default_process()[1] if process_count is None else process_count
    if global_rows % count:
        raise ValueError(f"a batch of {global_rows} segments does not split over {count} processes")
    return global_rows // count


def options_from_config(
    cfg: Any,
    directory: str | Path,
    dims: RecordDims,
    *,
    current_version: Callable[[], int] | None = None,
    follow: bool = True,
    advantage: str = "group",
    skip_uniform_groups: bool = False,
    batch_segments: int | None = None,
    timeline: Timeline = NO_LOSS,
) -> PipelineOptions:
    """`PipelineOptions` from the experiment config (``rollout.max_policy_lag``; the lag applies
    only with ``current_version``). ``batch_segments`` (default ``data.batch_segments``) is the
    global batch: this process builds its share of it (`rows_per_process`)."""
    lag = int(cfg.rollout.max_policy_lag) if current_version is not None else None
    rows = int(cfg.data.batch_segments if batch_segments is None else batch_segments)
    return PipelineOptions(
        directory=directory,
        dims=dims,
        batch_segments=rows_per_process(rows),
        follow=follow,
        max_policy_lag=lag,
        current_version=current_version,
        advantage=advantage,
        skip_uniform_groups=skip_uniform_groups,
        positive_threshold=float(cfg.loss.positive_threshold),
        timeline=timeline,
    )


def visual_stage_from_config(
    cfg: Any, model_fn: Callable[[], Any], store: Any, max_patches: int
) -> Callable[[dict[str, np.ndarray]], dict[str, Any]] | None:
    """The learner's visual stage for the policy ``model_fn`` builds: a `vision.VisualInputs`
    with the model's config for a vision-language policy (a model with ``prepare_prefill``),
    None for a text-only one.

    Pixels are read from the corpus ``store``'s directory through a store of the stage's own
    (the stage runs in the prefetch thread; the learner's evaluation reads the same corpus
    from the main thread). The patch cap is ``data.max_patches`` when the config sets it,
    else ``max_patches`` (e.g. ``RolloutConfig.max_visual_patches``).
    """
    from flax import nnx

    from vimrag_jax.data.vision import visual_stage
    from vimrag_jax.retrieval.corpus import CorpusStore

    with nnx.use_eager_sharding(False):  # shapes only: no weights, no mesh
        model = nnx.eval_shape(model_fn)
    if not hasattr(model, "prepare_prefill"):
        return None
    data = cfg.get("data")
    configured = int(data.get("max_patches", 0) or 0) if data is not None else 0
    pixels = CorpusStore.open(store.directory, store.embedder)
    return visual_stage(model, pixels, max_patches=configured or int(max_patches))
