"""KV-cache sampler and shared per-token log-probs on a tiny random Qwen3."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_qwen3

from vimrag_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from vimrag_jax.sampling import (
    Sampler,
    chunked_token_logprobs,
    sample_tokens,
    sequence_logprobs,
    token_logprobs,
)

_CONFIG = Qwen3Config(**tiny_qwen3(narrow=True, vocab_size=64))
_MAX_NEW = 12
_PROMPTS = [[5, 9, 3, 17, 40, 2, 8, 1, 33, 12, 7, 21, 4, 60], [11, 4, 9], [3, 3, 50, 23, 1, 9, 44]]


@pytest.fixture(scope="module")
def model():
    return Qwen3ForCausalLM(_CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(
        model,
        max_prompt_len=16,
        max_new_tokens=_MAX_NEW,
        eos_token_ids=(),
        pad_token_id=0,
        batch_buckets=(4,),
        length_buckets=(8, 16),
        chunk_size=4,
    )


@pytest.fixture(scope="module")
def greedy(sampler):
    return sampler.generate(_PROMPTS, greedy=True)


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, attention_mask=mask)


@nnx.jit
def _lean_logprobs(model, ids, mask):
    return sequence_logprobs(model, ids, mask, chunk_size=5)


def _right_padded(rows: list[list[int]], length: int = 16 + _MAX_NEW):
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def test_greedy_equals_full_forward_argmax(model, greedy):
    rows = [list(p) for p in _PROMPTS]
    for _ in range(_MAX_NEW):
        ids, mask = _right_padded(rows)
        logits = np.asarray(_logits(model, ids, mask))
        for i, row in enumerate(rows):
            row.append(int(np.argmax(logits[i, len(row) - 1])))
    for prompt, row, completion in zip(_PROMPTS, rows, greedy, strict=True):
        assert completion.tokens == row[len(prompt) :]
        assert completion.finish_reason == "length" and completion.stop_text is None


def test_sampler_logprobs_equal_learner_logprobs(model, greedy):
    rows = [p + c.tokens for p, c in zip(_PROMPTS, greedy, strict=True)]
    ids, mask = _right_padded(rows)
    plain = np.asarray(token_logprobs(_logits(model, ids, mask), jnp.asarray(ids)))
    lean = np.asarray(_lean_logprobs(model, ids, mask))
    for i, (prompt, completion) in enumerate(zip(_PROMPTS, greedy, strict=True)):
        span = slice(len(prompt), len(rows[i]))
        np.testing.assert_allclose(completion.logprobs, plain[i, span], atol=1e-4, rtol=0)
        np.testing.assert_allclose(completion.logprobs, lean[i, span], atol=1e-4, rtol=0)
        assert all(lp <= 0 for lp in completion.logprobs)


def test_left_padding_rows_equal_each_row_alone(sampler, greedy):
    # Alone, the short prompts land in the 8-token bucket: a different amount of left padding.
    for prompt, together in zip(_PROMPTS, greedy, strict=True):
        (alone,) = sampler.generate([prompt], greedy=True)
        assert alone.tokens == together.tokens
        np.testing.assert_allclose(alone.logprobs, together.logprobs, atol=1e-5, rtol=0)


def _expected_stop(tokens: list[int], stop: int) -> list[int]:
    return tokens[: tokens.index(stop) + 1] if stop in tokens else tokens


def test_stop_tokens_end_each_row(sampler, greedy):
    first = greedy[0].tokens
    stop = next(t for i, t in enumerate(first) if i >= 2 and t not in first[:i])
    out = sampler.generate(_PROMPTS, greedy=True, stop_token_ids=[stop])
    for before, after in zip(greedy, out, strict=True):
        expected = _expected_stop(before.tokens, stop)
        assert after.tokens == expected
        assert after.logprobs == pytest.approx(before.logprobs[: len(expected)], abs=1e-6)
        assert after.finish_reason == ("stop" if stop in before.tokens else "length")
        assert after.stop_text is None


def test_max_new_tokens_override_gives_length(sampler, greedy):
    out = sampler.generate(_PROMPTS, greedy=True, max_new_tokens=5)
    for before, after in zip(greedy, out, strict=True):
        assert after.tokens == before.tokens[:5] and after.finish_reason == "length"


def _decode(tokens: list[int]) -> str:
    return "".join(f"<{t}>" for t in tokens)


def test_stop_strings_cut_after_the_completing_token(sampler, greedy):
    tokens = greedy[0].tokens
    # Ends inside token 5: the shortest prefix holding it is tokens[:6].
    stop = f"{tokens[4]}><{tokens[5]}"[:-1] if tokens[5] >= 10 else f"{tokens[4]}><"
    out = sampler.generate(_PROMPTS, greedy=True, stop_strings=["@never@", stop], decode_fn=_decode)
    for before, after in zip(greedy, out, strict=True):
        full = before.tokens
        hit = next((n for n in range(1, len(full) + 1) if stop in _decode(full[:n])), None)
        if hit is None:
            assert after.tokens == full and after.finish_reason == "length"
            assert after.stop_text is None
        else:
            assert after.tokens == full[:hit] and after.finish_reason == "stop"
            assert after.stop_text == stop
            assert after.logprobs == pytest.approx(before.logprobs[:hit], abs=1e-6)
    assert len(out[0].tokens) <= 6


def test_temperature_sampling_is_seeded_and_tiny_top_p_is_greedy(sampler, greedy):
    a = sampler.generate(_PROMPTS, temperature=1.0, seed=3)
    b = sampler.generate(_PROMPTS, temperature=1.0, seed=3)
    c = sampler.generate(_PROMPTS, temperature=1.0, seed=4)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]
    assert [x.tokens for x in a] != [x.tokens for x in greedy]
    nucleus = sampler.generate(_PROMPTS, temperature=1.0, top_p=1e-6, seed=3)
    assert [x.tokens for x in nucleus] == [x.tokens for x in greedy]


def test_top_p_keeps_the_smallest_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)
    draw = jax.jit(
        jax.vmap(lambda k: sample_tokens(logits, k, temperature=1.0, top_p=0.7, greedy=False))
    )
    assert set(np.asarray(draw(keys)).ravel().tolist()) == {0, 1}


def test_more_prompts_than_the_largest_bucket(sampler, greedy):
    out = sampler.generate(_PROMPTS * 2, greedy=True)
    assert [x.tokens for x in out] == [x.tokens for x in greedy] * 2


def test_set_weights_swaps_without_recompiling(sampler, greedy):
    other = Qwen3ForCausalLM(_CONFIG, rngs=nnx.Rngs(1))
    original = sampler._state
    compiled = sampler._decode_fn._cache_size()
    sampler.set_weights(other)
    try:
        out = sampler.generate(_PROMPTS, greedy=True)
        assert [x.tokens for x in out] != [x.tokens for x in greedy]
        assert sampler._decode_fn._cache_size() == compiled
    finally:
        sampler.set_weights(original)
    assert sampler.generate(_PROMPTS, greedy=True)[0].tokens == greedy[0].tokens


def test_bad_calls_are_refused(sampler):
    with pytest.raises(ValueError, match="prompt 0 has 17 tokens"):
        sampler.generate([[1] * 17])
    with pytest.raises(ValueError, match="decode_fn"):
        sampler.generate([[1]], stop_strings=["x"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampler.generate([[1]], max_new_tokens=_MAX_NEW + 1)
    with pytest.raises(ValueError, match="top_p"):
        sampler.generate([[1]], top_p=0.0)


@pytest.mark.parametrize("keep_logits_bytes", [0, 2**30], ids=["recomputed", "kept"])
def test_lean_logprobs_and_gradients_equal_plain(model, keep_logits_bytes):
    # Both backward passes: logits recomputed chunk by chunk, or kept from the forward.
    rng = np.random.default_rng(0)
    ids = rng.integers(0, _CONFIG.vocab_size, size=(3, 13)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    weights = rng.random(ids.shape).astype(np.float32) * mask

    def plain(m):
        return jnp.sum(token_logprobs(m(ids, attention_mask=mask), ids) * weights)

    def lean(m):
        hidden = m.hidden_states(ids, mask)
        logp = chunked_token_logprobs(
            hidden, m.head_weight(), ids, chunk_size=5, keep_logits_bytes=keep_logits_bytes
        )
        return jnp.sum(logp * weights)

    value_plain, grads_plain = nnx.jit(nnx.value_and_grad(plain))(model)
    value_lean, grads_lean = nnx.jit(nnx.value_and_grad(lean))(model)
    np.testing.assert_allclose(value_lean, value_plain, rtol=1e-5)
    # float32 sums in another order: gradients of size ~1 differ by up to ~6e-6 (an element
    # near 0 of an up-projection weight, with the norm scales folded into the weights).
    for a, b in zip(jax.tree.leaves(grads_lean), jax.tree.leaves(grads_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="tokens must be"):
        chunked_token_logprobs(jnp.zeros((3, 13, 32)), model.head_weight(), ids[:, :5])
