"""Per-device memory of a training run, worked out from shapes: no weights, no compile.

`estimate(cfg, num_devices)` builds the policy, its optimizer state and the learner's loss batch
as abstract arrays with the shardings the learner gives them (`parallel.sharding`), and sums what
each device holds of them exactly; the activations of one forward/backward pass are an analytic
estimate (below). `config_checks` uses it to refuse, before anything compiles, a config that
cannot fit ``mesh.device_memory_gb``; `vimrag_jax.plan` prints it beside XLA's own figures for
the compiled step, which are the ones to trust.

The activation model, per device and pass (``r`` segment rows of ``L`` tokens, ``P`` patch rows
each; ``a`` bytes per compute element; tensor-parallel degree ``t``):

- decoder: with ``model.remat`` the input of every layer is kept (``layers · r·L·d·a``) and one
  layer is live at a time during the backward pass (its projections, MLP and attention
  statistics); without remat every layer's working set is kept;
- the attention mask the decoder layers read (``r·L·L`` booleans) and the per-token log-prob
  chunks of the LM head (``r · 256 · V/t`` float32 logits, a few live at once);
- vision tower (Qwen3-VL): the same rule over its blocks at ``P`` patch rows, blocked attention
  (no ``P × P`` scores), plus the merged visual features the decoder reads.

It is a lower bound, not a promise: it leaves out the scanned layers' stacked parameter copy
and its gradients, the float32 head gradient and the temporaries of XLA's fusions, and came out
2.5–3× under the compiled peak of the qwen3vl presets (``docs/benchmarks.md``, "Planner"). So
`config_checks` refuses with it only what cannot fit even by this count; `vimrag_jax.plan`'s
compiled figure is the one to trust before a launch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

GIB = 1 << 30
#: Tokens per chunk of the memory-lean log-prob head (`sampling.logprobs.DEFAULT_CHUNK_SIZE`).
_LOGPROB_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Bytes one device holds during a train step (`estimate`)."""

    params_bytes: int
    optimizer_bytes: int
    gradients_bytes: int
    batch_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return (
            self.params_bytes
            + self.optimizer_bytes
            + self.gradients_bytes
            + self.batch_bytes
            + self.activation_bytes
        )


