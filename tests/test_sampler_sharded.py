"""The embedded sampler tensor-parallel over a mesh and in bfloat16 (issue 16, item 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_qwen3

from vimrag_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from vimrag_jax.parallel.mesh import make_mesh
from vimrag_jax.sampling.sampler import Sampler

# 4 query heads over 2 key/value heads, 96 MLP units, 128 tokens: all split 2 ways.
_CONFIG = Qwen3Config(**tiny_qwen3(vocab_size=128))
_PROMPTS = [[5, 9, 13, 2, 7], [3, 3, 8], [11, 4, 6, 1, 2, 9, 10]]


@pytest.fixture(scope="module")
def model():
    return Qwen3ForCausalLM(_CONFIG, rngs=nnx.Rngs(0))


def _sampler(model, **kwargs) -> Sampler:
    return Sampler(
        model,
        max_prompt_len=16,
        max_new_tokens=6,
        eos_token_ids=(),
        pad_token_id=0,
        batch_buckets=(4,),
        **kwargs,
    )


def test_tensor_parallel_greedy_equals_one_device(model):
    mesh = make_mesh(1, 1, 2, devices=jax.devices()[:2])
    plain, split = _sampler(model), _sampler(model, mesh=mesh)
    want = plain.generate(_PROMPTS, greedy=True)
    got = split.generate(_PROMPTS, greedy=True)
    assert [c.tokens for c in got] == [c.tokens for c in want]
    np.testing.assert_allclose(
        np.concatenate([c.logprobs for c in got]),
        np.concatenate([c.logprobs for c in want]),
        rtol=1e-5,
        atol=1e-5,
    )
    # The weights are split over the heads and MLP units, not copied.
    state = nnx.to_pure_dict(split._state)
    q = state["layers"][0]["attn"]["q_dhk"]
    assert q.sharding.shard_shape(q.shape) == (q.shape[0], q.shape[1] // 2, q.shape[2])
    up = jax.tree.leaves(state["layers"][0]["mlp"])[0]
    assert not up.sharding.is_fully_replicated


def test_new_weights_keep_the_layout_and_dtype(model):
    mesh = make_mesh(1, 1, 2, devices=jax.devices()[:2])
    sampler = _sampler(model, mesh=mesh, param_dtype="bfloat16")
    floats = [x for x in jax.tree.leaves(sampler._state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.bfloat16 for x in floats)
    first = sampler.generate(_PROMPTS, greedy=True)
    assert all(len(c.tokens) == 6 for c in first)
    other = Qwen3ForCausalLM(_CONFIG, rngs=nnx.Rngs(1))  # float32, on one device
    sampler.set_weights(other)
    leaves = jax.tree.leaves(sampler._state)
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.bfloat16 for x in floats)
    assert any(not x.sharding.is_fully_replicated for x in leaves)
    assert sampler.generate(_PROMPTS, greedy=True) != first  # the new policy is used
