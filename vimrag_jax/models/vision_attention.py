"""Segment-masked attention for the Qwen3-VL vision tower, blocked so memory stays O(block²).

The vision tower attends within one image or video frame at a time (transformers'
`cu_seqlens`): row n may attend to row m iff `segment[n] == segment[m]`. A padding row (a
negative id: -1 from `vision_tables(pad_to=...)`) attends only to itself, so padding, however
much of it, is O(rows) work and never mixes with anything (transformers has no padding rows;
their outputs are never read). Written densely this is a `[heads, N, N]` float32 score matrix
over every patch row of the call, about 5.8 GB per layer at the paper's visual budget (~9.5k
patches, 16 heads), and the backward pass keeps one per layer.

Design (`blocked_segment_attention`): flash attention over fixed-size blocks of rows, visiting
only the block pairs that can share a segment.

- The N rows are padded to a multiple of `block` with more padding rows (segment -1).
- For every row, the first and last row of its segment are found on device with one stable sort
  of the segment ids (O(N log N), no N x N comparison; a padding row is its own first and last
  row); for every block b, `lo[b]`..`hi[b]` is the smallest block range holding every row that
  shares a segment with a row of b. Segments are contiguous runs in practice (`vision_tables`
  lays frames out one after another), which makes the range tight; a segment split into several
  runs is still handled correctly, it only widens the range. The allowed pattern is symmetric,
  so the same range serves query block b (which key blocks to read) and key block b (which
  query blocks to read in the backward pass).
- The forward pass maps over query blocks (`lax.map`, sequential: one block's working set live
  at a time) and runs an online softmax over its key blocks with `lax.fori_loop(lo, hi + 1)`,
  a loop whose trip count is data but whose shapes are static. Each step holds a
  `[heads, block, block]` score tile, masked by segment id; the running max, sum and output
  accumulator are float32 whatever the compute dtype, the two matmuls run in the compute dtype
  with float32 accumulation (bfloat16 inputs give bfloat16 matmuls).
- The backward pass is a `jax.custom_vjp` (a `while` loop with a data-dependent trip count has
  no reverse-mode derivative, and differentiating through a scan would keep every tile): the
  forward keeps only the output and each row's float32 log-sum-exp; the backward recomputes
  tiles, once per query block for dq and once per key block for dk and dv (FlashAttention-2's
  two-loop form, with no scatter between blocks).

Cost: work is proportional to the visited tiles, the sum over blocks of `hi - lo + 1`, at most
the sum over segments of (segment length / block + 1)², not (total rows)²: concatenating the
images of many prompts into one call costs what encoding them one by one would. Memory is
O(N·heads·head_dim) for inputs and outputs plus O(block²·heads) for one tile. A single block of
all rows is used when N <= block, so small inputs (tests, one small image) pay no padding.

Rejected alternatives: vmapping a dense attention over frames needs every frame padded to the
largest (a 9.5k-patch frame beside 64-patch ones); a static window of key blocks per query
block cannot cover a frame spanning many blocks without covering all; scanning over all
(query, key) tile pairs with `lax.cond` does O((N/block)²) steps and its reverse mode keeps a
carry per step, O(N²/block) memory.

`dense_segment_attention` is the plain masked softmax it replaces, kept as the reference for
tests and as the tower's `attention="dense"` switch for tiny inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_PAD = -1  # segment of the rows padding N to a multiple of `block` (any negative id is padding)
_F32 = jnp.float32


def dense_segment_attention(
    q_nhk: jax.Array, k_nhk: jax.Array, v_nhk: jax.Array, segment_n: jax.Array
) -> jax.Array:
    """Softmax attention of every row over the rows of its segment, with an `[H, N, N]` score
    matrix (the reference; `blocked_segment_attention` computes the same without it). A row
    with a negative segment id is padding and attends only to itself.

    Scores and softmax in float32, the probabilities cast to the compute dtype for the value
    matmul (as transformers' eager vision attention). Returns `[N, H, K]` in v's dtype.
    """
    dtype = v_nhk.dtype
    scale = q_nhk.shape[-1] ** -0.5
    scores_hnm = jnp.einsum("nhk,mhk->hnm", q_nhk, k_nhk, preferred_element_type=_F32) * scale
    rows = jnp.arange(segment_n.shape[0])
    allowed_nm = _allowed(segment_n, segment_n, rows, rows)
    scores_hnm = jnp.where(allowed_nm[None], scores_hnm, jnp.finfo(_F32).min)
    probs_hnm = jax.nn.softmax(scores_hnm, axis=-1).astype(dtype)
    return jnp.einsum("hnm,mhk->nhk", probs_hnm, v_nhk)


def _allowed(seg_q: jax.Array, seg_k: jax.Array, row_q: jax.Array, row_k: jax.Array) -> jax.Array:
    """`bool[Q, K]`: same segment, and for padding (negative) segments the same row."""
    same = seg_q[:, None] == seg_k[None, :]
    return same & ((seg_q[:, None] >= 0) | (row_q[:, None] == row_k[None, :]))


def block_ranges(segment_n: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """`lo, hi: int32[N / block]`: block b's rows share segments only with rows of blocks
    `lo[b]..hi[b]` (inclusive). N must be a multiple of `block`.

    One stable sort groups equal segment ids in row order, so the first and last entry of a
    group are the first and last row of that segment; no N x N comparison is made. A padding
    row (negative id) only ever meets itself.
    """
    n = segment_n.shape[0]
    if n % block:
        raise ValueError(f"{n} rows are not a multiple of block={block}.")
    order = jnp.argsort(segment_n, stable=True).astype(jnp.int32)
    sorted_seg = segment_n[order]
    index = jnp.arange(n, dtype=jnp.int32)
    changes = sorted_seg[1:] != sorted_seg[:-1]
    starts = jnp.concatenate([jnp.ones((1,), bool), changes])
    ends = jnp.concatenate([changes, jnp.ones((1,), bool)])
    group_start = jax.lax.cummax(jnp.where(starts, index, 0))
    group_end = jax.lax.cummin(jnp.where(ends, index, n - 1), reverse=True)
    first_n = jnp.zeros((n,), jnp.int32).at[order].set(order[group_start])
    last_n = jnp.zeros((n,), jnp.int32).at[order].set(order[group_end])
    padding = segment_n < 0
    first_n = jnp.where(padding, index, first_n)
    last_n = jnp.where(padding, index, last_n)
    lo = jnp.min(first_n.reshape(-1, block), axis=1) // block
    hi = jnp.max(last_n.reshape(-1, block), axis=1) // block
    return lo, hi


def visited_block_pairs(segment_n: jax.Array, block: int) -> jax.Array:
    """Number of (query block, key block) tiles `blocked_segment_attention` computes for these
    segments (after padding to a multiple of `block`): its work, in tiles."""
    segment_n, block = _pad_segment(jnp.asarray(segment_n), block)
    lo, hi = block_ranges(segment_n, block)
    return jnp.sum(hi - lo + 1)


def _pad_segment(segment_n: jax.Array, block: int) -> tuple[jax.Array, int]:
    n = segment_n.shape[0]
    block = min(block, n)
    pad = -n % block
    return jnp.pad(segment_n.astype(jnp.int32), (0, pad), constant_values=_PAD), block


def blocked_segment_attention(
    q_nhk: jax.Array,
    k_nhk: jax.Array,
    v_nhk: jax.Array,
    segment_n: jax.Array,
    *,
    block: int = 512,
) -> jax.Array:
    """`dense_segment_attention` computed tile by tile (see the module docstring).

    `q, k, v: [N, H, K]` in the compute dtype, `segment_n: int[N]` (rows with equal
    non-negative ids attend to each other; a negative id is a padding row, attending only to
    itself). Returns `[N, H, K]` in v's dtype. Differentiable in q, k
    and v (custom VJP); jit-, vmap- and remat-compatible. Raises ValueError for a block < 1.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}.")
    n = q_nhk.shape[0]
    segment_n, block = _pad_segment(segment_n, block)
    pad = segment_n.shape[0] - n

    def blocks(x_nhk: jax.Array) -> jax.Array:
        x_nhk = jnp.pad(x_nhk, ((0, pad), (0, 0), (0, 0)))
        return x_nhk.reshape(-1, block, *x_nhk.shape[1:])

    out = _flash(blocks(q_nhk), blocks(k_nhk), blocks(v_nhk), segment_n.reshape(-1, block))
    return out.reshape(-1, *out.shape[2:])[:n]


