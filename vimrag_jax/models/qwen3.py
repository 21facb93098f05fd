"""The Qwen3 text decoder (`Qwen3ForCausalLM`) in Flax NNX, numerically matching transformers.

Parameters carry logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv_heads`, `head_dim`)
that `vimrag_jax.parallel.sharding` maps to mesh axes. Attention projections keep the head axis
separate (`q [embed, heads, head_dim]`, `o [heads, head_dim, embed]`) so heads can be sharded
without reshapes. Weights are stored in float32; `Qwen3Config.dtype` picks the compute dtype.
Checkpoint import lives in `vimrag_jax.models.hf`, the attention kernels in
`vimrag_jax.models.attention`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vimrag_jax.models.attention import blocked_attend
from vimrag_jax.models.linear import dense, swiglu
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

    def __post_init__(self):
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
        cls, hf: dict[str, Any], *, dtype: str = "float32", remat: bool = False
    ) -> Qwen3Config:
        """Reads a `config.json` dict of `model_type: qwen3` (transformers 4.x or 5.x layout).

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


def _param(
    rngs: nnx.Rngs, init: nnx.Initializer, shape: tuple[int, ...], axes: tuple[str, ...]
) -> nnx.Param:
    # Logical names are not mesh axes, so Variables must not shard themselves on creation;
    # vimrag_jax.parallel.sharding maps them to the mesh.
    annotated = nnx.with_partitioning(init, axes, eager_sharding=False)
    return nnx.Param(annotated(rngs.params(), shape, jnp.float32))


def _dense_init(in_axes: tuple[int, ...], out_axes: tuple[int, ...]) -> nnx.Initializer:
    return nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axes, out_axis=out_axes
    )


