"""Grouped-query attention kernels: plain (`attend`) and flash-style blocked (`blocked_attend`).

`attend` materialises the `[B, G, R, Q, M]` scores; it serves short inputs and decoding.
`blocked_attend` is exact flash attention for training-length sequences: a `custom_vjp` whose
forward pass visits, per block of queries, only the key blocks the mask opens (so causal
attention skips the future), keeps an online softmax, and saves q, k, v, the output and the
per-row logsumexp; the backward pass recomputes one block pair of probabilities at a time.
Fully masked rows (left padding) behave as in `attend`. Under the learner's mesh every blocked
layout keeps its batch axis on the batch devices (`parallel.sharding.constrain_rows`): the
relayouts move the batch off axis 0, where GSPMD would otherwise gather it and run the whole
batch's attention on every device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vimrag_jax.parallel.sharding import constrain_rows, row_shards


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


# Tiles of `blocked_attend`: query/key blocks of 256, one batch row per pass. A tile's matmuls
# (`[G, R*256, K] x [K, 256]`) are then large enough for XLA:CPU to split over its threads, while
# its float32 scores (`[G, R*256, 256]`, 2 MiB for Qwen3's 8 heads) stay cache-sized. Measured
# (`benchmarks/attention_tiles.py`, AMD EPYC, 2 cores, batch 8 x 1,024, 8 heads, one layer
# forward + backward): 339 ms with blocks of 64 and 2 rows, 262 ms with 128 and 2, 179 ms with
# 256 and 1, 233 ms with 512 and 1; on one core 64/2 and 256/1 are within 5 % (277 / 289 ms).
ATTENTION_BLOCK = 256
ATTENTION_BATCH_BLOCK = 1
_MASKED = float(jnp.finfo(jnp.float32).min)


def blocked_attend(
    q_blhk: jax.Array,
    k_bmgk: jax.Array,
    v_bmgk: jax.Array,
    allowed_bqm: jax.Array,
    *,
    block: int = ATTENTION_BLOCK,
    batch_block: int | None = None,
) -> jax.Array:
    """`attend` computed in `block x block` tiles (flash attention); equals `attend(...)`.

    Queries and keys are cut into blocks; a `lax.scan` over query blocks runs, for each, a loop
    over the key blocks between the first and last one that `allowed_bqm` opens for any query of
    the block (a causal mask skips the blocks above the diagonal, for any mask it is exact),
    with an online softmax. The backward pass (`jax.custom_vjp`) keeps only q, k, v, the output
    and each row's logsumexp and recomputes one tile's probabilities at a time, so neither pass
    holds more than one tile of scores. Fully masked rows get the mean of all values, as
    `attend`'s uniform softmax gives them. Sequences of at most `block` queries take the plain
    path. The batch is processed `batch_block` rows at a time (a `lax.map`; the largest divisor
    of the batch not above it), which keeps a tile cache-sized on a CPU; the default (None) is
    `ATTENTION_BATCH_BLOCK` on CPU and the whole batch elsewhere, where the batch axis is
    sharded over devices and a loop over it would only serialise them.
    """
    if q_blhk.shape[1] <= block:
        return attend(q_blhk, k_bmgk, v_bmgk, allowed_bqm)
    b = q_blhk.shape[0]
    if batch_block is None:
        batch_block = ATTENTION_BATCH_BLOCK if jax.default_backend() == "cpu" else b
    # Under a mesh the rows are split in `shards` blocks over the devices: each loop step takes
    # `rows` rows of every block, so the loop never moves rows between devices.
    shards = row_shards(b)
    local = b // shards
    rows = max(d for d in range(1, min(local, batch_block) + 1) if local % d == 0)
    if rows == local:
        return _flash_attend(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block)
    groups = local // rows

    def by_rows(x: jax.Array) -> jax.Array:
        x = x.reshape(shards, groups, rows, *x.shape[1:]).swapaxes(0, 1)
        return constrain_rows(x.reshape(groups, shards * rows, *x.shape[3:]), 1)

    def one_group(xs: tuple[jax.Array, ...]) -> jax.Array:
        return _flash_attend(*xs, block)

    out = jax.lax.map(one_group, tuple(map(by_rows, (q_blhk, k_bmgk, v_bmgk, allowed_bqm))))
    out = out.reshape(groups, shards, rows, *out.shape[2:]).swapaxes(0, 1)
    return constrain_rows(out.reshape(q_blhk.shape))


# Layouts. Inside the loops every tensor is head-major and blocked on a leading axis, so each
# tile's matmuls are plain batched `[rows, K] @ [K, cols]` products over (batch, kv head) with
# no transposes inside the loops (XLA:CPU otherwise copies every `[B, G, R, C, M]` gradient
# tile into a second layout): queries `[N, B, G, R*C, K]`, keys and values `[N', B, G, M, K]`
# and transposed `[N', B, G, K, M]`, key/value gradients accumulated transposed.


def _query_blocks(x_blhk: jax.Array, g: int, block: int) -> jax.Array:
    """`[B, L, H, K]` -> `[N, B, G, R*C, K]` (queries padded to whole blocks, R = H / G)."""
    b, length, h, k = x_blhk.shape
    nq = -(-length // block)
    x_blhk = jnp.pad(x_blhk, ((0, 0), (0, nq * block - length), (0, 0), (0, 0)))
    x_bncgrk = x_blhk.reshape(b, nq, block, g, h // g, k)
    return constrain_rows(
        x_bncgrk.transpose(1, 0, 3, 4, 2, 5).reshape(nq, b, g, h // g * block, k), 1
    )


def _from_query_blocks(x_nbgxk: jax.Array, length: int, h: int, block: int) -> jax.Array:
    """Inverse of `_query_blocks`: `[N, B, G, R*C, K]` -> `[B, L, H, K]`."""
    nq, b, g, _, k = x_nbgxk.shape
    x_nbgrck = x_nbgxk.reshape(nq, b, g, h // g, block, k)
    return constrain_rows(
        x_nbgrck.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * block, h, k)[:, :length]
    )


def _key_blocks(x_bmgk: jax.Array, block: int) -> jax.Array:
    """`[B, M, G, K]` -> `[N', B, G, block, K]` (keys padded to whole blocks)."""
    b, m, g, k = x_bmgk.shape
    nk = -(-m // block)
    x_bmgk = jnp.pad(x_bmgk, ((0, 0), (0, nk * block - m), (0, 0), (0, 0)))
    return constrain_rows(x_bmgk.reshape(b, nk, block, g, k).transpose(1, 0, 3, 2, 4), 1)


def _mask_blocks(allowed_bqm: jax.Array, block: int) -> jax.Array:
    """`bool[B, L, M]` -> `[N, B, C, M']`; padded queries and keys are never allowed."""
    b, length, m = allowed_bqm.shape
    nq, mp = -(-length // block), -(-m // block) * block
    allowed_bqm = jnp.pad(allowed_bqm, ((0, 0), (0, nq * block - length), (0, mp - m)))
    return constrain_rows(allowed_bqm.reshape(b, nq, block, mp).swapaxes(0, 1), 1)


def _key_block_range(allowed_bcm: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """`[lo, hi)`: the key blocks between the first and the last one any query may read."""
    open_n = jnp.any(allowed_bcm, axis=(0, 1)).reshape(-1, block).any(-1)
    index_n = jnp.arange(open_n.shape[0])
    lo = jnp.min(jnp.where(open_n, index_n, open_n.shape[0]))
    return lo, jnp.maximum(jnp.max(jnp.where(open_n, index_n + 1, 0)), lo)


def _bmm(x_bgij: jax.Array, y_bgjk: jax.Array) -> jax.Array:
    """Batched `[B, G, I, J] @ [B, G, J, K]` with a float32 result."""
    return jnp.einsum("bgij,bgjk->bgik", x_bgij, y_bgjk, preferred_element_type=jnp.float32)


def _tile_scores(q_bgxk, kt_bgkm, allowed_bcm, r):
    """Scores `float32[B, G, R*C, M]` of a tile (queries pre-scaled), masked entries `_MASKED`."""
    b, g, x, m = q_bgxk.shape[0], q_bgxk.shape[1], q_bgxk.shape[2], kt_bgkm.shape[-1]
    scores_bgrcm = _bmm(q_bgxk, kt_bgkm).reshape(b, g, r, x // r, m)
    scores_bgrcm = jnp.where(allowed_bcm[:, None, None], scores_bgrcm, _MASKED)
    return scores_bgrcm.reshape(b, g, x, m)


def _flash_forward(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block):
    """Output `[B, L, H, K]` and the logsumexp of each row `float32[N, B, G, R*C]`."""
    dtype = q_blhk.dtype
    b, length, h, k = q_blhk.shape
    g = k_bmgk.shape[2]
    r = h // g
    q_nbgxk = _query_blocks(q_blhk * jnp.asarray(k**-0.5, dtype), g, block)
    kt_nbgkm = _key_blocks(k_bmgk, block).swapaxes(-1, -2)
    v_nbgmk = _key_blocks(v_bmgk, block)
    allowed_nbcm = _mask_blocks(allowed_bqm, block)
    mean_v_bgk = jnp.mean(v_bmgk.astype(jnp.float32), axis=1)

    def query_block(_, xs):
        q_bgxk, allowed_bcm = xs

        def key_block(j, state):
            max_bgx, sum_bgx, acc_bgxk = state
            allowed_j = jax.lax.dynamic_slice_in_dim(allowed_bcm, j * block, block, 2)
            scores_bgxm = _tile_scores(q_bgxk, kt_nbgkm[j], allowed_j, r)
            new_max_bgx = jnp.maximum(max_bgx, jnp.max(scores_bgxm, axis=-1))
            probs_bgxm = jnp.exp(scores_bgxm - new_max_bgx[..., None])
            rescale_bgx = jnp.exp(max_bgx - new_max_bgx)
            sum_bgx = sum_bgx * rescale_bgx + jnp.sum(probs_bgxm, axis=-1)
            pv_bgxk = _bmm(probs_bgxm.astype(dtype), v_nbgmk[j])
            return new_max_bgx, sum_bgx, acc_bgxk * rescale_bgx[..., None] + pv_bgxk

        stats_shape = (b, g, r * block)
        init = (
            jnp.full(stats_shape, _MASKED, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, k), jnp.float32),
        )
        lo, hi = _key_block_range(allowed_bcm, block)
        max_bgx, sum_bgx, acc_bgxk = jax.lax.fori_loop(lo, hi, key_block, init)
        seen_bgx = jnp.broadcast_to(
            jnp.any(allowed_bcm, axis=-1)[:, None, None, :], (b, g, r, block)
        ).reshape(stats_shape)
        sum_bgx = jnp.where(seen_bgx, sum_bgx, 1.0)
        out_bgxk = jnp.where(
            seen_bgx[..., None], acc_bgxk / sum_bgx[..., None], mean_v_bgk[:, :, None]
        )
        # Fully masked rows get logsumexp 0, so the backward's exp(finfo.min - 0) is exactly 0.
        lse_bgx = jnp.where(seen_bgx, max_bgx + jnp.log(sum_bgx), 0.0)
        return None, (out_bgxk.astype(dtype), lse_bgx)

    _, (out_nbgxk, lse_nbgx) = jax.lax.scan(query_block, None, (q_nbgxk, allowed_nbcm))
    return _from_query_blocks(out_nbgxk, length, h, block), lse_nbgx


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash_attend(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block):
    return _flash_forward(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block)[0]


def _flash_attend_fwd(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block):
    out_blhk, lse_nbgx = _flash_forward(q_blhk, k_bmgk, v_bmgk, allowed_bqm, block)
    return out_blhk, (q_blhk, k_bmgk, v_bmgk, allowed_bqm, out_blhk, lse_nbgx)


def _flash_attend_bwd(block, residuals, dout_blhk):
    # The barrier keeps the relayouts below in the backward pass (XLA would hoist them into
    # the forward and keep their results alive until here).
    *residuals, dout_blhk = jax.lax.optimization_barrier((*residuals, dout_blhk))
    q_blhk, k_bmgk, v_bmgk, allowed_bqm, out_blhk, lse_nbgx = residuals
    dtype = q_blhk.dtype
    b, length, h, k = q_blhk.shape
    m, g = k_bmgk.shape[1], k_bmgk.shape[2]
    r = h // g
    q_nbgxk = _query_blocks(q_blhk * jnp.asarray(k**-0.5, dtype), g, block)
    dout_nbgxk = _query_blocks(dout_blhk, g, block)
    k_nbgmk, v_nbgmk = _key_blocks(k_bmgk, block), _key_blocks(v_bmgk, block)
    kt_nbgkm, vt_nbgkm = k_nbgmk.swapaxes(-1, -2), v_nbgmk.swapaxes(-1, -2)
    allowed_nbcm = _mask_blocks(allowed_bqm, block)
    # delta = rowsum(dout * out), the softmax-gradient term of every query row.
    delta_blh = jnp.einsum(
        "blhk,blhk->blh", dout_blhk.astype(jnp.float32), out_blhk.astype(jnp.float32)
    )
    delta_nbgx = _query_blocks(delta_blh[..., None], g, block)[..., 0]

    # Fully masked rows read the mean of all values: their cotangent spreads evenly over v.
    masked_bq = ~jnp.any(allowed_bqm, axis=-1)
    dv_mean_bgk = (
        jnp.einsum(
            "bqgrk,bq->bgk",
            dout_blhk.reshape(b, length, g, r, k).astype(jnp.float32),
            masked_bq.astype(jnp.float32),
        )
        / m
    )

    def query_block(carry, xs):
        q_bgxk, dout_bgxk, allowed_bcm, lse_bgx, delta_bgx = xs
        q_bgkx, dout_bgkx = q_bgxk.swapaxes(-1, -2), dout_bgxk.swapaxes(-1, -2)

        def key_block(j, state):
            dq_bgxk, dkt_nbgkm, dvt_nbgkm = state
            allowed_j = jax.lax.dynamic_slice_in_dim(allowed_bcm, j * block, block, 2)
            scores_bgxm = _tile_scores(q_bgxk, kt_nbgkm[j], allowed_j, r)
            probs_bgxm = jnp.exp(scores_bgxm - lse_bgx[..., None])
            dvt_j = _bmm(dout_bgkx, probs_bgxm.astype(dtype))
            dprobs_bgxm = _bmm(dout_bgxk, vt_nbgkm[j])
            dscores_bgxm = (probs_bgxm * (dprobs_bgxm - delta_bgx[..., None])).astype(dtype)
            dq_bgxk = dq_bgxk + _bmm(dscores_bgxm, k_nbgmk[j])
            dkt_j = _bmm(q_bgkx, dscores_bgxm)
            dkt_nbgkm = dkt_nbgkm.at[j].add(dkt_j)
            dvt_nbgkm = dvt_nbgkm.at[j].add(dvt_j)
            return dq_bgxk, dkt_nbgkm, dvt_nbgkm

        lo, hi = _key_block_range(allowed_bcm, block)
        dq_bgxk = jnp.zeros(q_bgxk.shape, jnp.float32)
        dq_bgxk, *carry = jax.lax.fori_loop(lo, hi, key_block, (dq_bgxk, *carry))
        return tuple(carry), dq_bgxk

    zeros_nbgkm = constrain_rows(jnp.zeros(kt_nbgkm.shape, jnp.float32), 1)
    xs = (q_nbgxk, dout_nbgxk, allowed_nbcm, lse_nbgx, delta_nbgx)
    (dkt_nbgkm, dvt_nbgkm), dq_nbgxk = jax.lax.scan(query_block, (zeros_nbgkm,) * 2, xs)
    # The queries were scaled before the loop: dq carries the scale once more, dk already has it.
    dq_blhk = _from_query_blocks(dq_nbgxk, length, h, block) * (k**-0.5)

    def from_key_blocks(xt_nbgkm: jax.Array) -> jax.Array:
        return constrain_rows(xt_nbgkm.transpose(1, 0, 4, 2, 3).reshape(b, -1, g, k)[:, :m])

    dk_bmgk = from_key_blocks(dkt_nbgkm)
    dv_bmgk = from_key_blocks(dvt_nbgkm) + dv_mean_bgk[:, None]
    return dq_blhk.astype(dtype), dk_bmgk.astype(dtype), dv_bmgk.astype(dtype), None


_flash_attend.defvjp(_flash_attend_fwd, _flash_attend_bwd)
