"""Times the decoder's flash attention (`blocked_attend`) forward + backward for several tile
shapes against the plain masked softmax (`attend`, the baseline) in the same run.

One decoder layer's attention of the `model_step.py` workload by default: batch 8 x 1,024
tokens, 8 query heads over 4 KV heads of 32, causal. `attention.ATTENTION_BLOCK` /
`ATTENTION_BATCH_BLOCK` were chosen from this table (docs/benchmarks.md).

    python benchmarks/attention_tiles.py [--tiles 64x2,128x2,256x1,512x1] [--repeats 4]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from vimrag_jax.models.attention import attend, blocked_attend


def _timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", default="64x2,128x2,256x1,256x2,512x1")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    b, length, h, g, k = args.batch, args.seq, 8, 4, 32
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, length, h, k))
    kv = [jax.random.normal(key, (b, length, g, k)) for key in keys[1:]]
    allowed = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (b, length, length))

    def grads(fn):
        def loss(q, k, v):
            return jnp.sum(fn(q, k, v, allowed) ** 2)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    print(f"attention forward + backward, batch {b} x {length}, {h} heads / {g} KV heads of {k}")
    print(f"devices: {jax.devices()[0].device_kind} x {len(jax.devices())}")
    base = _timed(grads(attend), q, *kv, repeats=args.repeats)
    print(f"  plain softmax (baseline)   {base * 1e3:8.1f} ms")
    for tile in args.tiles.split(","):
        block, rows = (int(part) for part in tile.split("x"))
        fn = grads(lambda q, k, v, a, block=block, rows=rows: blocked_attend(
            q, k, v, a, block=block, batch_block=rows
        ))  # fmt: skip
        seconds = _timed(fn, q, *kv, repeats=args.repeats)
        print(
            f"  blocks of {block:4d}, {rows} row(s) {seconds * 1e3:8.1f} ms  "
            f"(baseline / this: {base / seconds:.2f}x)"
        )


if __name__ == "__main__":
    main()