class RMSNorm(nnx.Module):
    """RMSNorm as in transformers: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, axis_name: str, eps: float, *, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, nnx.initializers.ones_init(), (dim,), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_cos_sin(
    positions_bl: jax.Array, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
    """Default-RoPE tables `cos, sin: float32[B, L, head_dim]` (two copies of each frequency)."""
    inv_freq_k = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_blk = positions_bl.astype(jnp.float32)[..., None] * inv_freq_k
    angles_bld = jnp.concatenate([freqs_blk, freqs_blk], axis=-1)
    return jnp.cos(angles_bld), jnp.sin(angles_bld)


def apply_rope(x_blhk: jax.Array, cos_blk: jax.Array, sin_blk: jax.Array) -> jax.Array:
    """Rotates `x[B, L, heads, K]` by the tables; the halves of K are the rotated pairs."""
    half = x_blhk.shape[-1] // 2
    rotated = jnp.concatenate([-x_blhk[..., half:], x_blhk[..., :half]], axis=-1)
    cos, sin = cos_blk[:, :, None, :], sin_blk[:, :, None, :]
    return (x_blhk * cos + rotated * sin).astype(x_blhk.dtype)


KVPair = tuple[jax.Array, jax.Array]  # (keys [B, T, G, K], values [B, T, G, K]) of one layer


class Attention(nnx.Module):
    """Grouped-query attention with per-head q/k RMSNorm before RoPE."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        d, h, g, k = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.num_kv_heads = g
        self.head_dim = k
        self.q_dhk = _param(
            rngs, _dense_init((0,), (1, 2)), (d, h, k), ("embed", "heads", "head_dim")
        )
        self.k_dgk = _param(
            rngs, _dense_init((0,), (1, 2)), (d, g, k), ("embed", "kv_heads", "head_dim")
        )
        self.v_dgk = _param(
            rngs, _dense_init((0,), (1, 2)), (d, g, k), ("embed", "kv_heads", "head_dim")
        )
        self.o_hkd = _param(
            rngs, _dense_init((0, 1), (2,)), (h, k, d), ("heads", "head_dim", "embed")
        )
        self.q_norm = RMSNorm(k, "head_dim", config.rms_norm_eps, rngs=rngs)
        self.k_norm = RMSNorm(k, "head_dim", config.rms_norm_eps, rngs=rngs)

    def __call__(
        self,
        x_bld: jax.Array,
        cos_blk: jax.Array,
        sin_blk: jax.Array,
        allowed_bqm: jax.Array,
        *,
        kv_cache: KVPair | None = None,
        cache_index: jax.Array | int = 0,
    ) -> jax.Array | tuple[jax.Array, KVPair]:
        """`[B, L, D]`; with `kv_cache`, also the cache with this call's keys/values written.

        Without a cache, `allowed_bqm: bool[B, L, L]`. With `kv_cache = (k, v)` of
        `[B, T, G, K]`, the new keys/values are written at slots `cache_index .. + L` (the same
        slots for every row) and queries attend over all T slots: `allowed_bqm: bool[B, L, T]`.
        """
        dtype = x_bld.dtype
        q_blhk = dense(x_bld, self.q_dhk[...].astype(dtype))
        k_blgk = dense(x_bld, self.k_dgk[...].astype(dtype))
        v_blgk = dense(x_bld, self.v_dgk[...].astype(dtype))
        q_blhk = apply_rope(self.q_norm(q_blhk), cos_blk, sin_blk)
        k_blgk = apply_rope(self.k_norm(k_blgk), cos_blk, sin_blk)
        if kv_cache is not None:
            start = (0, cache_index, 0, 0)
            k_blgk = jax.lax.dynamic_update_slice(
                kv_cache[0], k_blgk.astype(kv_cache[0].dtype), start
            )
            v_blgk = jax.lax.dynamic_update_slice(
                kv_cache[1], v_blgk.astype(kv_cache[1].dtype), start
            )
        out_blhk = blocked_attend(q_blhk, k_blgk.astype(dtype), v_blgk.astype(dtype), allowed_bqm)
        out_bld = dense(out_blhk, self.o_hkd[...].astype(dtype), contract=2)
        return out_bld if kv_cache is None else (out_bld, (k_blgk, v_blgk))


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_df = _param(rngs, _dense_init((0,), (1,)), (d, f), ("embed", "mlp"))
        self.up_df = _param(rngs, _dense_init((0,), (1,)), (d, f), ("embed", "mlp"))
        self.down_fd = _param(rngs, _dense_init((0,), (1,)), (f, d), ("mlp", "embed"))

    def __call__(self, x_bld: jax.Array) -> jax.Array:
        dtype = x_bld.dtype
        weights = (self.gate_df, self.up_df, self.down_fd)
        return swiglu(x_bld, *(w[...].astype(dtype) for w in weights))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_norm = RMSNorm(d, "embed", eps, rngs=rngs)
        self.attn = Attention(config, rngs=rngs)
        self.post_attn_norm = RMSNorm(d, "embed", eps, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(
        self,
        x_bld: jax.Array,
        cos_blk: jax.Array,
        sin_blk: jax.Array,
        allowed_bqm: jax.Array,
        *,
        kv_cache: KVPair | None = None,
        cache_index: jax.Array | int = 0,
    ) -> jax.Array | tuple[jax.Array, KVPair]:
        """`[B, L, D]`; with `kv_cache`, also the updated cache (see `Attention.__call__`)."""
        attn_out = self.attn(
            self.input_norm(x_bld),
            cos_blk,
            sin_blk,
            allowed_bqm,
            kv_cache=kv_cache,
            cache_index=cache_index,
        )
        new_cache = None
        if kv_cache is not None:
            attn_out, new_cache = attn_out
        x_bld = x_bld + attn_out
        x_bld = x_bld + self.mlp(self.post_attn_norm(x_bld))
        return x_bld if kv_cache is None else (x_bld, new_cache)


def _layer_forward(layer: DecoderLayer, x_bld, cos_blk, sin_blk, allowed_bqm) -> jax.Array:
    return layer(x_bld, cos_blk, sin_blk, allowed_bqm)


# Recomputes a layer's activations in the backward pass instead of keeping them.
_remat_layer_forward = nnx.remat(_layer_forward)


@struct.dataclass
class KVCache:
    """Decoding state of a causal decoder: keys/values of every layer plus bookkeeping.

    Prompts are left-padded so every row writes its next token at the same slot `length`;
    `valid_bt` marks slots holding real tokens and `next_position_b` is each row's RoPE position
    for the next token (for a Qwen3-VL model: the text position after its MRoPE offsets).
    """

    layers: tuple[KVPair, ...]  # per layer (keys, values), each [B, T, G, K]
    valid_bt: jax.Array  # bool[B, T]
    next_position_b: jax.Array  # int32[B]
    length: jax.Array  # int32[], slots filled so far (same for every row)

    @property
    def size(self) -> int:
        """T, the number of slots."""
        return self.valid_bt.shape[1]


def default_positions(attention_mask_bl: jax.Array) -> jax.Array:
    """Positions `int32[B, L]` counting real tokens only: `cumsum(mask) - 1`, clipped at 0."""
    counts_bl = jnp.cumsum(attention_mask_bl.astype(jnp.int32), axis=-1)
    return jnp.maximum(counts_bl - 1, 0)


def empty_cache(config: Qwen3Config, batch: int, cache_size: int) -> KVCache:
    """An empty `KVCache` of `cache_size` slots for `batch` rows, in the compute dtype."""
    dtype = jnp.dtype(config.dtype)
    shape = (batch, cache_size, config.num_key_value_heads, config.head_dim)
    layers = tuple(
        (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_hidden_layers)
    )
    return KVCache(
        layers=layers,
        valid_bt=jnp.zeros((batch, cache_size), bool),
        next_position_b=jnp.zeros((batch,), jnp.int32),
        length=jnp.zeros((), jnp.int32),
    )


def cached_decoder_layers(
    layers: Sequence[DecoderLayer],
    x_bld: jax.Array,
    cos_blk: jax.Array,
    sin_blk: jax.Array,
    allowed_bqt: jax.Array,
    cache_layers: tuple[KVPair, ...],
    cache_index: jax.Array | int,
    after_layer: Callable[[int, jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, tuple[KVPair, ...]]:
    """Runs `layers` over `x[B, L, D]`, writing their keys/values at `cache_index .. + L`.

    Returns the last layer's output (before the final norm) and the updated caches.
    `after_layer(i, x)` is applied to the output of layer i (Qwen3-VL adds DeepStack features
    there).
    """
    new_layers = []
    for i, (layer, kv) in enumerate(zip(layers, cache_layers, strict=True)):
        x_bld, kv = layer(
            x_bld, cos_blk, sin_blk, allowed_bqt, kv_cache=kv, cache_index=cache_index
        )
        if after_layer is not None:
            x_bld = after_layer(i, x_bld)
        new_layers.append(kv)
    return x_bld, tuple(new_layers)


def pad_cache_layers(layers: tuple[KVPair, ...], cache_size: int) -> tuple[KVPair, ...]:
    """Caches of `[B, P, G, K]` (a prompt) grown to `cache_size` empty slots at the end."""

    def pad(x: jax.Array) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, cache_size - x.shape[1]), (0, 0), (0, 0)))

    return tuple((pad(k), pad(v)) for k, v in layers)


