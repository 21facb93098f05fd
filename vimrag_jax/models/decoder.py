"""The Qwen3 decoder stack that Qwen3 and Qwen3-VL share: layers, KV cache, embedding and LM head.

`DecoderStack` holds the token embedding, the decoder layers, the final norm and the (optional)
LM head, and runs them: the full forward (`decode_hidden`, optionally rematerialised per layer)
and the sampler's decoding protocol (`decode_step`, and `prefill_embeddings` for the models'
`prefill`). A model subclasses it and says only how positions become rotary tables
(`position_tables`): default RoPE over `[B, L]` positions for Qwen3, interleaved MRoPE over
`[3, B, L]` for Qwen3-VL, which also places visual features and DeepStack through the
embeddings and `after_layer` hooks.

With `scan_layers` (a `Qwen3Config` field) the full forward runs the layers as one
`jax.lax.scan` over their parameters stacked `[layers, ...]`, so the traced and compiled
program holds one layer body whatever the depth; with `remat` the scanned body is a
`jax.checkpoint` under `remat_policy`. The parameters stay stored per layer (`layers[i]...`)
and are stacked on the fly in `scan_decoder_layers`: checkpoints, the Hugging Face
import/export (`vimrag_jax.models.hf`), publishing, the optimizer state, the logical-axis
sharding rules and every caller that walks `model.layers` are unchanged, and one checkpoint
runs scanned or unrolled. Storing them stacked would save a copy but put a `layers` axis into
all of those. The price: one copy of the layer parameters per forward (their gradients are
sliced back per layer), and a few stacking/slicing ops per parameter and layer, so the
program still grows with depth, by about a tenth of a layer's body per layer
(`tests/test_scan_layers.py`); under FSDP the copy keeps each weight's split. Layers whose
output an `after_layer` hook may change (Qwen3-VL's DeepStack levels,
`DecoderStack.hooked_layers`) run unrolled before the scan; the KV-cache passes (prefill,
decode) stay unrolled.

Parameters carry logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv_heads`, `head_dim`);
attention projections keep the head axis separate (`q [embed, heads, head_dim]`,
`o [heads, head_dim, embed]`) so heads can be sharded without reshapes. The parameter names
are the checkpoint layout that `vimrag_jax.models.hf` maps to transformers' names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vimrag_jax.models.attention import blocked_attend
from vimrag_jax.models.linear import dense, swiglu
from vimrag_jax.models.params import dense_init, param
from vimrag_jax.parallel.sharding import constrain_rows

if TYPE_CHECKING:  # qwen3 imports this module; the config is only a type here
    from vimrag_jax.models.qwen3 import Qwen3Config

KVPair = tuple[jax.Array, jax.Array]  # (keys [B, T, G, K], values [B, T, G, K]) of one layer
AfterLayer = Callable[[int, jax.Array], jax.Array]  # (layer index, its output) -> new output


class LayerInputs(NamedTuple):
    """What every decoder layer reads in one call besides the hidden states."""

    cos_blk: jax.Array  # rotary tables float32[B, L, head_dim]
    sin_blk: jax.Array
    allowed_bqm: jax.Array  # bool[B, L, M]: may query q see key m (M = L, or T cache slots)
    cache_index: jax.Array | int = 0  # with a KV cache: the slot of this call's first token


class RMSNorm(nnx.Module):
    """RMSNorm as in transformers: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, axis_name: str, eps: float, *, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)

    def normalize(self, x: jax.Array) -> jax.Array:
        """`x / rms(x)` without the scale, for a caller that folds the scale into the weights
        of the projection that reads it (`fold_scale`)."""
        return rms_normalize(x, self.eps)


