"""Which rollout shards a learner process reads, and the ledger of what it has consumed.

`ShardSource` lists the published shards of a directory (a writer's temporary files are
never seen), keeps this process's share, and skips the shards the ledger marks done. For a
fixed shard set the share is round-robin over the sorted names (balanced); for a directory
that keeps growing it is ``crc32(name) % process_count`` (stable as new names appear). Either
way the processes' shares are disjoint and cover every shard, and since a group of rollouts
lives in one shard (records.py), groups are never split between processes.

`Ledger` is the JSON state of the pipeline. Records are consumed in a fixed order (shard by
shard, then record, then segment); the ledger holds the set of finished shards and a cursor
in the current shard: ``group_start`` (first record of the group being emitted), ``record``
and ``segment`` (the next segment not yet emitted). A record is *consumed* when its shard is
done, when its index is below ``cursor.record``, or when it is ``cursor.record`` and all its
valid segments are below ``cursor.segment``. Dropped records (stale, corrupt, incomplete
group) count as consumed once the cursor has passed them.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vimrag_jax.rollout.records import list_shards

LEDGER_VERSION = 1
COUNTERS = (
    "shards_done",
    "corrupt_shards",
    "corrupt_records",
    "records_consumed",
    "segments_emitted",
    "stale_groups",
    "stale_records",
    "incomplete_groups",
    "incomplete_records",
    # Complete groups read (stale and lost ones included) and their positive records
    # (`rl.ggpo.is_positive`): the success of the rollouts as the workers produced them, before
    # any filtering.
    "groups_read",
    "records_read",
    "rewarded_records",
    # Groups dropped because every rollout got the same reward (PipelineOptions).
    "uniform_groups",
    "uniform_records",
    # Groups with a rollout sampled by a policy version a restart lost (`vimrag_jax.timeline`).
    "lost_groups",
    "lost_records",
)
# Counters older states may lack (they start at 0 on restore).
_LATER_COUNTERS = frozenset(COUNTERS[COUNTERS.index("groups_read") :])


def default_process() -> tuple[int, int]:
    """``(jax.process_index(), jax.process_count())``."""
    import jax

    return jax.process_index(), jax.process_count()


def owned_shards(
    names: Iterable[str], process_index: int, process_count: int, *, follow: bool
) -> list[str]:
    """This process's share of ``names``, sorted (see the module docstring for the rule)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process {process_index} of {process_count} is not a valid split")
    names = sorted(names)
    if follow:
        return [n for n in names if zlib.crc32(n.encode()) % process_count == process_index]
    return names[process_index::process_count]


class ShardSource:
    """This process's published shards in ``directory``, in name order.

    With ``follow=False`` the shard set is frozen at the first listing (an SFT or offline
    set); with ``follow=True`` every call lists the directory again.
    """

    def __init__(
        self, directory: str | Path, *, process_index: int, process_count: int, follow: bool
    ):
        self.directory = Path(directory)
        self.follow = follow
        self._split = (process_index, process_count)
        owned_shards([], process_index, process_count, follow=follow)  # validates the split
        self._frozen: list[str] | None = None

    def shards(self) -> list[str]:
        """Names (not paths) of this process's shards."""
        if self._frozen is not None:
            return self._frozen
        names = owned_shards(
            (p.name for p in list_shards(self.directory)), *self._split, follow=self.follow
        )
        if not self.follow:
            self._frozen = names
        return names

    def next_shard(self, done: frozenset[str] | set[str]) -> str | None:
        """The first shard not in ``done``; None when there is none (yet)."""
        for name in self.shards():
            if name not in done:
                return name
        return None

    def path(self, name: str) -> Path:
        return self.directory / name


@dataclasses.dataclass(frozen=True)
class Cursor:
    """Position in the shard being read: the next segment to emit (see module docstring)."""

    shard: str
    group_start: int
    record: int
    segment: int

    def __post_init__(self):
        if not isinstance(self.shard, str) or not self.shard:
            raise ValueError(f"cursor shard must be a non-empty name, got {self.shard!r}")
        for name in ("group_start", "record", "segment"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"cursor {name} must be an int >= 0, got {value!r}")
        if self.record < self.group_start:
            raise ValueError(f"cursor record {self.record} before group_start {self.group_start}")


@dataclasses.dataclass(frozen=True)
class Ledger:
    """Immutable snapshot of the consumed position; cheap to keep one per emitted row."""

    done: frozenset[str] = frozenset()
    cursor: Cursor | None = None
    counters: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(COUNTERS, 0)
    )

    def to_state(self) -> dict[str, Any]:
        """JSON-serialisable state (grain ``DatasetIterator.get_state`` style)."""
        return {
            "ledger_version": LEDGER_VERSION,
            "done_shards": sorted(self.done),
            "cursor": None if self.cursor is None else dataclasses.asdict(self.cursor),
            "counters": dict(self.counters),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Ledger:
        """Inverse of `to_state`; ValueError naming the problem for a malformed state."""
        if not isinstance(state, Mapping):
            raise ValueError(f"pipeline state must be a mapping, got {type(state).__name__}")
        if state.get("ledger_version") != LEDGER_VERSION:
            raise ValueError(
                f"pipeline state ledger_version {state.get('ledger_version')!r}, "
                f"expected {LEDGER_VERSION}"
            )
        done = state.get("done_shards")
        if not isinstance(done, list) or not all(isinstance(n, str) for n in done):
            raise ValueError("pipeline state 'done_shards' must be a list of shard names")
        cursor = state.get("cursor")
        if cursor is not None:
            if not isinstance(cursor, Mapping) or set(cursor) != {
                f.name for f in dataclasses.fields(Cursor)
            }:
                raise ValueError(f"pipeline state 'cursor' is malformed: {cursor!r}")
            cursor = Cursor(**cursor)
        counters = state.get("counters")
        if isinstance(counters, Mapping) and set(COUNTERS) - set(counters) <= _LATER_COUNTERS:
            counters = {key: 0 for key in COUNTERS} | dict(counters)
        if not isinstance(counters, Mapping) or set(counters) != set(COUNTERS):
            raise ValueError(f"pipeline state 'counters' must have exactly the keys {COUNTERS}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counters.values()):
            raise ValueError("pipeline state counters must be ints")
        return cls(frozenset(done), cursor, dict(counters))

    def is_consumed(self, shard: str, record: int, last_valid_segment: int = -1) -> bool:
        """Whether record ``record`` of ``shard`` is consumed (module docstring rule).

        ``last_valid_segment`` is the record's last valid segment index (-1 for none); it
        only matters for the record under the cursor.
        """
        if shard in self.done:
            return True
        cursor = self.cursor
        if cursor is None or cursor.shard != shard:
            return False
        if record != cursor.record:
            return record < cursor.record
        return last_valid_segment < cursor.segment
