"""Grouped-query attention kernels: plain (`attend`) and flash-style blocked (`blocked_attend`).

`attend` materialises the `[B, G, R, Q, M]` scores; it serves short inputs and decoding.
`blocked_attend` is exact flash attention for training-length sequences: a `custom_vjp` whose
forward pass visits, per block of queries, only the key blocks the mask opens (so causal
attention skips the future), keeps an online softmax, and saves q, k, v, the output and the
per-row logsumexp; the backward pass recomputes one block pair of probabilities at a time.
Fully masked rows (left padding) behave as in `attend`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def attend(
    q_blhk: jax.Array, k_bmgk: jax.Array, v_bmgk: jax.Array, allowed_bqm: jax.Array
) -> jax.Array:
    """Grouped-query softmax attention `[B, L, H, K]` of queries over keys `m` where allowed.

    Query head h reads kv head `h // (H / G)`, as transformers' `repeat_kv` does. Scores and the
    softmax are float32. Fully masked rows (left-padding queries) stay finite (`finfo.min`).
    """
    dtype = q_blhk.dtype
    b, length, h, k = q_blhk.shape
    g = k_bmgk.shape[2]
    q_blgrk = q_blhk.reshape(b, length, g, h // g, k)
    scores_bgrqm = jnp.einsum(
        "bqgrk,bmgk->bgrqm", q_blgrk, k_bmgk, preferred_element_type=jnp.float32
    ) * (k**-0.5)
    scores_bgrqm = jnp.where(allowed_bqm[:, None, None], scores_bgrqm, jnp.finfo(jnp.float32).min)
    probs_bgrqm = jax.nn.softmax(scores_bgrqm, axis=-1).astype(dtype)
    out_bqgrk = jnp.einsum("bgrqm,bmgk->bqgrk", probs_bgrqm, v_bmgk)
    return out_bqgrk.reshape(b, length, h, k)


# Query and key block of `blocked_attend`: one block pair's float32 scores `[B, H, 128, 128]`
# stay cache-sized, and causal masks skip more key blocks the smaller the block (measured on CPU:
# 128 beats 256 and 512, 64 is no faster).
ATTENTION_BLOCK = 128
_MASKED = float(jnp.finfo(jnp.float32).min)


def blocked_attend(
    q_blhk: jax.Array,
    k_bmgk: jax.Array,
    v_bmgk: jax.Array,
    allowed_bqm: jax.Array,
    *,
    block: int = ATTENTION_BLOCK,
) -> jax.Array:
    """`attend` computed in `block x block` tiles (flash attention); equals `attend(...)`.

    Queries and keys are cut into blocks; a `lax.scan` over query blocks runs, for each, a loop
    over the key blocks between the first and last one that `allowed_bqm` opens for any query of
    the block (a causal mask skips the blocks above the diagonal, for any mask it is exact),
    with an online softmax. The backward pass (`jax.custom_vjp`) keeps only q, k, v, the output
    and each row's logsumexp and recomputes one tile's probabilities at a time, so neither pass
    holds more than one tile of scores. Fully masked rows get the mean of all values, as
    `attend`'s uniform softmax gives them. Sequences of at most `block` queries take the plain
    path.
    """
    if q_blhk.shape[1] <= block:
        return attend(q_blhk, k_bmgk, v_bmgk, allowed_bqm)
    return _flash_attend(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block)


def _tiles(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block):
    """Pads to whole blocks: queries `[N, B, C, G, R, K]` (block-major), keys/values
    `[B, M', G, K]`, mask `[N, B, C, M']`. Padded queries and keys are never allowed."""
    b, length, h, k = q_blhk.shape
    m, g = k_bmgk.shape[1], k_bmgk.shape[2]
    nq, mp = -(-length // block), -(-m // block) * block
    q_pad = ((0, 0), (0, nq * block - length), (0, 0), (0, 0))
    kv_pad = ((0, 0), (0, mp - m), (0, 0), (0, 0))
    q_nbcgrk = jnp.pad(q_blhk, q_pad).reshape(b, nq, block, g, h // g, k).swapaxes(0, 1)
    allowed_bqm = jnp.pad(allowed_bqm, ((0, 0), (0, nq * block - length), (0, mp - m)))
    allowed_nbcm = allowed_bqm.reshape(b, nq, block, mp).swapaxes(0, 1)
    return q_nbcgrk, jnp.pad(k_bmgk, kv_pad), jnp.pad(v_bmgk, kv_pad), allowed_nbcm


def _key_block_range(allowed_bcm: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """`[lo, hi)`: the key blocks between the first and the last one any query may read."""
    open_n = jnp.any(allowed_bcm, axis=(0, 1)).reshape(-1, block).any(-1)
    index_n = jnp.arange(open_n.shape[0])
    lo = jnp.min(jnp.where(open_n, index_n, open_n.shape[0]))
    return lo, jnp.maximum(jnp.max(jnp.where(open_n, index_n + 1, 0)), lo)


def _key_tile(j, block, *arrays_and_axes):
    return [jax.lax.dynamic_slice_in_dim(x, j * block, block, axis) for x, axis in arrays_and_axes]


def _tile_scores(q_bcgrk, k_bmgk, allowed_bcm):
    scores_bgrcm = jnp.einsum(
        "bqgrk,bmgk->bgrqm", q_bcgrk, k_bmgk, preferred_element_type=jnp.float32
    ) * (q_bcgrk.shape[-1] ** -0.5)
    return jnp.where(allowed_bcm[:, None, None], scores_bgrcm, _MASKED)


def _flash_forward(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block):
    """Output `[B, L, H, K]` and the logsumexp of each row `float32[N, B, G, R, C]`."""
    dtype = q_blhk.dtype
    b, length, h, k = q_blhk.shape
    g = k_bmgk.shape[2]
    q_nbcgrk, k_bmgk_p, v_bmgk_p, allowed_nbcm = _tiles(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block)
    mean_v_bgk = jnp.mean(v_bmgk.astype(jnp.float32), axis=1)

    def query_block(_, xs):
        q_bcgrk, allowed_bcm = xs

        def key_block(j, state):
            max_bgrc, sum_bgrc, acc_bgrck = state
            k_j, v_j, allowed_j = _key_tile(
                j, block, (k_bmgk_p, 1), (v_bmgk_p, 1), (allowed_bcm, 2)
            )
            scores_bgrcm = _tile_scores(q_bcgrk, k_j, allowed_j)
            new_max_bgrc = jnp.maximum(max_bgrc, jnp.max(scores_bgrcm, axis=-1))
            probs_bgrcm = jnp.exp(scores_bgrcm - new_max_bgrc[..., None])
            rescale_bgrc = jnp.exp(max_bgrc - new_max_bgrc)
            sum_bgrc = sum_bgrc * rescale_bgrc + jnp.sum(probs_bgrcm, axis=-1)
            pv_bgrck = jnp.einsum(
                "bgrqm,bmgk->bgrqk",
                probs_bgrcm.astype(dtype),
                v_j,
                preferred_element_type=jnp.float32,
            )
            return new_max_bgrc, sum_bgrc, acc_bgrck * rescale_bgrc[..., None] + pv_bgrck

        stats_shape = (b, g, h // g, block)
        init = (
            jnp.full(stats_shape, _MASKED, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, k), jnp.float32),
        )
        lo, hi = _key_block_range(allowed_bcm, block)
        max_bgrc, sum_bgrc, acc_bgrck = jax.lax.fori_loop(lo, hi, key_block, init)
        seen_b11c = jnp.any(allowed_bcm, axis=-1)[:, None, None, :]
        sum_bgrc = jnp.where(seen_b11c, sum_bgrc, 1.0)
        out_bgrck = jnp.where(
            seen_b11c[..., None], acc_bgrck / sum_bgrc[..., None], mean_v_bgk[:, :, None, None]
        )
        # Fully masked rows get logsumexp 0, so the backward's exp(finfo.min - 0) is exactly 0.
        lse_bgrc = jnp.where(seen_b11c, max_bgrc + jnp.log(sum_bgrc), 0.0)
        return None, (out_bgrck.transpose(0, 3, 1, 2, 4).astype(dtype), lse_bgrc)

    _, (out_nbcgrk, lse_nbgrc) = jax.lax.scan(query_block, None, (q_nbcgrk, allowed_nbcm))
    out_blhk = out_nbcgrk.swapaxes(0, 1).reshape(b, -1, h, k)[:, :length]
    return out_blhk, lse_nbgrc


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash_attend(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block):
    return _flash_forward(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block)[0]


def _flash_attend_fwd(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block):
    out_blhk, lse_nbgrc = _flash_forward(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block)
    return out_blhk, (q_blhk, k_bmgk, v_bmgk, allowed_bqm, out_blhk, lse_nbgrc)


def _flash_attend_bwd(block, residuals, dout_blhk):
    q_blhk, k_bmgk, v_bmgk, allowed_bqm, out_blhk, lse_nbgrc = residuals
    dtype = q_blhk.dtype
    b, length, h, k = q_blhk.shape
    m, g = k_bmgk.shape[1], k_bmgk.shape[2]
    q_nbcgrk, k_bmgk_p, v_bmgk_p, allowed_nbcm = _tiles(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block)
    nq = q_nbcgrk.shape[0]

    def by_block(x_blhk):
        x_blhk = jnp.pad(x_blhk, ((0, 0), (0, nq * block - length), (0, 0), (0, 0)))
        return x_blhk.reshape(b, nq, block, g, h // g, k).swapaxes(0, 1)

    # Fully masked rows read the mean of all values: their cotangent spreads evenly over v.
    masked_bq = ~jnp.any(allowed_bqm, axis=-1)
    dv_mean_bgk = (
        jnp.einsum(
            "bqgrk,bq->bgk",
            dout_blhk.reshape(b, length, g, h // g, k).astype(jnp.float32),
            masked_bq.astype(jnp.float32),
        )
        / m
    )

    def query_block(carry, xs):
        q_bcgrk, allowed_bcm, dout_bcgrk, out_bcgrk, lse_bgrc = xs
        delta_bgrc = jnp.einsum(
            "bqgrk,bqgrk->bgrq", dout_bcgrk.astype(jnp.float32), out_bcgrk.astype(jnp.float32)
        )

        def key_block(j, state):
            dq_bcgrk, dk_bmgk, dv_bmgk = state
            k_j, v_j, allowed_j = _key_tile(
                j, block, (k_bmgk_p, 1), (v_bmgk_p, 1), (allowed_bcm, 2)
            )
            probs_bgrcm = jnp.exp(_tile_scores(q_bcgrk, k_j, allowed_j) - lse_bgrc[..., None])
            dv_j = jnp.einsum(
                "bgrqm,bqgrk->bmgk",
                probs_bgrcm.astype(dtype),
                dout_bcgrk,
                preferred_element_type=jnp.float32,
            )
            dprobs_bgrcm = jnp.einsum(
                "bqgrk,bmgk->bgrqm", dout_bcgrk, v_j, preferred_element_type=jnp.float32
            )
            dscores_bgrcm = probs_bgrcm * (dprobs_bgrcm - delta_bgrc[..., None]) * (k**-0.5)
            dscores_bgrcm = dscores_bgrcm.astype(dtype)
            dq_bcgrk = dq_bcgrk + jnp.einsum(
                "bgrqm,bmgk->bqgrk", dscores_bgrcm, k_j, preferred_element_type=jnp.float32
            )
            dk_j = jnp.einsum(
                "bgrqm,bqgrk->bmgk", dscores_bgrcm, q_bcgrk, preferred_element_type=jnp.float32
            )
            dk_j = dk_j + _key_tile(j, block, (dk_bmgk, 1))[0]
            dv_j = dv_j + _key_tile(j, block, (dv_bmgk, 1))[0]
            dk_bmgk = jax.lax.dynamic_update_slice_in_dim(dk_bmgk, dk_j, j * block, 1)
            dv_bmgk = jax.lax.dynamic_update_slice_in_dim(dv_bmgk, dv_j, j * block, 1)
            return dq_bcgrk, dk_bmgk, dv_bmgk

        lo, hi = _key_block_range(allowed_bcm, block)
        dq_bcgrk = jnp.zeros(q_bcgrk.shape, jnp.float32)
        dq_bcgrk, *carry = jax.lax.fori_loop(lo, hi, key_block, (dq_bcgrk, *carry))
        return tuple(carry), dq_bcgrk

    zeros_bmgk = jnp.zeros(k_bmgk_p.shape, jnp.float32)
    xs = (q_nbcgrk, allowed_nbcm, by_block(dout_blhk), by_block(out_blhk), lse_nbgrc)
    (dk_bmgk, dv_bmgk), dq_nbcgrk = jax.lax.scan(query_block, (zeros_bmgk, zeros_bmgk), xs)
    dq_blhk = dq_nbcgrk.swapaxes(0, 1).reshape(b, -1, h, k)[:, :length]
    dv_bmgk = dv_bmgk[:, :m] + dv_mean_bgk[:, None]
    return dq_blhk.astype(dtype), dk_bmgk[:, :m].astype(dtype), dv_bmgk.astype(dtype), None


_flash_attend.defvjp(_flash_attend_fwd, _flash_attend_bwd)
