"""Parameter creation for the NNX models: float32 weights annotated with logical axis names.

The names (`vocab`, `embed`, `heads`, `vision_embed`, ...) are not mesh axes;
`vimrag_jax.parallel.sharding` maps them to the mesh when the model is sharded.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def cast_floats(tree: Any, dtype: Any) -> Any:
    """``tree`` with its floating-point leaves in ``dtype`` (integer leaves kept): the one cast
    behind stored bfloat16 parameters, the sampler's weights and the float32 optimizer state."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def param(
    rngs: nnx.Rngs, init: nnx.Initializer, shape: tuple[int, ...], axes: tuple[str, ...]
) -> nnx.Param:
    """A float32 `nnx.Param` of `shape` drawn by `init`, its axes named `axes`."""
    # Logical names are not mesh axes, so Variables must not shard themselves on creation.
    annotated = nnx.with_partitioning(init, axes, eager_sharding=False)
    return nnx.Param(annotated(rngs.params(), shape, jnp.float32))


def dense_init(in_axes: tuple[int, ...], out_axes: tuple[int, ...]) -> nnx.Initializer:
    """Truncated-normal fan-in initialiser of a kernel with input dims `in_axes`, output dims
    `out_axes`."""
    return nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axes, out_axis=out_axes
    )
