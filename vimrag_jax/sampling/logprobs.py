"""Per-token log-probabilities of given token sequences, shared by the learner and the sampler.

Convention (the learner's): `logp[b, t]` is the log-probability of `tokens[b, t]` under the
model's distribution at position t-1, i.e. the raw softmax of the logits, before any sampling
temperature or top-p; `logp[b, 0] = 0`. Every function computes `logit[token] - logsumexp(logits)`
so no second `[B, L, V]` log-softmax array is ever materialised.

`sequence_logprobs` is the memory-lean entry point: it never builds the full float32 `[B, L, V]`
logits either. It runs the decoder to its final hidden states, then scans over the sequence in
chunks, each computing `[B, C, V]` logits, their logsumexp and the picked logit. Its custom
backward pass keeps only the logsumexps and recomputes one chunk's logits at a time.

`visual_sequence_logprobs` is the same for a Qwen3-VL policy on segments whose prompts hold
images and videos: it takes the per-segment vision inputs of `VISUAL_KEYS` (built on the host
by `vimrag_jax.data.vision.VisualInputs`), runs the vision tower once per segment (vmapped, so
attention stays within a segment's own patches and shapes stay static), places the merged
visual tokens and DeepStack features at the prompt's placeholders, and runs the decoder with
the MRoPE positions the host computed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from vimrag_jax.models.qwen3_vl_vision import VisionTables
from vimrag_jax.parallel.sharding import constrain_logical, constrain_rows

DEFAULT_CHUNK_SIZE = 256
#: `chunked_token_logprobs` keeps the float32 logits for its backward pass up to this size:
#: the tiny CPU configs. At `benchmarks/model_step.py`'s 134 MB keeping them measured at most
#: ~3 % faster for ~120 MB more peak memory (docs/benchmarks.md), so there they are recomputed.
KEEP_LOGITS_BYTES = 64 * 2**20

#: Batch keys of a Qwen3-VL policy's per-segment vision inputs (B segments, P patch rows, L
#: tokens): ``pixel_values float32[B, P, patch_dim]``, the vision tables
#: ``vision_interp_index int32[B, P, 4]``, ``vision_interp_weight float32[B, P, 4]``,
#: ``vision_rotary_hw int32[B, P, 2]``, ``vision_segment int32[B, P]`` (-1: padding row),
#: MRoPE ``position_ids int32[B, 3, L]`` and ``visual_token_index int32[B, L]`` (each
#: placeholder token's row among the segment's merged visual tokens, -1 elsewhere).
VISUAL_KEYS = (
    "pixel_values",
    "vision_interp_index",
    "vision_interp_weight",
    "vision_rotary_hw",
    "vision_segment",
    "position_ids",
    "visual_token_index",
)
#: The visual keys with a token axis (the last one).
VISUAL_TOKEN_KEYS = ("position_ids", "visual_token_index")


class HiddenStateModel(Protocol):
    """What `sequence_logprobs` needs from a model (Qwen3ForCausalLM provides it)."""

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array: ...

    def head_weight(self) -> jax.Array: ...


def picked_logprobs(logits_xv: jax.Array, tokens_x: jax.Array) -> jax.Array:
    """`float32[...]`: log-softmax of `logits[..., V]` at `tokens[...]` (no temperature)."""
    return _picked_and_logsumexp(logits_xv, tokens_x)[0]


def _picked_and_logsumexp(logits_xv: jax.Array, tokens_x: jax.Array):
    """`picked_logprobs` and the logsumexp of each row it subtracted, both `float32[...]`."""
    logits_xv = logits_xv.astype(jnp.float32)
    picked_x = jnp.take_along_axis(logits_xv, tokens_x[..., None].astype(jnp.int32), axis=-1)
    lse_x = jax.nn.logsumexp(logits_xv, axis=-1)
    return picked_x[..., 0] - lse_x, lse_x


def token_logprobs(logits_blv: jax.Array, tokens_bl: jax.Array) -> jax.Array:
    """`float32[B, L]`: log-prob of `tokens[b, t]` under the logits at position t-1; 0 at t=0.

    The plain version: takes full logits (as `model(tokens)` returns them).
    """
    _check_tokens(tokens_bl, logits_blv.shape[:2])
    logp_bl = picked_logprobs(logits_blv[:, :-1], tokens_bl[:, 1:])
    return jnp.pad(logp_bl, ((0, 0), (1, 0)))


def chunked_token_logprobs(
    hidden_bld: jax.Array,
    head_dv: jax.Array,
    tokens_bl: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    keep_logits_bytes: int = KEEP_LOGITS_BYTES,
) -> jax.Array:
    """`token_logprobs(hidden @ head, tokens)` without materialising the `[B, L, V]` logits.

    `hidden_bld` are final hidden states, `head_dv` the LM head `[D, V]`. The sequence is cut
    into chunks of `chunk_size` positions (the last one padded); a `lax.scan` computes each
    chunk's float32 logits, and the custom backward pass (`_head_logprobs`) recomputes them, so
    forward and backward both hold one `[B, chunk_size, V]` block at a time. When all the
    float32 logits take at most `keep_logits_bytes` (small vocabularies and batches: the CPU
    default, the tests), the forward keeps them for the backward instead, which saves the
    backward a quarter of the head's matmuls; at a real vocabulary they are recomputed.
    """
    _check_tokens(tokens_bl, hidden_bld.shape[:2])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    b, length, d = hidden_bld.shape
    steps = length - 1
    if steps == 0:
        return jnp.zeros((b, length), jnp.float32)
    chunk = min(chunk_size, steps)
    num_chunks = -(-steps // chunk)
    pad = num_chunks * chunk - steps
    hidden_bsd = jnp.pad(hidden_bld[:, :-1], ((0, 0), (0, pad), (0, 0)))
    targets_bs = jnp.pad(tokens_bl[:, 1:].astype(jnp.int32), ((0, 0), (0, pad)))
    hidden_nbcd = constrain_rows(hidden_bsd.reshape(b, num_chunks, chunk, d).swapaxes(0, 1), 1)
    targets_nbc = constrain_rows(targets_bs.reshape(b, num_chunks, chunk).swapaxes(0, 1), 1)
    keep = b * num_chunks * chunk * head_dv.shape[-1] * 4 <= keep_logits_bytes
    logp_nbc = _head_logprobs(hidden_nbcd, head_dv, targets_nbc, keep)
    logp_bs = logp_nbc.swapaxes(0, 1).reshape(b, num_chunks * chunk)[:, :steps]
    return jnp.pad(logp_bs, ((0, 0), (1, 0)))


def _chunk_logits(hidden_bcd: jax.Array, head_dv: jax.Array) -> jax.Array:
    """`float32[B*C, V]` logits of one chunk (rows flattened: a plain 2-D matmul).

    Under the learner's mesh the flattened rows stay on the batch devices (`constrain_rows`):
    with the head split over ``fsdp`` on its ``embed`` axis, GSPMD would otherwise contract the
    split axis and give every device the whole batch's `[B*C, V]` logits."""
    hidden_xd = constrain_rows(hidden_bcd.reshape(-1, hidden_bcd.shape[-1]))
    return constrain_rows(jnp.dot(hidden_xd, head_dv, preferred_element_type=jnp.float32))


