"""A tiny causal policy that stands in for Qwen3 while the parallel training step is built.

It has the real model's calling convention (`model(input_ids) -> logits [B, L, V]`) and uses
the same logical axis names on its parameters (`vocab`, `embed`, `mlp`), so code written against
it (sharding rules, the update step) carries over unchanged. Each position sees its own token and
the previous one, so log-probabilities depend on context and gradients reach every parameter.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class StandinConfig:
    """Sizes of the stand-in; keep them divisible by the mesh axes a test shards over."""

    vocab_size: int = 32
    embed_dim: int = 16
    mlp_dim: int = 32


def _annotated(init: nnx.Initializer, logical_axes: tuple[str, ...]) -> nnx.Initializer:
    # Logical names are not mesh axes, so Variables must not try to shard themselves on creation
    # (flax's default "eager sharding"); vimrag_jax.parallel.sharding maps them to the mesh.
    return nnx.with_partitioning(init, logical_axes, eager_sharding=False)


class StandinPolicy(nnx.Module):
    """Embedding -> mix of current and previous token -> residual MLP -> RMSNorm -> LM head."""

    def __init__(self, config: StandinConfig, *, rngs: nnx.Rngs):
        self.config = config
        dense_init = nnx.initializers.lecun_normal()
        self.embed = nnx.Embed(
            config.vocab_size,
            config.embed_dim,
            embedding_init=_annotated(nnx.initializers.normal(1.0), ("vocab", "embed")),
            rngs=rngs,
        )
        self.up_current = nnx.Linear(
            config.embed_dim,
            config.mlp_dim,
            kernel_init=_annotated(dense_init, ("embed", "mlp")),
            bias_init=_annotated(nnx.initializers.zeros_init(), ("mlp",)),
            rngs=rngs,
        )
        self.up_previous = nnx.Linear(
            config.embed_dim,
            config.mlp_dim,
            use_bias=False,
            kernel_init=_annotated(dense_init, ("embed", "mlp")),
            rngs=rngs,
        )
        self.down = nnx.Linear(
            config.mlp_dim,
            config.embed_dim,
            kernel_init=_annotated(dense_init, ("mlp", "embed")),
            bias_init=_annotated(nnx.initializers.zeros_init(), ("embed",)),
            rngs=rngs,
        )
        self.norm = nnx.RMSNorm(
            config.embed_dim,
            scale_init=_annotated(nnx.initializers.ones_init(), ("embed",)),
            rngs=rngs,
        )
        self.lm_head = nnx.Linear(
            config.embed_dim,
            config.vocab_size,
            use_bias=False,
            kernel_init=_annotated(dense_init, ("embed", "vocab")),
            rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Logits `float32[B, L, V]` for `input_ids: int[B, L]`; position t sees tokens <= t."""
        x_bld = self.embed(input_ids)
        # Shift right by one position so each token also sees its predecessor (zeros at t=0).
        previous_bld = jnp.pad(x_bld[:, :-1], ((0, 0), (1, 0), (0, 0)))
        hidden_blm = jax.nn.gelu(self.up_current(x_bld) + self.up_previous(previous_bld))
        x_bld = x_bld + self.down(hidden_blm)
        return self.lm_head(self.norm(x_bld))
