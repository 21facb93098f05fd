"""Maps logical array axes (`vocab`, `embed`, `batch`, ...) to mesh axes for params and batches.

Models annotate every parameter with logical axis names (NNX `out_sharding` metadata); the rules
here decide which mesh axis each name is split over. Keeping the model ignorant of the mesh lets
one checkpoint run under any mesh shape.

Two deliberate relaxations keep tiny test models and odd shapes working:

- A mesh axis is used at most once per array. When two dimensions map to the same mesh axis
  (say `heads` and `vocab`, both `tensor`), the earlier dimension keeps it and the later one
  drops it (is not split over it).
- A dimension is split only over mesh axes whose sizes divide it. For a tuple rule such as
  `batch -> ("data", "fsdp")`, the longest leading run of axes whose size product divides the
  dimension is kept (16 rows on data=2 x fsdp=3 split over `data` only); with none, the dimension
  is replicated. Size-1 mesh axes always divide and are kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    # Qwen3-VL vision tower: small next to the decoder, so only its wide axes are split.
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_patch", None),
    ("vision_position", None),
)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _lookup(name: str, rules: Rules) -> tuple[str, ...]:
    for logical, axes in rules:  # first matching rule wins, as in flax's logical rules
        if logical == name:
            return _as_tuple(axes)
    known = ", ".join(repr(logical) for logical, _ in rules)
    raise ValueError(
        f"No sharding rule for logical axis {name!r}; known logical axes: {known}. "
        "Add a (name, mesh axes) pair to the rules."
    )


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None],
    rules: Rules = DEFAULT_RULES,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions carry `logical_axes` (None: replicated).

    With `shape` and `mesh`, mesh axes that do not divide their dimension are dropped (see the
    module docstring); a mesh axis named by the rules but absent from `mesh` is an error.
    """
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(
            f"Logical axes {tuple(logical_axes)} do not match an array of shape {tuple(shape)}."
        )
    used: set[str] = set()
    entries: list[MeshAxes] = []
    for dim, name in enumerate(logical_axes):
        axes = () if name is None else _lookup(name, rules)
        axes = tuple(axis for axis in axes if axis not in used)
        if mesh is not None:
            missing = [axis for axis in axes if axis not in mesh.shape]
            if missing:
                raise ValueError(
                    f"Logical axis {name!r} maps to mesh axes {missing} that the mesh "
                    f"{dict(mesh.shape)} does not have."
                )
            if shape is not None:
                axes = _dividing_prefix(axes, shape[dim], mesh)
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def _dividing_prefix(axes: tuple[str, ...], size: int, mesh: Mesh) -> tuple[str, ...]:
    """The longest leading run of `axes` whose product of mesh sizes divides `size`."""
    for end in range(len(axes), 0, -1):
        if size % math.prod(mesh.shape[axis] for axis in axes[:end]) == 0:
            return axes[:end]
    return ()


BATCH_AXES = ("data", "fsdp")


def constrain_rows(x: jax.Array, axis: int = 0) -> jax.Array:
    """Pins axis ``axis`` of an activation (its segment rows) to the batch mesh axes and
    replicates the others, when traced under a mesh (`under_mesh`); unchanged otherwise (the
    pmap step, the sampler, a single device).

    Why: FSDP splits parameters on their ``embed`` axis, and the inputs alone do not tell
    GSPMD to split the rows: it may instead keep each weight split and replicate the
    activations, so that every device computes the whole batch (the planner measured 66 GiB of
    temporaries for a pass of 2 rows per device that way). Pinning the residual stream to the
    rows makes it gather each weight instead, as FSDP means to.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    axes = _dividing_prefix(BATCH_AXES, x.shape[axis], mesh)
    spec: list[Any] = [None] * x.ndim
    spec[axis] = axes or None
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def constrain_logical(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Lays ``x`` out as a parameter with ``logical_axes`` is (`DEFAULT_RULES`) when traced
    under a mesh (`under_mesh`); unchanged otherwise. For gradient accumulators a custom
    backward pass builds: left unconstrained, GSPMD may keep a whole copy on every device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    spec = logical_to_mesh_spec(logical_axes, DEFAULT_RULES, shape=x.shape, mesh=mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def row_shards(rows: int) -> int:
    """How many blocks of ``rows`` `constrain_rows` spreads over the context mesh (1 without
    one): loops over rows should run within each device's block, not across devices."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return 1
    return math.prod(mesh.shape[axis] for axis in _dividing_prefix(BATCH_AXES, rows, mesh))


def under_mesh(fn: Any, mesh: Mesh) -> Any:
    """``fn`` traced with ``mesh`` as the context mesh, so that `constrain_rows` applies."""

    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """A tree like `abstract_params` (an nnx.State) holding a NamedSharding per parameter.

    Each Variable's logical names come from its `out_sharding` metadata (set by
    `nnx.with_partitioning`); Variables without it, and bare array leaves, are replicated.
    """

    def sharding_of(leaf: Any) -> Any:
        if not _is_variable(leaf):
            return NamedSharding(mesh, PartitionSpec())
        logical = leaf.get_metadata().get("out_sharding")
        value = leaf.get_value()
        if not logical:
            return leaf.replace(NamedSharding(mesh, PartitionSpec()))
        if isinstance(logical, PartitionSpec):
            logical = tuple(logical)
        spec = logical_to_mesh_spec(logical, rules, shape=value.shape, mesh=mesh)
        return leaf.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding_of, abstract_params, is_leaf=_is_variable)


def batch_shardings(batch: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings splitting each batch leaf's leading (segment) axis as logical `batch`.

    Works on arrays or `jax.ShapeDtypeStruct`s; scalars are replicated, trailing axes are not split.
    """

    def sharding_of(leaf: Any) -> NamedSharding:
        shape = tuple(leaf.shape)
        if not shape:
            return NamedSharding(mesh, PartitionSpec())
        logical = ("batch",) + (None,) * (len(shape) - 1)
        return NamedSharding(mesh, logical_to_mesh_spec(logical, rules, shape=shape, mesh=mesh))

    return jax.tree.map(sharding_of, batch)


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())
