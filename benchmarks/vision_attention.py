"""Vision-tower attention memory and speed: dense `[heads, N, N]` scores vs blocked tiles.

Memory (compiled, never run): `jax.jit(f).lower(ShapeDtypeStruct...).compile().memory_analysis()`
at the paper's visual budget (`--patches`, default 9,500 patch rows in one segment) with the
Qwen3-VL-8B vision sizes (hidden 1152, 16 heads of 72, MLP 4304; the 2B/4B towers are 1024 wide
with 16 heads of 64), for

- the attention alone, forward and forward+backward;
- one full vision block (norms, qkv, rotary, attention, MLP), forward+backward;
- a tower slice of `--depth` blocks, forward+backward, with and without per-block remat.

XLA's temp bytes (scratch the compiled program allocates beside its arguments and outputs) are
printed per case with the dense/blocked ratio. XLA:CPU schedules a rematerialised forward as
early as the original one, so its temp bytes hardly move with remat; the residuals `jax.vjp`
keeps between the forward and backward pass (traced only) show what remat changes by
construction. Output cotangents are inputs of the compiled functions (a broadcast constant
would be folded through the whole backward pass at compile time).

Speed (run on this CPU): attention forward and forward+backward at `--time-patches` rows (default
2,048: two frames of 1,024 patches), dense vs blocked, median of `--repeats` timed calls after
one warm-up call, the cases taking turns.

    python benchmarks/vision_attention.py [--patches 9500] [--block 512] [--dtype float32]
        [--depth 4] [--time-patches 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vimrag_jax.models.qwen3_vl_vision import (
    Qwen3VLVisionConfig,
    VisionBlock,
    VisionTower,
    vision_rotary,
    vision_tables,
)
from vimrag_jax.models.vision_attention import blocked_segment_attention, dense_segment_attention

HIDDEN, HEADS, HEAD_DIM, MLP = 1152, 16, 72, 4304  # Qwen3-VL-8B vision tower


def _config(args, attention: str, **fields) -> Qwen3VLVisionConfig:
    return Qwen3VLVisionConfig(
        depth=fields.pop("depth", 1),
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_heads=HEADS,
        out_hidden_size=2048,
        num_position_embeddings=2304,
        dtype=args.dtype,
        attention=attention,
        attention_block=args.block,
        **fields,
    )


def _attention(kind: str, block: int):
    if kind == "dense":
        return dense_segment_attention
    return functools.partial(blocked_segment_attention, block=block)


def _temp_mib(fn, *shapes) -> float:
    compiled = jax.jit(fn).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def _weighted(out: jax.Array, cotangent: jax.Array) -> jax.Array:
    # The output's cotangent is an input, not a broadcast constant XLA would try to fold.
    return jnp.sum(out.astype(jnp.float32) * cotangent)


def _attention_grad(fn):
    """d/d(q, k, v) of `sum(fn(q, k, v, seg) * cotangent)`: forward and backward."""
    return jax.grad(lambda q, k, v, seg, cot: _weighted(fn(q, k, v, seg), cot), argnums=(0, 1, 2))


def attention_memory(args, kind: str) -> tuple[float, float]:
    dtype = jnp.dtype(args.dtype)
    qkv = jax.ShapeDtypeStruct((args.patches, HEADS, HEAD_DIM), dtype)
    seg = jax.ShapeDtypeStruct((args.patches,), jnp.int32)
    cot = jax.ShapeDtypeStruct(qkv.shape, jnp.float32)
    fn = _attention(kind, args.block)
    return _temp_mib(fn, qkv, qkv, qkv, seg), _temp_mib(
        _attention_grad(fn), qkv, qkv, qkv, seg, cot
    )


def block_memory(args, kind: str) -> float:
    config = _config(args, kind)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VisionBlock(config, rngs=nnx.Rngs(0))))
    n = args.patches
    rows = np.arange(n)
    cos, sin = vision_rotary(jnp.stack([rows // 100, rows % 100], -1), HEAD_DIM, 10_000.0)

    def loss(state, x, seg, cot):
        return _weighted(nnx.merge(graphdef, state)(x, cos, sin, seg), cot)

    x = jax.ShapeDtypeStruct((n, HIDDEN), jnp.dtype(args.dtype))
    seg = jax.ShapeDtypeStruct((n,), jnp.int32)
    cot = jax.ShapeDtypeStruct((n, HIDDEN), jnp.float32)
    return _temp_mib(jax.grad(loss, argnums=(0, 1)), state, x, seg, cot)


def _tower_loss(args, kind: str, remat: bool):
    """(loss(state, pixels, tables, cot), its abstract inputs) of a `--depth`-block tower
    without DeepStack."""
    config = _config(args, kind, depth=args.depth, remat=remat)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VisionTower(config, rngs=nnx.Rngs(0))))
    n = args.patches - args.patches % 4
    grid = np.array([[1, 2, n // 2]])  # one frame: a 2 x n/2 patch strip (any layout will do)
    tables = vision_tables(grid, config)

    def loss(state, pixels, tables, cot):
        return _weighted(nnx.merge(graphdef, state)(pixels, tables)[0], cot)

    pixels = jax.ShapeDtypeStruct((n, config.patch_dim), jnp.float32)
    cot = jax.ShapeDtypeStruct((n // 4, config.out_hidden_size), jnp.float32)
    tables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tables)
    return loss, (state, pixels, tables, cot)


def tower_memory(args, kind: str, remat: bool) -> float:
    loss, inputs = _tower_loss(args, kind, remat)
    return _temp_mib(jax.grad(loss), *inputs)


def tower_residuals(args, kind: str, remat: bool) -> float:
    """MiB the backward pass keeps from the forward (`jax.vjp`'s residuals, traced only)."""
    loss, (state, *rest) = _tower_loss(args, kind, remat)
    vjp = jax.eval_shape(lambda s, *r: jax.vjp(lambda s: loss(s, *r), s)[1], state, *rest)
    return sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(vjp)) / 2**20


