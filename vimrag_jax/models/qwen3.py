"""The Qwen3 text decoder (`Qwen3ForCausalLM`) in Flax NNX, numerically matching transformers.

`Qwen3Config` holds the sizes and the RoPE setting; the model is the shared decoder stack
(`vimrag_jax.models.decoder`, which also holds the layers and the KV cache) with default or
scaled RoPE over `[B, L]` positions. Weights are stored in float32; `Qwen3Config.dtype` picks
the compute dtype. Checkpoint import lives in `vimrag_jax.models.hf`, the attention kernels in
`vimrag_jax.models.attention`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vimrag_jax.models.decoder import (
    REMAT_POLICIES,
    DecoderStack,
    KVCache,
    causal_allowed,
    default_positions,
)
from vimrag_jax.models.rope import (
    DEFAULT_THETA,
    RopeParameters,
    cos_sin,
    inv_freq_and_scaling,
    rope_parameters_from_hf,
)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Sizes and constants of a Qwen3 decoder; build one from a HF config with `from_hf`.

    `rope` is the RoPE setting (default, linear, dynamic NTK, YaRN or Llama-3 scaling, see
    `vimrag_jax.models.rope`). `rope_theta` is a shorthand kept for older callers: given alone
    it means default RoPE with that base; after construction it always equals
    `rope.rope_theta`. Leaving `rope` out gives default RoPE whose `max_position_embeddings`
    is the config's.

    `remat`, `remat_policy` and `scan_layers` change how the full forward runs, not what it
    computes: `scan_layers` runs the decoder layers as one scan over their stacked parameters
    (compile time independent of depth; see `vimrag_jax.models.decoder`), `remat_policy`
    (one of `decoder.REMAT_POLICIES`) says what a rematerialised layer keeps.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None  # shorthand, see the class docstring
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: bool = False  # recompute each layer's activations in the backward pass
    rope: RopeParameters | None = None  # never None after construction
    scan_layers: bool = False  # full forward: layers as one scan over stacked parameters
    remat_policy: str = (
        "nothing_saveable"  # with remat: what each layer keeps (a checkpoint policy)
    )

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}.")
        rope = self.rope
        if rope is None:
            theta = DEFAULT_THETA if self.rope_theta is None else float(self.rope_theta)
            rope = RopeParameters(
                rope_theta=theta, max_position_embeddings=self.max_position_embeddings
            )
        elif self.rope_theta is not None and float(self.rope_theta) != rope.rope_theta:
            raise ValueError(
                f"rope_theta={self.rope_theta} contradicts rope.rope_theta={rope.rope_theta}; "
                "change the base through `rope` (dataclasses.replace(config.rope, ...))."
            )
        object.__setattr__(self, "rope", rope)
        object.__setattr__(self, "rope_theta", rope.rope_theta)

    @classmethod
    def from_hf(
        cls,
        hf: dict[str, Any],
        *,
        dtype: str = "float32",
        remat: bool = False,
        scan_layers: bool = False,
        remat_policy: str = "nothing_saveable",
    ) -> Qwen3Config:
        """Reads a `config.json` dict of `model_type: qwen3` (transformers 4.x or 5.x layout).

        `dtype`, `remat`, `scan_layers` and `remat_policy` are ours (see the class docstring).

        RoPE settings are read by `rope_parameters_from_hf`. Raises NotImplementedError for
        features this port does not have yet: RoPE types outside `rope.ROPE_TYPES` (e.g.
        "longrope"), partial rotary, per-layer RoPE, sliding-window attention, attention
        biases, and activations other than SiLU.
        """
        if hf.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(
                f"Qwen3 port supports hidden_act='silu' only, got {hf['hidden_act']!r}."
            )
        if hf.get("attention_bias", False):
            raise NotImplementedError("Qwen3 port does not support attention_bias=True yet.")
        if hf.get("use_sliding_window", False):
            raise NotImplementedError("Qwen3 port does not support sliding-window attention yet.")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            dtype=dtype,
            remat=remat,
            rope=rope_parameters_from_hf(hf),
            scan_layers=scan_layers,
            remat_policy=remat_policy,
        )


def rope_tables(config: Qwen3Config, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`cos, sin: float32[*positions.shape, head_dim]` for the config's RoPE setting.

    Dynamic NTK takes `seq_len = max(positions) + 1` over the whole batch, as transformers'
    rotary embedding does for one call; during decoding that is the new token's position + 1,
    while cached keys keep the rotation they were written with (as in transformers).
    """
    seq_len = None
    if config.rope.rope_type == "dynamic":
        seq_len = jnp.max(positions).astype(jnp.int32) + 1
    inv_freq, scaling = inv_freq_and_scaling(config.rope, config.head_dim, seq_len=seq_len)
    return cos_sin(positions, inv_freq, scaling)


