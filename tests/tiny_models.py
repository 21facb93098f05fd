"""Tiny Qwen3 decoder sizes the model tests share (keyword fields of our and transformers' configs).

`Qwen3Config(**tiny_qwen3())` and `transformers.Qwen3Config(**tiny_qwen3())` build the same model;
a Qwen3-VL test passes the dict as `text_config`. Tests override the fields they care about
(vocabulary, depth, RoPE, tying) and keep the rest.
"""

from __future__ import annotations

from typing import Any

# Two layers of grouped-query attention (4 query heads over 2 key/value heads).
_COMMON = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_WIDE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, head_dim=16)
_NARROW = dict(vocab_size=128, hidden_size=32, intermediate_size=64, head_dim=8)


def tiny_qwen3(*, narrow: bool = False, **fields: Any) -> dict[str, Any]:
    """Config fields of a tiny Qwen3 decoder: 64 wide (head_dim 16), or 32 wide (head_dim 8)
    with `narrow`; `fields` add to or override them."""
    return {**_COMMON, **(_NARROW if narrow else _WIDE), **fields}
