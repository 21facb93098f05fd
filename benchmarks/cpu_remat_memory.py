"""Does XLA:CPU's memory analysis show what rematerialisation saves? Only under a scan.

The planner (`python -m vimrag_jax.plan`) reads XLA's per-device memory analysis of the train
step compiled for fake CPU devices. This script compiles the gradient of an 8-layer MLP with and
without `jax.checkpoint` per layer on the CPU and prints the temporaries XLA plans for each, with
the layers unrolled and under a `lax.scan`: a schedule that honours remat keeps one layer's
activations instead of eight. Unrolled, XLA:CPU's schedule does not (its temporaries grow with
remat); under a scan the loop forces one layer at a time and they shrink. Run:

    python benchmarks/cpu_remat_memory.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LAYERS, TOKENS, WIDTH = 8, 4096, 1024


def layer(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.tanh(jnp.tanh(x @ w[0]) @ w[1])


def loss(ws, x, remat: bool, scan: bool) -> jax.Array:
    step = jax.checkpoint(layer) if remat else layer
    if scan:
        x, _ = jax.lax.scan(lambda x, w: (step(x, w), None), x, ws)
    else:
        for i in range(LAYERS):
            x = step(x, ws[i])
    return jnp.sum(x)


def temp_mib(remat: bool, scan: bool) -> float:
    ws = jax.ShapeDtypeStruct((LAYERS, 2, WIDTH, WIDTH), jnp.float32)
    x = jax.ShapeDtypeStruct((TOKENS, WIDTH), jnp.float32)
    grad = jax.grad(lambda ws, x: loss(ws, x, remat, scan))
    return jax.jit(grad).lower(ws, x).compile().memory_analysis().temp_size_in_bytes / 2**20


def main() -> None:
    activation = TOKENS * WIDTH * 4 / 2**20
    print(f"backend {jax.default_backend()}: {LAYERS} layers, one activation {activation:.0f} MiB")
    for scan in (False, True):
        plain, remat = temp_mib(False, scan), temp_mib(True, scan)
        layout = "scanned" if scan else "unrolled"
        print(
            f"{layout:8s}: temporaries without remat {plain:.0f} MiB, with remat {remat:.0f} MiB "
            f"(ratio {remat / plain:.2f})"
        )


if __name__ == "__main__":
    main()
