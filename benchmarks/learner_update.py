"""Times one RL update of the learner on the tiny default's workload, against the update with a
separate forward pass for the recomputed old log-probs (how the learner worked before).

Workload: `tiny-agent` (1.0M parameters, vocabulary 2,048), a batch of 48 segments of 640 tokens
(the tiny default's `data.batch_segments` and a typical trimmed length), the tiny preset's loss
(GGPO, `old_logprobs="recompute"`, k3 KL to a frozen reference at 0.5), pjit over the host's
devices. Ours: `Learner.train_step`, whose update takes the old log-probs from its own forward
under `stop_gradient` (a batch is trained in one update) and runs the reference forward on the
devices. Baseline: the same update plus what the learner used to run before it: one more jitted
forward of the current policy over the batch, fetched to the host and placed again.

    python benchmarks/learner_update.py [--steps 5] [--segments 48] [--tokens 640]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from vimrag_jax.data.segments import batch_spec
from vimrag_jax.learner import Learner
from vimrag_jax.models.presets import init_model, preset_config
from vimrag_jax.optim import make_optimizer
from vimrag_jax.parallel.mesh import make_mesh
from vimrag_jax.rl.losses import LossConfig
from vimrag_jax.rollout.records import RecordDims

VOCAB = 2048


def _model():
    hf = preset_config("tiny-agent")
    hf["vocab_size"] = VOCAB
    return init_model(hf, rngs=nnx.Rngs(0))


def _batch(rows: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dims = RecordDims(nodes=16, items=3, segments=16, tokens=length, visuals=1)
    batch = {key: np.zeros(shape, dtype) for key, (shape, dtype) in batch_spec(rows, dims).items()}
    batch["tokens"] = rng.integers(1, VOCAB, (rows, length)).astype(np.int32)
    batch["loss_mask"][:, length - 96 :] = True  # the policy's reply at the end of each prompt
    batch["behavior_logprobs"] = np.where(batch["loss_mask"], -7.6, 0.0).astype(np.float32)
    batch["segment_valid"][:] = True
    batch["reward"] = (np.arange(rows) % 2).astype(np.float32)
    batch["advantage"] = np.where(batch["reward"] > 0, 1.0, -1.0).astype(np.float32)
    batch["adjacency"][:, 0, 1] = batch["adjacency"][:, 1, 2] = True
    batch["node_valid"][:, :3] = True
    batch["answer_node"][:] = 2
    batch["segment_node"] = (np.arange(rows) % 3).astype(np.int32)
    batch["relevant"][:, 1] = True
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--segments", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=640)
    args = parser.parse_args()

    optim = ml_collections.ConfigDict(
        dict(
            learning_rate=1.5e-4, schedule="warmup_cosine", warmup_steps=5, total_steps=90,
            final_lr_ratio=0.2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0,
            accumulate_steps=1,
        )
    )  # fmt: skip
    loss = dataclasses.replace(
        LossConfig.for_algorithm("ggpo"), old_logprobs="recompute", kl_coef=0.5
    )
    mesh = make_mesh(-1, 1, 1)
    learner = Learner(_model, make_optimizer(optim), loss, mesh, length_bucket=0)
    learner.initialize()
    batches = [_batch(args.segments, args.tokens, seed) for seed in range(args.steps + 1)]
    learner.train_step(batches[0])  # compile
    learner.reference_logprobs(batches[0]["tokens"])  # compile the extra forward

    ours, baseline = [], []
    for batch in batches[1:]:  # alternate, so drifting load hurts both sides alike
        began = time.perf_counter()
        learner.train_step(batch)
        ours.append(time.perf_counter() - began)
        began = time.perf_counter()
        old = np.asarray(jax.device_get(learner._ref_fn(learner.params(), batch["tokens"])))
        jax.block_until_ready(jax.device_put(old))
        learner.train_step(batch)
        baseline.append(time.perf_counter() - began)
    mine, theirs = statistics.median(ours), statistics.median(baseline)
    print(
        f"{platform.node()} {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"{args.segments} segments x {args.tokens} tokens, {args.steps} steps each"
    )
    print(f"update, old log-probs from its own forward: {mine:.3f} s (median)")
    print(f"update + separate old-log-prob forward:     {theirs:.3f} s (median)")
    print(f"speed-up: {theirs / mine:.2f}x")


if __name__ == "__main__":
    main()
