"""Tests for the tiny byte-level BPE tokenizer of the embedded model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from vimrag_jax.agent.prompts import SPECIAL_TOKENS, Message, render_chat
from vimrag_jax.agent.tokenizer import build_tokenizer

CORPUS = [
    f"Question {i}: which film did director {i % 7} shoot in {1950 + i}? "
    '<tool_call>\n{"name": "add_search_node"}\n</tool_call> Ça va, 東京 🎬'
    for i in range(120)
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=512)


def test_special_tokens_are_single_fixed_ids(tokenizer):
    for index, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.encode(token) == [index]
        assert tokenizer.convert_ids_to_tokens(index) == token
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 0)
    pads = "<|vision_start|>" + "<|image_pad|>" * 5 + "<|vision_end|>"
    assert tokenizer.encode(pads) == [9] + [11] * 5 + [10]
    assert len(tokenizer) <= 512
    # Training found merges: common corpus words take fewer ids than bytes.
    assert len(tokenizer.encode("director")) < len("director")


@given(st.text(max_size=200))
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@given(
    st.lists(
        st.sampled_from([*SPECIAL_TOKENS, "a b", " ", "\n", "é", "<|", "|>", "<"]), max_size=30
    )
)
def test_decode_inverts_encode_around_special_tokens(tokenizer, parts):
    text = "".join(parts)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chat_prompt_round_trips(tokenizer):
    text = render_chat([Message("system", "be brief"), Message("user", "hi")]).text
    ids = tokenizer.encode(text)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> first, two <|im_end|>
    assert tokenizer.decode(ids) == text


def test_same_texts_same_vocabulary(tokenizer):
    again = build_tokenizer(CORPUS, vocab_size=512)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_save_and_load_offline(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    sample = "<|im_start|>user\nWhich film? 東京 🎬<|im_end|>"
    assert loaded.encode(sample) == tokenizer.encode(sample)
    assert loaded.decode(loaded.encode(sample)) == sample
    assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_vocab_size_must_hold_bytes_and_specials():
    with pytest.raises(ValueError, match="at least"):
        build_tokenizer(["x"], vocab_size=100)
