"""The decoder's hand-written backward passes (`rms_norm`, `rms_normalize`, `apply_rope`)
against autodiff of the plain expressions, on random shapes, values and dtypes; and the norm
scale folded into the next projection (`fold_scale`) against norm-then-project."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vimrag_jax.models.decoder import apply_rope, fold_scale, rms_norm, rms_normalize
from vimrag_jax.models.linear import dense


def plain_rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * x32.astype(x.dtype)


def plain_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def _value_and_grads(fn, *args):
    weights = jax.random.normal(jax.random.key(7), fn(*args).shape, jnp.float32)

    def loss(*a):
        return jnp.sum(jnp.sin(fn(*a).astype(jnp.float32)) * weights)

    return jax.value_and_grad(loss, argnums=tuple(range(len(args))))(*args)


@functools.cache
def _norm_pair(eps):
    ours = jax.jit(lambda x, s: _value_and_grads(lambda a, b: rms_norm(a, b, eps), x, s))
    ref = jax.jit(lambda x, s: _value_and_grads(lambda a, b: plain_rms_norm(a, b, eps), x, s))
    return ours, ref


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 5),
    dim=st.sampled_from([4, 8, 32]),
    scale_mean=st.floats(-2.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_gradient_equals_autodiff(rows, dim, scale_mean, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((rows, 3, dim)) * rng.uniform(0.1, 10.0), jnp.float32)
    scale = jnp.asarray(scale_mean + rng.standard_normal(dim), jnp.float32)
    ours, ref = _norm_pair(1e-6)
    (value, grads), (want, want_grads) = ours(x, scale), ref(x, scale)
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def _folded(x, scale, w):
    # What a decoder layer computes: normalise, then project with the scale in the weight.
    return dense(rms_normalize(x, 1e-6), fold_scale(w, scale))


def _norm_then_project(x, scale, w):
    return plain_rms_norm(x, scale, 1e-6) @ w


_FOLD_PAIR = (
    jax.jit(lambda *a: _value_and_grads(_folded, *a)),
    jax.jit(lambda *a: _value_and_grads(_norm_then_project, *a)),
)


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 5),
    dim=st.sampled_from([4, 8, 32]),
    out=st.sampled_from([3, 16]),
    scale_mean=st.floats(-2.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_folded_norm_scale_equals_norm_then_projection(rows, dim, out, scale_mean, seed):
    # Values and the gradients of the input, the scale and the weight.
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((rows, 3, dim)) * rng.uniform(0.1, 10.0), jnp.float32)
    scale = jnp.asarray(scale_mean + rng.standard_normal(dim), jnp.float32)
    w = jnp.asarray(rng.standard_normal((dim, out)) / np.sqrt(dim), jnp.float32)
    (value, grads), (want, want_grads) = (fn(x, scale, w) for fn in _FOLD_PAIR)
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_fold_scale_scales_the_input_rows_of_any_weight_shape():
    w = jnp.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(
        fold_scale(w, jnp.array([2.0, -1.0])), w * jnp.array([2.0, -1.0])[:, None, None]
    )


def test_rms_norm_keeps_dtypes_and_matches_in_bfloat16():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 16)), jnp.bfloat16)
    scale = jnp.asarray(1 + 0.1 * rng.standard_normal(16), jnp.float32)
    np.testing.assert_array_equal(rms_norm(x, scale, 1e-6), plain_rms_norm(x, scale, 1e-6))
    grads = jax.grad(lambda a, b: jnp.sum(rms_norm(a, b, 1e-6).astype(jnp.float32)), (0, 1))(
        x, scale
    )
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32
    want = jax.grad(lambda a, b: jnp.sum(plain_rms_norm(a, b, 1e-6).astype(jnp.float32)), (0, 1))(
        x, scale
    )
    for got, expected in zip(grads, want, strict=True):
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(expected, np.float32), rtol=0.05, atol=0.02
        )


_rope_ours = jax.jit(lambda x, c, s: _value_and_grads(lambda a: apply_rope(a, c, s), x))
_rope_ref = jax.jit(lambda x, c, s: _value_and_grads(lambda a: plain_rope(a, c, s), x))


@settings(max_examples=12, deadline=None)
@given(
    heads=st.integers(1, 3),
    half=st.sampled_from([1, 2, 4]),
    equal_halves=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rope_gradient_equals_autodiff(heads, half, equal_halves, seed):
    # Any tables, not only rotations whose halves repeat (mrope's sections, say).
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, 5, heads, 2 * half)), jnp.float32)
    angles = rng.uniform(-np.pi, np.pi, (2, 5, half if equal_halves else 2 * half))
    if equal_halves:
        angles = np.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    (value, (grad,)), (want, (want_grad,)) = _rope_ours(x, cos, sin), _rope_ref(x, cos, sin)
    np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_rope_tables_get_no_gradient():
    x = jnp.ones((1, 2, 1, 4))
    cos, sin = jnp.ones((1, 2, 4)), jnp.zeros((1, 2, 4))
    dcos = jax.grad(lambda c: jnp.sum(apply_rope(x, c, sin)))(cos)
    np.testing.assert_array_equal(dcos, np.zeros((1, 2, 4)))
