"""The decoder's hand-written backward passes (`rms_norm`, `apply_rope`) against autodiff of
the plain expressions, on random shapes, values and dtypes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vimrag_jax.models.decoder import apply_rope, rms_norm


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
