"""Qwen3 port: logits parity with transformers' PyTorch model, and checkpoint-import errors."""

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tiny_models import tiny_qwen3

from vimrag_jax.models.attention import attend, blocked_attend
from vimrag_jax.models.hf import from_pretrained, save_pretrained
from vimrag_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, default_positions
from vimrag_jax.models.rope import RopeParameters

_TINY = tiny_qwen3(max_position_embeddings=64)
_B, _L = 2, 12


def _save_tiny(directory, tied: bool) -> transformers.Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = transformers.Qwen3Config(**_TINY, tie_word_embeddings=tied, rope_theta=10_000.0)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        # Norm scales start at 1; randomise them so a wrongly mapped norm cannot go unnoticed.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tied" if request.param else "untied")
    theirs = _save_tiny(directory, tied=request.param)
    ours = from_pretrained(directory)
    return directory, theirs, ours


def _inputs():
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, _TINY["vocab_size"], size=(_B, _L), dtype=np.int32)
    mask = np.ones((_B, _L), dtype=np.int32)
    mask[1, :5] = 0  # row 1 is left-padded by 5
    return input_ids, mask


def _torch_logits(model, input_ids, mask=None, positions=None):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(input_ids).long(),
            attention_mask=None if mask is None else torch.from_numpy(mask).long(),
            position_ids=None if positions is None else torch.from_numpy(positions.copy()).long(),
        )
    return out.logits.float().numpy()


@nnx.jit
def _our_logits(model, input_ids, mask):
    return model(input_ids, attention_mask=mask)


def test_config_reads_hf_dict(pair):
    directory, theirs, ours = pair
    config = Qwen3Config.from_hf(json.loads((directory / "config.json").read_text()))
    assert config == ours.config
    assert config.rope_theta == 10_000.0
    assert config.tie_word_embeddings == theirs.config.tie_word_embeddings


def test_logits_match_without_padding(pair):
    _, theirs, ours = pair
    input_ids, _ = _inputs()
    mask = np.ones_like(input_ids)
    logits = np.asarray(_our_logits(ours, input_ids, mask))
    assert logits.shape == (_B, _L, _TINY["vocab_size"]) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, _torch_logits(theirs, input_ids), rtol=2e-3, atol=2e-4)


def test_logits_match_with_left_padding(pair):
    _, theirs, ours = pair
    input_ids, mask = _inputs()
    positions = np.asarray(default_positions(mask))
    np.testing.assert_array_equal(positions[1], [0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6])
    logits = np.asarray(_our_logits(ours, input_ids, mask))
    reference = _torch_logits(theirs, input_ids, mask, positions)
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], reference[real], rtol=2e-3, atol=2e-4)
    # The padded row's real tokens must equal the same tokens run unpadded on their own.
    alone = _torch_logits(theirs, input_ids[1:, 5:])
    np.testing.assert_allclose(logits[1, 5:], alone[0], rtol=2e-3, atol=2e-4)


def test_parameters_carry_logical_axes(pair):
    _, _, ours = pair
    axes = {
        "/".join(map(str, path)): var.get_metadata().get("out_sharding")
        for path, var in nnx.to_flat_state(nnx.state(ours, nnx.Param))
    }
    assert all(axes.values()), axes
    assert axes["layers/0/attn/q_dhk"] == ("embed", "heads", "head_dim")
    assert axes["layers/0/attn/k_dgk"] == ("embed", "kv_heads", "head_dim")


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nope")


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **_TINY})
    )
    with pytest.raises(FileNotFoundError, match="safetensors"):
        from_pretrained(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(pair, tmp_path):
    directory, _, _ = pair
    copy = tmp_path / "ckpt"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    config["intermediate_size"] = 80
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"mlp\.\w+_proj\.weight.*\((96, 64|64, 96)\).*\((80, 64|64, 80)\)"
    ):
        from_pretrained(copy)


def test_unknown_architectures_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(NotImplementedError, match="LlamaForCausalLM"):
        from_pretrained(tmp_path)


