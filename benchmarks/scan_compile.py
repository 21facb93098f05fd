"""Compile time of the learner's train step with the decoder layers unrolled vs scanned.

`Qwen3Config.scan_layers` runs the decoder layers of the full forward as one `lax.scan` over
their stacked parameters (`vimrag_jax.models.decoder.scan_decoder_layers`), so the program XLA
compiles holds one layer body whatever the depth. This script builds the learner's pjit step
(`Learner.lower`, as `python -m vimrag_jax.plan` does: abstract train state and batch, no
weights) for each model preset with the layers unrolled and scanned (remat on, as in training)
and prints the seconds to trace and lower it, the seconds `.compile()` takes, the size of the
lowered StableHLO and XLA's per-device temporaries; then, to isolate the decoder from the
optimizer and the loss, the seconds to lower and compile the gradient of the policy's mean
log-prob alone (one device, same shapes). Run (CPU; `--devices 8` splits the
parameters over 8 fake devices, FSDP):

    python benchmarks/scan_compile.py --models tiny qwen3-0.6b
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any


def _configure(devices: int) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flag = f"--xla_force_host_platform_device_count={devices}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def measure(model: str, *, scan: bool, devices: int, rows: int, tokens_: int) -> dict[str, Any]:
    """Lowers and compiles the learner's step for preset `model`; returns the figures."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from vimrag_jax.data.segments import batch_spec
    from vimrag_jax.learner import Learner
    from vimrag_jax.models.presets import init_model, preset_config
    from vimrag_jax.optim import make_optimizer
    from vimrag_jax.parallel.mesh import make_mesh
    from vimrag_jax.parallel.step import policy_logprobs
    from vimrag_jax.rl.losses import LossConfig
    from vimrag_jax.rollout.records import RecordDims
    from vimrag_jax.schema import LOSS_KEYS

    hf = preset_config(model)
    dims = RecordDims(nodes=4, items=2, segments=3, tokens=tokens_, visuals=1)
    spec = batch_spec(rows, dims)
    inputs = {key: jax.ShapeDtypeStruct(*spec[key]) for key in LOSS_KEYS}
    optim = dict(learning_rate=1e-5, schedule="warmup_constant", warmup_steps=1, total_steps=2)
    optim |= dict(final_lr_ratio=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    optim |= dict(grad_clip=1.0, accumulate_steps=1)
    learner = Learner(
        lambda: init_model(hf, rngs=nnx.Rngs(0), dtype="bfloat16", remat=True, scan_layers=scan),
        make_optimizer(ml_collections.ConfigDict(optim)),
        LossConfig.for_algorithm("ggpo"),
        make_mesh(1, devices, 1, devices=jax.devices()[:devices]),
    )
    began = time.perf_counter()
    lowered = learner.lower(inputs)
    lower_s = time.perf_counter() - began
    began = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - began
    # The decoder alone: the gradient of the policy's mean log-prob, same shapes and layout.
    graphdef, state = nnx.split(nnx.eval_shape(learner.model_fn))

    def grad_of_logprobs(state: Any, tokens: jax.Array) -> Any:
        return jax.grad(lambda s: policy_logprobs(nnx.merge(graphdef, s), tokens).mean())(state)

    tokens = jax.ShapeDtypeStruct((rows, tokens_), jnp.int32)
    began = time.perf_counter()
    jax.jit(grad_of_logprobs).lower(state, tokens).compile()
    grad_s = time.perf_counter() - began
    return {
        "model": model,
        "grad_s": grad_s,
        "layers": hf["num_hidden_layers"],
        "layout": "scanned" if scan else "unrolled",
        "lower_s": lower_s,
        "compile_s": compile_s,
        "hlo_kchars": len(lowered.as_text()) / 1000,
        "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "qwen3-0.6b"])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    _configure(args.devices)
    print(
        "| model | layers | layout | step trace+lower s | step compile s | step StableHLO kchars "
        "| step temp MiB | log-prob grad lower+compile s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for model in args.models:
        for scan in (False, True):
            r = measure(model, scan=scan, devices=args.devices, rows=args.rows, tokens_=args.tokens)
            print(
                f"| {r['model']} | {r['layers']} | {r['layout']} | {r['lower_s']:.1f} "
                f"| {r['compile_s']:.1f} | {r['hlo_kchars']:,.0f} | {r['temp_mib']:,.0f} "
                f"| {r['grad_s']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
