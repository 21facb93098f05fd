"""Dense projections whose weight gradient XLA:CPU computes with its fast matmul kernels.

`dense(x, w)` is `x @ w` contracting the trailing axes of `x` with the leading axes of `w`. Its
only difference from `jnp.einsum` is the backward pass: for the weight gradient
`dw = x^T @ dy`, which contracts the token axis of both operands, XLA:CPU (jax 0.10) picks a
transposed Eigen matmul and materialises the large gradient `dy` transposed, fused into the
elementwise ops that produce it, which runs at a few GB/s. Here the backward transposes the
smaller of `x` and `dy` into its own buffer, behind optimization barriers so XLA can neither
fold the transpose back into the matmul nor fuse it, and multiplies the canonical
`[K, T] @ [T, N]` (YNNPACK's kernel). The results are the same matmuls in the same dtype;
only layouts change. `swiglu` does the same for Qwen3's feed-forward block.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """`x[..., *K] @ w[*K, *N] -> [..., *N]`, contracting the last `contract` axes of `x`.

    Same result as `jnp.tensordot(x, w, contract)` (in `x`'s dtype); see the module
    docstring for what the custom gradient changes.
    """
    if contract < 1 or x.shape[x.ndim - contract :] != w.shape[:contract]:
        raise ValueError(f"cannot contract {contract} axes of {x.shape} with {w.shape}")
    lead, out = x.shape[: x.ndim - contract], w.shape[contract:]
    k = math.prod(w.shape[:contract])
    y_tn = _matmul(x.reshape(-1, k), w.reshape(k, -1))
    return y_tn.reshape(*lead, *out)


@jax.custom_vjp
def _matmul(x_tk: jax.Array, w_kn: jax.Array) -> jax.Array:
    return jnp.dot(x_tk, w_kn)


def _matmul_fwd(x_tk, w_kn):
    return jnp.dot(x_tk, w_kn), (x_tk, w_kn)


def _matmul_bwd(residuals, dy_tn):
    # The barriers pin the transpose to the backward pass (without the first, XLA computes it
    # as soon as x exists and keeps it alive alongside x) and keep it a plain copy, out of the
    # matmul and out of the elementwise ops that produce its input (fused, it runs ~10x slower).
    x_tk, w_kn, dy_tn = jax.lax.optimization_barrier((*residuals, dy_tn))
    dx_tk = jax.lax.dot_general(dy_tn, w_kn, (((1,), (1,)), ((), ())))
    dy_tn = dy_tn.astype(x_tk.dtype)
    if x_tk.shape[1] <= dy_tn.shape[1]:  # transpose the smaller operand
        dw_kn = jnp.dot(jax.lax.optimization_barrier(x_tk.T), dy_tn)
    else:
        dw_nk = jnp.dot(jax.lax.optimization_barrier(dy_tn.T), x_tk)
        dw_kn = jax.lax.optimization_barrier(dw_nk).T
    return dx_tk.astype(x_tk.dtype), dw_kn.astype(w_kn.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def swiglu(x: jax.Array, gate_df: jax.Array, up_df: jax.Array, down_fd: jax.Array) -> jax.Array:
    """SwiGLU feed-forward `(silu(x @ gate) * (x @ up)) @ down` over the last axis of `x`.

    Same matmuls in the same dtype as the plain expression; the custom backward keeps only
    `x`, `x @ gate` and `x @ up` (not `silu(gate)` nor the product, each as large again: the
    product is recomputed from them) and runs gate and up as one matmul `x @ [gate | up]` in
    both passes, with the transposed-input weight gradient of `dense`.
    """
    d = x.shape[-1]
    return _swiglu(x.reshape(-1, d), gate_df, up_df, down_fd).reshape(*x.shape[:-1], -1)


def _gate_up(x_td, gate_df, up_df):
    f = gate_df.shape[1]
    gu_tf = jnp.dot(x_td, jnp.concatenate([gate_df, up_df], axis=1))
    return gu_tf[:, :f], gu_tf[:, f:]


@jax.custom_vjp
def _swiglu(x_td, gate_df, up_df, down_fd):
    gate_tf, up_tf = _gate_up(x_td, gate_df, up_df)
    return jnp.dot(jax.nn.silu(gate_tf) * up_tf, down_fd)


def _swiglu_fwd(x_td, gate_df, up_df, down_fd):
    gate_tf, up_tf = _gate_up(x_td, gate_df, up_df)
    out_td = jnp.dot(jax.nn.silu(gate_tf) * up_tf, down_fd)
    return out_td, (x_td, gate_tf, up_tf, gate_df, up_df, down_fd)


def _swiglu_bwd(residuals, dout_td):
    # Recompute nothing before the cotangent exists (XLA would otherwise run it early and
    # keep it alive: the memory the custom backward is there to save).
    *residuals, dout_td = jax.lax.optimization_barrier((*residuals, dout_td))
    x_td, gate_tf, up_tf, gate_df, up_df, down_fd = residuals
    dtype = x_td.dtype
    sig_tf = jax.nn.sigmoid(gate_tf)
    act_tf = gate_tf * sig_tf
    hidden_tf = act_tf * up_tf
    dhidden_tf, ddown_fd = _matmul_bwd((hidden_tf, down_fd), dout_td)
    dgate_tf = dhidden_tf * up_tf * sig_tf * (1 + gate_tf * (1 - sig_tf))
    dgu_tf = jnp.concatenate([dgate_tf, dhidden_tf * act_tf], axis=1).astype(dtype)
    dx_td, dgu_df = _matmul_bwd((x_td, jnp.concatenate([gate_df, up_df], axis=1)), dgu_tf)
    f = gate_df.shape[1]
    return dx_td, dgu_df[:, :f], dgu_df[:, f:], ddown_fd


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