def model_hf_config(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The policy's ``config.json`` dict: ``model.path``'s when set, else the published config
    the preset names (``qwen3vl_8b`` -> Qwen3-VL-8B-Instruct) or ``model.name``'s preset."""
    from vimrag_jax.models.presets import preset_config

    model = cfg.model
    if model.name == "hf":
        if model.path:
            from vimrag_jax.models.hf import read_config

            return read_config(Path(model.path))
        if not str(cfg.preset).startswith("qwen3vl_"):
            raise ValueError(
                "config.model.name='hf' needs config.model.path (a checkpoint directory with "
                "config.json) unless the preset is a published size (qwen3vl_2b/4b/8b)"
            )
        return preset_config(str(cfg.preset).replace("_", "-"))
    return preset_config(model.name)


def model_fn(cfg: ml_collections.ConfigDict, hf: dict[str, Any]) -> Callable[[], Any]:
    """A builder of the policy as the learner builds it (`model_options`)."""
    from flax import nnx

    from vimrag_jax.models.presets import init_model

    options = model_options(cfg)
    dtype = param_dtype(cfg)
    return lambda: with_param_dtype(init_model(hf, rngs=nnx.Rngs(0), **options), dtype)


def param_dtype(cfg: ml_collections.ConfigDict) -> str:
    """``model.param_dtype``: the dtype the learner stores the policy's parameters in."""
    return str(cfg.model.get("param_dtype", "float32"))


def with_param_dtype(model: Any, dtype: str) -> Any:
    """``model`` with its floating-point parameters cast to ``dtype`` (in place; returned)."""
    if dtype == "float32":
        return model
    from flax import nnx

    from vimrag_jax.models.params import cast_floats

    nnx.update(model, cast_floats(nnx.state(model, nnx.Param), dtype))
    return model


def model_options(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ``model`` block's build options (`models.presets.init_model`'s keywords)."""
    model = cfg.model
    return dict(
        dtype=str(model.dtype),
        remat=bool(model.remat),
        scan_layers=bool(model.get("scan_layers", False)),
        remat_policy=str(model.get("remat_policy", "nothing_saveable")),
    )


def max_patches(cfg: ml_collections.ConfigDict) -> int:
    """Patch rows of a segment's images and videos at the worst case: ``data.max_patches``
    or the rollout budget's bound (`RolloutConfig.max_visual_patches`)."""
    from vimrag_jax.agent.config import RolloutConfig

    configured = int(cfg.data.get("max_patches", 0) or 0)
    return configured or RolloutConfig.from_config(cfg).max_visual_patches


def loss_batch_shapes(
    cfg: ml_collections.ConfigDict, rows: int, *, visual: bool
) -> dict[str, jax.ShapeDtypeStruct]:
    """The learner's loss inputs (`learner.loss_inputs`) for ``rows`` segments at the longest
    segment (``data.max_segment_tokens``) and, for a vision policy, the most patch rows."""
    from vimrag_jax.agent.config import RolloutConfig
    from vimrag_jax.data.segments import batch_spec
    from vimrag_jax.data.vision import PATCH_DIM
    from vimrag_jax.rollout.trajectory import record_dims
    from vimrag_jax.schema import LOSS_KEYS

    dims = record_dims(RolloutConfig.from_config(cfg))
    spec = batch_spec(rows, dims)
    out = {key: jax.ShapeDtypeStruct(*spec[key]) for key in LOSS_KEYS}
    if visual:
        length, patches = dims.tokens, max_patches(cfg)
        i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
        for key, shape, dtype in (
            ("pixel_values", (rows, patches, PATCH_DIM), f32),
            ("vision_interp_index", (rows, patches, 4), i32),
            ("vision_interp_weight", (rows, patches, 4), f32),
            ("vision_rotary_hw", (rows, patches, 2), i32),
            ("vision_segment", (rows, patches), i32),
            ("position_ids", (rows, 3, length), i32),
            ("visual_token_index", (rows, length), i32),
        ):
            out[key] = jax.ShapeDtypeStruct(shape, dtype)
    return out


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of abstract arrays with shardings (the largest shard of
    each leaf; replicated leaves count whole)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The text decoder's part of a config.json (the whole of a text-only one)."""
    return hf.get("text_config", hf)


def activation_bytes(
    cfg: ml_collections.ConfigDict, hf: dict[str, Any], rows: int, tensor: int
) -> int:
    """The analytic activation estimate of one forward/backward pass of ``rows`` segments on
    one device (see the module docstring)."""
    text = text_config(hf)
    itemsize = np.dtype(str(cfg.model.dtype)).itemsize
    remat = bool(cfg.model.remat)
    length = int(cfg.data.max_segment_tokens)
    tokens = rows * length
    d, ff, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim") or d // heads
    # One layer's live tensors for its backward: norms, q/k/v/o, the attention output and
    # statistics, the gated MLP's three projections.
    attention = (heads + 2 * kv) * head_dim + heads * head_dim
    per_layer = tokens * (4 * d + math.ceil(attention / tensor) + 3 * math.ceil(ff / tensor))
    per_layer = per_layer * itemsize + tokens * math.ceil(heads / tensor) * 4
    kept = layers * tokens * d * itemsize if remat else layers * per_layer
    total = kept + (2 * per_layer if remat else 0)
    total += rows * length * length  # the boolean attention mask
    vocab = math.ceil(text["vocab_size"] / tensor)
    total += 3 * rows * _LOGPROB_CHUNK * vocab * 4 + 2 * tokens * d * 4  # head, residual grads
    vision = hf.get("vision_config")
    if vision is not None:
        patches = rows * max_patches(cfg)
        dv, ffv, depth = vision["hidden_size"], vision["intermediate_size"], vision["depth"]
        block = patches * (7 * dv + 2 * math.ceil(ffv / tensor)) * itemsize
        kept = depth * patches * dv * itemsize if remat else depth * block
        total += kept + (2 * block if remat else 0)
        merged = patches // 4 * text["hidden_size"] * itemsize
        total += merged * (1 + len(vision.get("deepstack_visual_indexes", ())))
    return int(total)


def rows_per_pass(cfg: ml_collections.ConfigDict, batch_shards: int) -> int:
    """Segment rows one device runs in one forward/backward pass of an RL update."""
    minibatches = int(cfg.loss.get("num_minibatches", 1))
    micro = int(cfg.optim.get("micro_batches", 1))
    return max(1, int(cfg.data.batch_segments) // (minibatches * micro * batch_shards))


def estimate(cfg: ml_collections.ConfigDict, num_devices: int) -> Footprint:
    """The per-device `Footprint` of ``cfg``'s RL step on ``num_devices`` devices.

    Builds abstract arrays only (``jax.eval_shape``); the mesh is made of abstract devices, so
    this runs on any host, whatever devices it has.
    """
    from vimrag_jax.checkpointing import abstract_train_state
    from vimrag_jax.optim import make_optimizer
    from vimrag_jax.parallel.mesh import resolve_mesh_shape
    from vimrag_jax.parallel.sharding import batch_shardings

    hf = model_hf_config(cfg)
    shape = resolve_mesh_shape((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), num_devices)
    mesh = abstract_mesh(shape)
    optimizer = make_optimizer(cfg.optim, param_dtype=param_dtype(cfg))
    state = abstract_train_state(model_fn(cfg, hf), optimizer, mesh)
    params = device_bytes(state.params)
    batch = loss_batch_shapes(
        cfg, int(cfg.data.batch_segments), visual=hf.get("vision_config") is not None
    )
    shardings = batch_shardings(batch, mesh)
    placed = {
        key: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=shardings[key])
        for key, value in batch.items()
    }
    rows = rows_per_pass(cfg, shape[0] * shape[1])
    return Footprint(
        params_bytes=params,
        optimizer_bytes=device_bytes(state.opt_state),
        gradients_bytes=params,
        batch_bytes=device_bytes(placed),
        activation_bytes=activation_bytes(cfg, hf, rows, shape[2]),
    )


def abstract_mesh(shape: tuple[int, int, int]) -> jax.sharding.Mesh | Any:
    """A ``(data, fsdp, tensor)`` mesh of ``shape`` without real devices (for shard shapes)."""
    from jax.sharding import AbstractMesh, AxisType

    from vimrag_jax.parallel.mesh import MESH_AXES

    return AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def format_bytes(count: float) -> str:
    """``12.3 GiB`` style."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"
