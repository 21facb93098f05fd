"""Metric statistics that reduce correctly across devices.

Loss functions report metrics as ``Mean`` / ``Max`` / ``Min`` pytrees of *local*
sums and extrema. The pmap step reduces them across its axis (``reduce_stats``)
before they become plain numbers (``to_scalars``); under pjit the batch is
already global and the reduction is the identity. Keeping sums and counts apart
until the end makes a pmap metric equal the pjit one exactly, not a mean of means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Mean:
    """A mean kept as ``total / count`` so shards can be summed first."""

    total: jax.Array
    count: jax.Array

    @classmethod
    def of(cls, values: jax.Array, mask: jax.Array) -> Mean:
        # where, not multiply: a NaN or inf in a masked-out entry must not leak in.
        return cls(jnp.sum(jnp.where(mask, values, 0.0)), jnp.sum(mask, dtype=jnp.float32))


@struct.dataclass
class Max:
    """A maximum over the masked entries (``-inf`` when none)."""

    value: jax.Array

    @classmethod
    def of(cls, values: jax.Array, mask: jax.Array) -> Max:
        return cls(jnp.max(jnp.where(mask, values, -jnp.inf)))


@struct.dataclass
class Min:
    """A minimum over the masked entries (``+inf`` when none)."""

    value: jax.Array

    @classmethod
    def of(cls, values: jax.Array, mask: jax.Array) -> Min:
        return cls(jnp.min(jnp.where(mask, values, jnp.inf)))


Stat = Mean | Max | Min


def _is_stat(x) -> bool:
    return isinstance(x, (Mean, Max, Min))


def reduce_stats(stats: dict[str, Stat], axis_name: str | None) -> dict[str, Stat]:
    """Combines per-device statistics over a named (pmap) axis; identity when None."""
    if axis_name is None:
        return stats

    def reduce(s: Stat) -> Stat:
        if isinstance(s, Mean):
            return Mean(jax.lax.psum(s.total, axis_name), jax.lax.psum(s.count, axis_name))
        if isinstance(s, Max):
            return Max(jax.lax.pmax(s.value, axis_name))
        return Min(jax.lax.pmin(s.value, axis_name))

    return jax.tree.map(reduce, stats, is_leaf=_is_stat)


def merge_stats(stats: dict[str, Stat]) -> dict[str, Stat]:
    """Combines statistics stacked on a leading axis (e.g. the micro-batches of a `lax.scan`)
    into one: sums of totals and counts, the max of maxima, the min of minima."""

    def merge(s: Stat) -> Stat:
        if isinstance(s, Mean):
            return Mean(jnp.sum(s.total, axis=0), jnp.sum(s.count, axis=0))
        if isinstance(s, Max):
            return Max(jnp.max(s.value, axis=0))
        return Min(jnp.min(s.value, axis=0))

    return jax.tree.map(merge, stats, is_leaf=_is_stat)


def to_scalars(stats: dict[str, Stat]) -> dict[str, jax.Array]:
    """Turns statistics into scalars; a mean over nothing is 0, not NaN."""

    def value(s: Stat) -> jax.Array:
        if isinstance(s, Mean):
            return s.total / jnp.maximum(s.count, 1.0)
        return s.value

    return {k: value(s) for k, s in stats.items()}
