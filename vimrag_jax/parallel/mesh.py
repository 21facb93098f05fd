"""Builds the learner's device mesh (`data`, `fsdp`, `tensor`) from the config.

The mesh is the only place device counts enter the program: sharding rules name mesh axes, never
device counts, so the same config runs on 1 CPU or a pod by changing `config.mesh.*`. Axes are
created as `Auto` (GSPMD propagates shardings from the jit boundary inwards), because this JAX
makes `jax.make_mesh` produce `Explicit` axes by default, which would change how every op inside
the model is typed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import ml_collections
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")


def resolve_mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces a single -1 by the size that makes the product equal `num_devices`.

    Raises a ValueError naming the config keys to change when the sizes cannot fit the devices.
    """
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"Expected sizes for the mesh axes {MESH_AXES}; got {tuple(sizes)}.")
    keys = ", ".join(
        f"config.mesh.{name}={size}" for name, size in zip(MESH_AXES, sizes, strict=True)
    )
    fill = [i for i, size in enumerate(sizes) if size == -1]
    if len(fill) > 1:
        raise ValueError(
            f"At most one mesh axis may be -1 (fill with the remaining devices); got {keys}. "
            "Set all but one of config.mesh.data / config.mesh.fsdp / config.mesh.tensor."
        )
    if any(size != -1 and size < 1 for size in sizes):
        raise ValueError(f"Mesh axis sizes must be positive or -1; got {keys}.")
    fixed = math.prod(size for size in sizes if size != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(
                f"Cannot fill config.mesh.{MESH_AXES[fill[0]]}=-1: the other axes multiply to "
                f"{fixed}, which does not divide the {num_devices} available devices ({keys}). "
                "Change config.mesh.data / config.mesh.fsdp / config.mesh.tensor."
            )
        sizes = list(sizes)
        sizes[fill[0]] = num_devices // fixed
        return tuple(sizes)
    if fixed != num_devices:
        raise ValueError(
            f"The mesh axes multiply to {fixed} but there are {num_devices} devices ({keys}). "
            "Change config.mesh.data / config.mesh.fsdp / config.mesh.tensor so that their "
            "product equals the device count, or set one of them to -1."
        )
    return tuple(sizes)


def make_mesh(
    data: int, fsdp: int, tensor: int, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A `("data", "fsdp", "tensor")` mesh with Auto axes over `devices` (default: all).

    At most one size may be -1, meaning "all remaining devices".
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape((data, fsdp, tensor), len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def mesh_from_config(
    cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """The mesh described by a config block with integer fields `data`, `fsdp`, `tensor`."""
    return make_mesh(int(cfg.data), int(cfg.fsdp), int(cfg.tensor), devices=devices)
