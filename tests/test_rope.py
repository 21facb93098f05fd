"""RoPE variants: config parsing and frequencies against transformers' ROPE_INIT_FUNCTIONS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from vimrag_jax.models.qwen3 import rope_cos_sin
from vimrag_jax.models.rope import (
    RopeParameters,
    cos_sin,
    inv_freq_and_scaling,
    rope_parameters_from_hf,
)

_SIZES = dict(
    vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip


def _theirs(hf: dict, seq_len=None) -> tuple[np.ndarray, float]:
    config = transformers.Qwen3Config(**_SIZES, **hf)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        inv_freq, scaling = Qwen3RotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)
    return inv_freq.numpy(), float(scaling)


def _check(hf: dict, seq_len=None):
    ours, our_scaling = inv_freq_and_scaling(
        rope_parameters_from_hf(hf), hf["head_dim"], seq_len=seq_len
    )
    theirs, their_scaling = _theirs(hf, seq_len)
    assert ours.dtype == np.float32 and ours.shape == (hf["head_dim"] // 2,)
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=0)
    assert our_scaling == pytest.approx(their_scaling, rel=1e-12)


def _layouts(theta: float, scaling: dict | None, **top) -> list[dict]:
    """The same setting in the 5.x layout and in the 4.x layout."""
    new = {**top, "rope_parameters": {"rope_theta": theta, **(scaling or {"rope_type": "default"})}}
    legacy_scaling = None
    if scaling is not None:  # 4.x configs often spelled the type as `type`
        legacy_scaling = {("type" if k == "rope_type" else k): v for k, v in scaling.items()}
    old = {**top, "rope_theta": theta, "rope_scaling": legacy_scaling}
    return [new, old]


_thetas = st.sampled_from([10_000.0, 500_000.0, 1_000_000.0, 5_000_000.0])
_head_dims = st.sampled_from([16, 32, 64, 128])
_factors = st.floats(1.0, 64.0).map(lambda f: round(f, 3))
_max_pos = st.sampled_from([2048, 4096, 32768, 40960, 131072])


@given(theta=_thetas, head_dim=_head_dims, max_pos=_max_pos)
def test_default_matches(theta, head_dim, max_pos):
    for hf in _layouts(theta, None, head_dim=head_dim, max_position_embeddings=max_pos):
        _check(hf)


@given(theta=_thetas, head_dim=_head_dims, factor=_factors)
def test_linear_matches(theta, head_dim, factor):
    for hf in _layouts(theta, {"rope_type": "linear", "factor": factor}, head_dim=head_dim):
        _check(hf)


@given(
    theta=_thetas,
    head_dim=_head_dims,
    factor=_factors,
    max_pos=_max_pos,
    extra=st.sampled_from([None, 0, 1, 7, 100_000]),
)
def test_dynamic_matches_at_and_beyond_max_length(theta, head_dim, factor, max_pos, extra):
    for hf in _layouts(
        theta,
        {"rope_type": "dynamic", "factor": factor},
        head_dim=head_dim,
        max_position_embeddings=max_pos,
    ):
        _check(hf, seq_len=None if extra is None else max_pos + extra)


@given(
    theta=_thetas,
    head_dim=_head_dims,
    factor=st.one_of(st.none(), _factors),
    original=st.sampled_from([None, 2048, 4096, 32768]),
    attention_factor=st.sampled_from([None, 0.8, 1.25]),
    betas=st.sampled_from([(None, None), (32.0, 1.0), (16.0, 2.0), (64.0, 0.5)]),
    mscales=st.sampled_from([(None, None), (1.0, 1.0), (0.707, 1.0), (1.0, 0.0)]),
    truncate=st.sampled_from([None, True, False]),
)
def test_yarn_matches(
    theta, head_dim, factor, original, attention_factor, betas, mscales, truncate
):
    scaling = {"rope_type": "yarn", "factor": factor}
    optional = dict(
        original_max_position_embeddings=original,
        attention_factor=attention_factor,
        beta_fast=betas[0],
        beta_slow=betas[1],
        mscale=mscales[0],
        mscale_all_dim=mscales[1],
        truncate=truncate,
    )
    scaling |= {key: value for key, value in optional.items() if value is not None}
    max_pos = 131072
    for hf in _layouts(theta, scaling, head_dim=head_dim, max_position_embeddings=max_pos):
        _check(hf)
        # Phi-3 style: a top-level original length overrides the dict's.
        _check({**hf, "original_max_position_embeddings": 8192})


@given(
    theta=_thetas,
    head_dim=_head_dims,
    factor=_factors,
    freq_factors=st.sampled_from([(1.0, 4.0), (2.0, 8.0), (0.5, 3.0)]),
    original=st.sampled_from([None, 2048, 8192]),
)
def test_llama3_matches(theta, head_dim, factor, freq_factors, original):
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": freq_factors[0],
        "high_freq_factor": freq_factors[1],
    }
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    for hf in _layouts(theta, scaling, head_dim=head_dim, max_position_embeddings=16384):
        _check(hf)


def test_layouts_parse_to_the_same_parameters():
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    new, old = _layouts(1e6, scaling, max_position_embeddings=131072)
    assert rope_parameters_from_hf(new) == rope_parameters_from_hf(old)
    params = rope_parameters_from_hf(new)
    assert params.rope_type == "yarn" and params.rope_theta == 1e6 and params.factor == 4.0
    # Plain Qwen3 configs: no scaling dict at all, theta on top (4.x) or none at all.
    assert rope_parameters_from_hf({"rope_theta": 5e5}) == RopeParameters(rope_theta=5e5)
    assert rope_parameters_from_hf({}).rope_theta == transformers.Qwen3Config().default_theta
    # A theta inside the dict wins over the top-level one, as in transformers.
    both = {"rope_theta": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}
    assert rope_parameters_from_hf(both).rope_theta == 7.0


def test_to_hf_round_trips():
    hf = {
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
            "truncate": False,
        },
    }
    params = rope_parameters_from_hf(hf)
    assert params.to_hf() == hf["rope_parameters"]
    assert rope_parameters_from_hf({**hf, "rope_parameters": params.to_hf()}) == params


def test_unsupported_settings_are_refused():
    with pytest.raises(NotImplementedError, match="longrope"):
        rope_parameters_from_hf(
            {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0]}}
        )
    with pytest.raises(NotImplementedError, match="partial_rotary_factor"):
        rope_parameters_from_hf({"rope_parameters": {"partial_rotary_factor": 0.5}})
    with pytest.raises(NotImplementedError, match="Per-layer"):
        rope_parameters_from_hf(
            {"layer_types": ["full_attention"], "rope_parameters": {"full_attention": {}}}
        )
    with pytest.raises(ValueError, match="factor"):
        RopeParameters(rope_type="linear")
    with pytest.raises(ValueError, match="even head_dim"):
        inv_freq_and_scaling(RopeParameters(), 15)
    with pytest.raises(TypeError, match="dict"):
        rope_parameters_from_hf(None)


def test_dynamic_accepts_a_traced_length():
    params = RopeParameters(rope_type="dynamic", factor=4.0, max_position_embeddings=64)
    traced = jax.jit(lambda n: inv_freq_and_scaling(params, 32, seq_len=n)[0])
    for length in (10, 64, 200):
        expected, _ = inv_freq_and_scaling(params, 32, seq_len=length)
        np.testing.assert_allclose(traced(jnp.int32(length)), expected, rtol=2e-5)


def test_cos_sin_matches_transformers_rotary_embedding_with_yarn_scaling():
    hf = {
        "head_dim": 32,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0},
    }
    config = transformers.Qwen3Config(**_SIZES, **hf)
    positions = np.array([[0, 1, 2, 3000], [5, 6, 7, 4095]])
    x = torch.zeros(1, dtype=torch.float32)
    their_cos, their_sin = Qwen3RotaryEmbedding(config)(x, torch.from_numpy(positions))
    inv_freq, scaling = inv_freq_and_scaling(rope_parameters_from_hf(hf), 32)
    assert scaling > 1.0
    cos, sin = cos_sin(jnp.asarray(positions), inv_freq, scaling)
    np.testing.assert_allclose(cos, their_cos.numpy(), rtol=1e-5, atol=3e-5)
    np.testing.assert_allclose(sin, their_sin.numpy(), rtol=1e-5, atol=3e-5)


def test_cos_sin_default_equals_the_decoder_tables():
    positions = jnp.arange(24).reshape(2, 12)
    inv_freq, scaling = inv_freq_and_scaling(RopeParameters(rope_theta=1e6), 16)
    ours = cos_sin(positions, inv_freq, scaling)
    reference = rope_cos_sin(positions, 16, 1e6)
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
