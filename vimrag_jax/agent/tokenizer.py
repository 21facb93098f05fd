"""A tiny byte-level BPE tokenizer with the Qwen chat and vision tokens, for the embedded model.

The default (CPU) setup trains a small Qwen3-architecture policy on the synthetic
corpus; it needs a tokenizer that exists without any download. ``build_tokenizer``
trains one with ``tokenizers`` on the texts it is given. Byte-level BPE with the full
256-byte alphabet encodes any text and decodes it back exactly. The Qwen special
tokens (``prompts.SPECIAL_TOKENS``) are single ids placed first, so their ids do not
depend on the training texts. The result is a ``PreTrainedTokenizerFast`` that
``save_pretrained`` writes and ``AutoTokenizer.from_pretrained`` reads back offline.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vimrag_jax.agent.prompts import SPECIAL_TOKENS

#: Tokens that mark structure but are ordinary text to a reader: Qwen keeps them when
#: decoding with ``skip_special_tokens=True``; the others are control tokens.
_TEXT_LIKE = {
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
}
_BYTES = 256


def build_tokenizer(texts: Iterable[str], *, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Trains a deterministic byte-level BPE of at most ``vocab_size`` ids (specials included).

    The same texts in the same order give the same vocabulary and merges. ``eos`` is
    ``<|im_end|>`` (the end of an assistant turn) and ``pad`` is ``<|endoftext|>``. A
    small corpus may yield fewer than ``vocab_size`` ids (BPE stops when no pair repeats);
    size the model's embedding by ``vocab_size``, not ``len(tokenizer)``.
    """
    minimum = _BYTES + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (bytes + special tokens)")
    tokenizer = Tokenizer(models.BPE())
    # The split regex only groups bytes into words, it never alters them: decoding is exact.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(token, special=token not in _TEXT_LIKE, normalized=False)
        for token in SPECIAL_TOKENS
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


__all__ = ["build_tokenizer"]