def _head_forward(hidden_nbcd, head_dv, targets_nbc, keep):
    """Log-probs `float32[N, B, C]`, each row's logsumexp and, with `keep`, the logits
    `float32[N, B*C, V]` (else None), one chunk at a time."""

    def body(carry, xs):
        hidden_bcd, targets_bc = xs
        logits_xv = _chunk_logits(hidden_bcd, head_dv)
        logp_x, lse_x = _picked_and_logsumexp(logits_xv, targets_bc.reshape(-1))
        return carry, (logp_x.reshape(targets_bc.shape), lse_x, logits_xv if keep else None)

    _, (logp_nbc, lse_nx, logits_nxv) = jax.lax.scan(body, None, (hidden_nbcd, targets_nbc))
    return logp_nbc, lse_nx, logits_nxv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head_logprobs(hidden_nbcd, head_dv, targets_nbc, keep):
    """`float32[N, B, C]`: log-softmax of `hidden @ head` at the targets, chunk by chunk.

    A `custom_vjp` rather than `jax.checkpoint`: the forward keeps only each row's logsumexp
    (and the logits when `keep`), and the backward computes a chunk's logits once (or reads
    them) and writes the gradient of the log-softmax directly,
    `d logp / d logits = onehot(target) - softmax`, with `softmax = exp(logits - logsumexp)`.
    The head gradient `hidden^T @ dlogits` reads the hidden states transposed once up front,
    so every matmul is a plain row-major one (XLA:CPU otherwise transposes the `[B*C, V]`
    gradient of each chunk).
    """
    del keep  # without a backward pass there is nothing to keep the logits for
    return _head_forward(hidden_nbcd, head_dv, targets_nbc, False)[0]