def fold_scale(w_d: jax.Array, scale_d: jax.Array) -> jax.Array:
    """The weight `w[D, ...]` with its input rows scaled: `x̂ @ fold_scale(w, s)` equals
    `(s * x̂) @ w`, with the scale applied to `D x N` weights instead of `T x D` activations
    (and its gradient `sum(dw_eff * w)` over weights, not activations: no `[T, D]`
    broadcast of the scale is materialised in either pass). Rounds in another order than
    transformers' `(s * x̂) @ w`: equal up to float32 rounding (the HF parity tests hold)."""
    return w_d * scale_d.astype(w_d.dtype).reshape(-1, *(1,) * (w_d.ndim - 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """`scale * x / rms(x)` over the last axis, normalised in float32 and cast back to `x`'s
    dtype before the scale (transformers' order).

    The custom backward keeps `x` and the per-row `1 / rms` only and writes the gradient in one
    pass, `dx = r * (g - x̂ * mean(g * x̂))` with `g = dy * scale`, `x̂ = x * r`; autodiff of the
    plain expression materialises broadcasts of the scale and of `r` over `[..., D]` (measured:
    ~10 % of the Qwen3 CPU training step in elementwise passes)."""
    return _rms_norm_fwd(x, scale, eps)[0]


def _inverse_rms(x, eps):
    """`(x in float32, 1 / rms(x))` over the last axis, the latter `[..., 1]`."""
    x32 = x.astype(jnp.float32)
    return x32, jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


def _normalize_grad(x, r, g32):
    """`dx = r * (g - x̂ * mean(g * x̂))`: the gradient of `x̂ = x * r` for the cotangent `g`."""
    x_hat = x.astype(jnp.float32) * r
    return r * (g32 - x_hat * jnp.mean(g32 * x_hat, axis=-1, keepdims=True)), x_hat


def _rms_norm_fwd(x, scale, eps):
    x32, r = _inverse_rms(x, eps)
    return scale.astype(x.dtype) * (x32 * r).astype(x.dtype), (x, scale, r)


def _rms_norm_bwd(eps, residuals, dy):
    del eps
    x, scale, r = residuals
    dy32 = dy.astype(jnp.float32)
    dx, x_hat = _normalize_grad(x, r, dy32 * scale.astype(jnp.float32))
    dscale = jnp.sum((dy32 * x_hat).reshape(-1, x.shape[-1]), axis=0)
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """`x / rms(x)` over the last axis, in float32 and cast back (`rms_norm` without the scale);
    backward `dx = r * (dy - x̂ * mean(dy * x̂))` in one pass."""
    return _rms_normalize_fwd(x, eps)[0]


def _rms_normalize_fwd(x, eps):
    x32, r = _inverse_rms(x, eps)
    return (x32 * r).astype(x.dtype), (x, r)


def _rms_normalize_bwd(eps, residuals, dy):
    del eps
    x, r = residuals
    return (_normalize_grad(x, r, dy.astype(jnp.float32))[0].astype(x.dtype),)


rms_normalize.defvjp(_rms_normalize_fwd, _rms_normalize_bwd)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@jax.custom_vjp
def apply_rope(x_blhk: jax.Array, cos_blk: jax.Array, sin_blk: jax.Array) -> jax.Array:
    """Rotates `x[B, L, heads, K]` by the tables; the halves of K are the rotated pairs.

    The tables are not differentiated (they come from positions). The backward applies the
    transposed rotation, `dx = dy * cos - rotate_half(dy * sin)`, in one elementwise pass;
    autodiff of the concatenate goes through padded copies of the whole `[B, L, H, K]`."""
    cos, sin = cos_blk[:, :, None, :], sin_blk[:, :, None, :]
    return (x_blhk * cos + _rotate_half(x_blhk) * sin).astype(x_blhk.dtype)


def _apply_rope_fwd(x_blhk, cos_blk, sin_blk):
    return apply_rope(x_blhk, cos_blk, sin_blk), (cos_blk, sin_blk)


def _apply_rope_bwd(residuals, dy_blhk):
    cos_blk, sin_blk = residuals
    cos, sin = cos_blk[:, :, None, :], sin_blk[:, :, None, :]
    dx_blhk = dy_blhk * cos - _rotate_half(dy_blhk * sin)
    return dx_blhk.astype(dy_blhk.dtype), None, None


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)


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
        in_embed = dense_init((0,), (1, 2))
        self.q_dhk = param(rngs, in_embed, (d, h, k), ("embed", "heads", "head_dim"))
        self.k_dgk = param(rngs, in_embed, (d, g, k), ("embed", "kv_heads", "head_dim"))
        self.v_dgk = param(rngs, in_embed, (d, g, k), ("embed", "kv_heads", "head_dim"))
        out_axes = ("heads", "head_dim", "embed")
        self.o_hkd = param(rngs, dense_init((0, 1), (2,)), (h, k, d), out_axes)
        self.q_norm = RMSNorm(k, "head_dim", config.rms_norm_eps, rngs=rngs)
        self.k_norm = RMSNorm(k, "head_dim", config.rms_norm_eps, rngs=rngs)

    def __call__(
        self,
        x_bld: jax.Array,
        inputs: LayerInputs,
        kv_cache: KVPair | None = None,
        in_scale: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVPair]:
        """`[B, L, D]`; with `kv_cache`, also the cache with this call's keys/values written.

        Without a cache, `inputs.allowed_bqm: bool[B, L, L]`. With `kv_cache = (k, v)` of
        `[B, T, G, K]`, the new keys/values are written at slots `inputs.cache_index .. + L`
        (the same slots for every row) and queries attend over all T slots:
        `allowed_bqm: bool[B, L, T]`. `in_scale[D]` multiplies the input (the pre-norm's
        scale, folded into the q/k/v weights: `fold_scale`).
        """
        cos_blk, sin_blk, allowed_bqm, cache_index = inputs
        dtype = x_bld.dtype
        q_dhk, k_dgk, v_dgk = (w[...].astype(dtype) for w in (self.q_dhk, self.k_dgk, self.v_dgk))
        if in_scale is not None:
            q_dhk, k_dgk, v_dgk = (fold_scale(w, in_scale) for w in (q_dhk, k_dgk, v_dgk))
        q_blhk = dense(x_bld, q_dhk)
        k_blgk = dense(x_bld, k_dgk)
        v_blgk = dense(x_bld, v_dgk)
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
        self.gate_df = param(rngs, dense_init((0,), (1,)), (d, f), ("embed", "mlp"))
        self.up_df = param(rngs, dense_init((0,), (1,)), (d, f), ("embed", "mlp"))
        self.down_fd = param(rngs, dense_init((0,), (1,)), (f, d), ("mlp", "embed"))

    def __call__(self, x_bld: jax.Array, in_scale: jax.Array | None = None) -> jax.Array:
        """`[B, L, D]`; `in_scale[D]` multiplies the input (folded into gate and up)."""
        dtype = x_bld.dtype
        gate_df, up_df, down_fd = (
            w[...].astype(dtype) for w in (self.gate_df, self.up_df, self.down_fd)
        )
        if in_scale is not None:
            gate_df, up_df = fold_scale(gate_df, in_scale), fold_scale(up_df, in_scale)
        return swiglu(x_bld, gate_df, up_df, down_fd)


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    The two norms' scales are folded into the weights that read them (`fold_scale`): the same
    function up to rounding, without a pass over the activations for the scale."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_norm = RMSNorm(d, "embed", eps, rngs=rngs)
        self.attn = Attention(config, rngs=rngs)
        self.post_attn_norm = RMSNorm(d, "embed", eps, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(
        self, x_bld: jax.Array, inputs: LayerInputs, kv_cache: KVPair | None = None
    ) -> jax.Array | tuple[jax.Array, KVPair]:
        """`[B, L, D]`; with `kv_cache`, also the updated cache (see `Attention.__call__`)."""
        attn_in = self.input_norm.normalize(x_bld)
        attn_out = self.attn(attn_in, inputs, kv_cache, in_scale=self.input_norm.scale[...])
        new_cache = None
        if kv_cache is not None:
            attn_out, new_cache = attn_out
        x_bld = x_bld + attn_out
        mlp_in = self.post_attn_norm.normalize(x_bld)
        x_bld = x_bld + self.mlp(mlp_in, in_scale=self.post_attn_norm.scale[...])
        return x_bld if kv_cache is None else (x_bld, new_cache)


def _layer_forward(layer: DecoderLayer, x_bld: jax.Array, inputs: LayerInputs) -> jax.Array:
    return layer(x_bld, inputs)


# `jax.checkpoint_policies` a config may name as `remat_policy`: what a rematerialised layer
# keeps from its forward pass (nothing: only its input, recomputing the rest; dots: the matmul
# outputs too, trading memory for less recomputation).
REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
)


def remat_policy(name: str) -> Callable[..., bool]:
    """The `jax.checkpoint_policies` member called `name` (one of `REMAT_POLICIES`)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={name!r} is not one of {REMAT_POLICIES}.")
    return getattr(jax.checkpoint_policies, name)


@functools.cache
def _remat_layer_forward(
    policy: str,
) -> Callable[[DecoderLayer, jax.Array, LayerInputs], jax.Array]:
    """`_layer_forward` recomputing the layer's activations in the backward pass (`policy`)."""
    return nnx.remat(_layer_forward, policy=remat_policy(policy))


def scan_decoder_layers(
    layers: Sequence[DecoderLayer],
    x_bld: jax.Array,
    inputs: LayerInputs,
    *,
    remat: bool = False,
    policy: str = "nothing_saveable",
) -> jax.Array:
    """Runs `layers` (all of one structure) over `x[B, L, D]` as one `jax.lax.scan`.

    Each layer's parameters are split off its module, the leaves stacked `[layers, ...]` and
    the scan body rebuilds one layer from a slice, so the program holds a single layer body
    whatever the depth. Each layer input is pinned to the batch axes (`constrain_rows`), as in
    the unrolled loop; with `remat` the body is checkpointed under `policy` (one of
    `REMAT_POLICIES`), so the backward pass keeps only each layer's input. Gradients reach the
    per-layer parameters through the stacking. Returns the last layer's output.
    """
    graphdef, first = nnx.split(layers[0])
    leaves, treedef = jax.tree.flatten(first)
    per_layer = [leaves, *(jax.tree.leaves(nnx.split(layer)[1]) for layer in layers[1:])]
    stacked = [jnp.stack(column) for column in zip(*per_layer, strict=True)]

    def body(x: jax.Array, layer_leaves: list[jax.Array]) -> tuple[jax.Array, None]:
        layer = nnx.merge(graphdef, jax.tree.unflatten(treedef, layer_leaves))
        return _layer_forward(layer, constrain_rows(x), inputs), None

    if remat:
        body = jax.checkpoint(body, policy=remat_policy(policy), prevent_cse=False)
    x_bld, _ = jax.lax.scan(body, x_bld, stacked)
    return x_bld


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


def causal_allowed(attention_mask_bl: jax.Array) -> jax.Array:
    """`bool[B, L, L]`: query q may see key m when m <= q and key m is a real token."""
    length = attention_mask_bl.shape[-1]
    causal_qm = jnp.tril(jnp.ones((length, length), dtype=bool))
    return causal_qm[None] & attention_mask_bl.astype(bool)[:, None, :]


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
    inputs: LayerInputs,
    cache_layers: tuple[KVPair, ...],
    after_layer: AfterLayer | None = None,
) -> tuple[jax.Array, tuple[KVPair, ...]]:
    """Runs `layers` over `x[B, L, D]`, writing their keys/values at slots
    `inputs.cache_index .. + L`; `inputs.allowed_bqm` is `bool[B, L, T]` over the T slots.
    Returns the last layer's output (before the final norm) and the updated caches.
    `after_layer(i, x)` is applied to the output of layer i (Qwen3-VL adds DeepStack features
    there).
    """
    new_layers = []
    for i, (layer, kv) in enumerate(zip(layers, cache_layers, strict=True)):
        x_bld, kv = layer(x_bld, inputs, kv)
        if after_layer is not None:
            x_bld = after_layer(i, x_bld)
        new_layers.append(kv)
    return x_bld, tuple(new_layers)


