"""Per-token log-probabilities of given token sequences, shared by the learner and the sampler.

Convention (the learner's): `logp[b, t]` is the log-probability of `tokens[b, t]` under the
model's distribution at position t-1, i.e. the raw softmax of the logits, before any sampling
temperature or top-p; `logp[b, 0] = 0`. Every function computes `logit[token] - logsumexp(logits)`
so no second `[B, L, V]` log-softmax array is ever materialised.

`sequence_logprobs` is the memory-lean entry point: it never builds the full float32 `[B, L, V]`
logits either. It runs the decoder to its final hidden states, then scans over the sequence in
chunks, each computing `[B, C, V]` logits, their logsumexp and the picked logit under
`jax.checkpoint`, so the backward pass recomputes one chunk at a time as well.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 256


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
    logits_xv = logits_xv.astype(jnp.float32)
    picked_x = jnp.take_along_axis(logits_xv, tokens_x[..., None].astype(jnp.int32), axis=-1)
    return picked_x[..., 0] - jax.nn.logsumexp(logits_xv, axis=-1)


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
) -> jax.Array:
    """`token_logprobs(hidden @ head, tokens)` without materialising the `[B, L, V]` logits.

    `hidden_bld` are final hidden states, `head_dv` the LM head `[D, V]`. The sequence is cut
    into chunks of `chunk_size` positions (the last one padded); a `lax.scan` computes each
    chunk's float32 logits under `jax.checkpoint`, so forward and backward both hold one
    `[B, chunk_size, V]` block at a time.
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
    hidden_nbcd = hidden_bsd.reshape(b, num_chunks, chunk, d).swapaxes(0, 1)
    targets_nbc = targets_bs.reshape(b, num_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(hidden_bcd, targets_bc):
        logits_bcv = jnp.dot(hidden_bcd, head_dv, preferred_element_type=jnp.float32)
        return picked_logprobs(logits_bcv, targets_bc)

    def body(carry, chunk_inputs):
        return carry, one_chunk(*chunk_inputs)

    _, logp_nbc = jax.lax.scan(body, None, (hidden_nbcd, targets_nbc))
    logp_bs = logp_nbc.swapaxes(0, 1).reshape(b, num_chunks * chunk)[:, :steps]
    return jnp.pad(logp_bs, ((0, 0), (1, 0)))


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


def _check_tokens(tokens_bl: jax.Array, expected: tuple[int, ...]) -> None:
    if tokens_bl.ndim != 2 or tuple(tokens_bl.shape) != tuple(expected):
        raise ValueError(
            f"tokens must be [B, L] = {tuple(expected)} to match the logits/hidden states, got "
            f"shape {tuple(tokens_bl.shape)}."
        )
