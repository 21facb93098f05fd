"""Does XLA:CPU's memory analysis show what rematerialisation saves? (It does not.)

The planner (`python -m vimrag_jax.plan`) reads XLA's per-device memory analysis of the train
step compiled for fake CPU devices. This script compiles the gradient of an 8-layer MLP with and
without `jax.checkpoint` per layer on the CPU and prints the temporaries XLA plans for each: a
backend that honours remat keeps one layer's activations instead of eight. Run:

    python benchmarks/cpu_remat_memory.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LAYERS, TOKENS, WIDTH = 8, 4096, 1024


def layer(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.tanh(jnp.tanh(x @ w[0]) @ w[1])


def loss(ws, x, remat: bool) -> jax.Array:
    step = jax.checkpoint(layer) if remat else layer
    for w in ws:
        x = step(x, w)
    return jnp.sum(x)


def temp_mib(remat: bool) -> float:
    ws = [jax.ShapeDtypeStruct((2, WIDTH, WIDTH), jnp.float32)] * LAYERS
    x = jax.ShapeDtypeStruct((TOKENS, WIDTH), jnp.float32)
    compiled = jax.jit(jax.grad(lambda ws, x: loss(ws, x, remat))).lower(ws, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main() -> None:
    plain, remat = temp_mib(False), temp_mib(True)
    activation = TOKENS * WIDTH * 4 / 2**20
    print(f"backend {jax.default_backend()}: {LAYERS} layers, one activation {activation:.0f} MiB")
    print(f"temporaries without remat {plain:.0f} MiB, with remat {remat:.0f} MiB")
    print(f"ratio remat / plain: {remat / plain:.2f} (a backend honouring remat: well below 1)")


if __name__ == "__main__":
    main()