def pad_cache_layers(layers: tuple[KVPair, ...], cache_size: int) -> tuple[KVPair, ...]:
    """Caches of `[B, P, G, K]` (a prompt) grown to `cache_size` empty slots at the end."""

    def pad(x: jax.Array) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, cache_size - x.shape[1]), (0, 0), (0, 0)))

    return tuple((pad(k), pad(v)) for k, v in layers)


class DecoderStack(nnx.Module):
    """Embedding, decoder layers, final norm and LM head, with the forward and decoding passes.

    The parameters are attributes of the model itself (`embed_vd`, `layers`, `final_norm`,
    `lm_head_dv`; None when tied), so their paths are the same in every model that subclasses
    this. A subclass sets `self.config` and its own parameters, calls `__init__` with the text
    decoder's config, and defines `text_config`, `position_tables` and `step_positions`.
    """

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        d, v = config.hidden_size, config.vocab_size
        self.embed_vd = param(rngs, nnx.initializers.normal(0.02), (v, d), ("vocab", "embed"))
        self.layers = nnx.List(
            [DecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.final_norm = RMSNorm(d, "embed", config.rms_norm_eps, rngs=rngs)
        self.lm_head_dv = (
            None
            if config.tie_word_embeddings
            else param(rngs, dense_init((0,), (1,)), (d, v), ("embed", "vocab"))
        )

    @property
    def text_config(self) -> Qwen3Config:
        """The decoder's sizes, dtype and remat setting."""
        raise NotImplementedError

    def position_tables(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Rotary tables `cos, sin: float32[B, L, head_dim]` of the model's positions."""
        raise NotImplementedError

    def step_positions(self, next_position_b: jax.Array) -> jax.Array:
        """The positions (in `position_tables`' layout) of one new text token per row."""
        raise NotImplementedError

    def hooked_layers(self) -> int:
        """How many leading layers an `after_layer` hook of this model may change the output of
        (they run unrolled before the scan under `scan_layers`); default: all of them."""
        return len(self.layers)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings `[B, L, D]` in the compute dtype."""
        dtype = jnp.dtype(self.text_config.dtype)
        return jnp.take(self.embed_vd[...], input_ids, axis=0).astype(dtype)

    def head_weight(self) -> jax.Array:
        """The LM head as `[D, V]` in the compute dtype (the transposed embedding when tied)."""
        dtype = jnp.dtype(self.text_config.dtype)
        if self.lm_head_dv is None:
            return self.embed_vd[...].astype(dtype).T
        return self.lm_head_dv[...].astype(dtype)

    def logits(self, hidden_bld: jax.Array) -> jax.Array:
        """`float32[..., V]` logits of final hidden states `[..., D]`."""
        return (hidden_bld @ self.head_weight()).astype(jnp.float32)

    def decode_hidden(
        self,
        x_bld: jax.Array,
        positions: jax.Array,
        allowed_bqm: jax.Array,
        after_layer: AfterLayer | None = None,
    ) -> jax.Array:
        """Final (normed) hidden states `[B, L, D]` of the layers on input embeddings `x_bld`.

        `positions` are in `position_tables`' layout, `allowed_bqm: bool[B, L, L]` is the
        attention pattern and `after_layer(i, x)` is applied after layer i (Qwen3-VL adds
        DeepStack there). With `text_config.remat`, each layer is rematerialised (under
        `text_config.remat_policy`). With `text_config.scan_layers`, the layers after the first
        `hooked_layers()` (all of them without `after_layer`) run as one scan
        (`scan_decoder_layers`); the result is the same up to float rounding.
        """
        config = self.text_config
        inputs = LayerInputs(*self.position_tables(positions), allowed_bqm)
        forward = _remat_layer_forward(config.remat_policy) if config.remat else _layer_forward
        layers = list(self.layers)
        unrolled = len(layers)
        if config.scan_layers:
            unrolled = 0 if after_layer is None else min(self.hooked_layers(), len(layers))
        for i, layer in enumerate(layers[:unrolled]):
            x_bld = forward(layer, constrain_rows(x_bld), inputs)
            if after_layer is not None:
                x_bld = after_layer(i, x_bld)
        if unrolled < len(layers):
            x_bld = scan_decoder_layers(
                layers[unrolled:], x_bld, inputs, remat=config.remat, policy=config.remat_policy
            )
        return constrain_rows(self.final_norm(x_bld))

    def init_cache(self, batch: int, cache_size: int) -> KVCache:
        """An empty cache of `cache_size` slots for `batch` rows, in the compute dtype."""
        return empty_cache(self.text_config, batch, cache_size)

    def prefill_embeddings(
        self,
        x_bld: jax.Array,
        positions: jax.Array,
        valid_bl: jax.Array,
        next_position_b: jax.Array,
        *,
        cache_size: int,
        after_layer: AfterLayer | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Runs left-padded prompt embeddings `[B, P, D]` into a fresh cache.

        `valid_bl: bool[B, P]` marks real tokens; `next_position_b` is where each row's
        generation continues. Returns `float32[B, V]` logits of the last column and a `KVCache`
        of `cache_size >= P` slots with the prompt in slots `0..P-1`.
        """
        b, length = valid_bl.shape
        if cache_size < length:
            raise ValueError(f"cache_size={cache_size} is shorter than the prompt ({length}).")
        inputs = LayerInputs(*self.position_tables(positions), causal_allowed(valid_bl))
        x_bld, layers = cached_decoder_layers(
            self.layers,
            x_bld,
            inputs,
            self.init_cache(b, length).layers,
            after_layer=after_layer,
        )
        cache = KVCache(
            layers=pad_cache_layers(layers, cache_size),
            valid_bt=jnp.pad(valid_bl, ((0, 0), (0, cache_size - length))),
            next_position_b=next_position_b,
            length=jnp.asarray(length, jnp.int32),
        )
        return self.logits(self.final_norm(x_bld[:, -1])), cache

    def decode_step(self, tokens_b: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Feeds one (text) token per row; returns `float32[B, V]` next-token logits and the cache.

        The token goes to slot `cache.length` at position `cache.next_position_b` (on every
        MRoPE section for Qwen3-VL); writing past the last slot is the caller's error (it would
        be clamped and overwrite slot T-1).
        """
        valid_bt = jax.lax.dynamic_update_slice(
            cache.valid_bt, jnp.ones((tokens_b.shape[0], 1), bool), (0, cache.length)
        )
        positions = self.step_positions(cache.next_position_b)
        cos_blk, sin_blk = self.position_tables(positions)
        inputs = LayerInputs(cos_blk, sin_blk, valid_bt[:, None, :], cache.length)
        x_b1d, layers = cached_decoder_layers(
            self.layers, self.embed(tokens_b[:, None]), inputs, cache.layers
        )
        new_cache = KVCache(
            layers=layers,
            valid_bt=valid_bt,
            next_position_b=cache.next_position_b + 1,
            length=cache.length + 1,
        )
        return self.logits(self.final_norm(x_b1d[:, 0])), new_cache
