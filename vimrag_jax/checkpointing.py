"""Learner checkpoints: the sharded train state, the input pipeline's position and run metadata.

A thin layer over orbax's ``CheckpointManager`` so the training loop says what it means:
``save(step, state, data_state=..., metadata=...)`` every ``every_steps`` step calls, and on
start ``restore_latest(abstract_state)``. One folder per step under ``WORKDIR/checkpoints/``
holds three items:

- ``state``: the ``TrainState`` pytree (arrays may be sharded over a multi-host mesh; every
  process writes its own shards);
- ``data``: the input pipeline's state, an opaque JSON-serialisable dict, so a resumed run
  reads the trajectory shards from where it stopped. Each process reads its own shards, so a
  multi-process save gathers every process's state into the one item (orbax writes JSON from
  process 0 only) and a restore hands each process its own (``Restored.data_state``; a
  checkpoint written by another number of processes cannot say where each should resume:
  ``CheckpointMismatchError`` when the caller asks for it);
- ``metadata``: JSON such as the published policy version and the config
  (``run_metadata``).

Saving is asynchronous by default: ``save`` returns once the arrays are copied off the
devices, and the files are written in the background (``wait``/``close`` block until every
pending save is committed; an unfinished save is never picked on restore, orbax writes it
under a temporary name). Restoring goes straight into the shardings of the abstract state
it is given, which may belong to a different mesh than the one that saved.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from flax import nnx
from jax.sharding import Mesh

from vimrag_jax.distributed import gather_json
from vimrag_jax.parallel.sharding import DEFAULT_RULES, Rules
from vimrag_jax.parallel.step import TrainState, train_state_shardings

CHECKPOINT_DIR = "checkpoints"


class _QuietOrbaxInfo(logging.Filter):
    """Drops INFO and DEBUG records logged from inside orbax's package; warnings and errors pass."""

    _PACKAGE = os.path.dirname(os.path.dirname(ocp.__file__)) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self._PACKAGE)


def quiet_orbax_info(handler: logging.Handler | None = None) -> None:
    """Keeps orbax's INFO lines off the console (by default absl's handler, where every log
    record of an absl app ends up). orbax logs ~30 of them per checkpoint save, two thirds of a
    training run's console; its warnings and errors still show. Calling it twice adds nothing."""
    handler = handler or absl_logging.get_absl_handler()
    if not any(isinstance(f, _QuietOrbaxInfo) for f in handler.filters):
        handler.addFilter(_QuietOrbaxInfo())


class CheckpointMismatchError(ValueError):
    """A checkpoint exists but does not hold arrays of the state being restored."""


# The data item of a multi-process checkpoint: {PER_PROCESS: [state of process 0, ...]}.
PER_PROCESS = "per_process"


class Restored(NamedTuple):
    """What ``restore_latest`` gives back: ``state, data_state, metadata = restored``.

    ``data_state`` is this process's input pipeline state; from a checkpoint written by another
    number of processes it is ``{PER_PROCESS: [state of each process that saved it]}``, which
    ``this_process_data`` refuses.
    """

    state: Any
    data_state: dict
    metadata: dict


def this_process_data(restored: Restored) -> dict:
    """This process's input pipeline state from ``restored``.

    Raises ``CheckpointMismatchError`` when the checkpoint was written by another number of
    processes: each process read its own subset of the shards, so the saved positions do not
    say where a different split should resume (resuming would repeat or skip trajectories).
    """
    data = restored.data_state
    if PER_PROCESS in data:
        raise CheckpointMismatchError(
            f"the checkpoint's input pipeline position was saved by {len(data[PER_PROCESS])} "
            f"process(es) and this run has {jax.process_count()}; each process reads its own "
            "shards, so the run must resume with the same number of processes (or start a new "
            "--workdir)"
        )
    return data