# --------------------------------------------------------------------------------------------
# The kernel on blocked arrays: x[nb, B, H, K], segment[nb, B].


def _tile_scores(q, k, seg, i, j):
    """Scaled float32 scores `[H, Bq, Bk]` of tile (query block i, key block j), -inf where
    attention is not allowed."""
    b = q.shape[1]
    scale = q.shape[-1] ** -0.5
    s_hqm = jnp.einsum("qhk,mhk->hqm", q[i], k[j], preferred_element_type=_F32) * scale
    rows = jnp.arange(b, dtype=jnp.int32)
    allowed = _allowed(seg[i], seg[j], i * b + rows, j * b + rows)
    return jnp.where(allowed[None], s_hqm, -jnp.inf)


def _forward(q, k, v, seg):
    """Output `[nb, B, H, K]` (v's dtype) and log-sum-exp `float32[nb, H, B]`."""
    b, h, kd = q.shape[1:]
    lo, hi = block_ranges(seg.reshape(-1), b)

    def query_block(xs):
        i, lo_i, hi_i = xs

        def step(j, carry):
            m_hq, l_hq, acc_hqk = carry
            s_hqm = _tile_scores(q, k, seg, i, j)
            m_new = jnp.maximum(m_hq, jnp.max(s_hqm, axis=-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # a row with no key here yet
            p_hqm = jnp.exp(s_hqm - m_safe[..., None])
            alpha = jnp.exp(m_hq - m_safe)
            l_hq = alpha * l_hq + jnp.sum(p_hqm, axis=-1)
            pv_hqk = jnp.einsum(
                "hqm,mhk->hqk", p_hqm.astype(v.dtype), v[j], preferred_element_type=_F32
            )
            return m_new, l_hq, alpha[..., None] * acc_hqk + pv_hqk

        init = (
            jnp.full((h, b), -jnp.inf, _F32),
            jnp.zeros((h, b), _F32),
            jnp.zeros((h, b, kd), _F32),
        )
        m_hq, l_hq, acc_hqk = jax.lax.fori_loop(lo_i, hi_i + 1, step, init)
        # Every row attends at least to itself, so l > 0.
        out_qhk = (acc_hqk / l_hq[..., None]).transpose(1, 0, 2).astype(v.dtype)
        return out_qhk, m_hq + jnp.log(l_hq)

    blocks = jnp.arange(q.shape[0], dtype=jnp.int32)
    return jax.lax.map(query_block, (blocks, lo, hi))


@jax.custom_vjp
def _flash(q, k, v, seg):
    return _forward(q, k, v, seg)[0]


def _flash_fwd(q, k, v, seg):
    out, lse = _forward(q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(residuals, dout):
    q, k, v, seg, out, lse = residuals
    b = q.shape[1]
    scale = q.shape[-1] ** -0.5
    lo, hi = block_ranges(seg.reshape(-1), b)
    # delta[n] = sum_k dout[n] * out[n]: the softmax backward's row term, float32 [nb, H, B].
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1).transpose(0, 2, 1)
    dout = dout.astype(v.dtype)

    def tile(i, j):
        """Probabilities `p` and score gradient `ds` (float32 [H, Bq, Bk]) of tile (i, j)."""
        s_hqm = _tile_scores(q, k, seg, i, j)
        p_hqm = jnp.exp(s_hqm - lse[i][..., None])
        dp_hqm = jnp.einsum("qhk,mhk->hqm", dout[i], v[j], preferred_element_type=_F32)
        return p_hqm, p_hqm * (dp_hqm - delta[i][..., None])

    def query_grad(xs):  # dq of query block i: loop over its key blocks
        i, lo_i, hi_i = xs

        def step(j, dq_qhk):
            _, ds_hqm = tile(i, j)
            return dq_qhk + jnp.einsum(
                "hqm,mhk->qhk", ds_hqm.astype(k.dtype), k[j], preferred_element_type=_F32
            )

        dq_qhk = jax.lax.fori_loop(lo_i, hi_i + 1, step, jnp.zeros(q.shape[1:], _F32))
        return (dq_qhk * scale).astype(q.dtype)

    def key_grad(xs):  # dk, dv of key block j: loop over its query blocks
        j, lo_j, hi_j = xs

        def step(i, carry):
            dk_mhk, dv_mhk = carry
            p_hqm, ds_hqm = tile(i, j)
            dv_mhk = dv_mhk + jnp.einsum(
                "hqm,qhk->mhk", p_hqm.astype(v.dtype), dout[i], preferred_element_type=_F32
            )
            dk_mhk = dk_mhk + jnp.einsum(
                "hqm,qhk->mhk", ds_hqm.astype(q.dtype), q[i], preferred_element_type=_F32
            )
            return dk_mhk, dv_mhk

        zeros = jnp.zeros(k.shape[1:], _F32)
        dk_mhk, dv_mhk = jax.lax.fori_loop(lo_j, hi_j + 1, step, (zeros, zeros))
        return (dk_mhk * scale).astype(k.dtype), dv_mhk.astype(v.dtype)

    blocks = jnp.arange(q.shape[0], dtype=jnp.int32)
    dq = jax.lax.map(query_grad, (blocks, lo, hi))
    dk, dv = jax.lax.map(key_grad, (blocks, lo, hi))
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