def _head_logprobs_fwd(hidden_nbcd, head_dv, targets_nbc, keep):
    logp_nbc, lse_nx, logits_nxv = _head_forward(hidden_nbcd, head_dv, targets_nbc, keep)
    return logp_nbc, (hidden_nbcd, head_dv, targets_nbc, lse_nx, logits_nxv)


def _head_logprobs_bwd(keep, residuals, dlogp_nbc):
    # The barrier keeps the transpose below in the backward pass (XLA would hoist it).
    *residuals, dlogp_nbc = jax.lax.optimization_barrier((*residuals, dlogp_nbc))
    hidden_nbcd, head_dv, targets_nbc, lse_nx, logits_nxv = residuals
    n, b, c, d = hidden_nbcd.shape
    dtype = hidden_nbcd.dtype
    # One transpose of all hidden states, outside the loop, for the head gradient's matmul.
    hidden_ndx = jax.lax.optimization_barrier(
        constrain_rows(hidden_nbcd.reshape(n, b * c, d).swapaxes(1, 2), 2)
    )

    def body(dhead_dv, xs):
        hidden_bcd, hidden_dx, targets_bc, lse_x, dlogp_bc, *kept = xs
        logits_xv = kept[0] if keep else _chunk_logits(hidden_bcd, head_dv)
        probs_xv = jnp.exp(logits_xv - lse_x[:, None])
        dlogp_x1 = dlogp_bc.reshape(-1, 1)
        onehot_xv = jnp.arange(logits_xv.shape[-1])[None] == targets_bc.reshape(-1, 1)
        dlogits_xv = (jnp.where(onehot_xv, dlogp_x1, 0.0) - dlogp_x1 * probs_xv).astype(dtype)
        dhidden_xd = jax.lax.dot_general(
            dlogits_xv, head_dv, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        dhead_dv = dhead_dv + jnp.dot(hidden_dx, dlogits_xv, preferred_element_type=jnp.float32)
        dhead_dv = constrain_logical(dhead_dv, ("embed", "vocab"))
        return dhead_dv, constrain_rows(dhidden_xd.astype(dtype)).reshape(b, c, d)

    xs = (hidden_nbcd, hidden_ndx, targets_nbc, lse_nx, dlogp_nbc)
    if keep:
        xs = (*xs, logits_nxv)
    # The head gradient accumulates split like the head itself (embed over fsdp, vocab over
    # tensor), not as a whole [D, V] float32 copy per device.
    zeros_dv = constrain_logical(jnp.zeros(head_dv.shape, jnp.float32), ("embed", "vocab"))
    dhead_dv, dhidden_nbcd = jax.lax.scan(body, zeros_dv, xs)
    return dhidden_nbcd, dhead_dv.astype(head_dv.dtype), None


_head_logprobs.defvjp(_head_logprobs_fwd, _head_logprobs_bwd)


def sequence_logprobs(
    model: HiddenStateModel,
    tokens_bl: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """`float32[B, L]` log-probs of `tokens` under `model` in one forward pass (memory-lean).

    Equals `token_logprobs(model(tokens, attention_mask, positions), tokens)`; the learner's
    entry point. Padding (either side) is given by `attention_mask`; values at padded positions
    and at the first real token of each row are meaningless (mask them out).
    """
    hidden_bld = model.hidden_states(tokens_bl, attention_mask, positions)
    return chunked_token_logprobs(hidden_bld, model.head_weight(), tokens_bl, chunk_size=chunk_size)


def visual_hidden_states(
    model: Any, tokens_bl: jax.Array, visual: Mapping[str, jax.Array]
) -> jax.Array:
    """Final hidden states `[B, L, D]` of a Qwen3-VL model on segments with vision inputs.

    `model` is a `Qwen3VLForConditionalGeneration`; `visual` holds the `VISUAL_KEYS` arrays.
    Equals the model's own forward pass on each segment alone (`model(...)` with its
    images and videos, before the LM head): the tower runs per segment on the segment's
    patch rows (images and videos together, which is what running them apart gives, as
    attention is per frame), each placeholder token takes the merged row
    `visual_token_index` names, DeepStack level i is added there after decoder layer i, and
    the rotary tables come from `position_ids`. Segments are right-padded; padding needs no
    mask (the decoder is causal and nothing reads past a segment's tokens).
    """
    missing = [key for key in VISUAL_KEYS if key not in visual]
    if missing:
        raise KeyError(f"visual inputs lack {missing}")
    config = model.config
    dtype = jnp.dtype(config.dtype)
    b, length = tokens_bl.shape
    index_bl = jnp.asarray(visual["visual_token_index"])
    positions_b3l = jnp.asarray(visual["position_ids"])
    if index_bl.shape != (b, length) or positions_b3l.shape != (b, 3, length):
        raise ValueError(
            f"visual_token_index {index_bl.shape} / position_ids {positions_b3l.shape} do not "
            f"match tokens {(b, length)}"
        )
    tables = VisionTables(
        visual["vision_interp_index"],
        visual["vision_interp_weight"],
        visual["vision_rotary_hw"],
        visual["vision_segment"],
    )
    merged_bmd, deepstack_bkmd = jax.vmap(model.visual)(visual["pixel_values"], tables)
    is_visual_bl = index_bl >= 0
    rows_bl = jnp.maximum(index_bl, 0)

    def place(rows_bmd: jax.Array) -> jax.Array:  # [B, M, D] -> [B, L, D], 0 at text tokens
        gathered = jax.vmap(lambda r, i: jnp.take(r, i, axis=0, mode="clip"))(rows_bmd, rows_bl)
        return jnp.where(is_visual_bl[..., None], gathered.astype(dtype), jnp.zeros((), dtype))

    x_bld = jnp.where(is_visual_bl[..., None], place(merged_bmd), model.embed(tokens_bl))

    def add_deepstack(i: int, x: jax.Array) -> jax.Array:
        return x + place(deepstack_bkmd[:, i]) if i < deepstack_bkmd.shape[1] else x

    allowed_bqm = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (b, length, length))
    return model.decode_hidden(x_bld, jnp.moveaxis(positions_b3l, 1, 0), allowed_bqm, add_deepstack)


def visual_sequence_logprobs(
    model: Any,
    tokens_bl: jax.Array,
    visual: Mapping[str, jax.Array],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """`float32[B, L]` log-probs of `tokens` under a Qwen3-VL `model` with each segment's
    images and videos (`visual_hidden_states`), memory-lean as `sequence_logprobs`."""
    hidden_bld = visual_hidden_states(model, tokens_bl, visual)
    return chunked_token_logprobs(hidden_bld, model.head_weight(), tokens_bl, chunk_size=chunk_size)


def _check_tokens(tokens_bl: jax.Array, expected: tuple[int, ...]) -> None:
    if tokens_bl.ndim != 2 or tuple(tokens_bl.shape) != tuple(expected):
        raise ValueError(
            f"tokens must be [B, L] = {tuple(expected)} to match the logits/hidden states, got "
            f"shape {tuple(tokens_bl.shape)}."
        )