def test_other_rope_types_are_refused():
    hf = {**_TINY, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6}}
    with pytest.raises(NotImplementedError, match="longrope"):
        Qwen3Config.from_hf(hf)
    legacy = {**_TINY, "rope_theta": 5e5, "rope_scaling": None}
    assert Qwen3Config.from_hf(legacy).rope_theta == 5e5
    assert Qwen3Config.from_hf(_TINY).rope_theta == transformers.Qwen3Config().default_theta
    # The constructor shorthand and the full setting agree; a contradiction is refused.
    config = Qwen3Config(**_TINY, rope_theta=5e5)
    assert config.rope == RopeParameters(rope_theta=5e5, max_position_embeddings=64)
    assert dataclasses.replace(config, remat=True).rope == config.rope
    with pytest.raises(ValueError, match="contradicts"):
        Qwen3Config(**_TINY, rope_theta=1.0, rope=RopeParameters())


_SCALED_ROPE = {
    # The original context (16) is shorter than the test sequence, so the scaling matters.
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 2.5},
}


@pytest.fixture(scope="module", params=sorted(_SCALED_ROPE))
def scaled_pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(2)
    rope = {"rope_theta": 10_000.0, **_SCALED_ROPE[request.param]}
    config = transformers.Qwen3Config(**_TINY, rope_parameters=rope, tie_word_embeddings=False)
    theirs = transformers.Qwen3ForCausalLM(config).eval()
    theirs.save_pretrained(directory, safe_serialization=True)
    return request.param, theirs, from_pretrained(directory)


def _relative_error(got, expected):
    return np.abs(got - expected).max() / np.abs(expected).max()


def test_scaled_rope_logits_match_transformers(scaled_pair):
    rope_type, theirs, ours = scaled_pair
    assert ours.config.rope.rope_type == rope_type
    input_ids = np.random.default_rng(1).integers(0, _TINY["vocab_size"], (2, 40), np.int32)
    mask = np.ones_like(input_ids)
    got = np.asarray(_our_logits(ours, input_ids, mask))
    assert _relative_error(got, _torch_logits(theirs, input_ids)) < 1e-4
    # The KV-cache path uses the same tables: prefill 30 tokens, then one decode step.
    _, cache = nnx.jit(lambda m, ids, mk: m.prefill(ids, mk, cache_size=32))(
        ours, input_ids[:, :30], mask[:, :30]
    )
    step, _ = nnx.jit(lambda m, t, c: m.decode_step(t, c))(ours, input_ids[:, 30], cache)
    assert _relative_error(np.asarray(step), got[:, 30]) < 1e-4


def test_scaled_rope_export_round_trips(scaled_pair, tmp_path):
    rope_type, theirs, ours = scaled_pair
    save_pretrained(ours, tmp_path, dtype="float32")
    written = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    assert written == {"rope_theta": 10_000.0, **_SCALED_ROPE[rope_type]}
    back = from_pretrained(tmp_path)
    assert back.config == ours.config
    reread = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reread.config.rope_parameters == theirs.config.rope_parameters
    input_ids = np.random.default_rng(2).integers(0, _TINY["vocab_size"], (1, 24), np.int32)
    expected = _torch_logits(theirs, input_ids)
    assert _relative_error(_torch_logits(reread, input_ids), expected) < 1e-5


def test_bf16_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen3Config(**_TINY, tie_word_embeddings=True)
    transformers.Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.embed_vd[...].dtype == jax.numpy.float32


def test_bfloat16_compute_stays_close(pair):
    directory, theirs, _ = pair
    ours = from_pretrained(directory, dtype="bfloat16")
    input_ids, _ = _inputs()
    logits = np.asarray(_our_logits(ours, input_ids, np.ones_like(input_ids)))
    reference = _torch_logits(theirs, input_ids)
    assert logits.dtype == np.float32
    assert np.linalg.norm(logits - reference) / np.linalg.norm(reference) < 3e-2