def abstract_state(shapes: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying the shardings to restore into.

    ``shapes`` is a train state or its ``jax.eval_shape``; ``shardings`` the matching tree of
    ``NamedSharding`` (e.g. from ``vimrag_jax.parallel.step.create_train_state``).
    """
    return jax.tree.map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        shapes,
        shardings,
    )


def abstract_train_state(
    model_fn: Callable[[], nnx.Module],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
) -> TrainState:
    """The train state's shapes with their shardings, without computing anything.

    The same layout ``vimrag_jax.parallel.step.create_train_state`` produces, so a resumed run
    can restore straight into it and skip initialising a model it would overwrite.
    """
    with nnx.use_eager_sharding(False):
        _, params, _ = nnx.split(nnx.eval_shape(model_fn), nnx.Param, ...)
        shapes = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=params,
            opt_state=jax.eval_shape(optimizer.init, params),
        )
        return abstract_state(shapes, train_state_shardings(shapes, optimizer, mesh, rules))


def run_metadata(cfg: ml_collections.ConfigDict, policy_version: int, **extra: Any) -> dict:
    """The metadata item of a checkpoint: policy version, the config as JSON, and ``extra``."""
    return {
        "policy_version": int(policy_version),
        "config": json.loads(cfg.to_json_best_effort()),
        **extra,
    }


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()))
        for path, leaf in leaves
    }


def _describe_mismatch(saved: Any, wanted: Any, limit: int = 5) -> list[str]:
    """Readable differences between the saved arrays and the state being restored."""
    saved_shapes, wanted_shapes = _shapes_by_path(saved), _shapes_by_path(wanted)
    problems = []
    missing = sorted(set(wanted_shapes) - set(saved_shapes))
    unexpected = sorted(set(saved_shapes) - set(wanted_shapes))
    if missing:
        problems.append(f"not in the checkpoint: {missing[:limit]}")
    if unexpected:
        problems.append(f"only in the checkpoint: {unexpected[:limit]}")
    shapes = [
        f"{path}: saved {saved_shapes[path]}, expected {shape}"
        for path, shape in sorted(wanted_shapes.items())
        if path in saved_shapes and saved_shapes[path] != shape
    ]
    if shapes:
        problems.append(f"shape differs: {shapes[:limit]}")
    return problems


class Checkpointer:
    """Saves and restores learner checkpoints under ``WORKDIR/checkpoints/<step>/``."""

    def __init__(
        self, workdir: str | os.PathLike, *, every_steps: int, keep: int, async_save: bool = True
    ):
        if every_steps < 1 or keep < 1:
            raise ValueError(
                f"every_steps and keep must be >= 1 (config.checkpoint.*), got {every_steps}, "
                f"{keep}"
            )
        self.directory = os.path.join(os.fspath(workdir), CHECKPOINT_DIR)
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every_steps,
            enable_async_checkpointing=async_save,
            create=True,
        )
        # Handlers named up front: a fresh process can then read an item's metadata before
        # any save or restore call has told orbax what the items are.
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "metadata": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    @classmethod
    def from_config(
        cls, workdir: str | os.PathLike, checkpoint_config: ml_collections.ConfigDict
    ) -> Checkpointer:
        """From the ``config.checkpoint`` block (``every_steps``, ``keep``, ``async_save``)."""
        return cls(
            workdir,
            every_steps=int(checkpoint_config.every_steps),
            keep=int(checkpoint_config.keep),
            async_save=bool(checkpoint_config.async_save),
        )

    def should_save(self, step: int) -> bool:
        """True when ``save(step, ...)`` would write (the interval, once per step)."""
        return self._manager.should_save(int(step))

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` at ``step`` when the interval says so (always with ``force``).

        Every process must call it with its shards of the same state and its own
        ``data_state``. Returns whether a save was started; with async saving it may still be
        writing (see ``wait``).
        """
        if not (force or self.should_save(step)):
            return False
        data = dict(data_state or {})
        if jax.process_count() > 1:  # every process calls save for the same steps
            data = {PER_PROCESS: gather_json(data)}
        items = {"data": data, "metadata": dict(metadata or {})}
        for name, item in items.items():
            try:
                json.dumps(item)
            except (TypeError, ValueError) as err:
                raise TypeError(
                    f"the checkpoint's {name} item is not JSON-serialisable: {err}"
                ) from err
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(items["data"]),
            metadata=ocp.args.JsonSave(items["metadata"]),
        )
        return self._manager.save(int(step), args=args, force=force)

    def latest_step(self) -> int | None:
        """The newest committed checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every committed checkpoint kept on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(self, step: int, abstract: Any) -> Restored:
        """The checkpoint of ``step``, its arrays placed as ``abstract``'s shardings say.

        ``abstract`` has ``jax.ShapeDtypeStruct`` leaves with shardings (``abstract_state``).
        Raises ``CheckpointMismatchError`` when the saved arrays do not match it.
        """
        saved = self._manager.item_metadata(step)["state"]
        if saved is None:
            raise CheckpointMismatchError(
                f"the checkpoint {self.directory}/{step} has no readable train state"
            )
        problems = _describe_mismatch(saved, abstract)
        if problems:
            raise CheckpointMismatchError(
                f"the checkpoint {self.directory}/{step} does not match the train state being "
                f"restored (a different model or optimizer config?): "
                + "; ".join(problems)
                + ". Use a fresh --workdir or the config that wrote it."
            )
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=ocp.args.JsonRestore(),
            metadata=ocp.args.JsonRestore(),
        )
        try:
            restored = self._manager.restore(step, args=args)
        except ValueError as err:  # dtype or structure problems the shape check did not see
            raise CheckpointMismatchError(
                f"cannot restore {self.directory}/{step} into the given train state: {err}"
            ) from err
        data = dict(restored.data)
        if PER_PROCESS not in data and data and jax.process_count() > 1:
            data = {PER_PROCESS: [data]}  # saved by one process
        if PER_PROCESS in data and len(data[PER_PROCESS]) == jax.process_count():
            data = dict(data[PER_PROCESS][jax.process_index()])
        return Restored(restored.state, data, dict(restored.metadata))

    def restore_latest(self, abstract: Any) -> Restored | None:
        """The newest checkpoint restored into ``abstract``'s shardings; None when there is none."""
        step = self.latest_step()
        return None if step is None else self.restore(step, abstract)

    def wait(self) -> None:
        """Blocks until every started save is committed to disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's background resources."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