class Qwen3ForCausalLM(nnx.Module):
    """Qwen3 decoder with LM head; `model(input_ids) -> logits float32[B, L, V]`.

    Besides the full forward it offers `hidden_states` (final-norm outputs, for embedders and
    memory-lean log-probs), `head_weight`, and the decoding protocol the sampler uses:
    `prefill(input_ids, attention_mask, cache_size=T) -> (logits_last, KVCache)` and
    `decode_step(tokens, cache) -> (logits, KVCache)`.
    """

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        self.config = config
        d, v = config.hidden_size, config.vocab_size
        self.embed_vd = _param(rngs, nnx.initializers.normal(0.02), (v, d), ("vocab", "embed"))
        self.layers = nnx.List(
            [DecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.final_norm = RMSNorm(d, "embed", config.rms_norm_eps, rngs=rngs)
        self.lm_head_dv = (
            None
            if config.tie_word_embeddings
            else _param(rngs, _dense_init((0,), (1,)), (d, v), ("embed", "vocab"))
        )

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

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings `[B, L, D]` in the compute dtype."""
        dtype = jnp.dtype(self.config.dtype)
        return jnp.take(self.embed_vd[...], input_ids, axis=0).astype(dtype)

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states `[B, L, D]` (after the final norm, before the LM head).

        Same arguments as `__call__`; `logits(hidden_states(...))` equals `__call__(...)`. The
        compute dtype is `config.dtype`. With `config.remat`, each layer is rematerialised.
        """
        b, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, length), dtype=jnp.int32)
        if positions is None:
            positions = default_positions(attention_mask)
        causal_qm = jnp.tril(jnp.ones((length, length), dtype=bool))
        allowed_bqm = causal_qm[None] & attention_mask.astype(bool)[:, None, :]
        cos_blk, sin_blk = rope_tables(self.config, positions)
        x_bld = self.embed(input_ids)
        forward = _remat_layer_forward if self.config.remat else _layer_forward
        for layer in self.layers:
            x_bld = forward(layer, x_bld, cos_blk, sin_blk, allowed_bqm)
        return self.final_norm(x_bld)

    def head_weight(self) -> jax.Array:
        """The LM head as `[D, V]` in the compute dtype (the transposed embedding when tied)."""
        dtype = jnp.dtype(self.config.dtype)
        if self.lm_head_dv is None:
            return self.embed_vd[...].astype(dtype).T
        return self.lm_head_dv[...].astype(dtype)

    def logits(self, hidden_bld: jax.Array) -> jax.Array:
        """`float32[..., V]` logits of final hidden states `[..., D]`."""
        return (hidden_bld @ self.head_weight()).astype(jnp.float32)

    def _cached_layers(
        self,
        x_bld: jax.Array,
        positions_bl: jax.Array,
        allowed_bqt: jax.Array,
        cache_layers: tuple[KVPair, ...],
        cache_index: jax.Array | int,
    ) -> tuple[jax.Array, tuple[KVPair, ...]]:
        cos_blk, sin_blk = rope_tables(self.config, positions_bl)
        x_bld, new_layers = cached_decoder_layers(
            self.layers, x_bld, cos_blk, sin_blk, allowed_bqt, cache_layers, cache_index
        )
        return self.final_norm(x_bld), new_layers

    def init_cache(self, batch: int, cache_size: int) -> KVCache:
        """An empty cache of `cache_size` slots for `batch` rows, in the compute dtype."""
        return empty_cache(self.config, batch, cache_size)

    def prefill(
        self, input_ids: jax.Array, attention_mask: jax.Array, *, cache_size: int
    ) -> tuple[jax.Array, KVCache]:
        """Runs left-padded prompts `int[B, P]` and returns the next-token logits and a cache.

        `attention_mask: [B, P]` must be 1 on each row's last column (left padding). Returns
        `float32[B, V]` logits at the last column and a `KVCache` of `cache_size >= P` slots with
        the prompt in slots `0..P-1`. Positions count real tokens from 0, as in `__call__`.
        """
        b, length = input_ids.shape
        if cache_size < length:
            raise ValueError(f"cache_size={cache_size} is shorter than the prompt ({length}).")
        valid_bl = attention_mask.astype(bool)
        positions_bl = default_positions(valid_bl)
        causal_qm = jnp.tril(jnp.ones((length, length), dtype=bool))
        allowed_bqm = causal_qm[None] & valid_bl[:, None, :]
        prompt_cache = self.init_cache(b, length)
        hidden_bld, layers = self._cached_layers(
            self.embed(input_ids), positions_bl, allowed_bqm, prompt_cache.layers, 0
        )
        cache = KVCache(
            layers=pad_cache_layers(layers, cache_size),
            valid_bt=jnp.pad(valid_bl, ((0, 0), (0, cache_size - length))),
            next_position_b=positions_bl[:, -1] + valid_bl[:, -1].astype(jnp.int32),
            length=jnp.asarray(length, jnp.int32),
        )
        return self.logits(hidden_bld[:, -1]), cache

    def decode_step(self, tokens_b: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Feeds one token per row; returns `float32[B, V]` next-token logits and the cache.

        The token goes to slot `cache.length` at position `cache.next_position_b`; writing past
        the last slot is the caller's error (it would be clamped and overwrite slot T-1).
        """
        valid_bt = jax.lax.dynamic_update_slice(
            cache.valid_bt, jnp.ones((tokens_b.shape[0], 1), bool), (0, cache.length)
        )
        hidden_b1d, layers = self._cached_layers(
            self.embed(tokens_b[:, None]),
            cache.next_position_b[:, None],
            valid_bt[:, None, :],
            cache.layers,
            cache.length,
        )
        new_cache = KVCache(
            layers=layers,
            valid_bt=valid_bt,
            next_position_b=cache.next_position_b + 1,
            length=cache.length + 1,
        )
        return self.logits(hidden_b1d[:, 0]), new_cache