def test_remat_keeps_values_and_gradients():
    config = Qwen3Config(**_TINY)
    plain = Qwen3ForCausalLM(config, rngs=nnx.Rngs(0))
    remat = nnx.eval_shape(
        lambda: Qwen3ForCausalLM(dataclasses.replace(config, remat=True), rngs=nnx.Rngs(0))
    )
    nnx.update(remat, nnx.state(plain))
    input_ids, mask = _inputs()

    def loss(model):
        return jnp.sum(jnp.tanh(model(input_ids, attention_mask=mask)) * mask[..., None])

    grad_fn = nnx.jit(nnx.value_and_grad(loss))
    value, grads = grad_fn(plain)
    value_remat, grads_remat = grad_fn(remat)
    np.testing.assert_allclose(value_remat, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads), strict=True):
        # Recomputation reorders float32 sums: equal up to rounding, relative to the scale.
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * np.abs(b).max())
    assert "remat" in str(jax.make_jaxpr(loss)(remat))
    assert "remat" not in str(jax.make_jaxpr(loss)(plain))


def test_blocked_attention_equals_plain_values_and_gradients():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 11, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 11, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 11, 2, 8)), jnp.float32)
    mask = np.ones((2, 11), bool)
    mask[1, :3] = False  # left padding: fully masked query rows must stay finite
    allowed = jnp.tril(jnp.ones((11, 11), bool))[None] & jnp.asarray(mask)[:, None, :]

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, allowed)))

    blocked = functools.partial(blocked_attend, block=4)  # 3 blocks, the last one padded
    plain_value, plain_grads = jax.jit(
        jax.value_and_grad(functools.partial(loss, attend), (0, 1, 2))
    )(q, k, v)
    value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, blocked), (0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(value, plain_value, rtol=1e-5)
    for a, b in zip(grads, plain_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(blocked(q, k, v, allowed))))


@pytest.mark.parametrize(
    "queries, keys, block, padding, causal, batch_block",
    [
        (11, 11, 4, 3, True, 2),  # 3 blocks, the last one padded; rows 0-2 of row 1 masked
        (13, 17, 4, 9, True, 1),  # a prompt cache: more keys than queries, key blocks padded
        (21, 21, 8, 0, False, 1),  # any mask, not only a causal one, stays exact
        (37, 37, 16, 20, True, 2),  # a whole query block fully masked, odd length
    ],
)  # batch_block 1: the two batch rows go through the lax.map one at a time
def test_flash_attention_equals_plain_with_masked_rows(
    queries, keys, block, padding, causal, batch_block
):
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, queries, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, keys, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, keys, 2, 8)), jnp.float32)
    valid = np.ones((2, keys), bool)
    valid[1, :padding] = False  # left padding
    if causal:  # query i sits at slot i + keys - queries, as in a prefill over a cache
        structure = np.tril(np.ones((queries, keys), bool), k=keys - queries)
    else:
        structure = rng.random((queries, keys)) < 0.3
        structure[2] = False  # a fully masked row without padding
    allowed = jnp.asarray(structure[None] & valid[:, None, :])
    weights = jnp.asarray(rng.standard_normal((2, queries, 4, 8)), jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, allowed)) * weights)

    flash = functools.partial(blocked_attend, block=block, batch_block=batch_block)
    grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2))
    plain_value, plain_grads = jax.jit(grad(functools.partial(loss, attend)))(q, k, v)
    value, grads = jax.jit(grad(functools.partial(loss, flash)))(q, k, v)
    np.testing.assert_allclose(value, plain_value, rtol=1e-5)
    for a, b in zip(grads, plain_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    out = np.asarray(jax.jit(flash)(q, k, v, allowed))
    np.testing.assert_allclose(out, np.asarray(attend(q, k, v, allowed)), rtol=1e-5, atol=1e-6)
    assert not np.asarray(allowed).any(-1).all()  # the case does have fully masked rows
    # Key blocks no query of a block may read are skipped: the loop's bounds depend on the mask.
    assert "while" in str(jax.make_jaxpr(flash)(q, k, v, allowed))
