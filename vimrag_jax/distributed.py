"""Multi-host start-up: decides whether to call ``jax.distributed.initialize()`` and does it.

A learner spanning several hosts (TPU pod slices, multi-node GPU jobs) must connect its
processes before JAX touches a device; a single-host run must not try. ``config.distributed``:

- ``enabled``: True forces the call, False never makes it, None (default) detects a
  multi-process launch from the environment: SLURM with more than one task, an explicit
  ``JAX_COORDINATOR_ADDRESS``, a TPU pod (several ``TPU_WORKER_HOSTNAMES``), or Open MPI with
  more than one rank. These are the environments JAX's own cluster detection understands, so
  the call itself needs no arguments there.
- ``coordinator_address`` / ``num_processes`` / ``process_id``: explicit values for a cluster
  JAX cannot detect (empty / -1: leave them to the environment).

Call ``maybe_initialize(config)`` first thing in ``main``, before any other JAX call.

The rest of this module holds the few cross-process agreements the learner needs once it runs
on several processes (each one is a collective: every process must call it, in the same order):
the token length of a step's batch (``max_over_processes``), whole-job data counters
(``sum_over_processes``), the input pipelines' positions
saved in one checkpoint (``gather_json``), decisions only process 0 can make
(``broadcast_from_main``) and whole parameters for the process that evaluates or exports
(``to_host``). With one process they return at once, without touching a device.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """The ``config.distributed`` block as a typed value."""

    enabled: bool | None = None
    coordinator_address: str = ""
    num_processes: int = -1
    process_id: int = -1
    initialization_timeout_s: int = 300

    @classmethod
    def from_config(cls, block: Any) -> DistributedConfig:
        """From a ConfigDict / mapping with these field names; unknown fields are an error."""
        values = block.to_dict() if hasattr(block, "to_dict") else dict(block)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(
                f"unknown config.distributed fields {unknown}; known: {sorted(fields)}"
            )
        return cls(**values)


class Decision(NamedTuple):
    """Whether to initialise, and why (logged, so a hung start-up is easy to explain)."""

    initialize: bool
    reason: str


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "0"))
    except ValueError:
        return 0


def decide(config: DistributedConfig, environ: Mapping[str, str]) -> Decision:
    """The decision for ``config`` in the environment ``environ`` (pure, for tests)."""
    if config.enabled is True:
        return Decision(True, "config.distributed.enabled=True")
    if config.enabled is False:
        return Decision(False, "config.distributed.enabled=False")
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        address = environ["JAX_COORDINATOR_ADDRESS"]
        return Decision(True, f"JAX_COORDINATOR_ADDRESS={address} is set")
    if environ.get("SLURM_JOB_ID") and _int(environ, "SLURM_NTASKS") > 1:
        return Decision(True, f"SLURM job {environ['SLURM_JOB_ID']} with "
                        f"{environ['SLURM_NTASKS']} tasks")  # fmt: skip
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
        return Decision(True, f"TPU pod with {len(hosts)} worker hosts (TPU_WORKER_HOSTNAMES)")
    if _int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return Decision(True, f"Open MPI with {environ['OMPI_COMM_WORLD_SIZE']} ranks")
    return Decision(False, "single process (no multi-host launcher detected)")


def _initialize_kwargs(config: DistributedConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if config.coordinator_address:
        kwargs["coordinator_address"] = config.coordinator_address
    if config.num_processes != -1:
        kwargs["num_processes"] = config.num_processes
    if config.process_id != -1:
        kwargs["process_id"] = config.process_id
    kwargs["initialization_timeout"] = config.initialization_timeout_s
    return kwargs


def maybe_initialize(
    config: Any,
    *,
    environ: Mapping[str, str] | None = None,
    initialize: Callable[..., None] = jax.distributed.initialize,
) -> bool:
    """Initialises multi-host JAX when ``config`` or the environment asks for it.

    ``config`` is the whole run config, its ``distributed`` block, or a ``DistributedConfig``.
    Returns whether ``initialize`` was called. Errors from it are re-raised with the reason.
    """
    if not isinstance(config, DistributedConfig):
        block = config.distributed if "distributed" in config else config
        config = DistributedConfig.from_config(block)
    decision = decide(config, os.environ if environ is None else environ)
    if not decision.initialize:
        logging.info("jax.distributed not initialised: %s", decision.reason)
        return False
    kwargs = _initialize_kwargs(config)
    logging.info("jax.distributed.initialize(%s): %s", kwargs, decision.reason)
    try:
        initialize(**kwargs)
    except Exception as err:
        raise RuntimeError(
            f"jax.distributed.initialize failed ({decision.reason}): {err}. Check that every "
            "process was started, the coordinator address is reachable, or set "
            "config.distributed.enabled=False for a single-host run."
        ) from err
    return True


def is_main_process() -> bool:
    """True on the process that writes metrics, policy files and logs (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process gets here (collective; nothing on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def max_over_processes(value: int) -> int:
    """The largest ``value`` any process passed (collective)."""
    if jax.process_count() == 1:
        return int(value)
    values = multihost_utils.process_allgather(np.asarray(value, np.int64))
    return int(np.max(values))


def all_processes(flag: bool) -> bool:
    """True when ``flag`` is True on every process (collective)."""
    return not max_over_processes(not flag)


def sum_over_processes(values: Mapping[str, float]) -> dict[str, float]:
    """Each key's sum over the processes (collective; every process passes the same keys):
    counters and token counts of per-process input pipelines, as whole-job metrics."""
    keys = sorted(values)
    if jax.process_count() == 1:
        return {key: values[key] for key in keys}
    local = np.asarray([float(values[key]) for key in keys], np.float64)
    total = np.sum(np.asarray(multihost_utils.process_allgather(local)), axis=0)
    return {key: float(value) for key, value in zip(keys, total, strict=True)}


def broadcast_from_main(value: int) -> int:
    """Process 0's ``value`` on every process (collective): for decisions that read files
    only process 0 writes, so that every process then takes the same branch."""
    if jax.process_count() == 1:
        return int(value)
    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def gather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable ``value``, indexed by process (collective).

    Used for per-process state that one file must hold, such as each process's input pipeline
    position in a checkpoint (orbax writes JSON items from process 0 only).
    """
    if jax.process_count() == 1:
        return [value]
    encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
    longest = max_over_processes(encoded.size)
    padded = np.zeros(longest + 8, np.uint8)  # 8 bytes of length, then the text
    padded[:8] = np.frombuffer(np.asarray(encoded.size, "<u8").tobytes(), np.uint8)
    padded[8 : 8 + encoded.size] = encoded
    rows = np.asarray(multihost_utils.process_allgather(padded))
    values = []
    for row in rows.reshape(jax.process_count(), -1):
        size = int(np.frombuffer(row[:8].tobytes(), "<u8")[0])
        values.append(json.loads(row[8 : 8 + size].tobytes().decode()))
    return values


def to_host(leaf: Any) -> np.ndarray:
    """The whole array as a NumPy array on this host; shards held by other processes are
    gathered (collective when ``leaf`` is not fully addressable)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))