def attention_times(args) -> dict[tuple[str, str], float]:
    """Median seconds per (kind, pass) at `--time-patches` rows; the four compiled functions
    take turns within each repeat, so a drifting machine load hurts all of them alike."""
    n = args.time_patches
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    q, k, v = (jnp.asarray(rng.standard_normal((n, HEADS, HEAD_DIM)), dtype) for _ in range(3))
    seg = jnp.asarray(np.repeat(np.arange(2), [n // 2, n - n // 2]), jnp.int32)
    cot = jnp.asarray(rng.standard_normal((n, HEADS, HEAD_DIM)), jnp.float32)
    calls = {}
    for kind in ("dense", "blocked"):
        fn = _attention(kind, args.block)
        calls[kind, "forward"] = functools.partial(jax.jit(fn), q, k, v, seg)
        calls[kind, "forward+backward"] = functools.partial(
            jax.jit(_attention_grad(fn)), q, k, v, seg, cot
        )
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for call in calls.values():
        jax.block_until_ready(call())  # compile and warm up
    for _ in range(args.repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=9_500)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--time-patches", type=int, default=2_048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or '?'}), "
        f"{args.dtype}, block {args.block}, {HEADS} heads x {HEAD_DIM}, hidden {HIDDEN}"
    )
    scores = args.patches**2 * HEADS * 4 / 2**20
    print(f"\nXLA temp memory at N={args.patches} patch rows, one segment (MiB; compiled only)")
    print(f"  one float32 [heads, N, N] score matrix would be {scores:,.0f} MiB")
    rows = []
    dense_fwd, dense_bwd = attention_memory(args, "dense")
    blocked_fwd, blocked_bwd = attention_memory(args, "blocked")
    rows.append(("attention forward", dense_fwd, blocked_fwd))
    rows.append(("attention forward+backward", dense_bwd, blocked_bwd))
    rows.append(
        (
            "vision block forward+backward",
            block_memory(args, "dense"),
            block_memory(args, "blocked"),
        )
    )
    for remat in (False, True):
        rows.append(
            (
                f"{args.depth}-block tower fwd+bwd, remat {'on' if remat else 'off'}",
                tower_memory(args, "dense", remat),
                tower_memory(args, "blocked", remat),
            )
        )
    print(f"  {'case':<40} {'dense':>10} {'blocked':>10} {'ratio':>7}")
    for name, dense, blocked in rows:
        print(f"  {name:<40} {dense:>10,.0f} {blocked:>10,.0f} {dense / blocked:>6.1f}x")

    print(f"\nSaved residuals of the {args.depth}-block tower fwd+bwd (MiB; jax.vjp, traced only)")
    print(f"  {'case':<40} {'dense':>10} {'blocked':>10} {'ratio':>7}")
    for remat in (False, True):
        dense, blocked = (tower_residuals(args, kind, remat) for kind in ("dense", "blocked"))
        name = f"remat {'on' if remat else 'off'}"
        print(f"  {name:<40} {dense:>10,.0f} {blocked:>10,.0f} {dense / blocked:>6.1f}x")

    print(f"\nCPU time at N={args.time_patches} (two frames), median of {args.repeats} (ms)")
    times = attention_times(args)
    print(f"  {'case':<40} {'dense':>10} {'blocked':>10} {'ratio':>7}")
    for name in ("forward", "forward+backward"):
        d, b = times["dense", name], times["blocked", name]
        print(f"  attention {name:<30} {d * 1e3:>10.1f} {b * 1e3:>10.1f} {d / b:>6.2f}x")


if __name__ == "__main__":
    main()