def rope_cos_sin(
    positions_bl: jax.Array, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
    """Default-RoPE tables `cos, sin: float32[B, L, head_dim]` (two copies of each frequency)."""
    inv_freq_k = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_blk = positions_bl.astype(jnp.float32)[..., None] * inv_freq_k
    angles_bld = jnp.concatenate([freqs_blk, freqs_blk], axis=-1)
    return jnp.cos(angles_bld), jnp.sin(angles_bld)


class Qwen3ForCausalLM(DecoderStack):
    """Qwen3 decoder with LM head; `model(input_ids) -> logits float32[B, L, V]`.

    Besides the full forward it offers `hidden_states` (final-norm outputs, for embedders and
    memory-lean log-probs), `head_weight`, and the decoding protocol the sampler uses:
    `prefill(input_ids, attention_mask, cache_size=T) -> (logits_last, KVCache)` and
    `decode_step(tokens, cache) -> (logits, KVCache)`.
    """

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        self.config = config
        super().__init__(config, rngs=rngs)

    @property
    def text_config(self) -> Qwen3Config:
        return self.config

    def position_tables(self, positions_bl: jax.Array) -> tuple[jax.Array, jax.Array]:
        """RoPE tables `float32[B, L, head_dim]` of positions `int[B, L]` (see `rope_tables`)."""
        return rope_tables(self.config, positions_bl)

    def step_positions(self, next_position_b: jax.Array) -> jax.Array:
        return next_position_b[:, None]

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits `float32[B, L, V]` for `input_ids: int[B, L]`.

        `attention_mask: [B, L]` (1 = real token, 0 = padding; any padding side) hides padded
        keys; `positions: int[B, L]` default to `cumsum(mask) - 1` (clipped at 0), i.e. 0..L-1
        without a mask. Logits at padded positions are meaningless.
        """
        return self.logits(self.hidden_states(input_ids, attention_mask, positions))

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states `[B, L, D]` (after the final norm, before the LM head).

        Same arguments as `__call__`; `logits(hidden_states(...))` equals `__call__(...)`. The
        compute dtype is `config.dtype`. With `config.remat`, each layer is rematerialised; with
        `config.scan_layers`, the layers run as one scan.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, dtype=jnp.int32)
        if positions is None:
            positions = default_positions(attention_mask)
        allowed_bqm = causal_allowed(attention_mask)
        return self.decode_hidden(self.embed(input_ids), positions, allowed_bqm)

    def prefill(
        self, input_ids: jax.Array, attention_mask: jax.Array, *, cache_size: int
    ) -> tuple[jax.Array, KVCache]:
        """Runs left-padded prompts `int[B, P]` and returns the next-token logits and a cache.

        `attention_mask: [B, P]` must be 1 on each row's last column (left padding). Returns
        `float32[B, V]` logits at the last column and a `KVCache` of `cache_size >= P` slots with
        the prompt in slots `0..P-1`. Positions count real tokens from 0, as in `__call__`.
        """
        valid_bl = attention_mask.astype(bool)
        positions_bl = default_positions(valid_bl)
        next_position_b = positions_bl[:, -1] + valid_bl[:, -1].astype(jnp.int32)
        return self.prefill_embeddings(
            self.embed(input_ids), positions_bl, valid_bl, next_position_b, cache_size=cache_size
        )
