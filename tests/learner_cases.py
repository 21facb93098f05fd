"""The tiny policy, optimizer and loss batches the learner tests share with the multi-process
learner script (`multiprocess_learner.py`, run as two JAX processes)."""

from __future__ import annotations

import ml_collections
import numpy as np
from flax import nnx

from vimrag_jax.data.segments import batch_spec
from vimrag_jax.models.presets import init_model, preset_config
from vimrag_jax.optim import make_optimizer
from vimrag_jax.rollout.records import RecordDims

VOCAB = 256
DIMS = RecordDims(nodes=4, items=2, segments=3, tokens=24, visuals=1)


def model_fn():
    hf = preset_config("tiny")
    hf["vocab_size"] = VOCAB
    return init_model(hf, rngs=nnx.Rngs(0))


def optim_config(**overrides) -> ml_collections.ConfigDict:
    """A ``config.optim`` block for tests (a short warmup-cosine AdamW); ``overrides`` on top."""
    values = dict(
        learning_rate=1e-3,
        schedule="warmup_cosine",
        warmup_steps=1,
        total_steps=4,
        final_lr_ratio=0.1,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.01,
        grad_clip=1.0,
        accumulate_steps=1,
    )
    return ml_collections.ConfigDict({**values, **overrides})


def optimizer():
    return make_optimizer(optim_config())


def batch(seed: int, rows: int = 8) -> dict[str, np.ndarray]:
    """A loss batch on a root -> 1 -> 2 (answer) graph with a dead end 3; the last two rows
    are padding."""
    rng = np.random.default_rng(seed)
    spec = batch_spec(rows, DIMS)
    out = {key: np.zeros(shape, dtype) for key, (shape, dtype) in spec.items()}
    length = DIMS.tokens
    out["tokens"] = rng.integers(1, VOCAB, (rows, length)).astype(np.int32)
    out["loss_mask"][:, length // 2 :] = True
    out["behavior_logprobs"] = np.where(
        out["loss_mask"], rng.normal(-5.5, 0.1, (rows, length)), 0.0
    ).astype(np.float32)
    out["segment_valid"][: rows - 2] = True
    out["reward"] = (np.arange(rows) % 2).astype(np.float32)
    out["advantage"] = np.where(out["reward"] > 0, 1.0, -1.0).astype(np.float32)
    out["adjacency"][:, 0, 1] = out["adjacency"][:, 1, 2] = out["adjacency"][:, 0, 3] = True
    out["node_valid"][:] = True
    out["answer_node"][:] = 2
    out["segment_node"] = (np.arange(rows) % 4).astype(np.int32)
    out["relevant"][:, 1] = True
    return out
