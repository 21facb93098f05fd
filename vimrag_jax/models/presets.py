"""Named model sizes as Hugging Face `config.json` dicts, and randomly initialised models of them.

The real sizes are the published configs of Qwen/Qwen3-{0.6B,1.7B,4B,8B} and
Qwen/Qwen3-VL-{2B,4B,8B}-Instruct, written from memory of those files (no download happens
here); the fields that decide the architecture and parameter count (sizes, layer and head
counts, head_dim, vocab, tied embeddings) are the ones checked against the published parameter
counts in the tests. Less certain, and irrelevant to the math of the decoder: the token ids
(`bos_token_id` / `eos_token_id`), `max_window_layers`, and the Qwen3-VL
`max_position_embeddings` (262144). `tiny` and `tiny-vl` are small configs for tests;
`tiny-agent` is what `configs/ggpo.py` trains from scratch on one CPU by default.
"""

from __future__ import annotations

import copy
from typing import Any

from flax import nnx

_QWEN3_COMMON: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "head_dim": 128,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "sliding_window": None,
    "initializer_range": 0.02,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> dict[str, Any]:
    return {
        **_QWEN3_COMMON,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "max_window_layers": layers,
        "num_attention_heads": heads,
        "tie_word_embeddings": tied,
    }


def _qwen3_vl(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    tied: bool,
    vision: dict[str, Any],
) -> dict[str, Any]:
    text = {
        "model_type": "qwen3_vl_text",
        "vocab_size": 151936,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144,
        "rope_theta": 5_000_000.0,
        "rope_scaling": {
            "rope_type": "default",
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "tie_word_embeddings": tied,
    }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "text_config": text,
        "vision_config": {
            "model_type": "qwen3_vl",
            "hidden_act": "gelu_pytorch_tanh",
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_heads": 16,
            "num_position_embeddings": 2304,
            "initializer_range": 0.02,
            "out_hidden_size": hidden,
            **vision,
        },
        "tie_word_embeddings": tied,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "torch_dtype": "bfloat16",
    }


_VIT_SMALL = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096}
_VIT_SMALL_DEEPSTACK = [5, 11, 17]

_TINY: dict[str, Any] = {
    **_QWEN3_COMMON,
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "max_window_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "rope_theta": 10_000.0,
    "tie_word_embeddings": True,
    "bos_token_id": None,
    "eos_token_id": None,
    "torch_dtype": "float32",
}

# The embedded CPU run's policy (configs/ggpo.py:tiny): big enough to learn the tool-call
# format within a few hundred SFT steps (`tiny` breaks about half of its calls), small enough
# for a 2-core machine. It does not learn in that time to copy a name or a value out of its
# context: after 300 steps its NLL is ~0.01 on format tokens and ~2.7 on copied ones.
_TINY_AGENT: dict[str, Any] = {
    **_TINY,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "max_window_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
}


def _tiny_vl() -> dict[str, Any]:
    hf = _qwen3_vl(
        64,
        128,
        2,
        4,
        True,
        {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
    )
    hf["text_config"] |= {
        "vocab_size": 2048,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 2048,
        "rope_theta": 10_000.0,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    hf["text_config"]["rope_scaling"]["mrope_section"] = [2, 3, 3]  # sums to head_dim / 2
    # Token ids inside the tiny vocabulary; the real ones sit past its end.
    hf |= {
        "image_token_id": 2000,
        "video_token_id": 2001,
        "vision_start_token_id": 2002,
        "vision_end_token_id": 2003,
        "torch_dtype": "float32",
    }
    return hf


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    "tiny-agent": _TINY_AGENT,
    "tiny-vl": _tiny_vl(),
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, tied=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, tied=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, tied=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, tied=False),
    "qwen3-vl-2b-instruct": _qwen3_vl(
        2048, 6144, 28, 16, True, {**_VIT_SMALL, "deepstack_visual_indexes": _VIT_SMALL_DEEPSTACK}
    ),
    "qwen3-vl-4b-instruct": _qwen3_vl(
        2560, 9728, 36, 32, True, {**_VIT_SMALL, "deepstack_visual_indexes": _VIT_SMALL_DEEPSTACK}
    ),
    "qwen3-vl-8b-instruct": _qwen3_vl(
        4096,
        12288,
        36,
        32,
        False,
        {
            "depth": 27,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "deepstack_visual_indexes": [8, 16, 24],
        },
    ),
}

# Spellings used elsewhere (configs/ggpo.py presets, Hugging Face repo names).
_ALIASES = {
    "qwen3vl-2b": "qwen3-vl-2b-instruct",
    "qwen3vl-4b": "qwen3-vl-4b-instruct",
    "qwen3vl-8b": "qwen3-vl-8b-instruct",
    "qwen3-vl-2b": "qwen3-vl-2b-instruct",
    "qwen3-vl-4b": "qwen3-vl-4b-instruct",
    "qwen3-vl-8b": "qwen3-vl-8b-instruct",
}


def preset_config(name: str) -> dict[str, Any]:
    """A fresh copy of the `config.json` dict of preset `name` (case and `_`/`-` insensitive,
    `Qwen/` prefix allowed). Raises ValueError listing the presets for an unknown name."""
    key = name.lower().removeprefix("qwen/").replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; known: {', '.join(PRESETS)}.")
    return copy.deepcopy(PRESETS[key])


def init_model(
    name_or_hf_config: str | dict[str, Any],
    *,
    rngs: nnx.Rngs,
    dtype: str = "float32",
    remat: bool = False,
    scan_layers: bool = False,
    remat_policy: str = "nothing_saveable",
) -> nnx.Module:
    """A randomly initialised model of a preset name or a `config.json` dict.

    `Qwen3ForCausalLM` for `model_type: qwen3`, `Qwen3VLForConditionalGeneration` for
    `qwen3_vl`; `dtype` is the compute dtype (parameters are float32), `remat` recomputes each
    decoder layer's activations in the backward pass (keeping what `remat_policy` names),
    `scan_layers` runs the decoder layers of the full forward as one scan (see
    `vimrag_jax.models.decoder`; the parameters are the same either way). Wrap in
    `nnx.eval_shape(lambda: init_model(...))` for an abstract model without allocating weights.
    """
    if isinstance(name_or_hf_config, str):
        hf = preset_config(name_or_hf_config)
    elif isinstance(name_or_hf_config, dict):
        hf = name_or_hf_config
    else:
        raise TypeError(
            f"Expected a preset name or a config.json dict, got {type(name_or_hf_config).__name__}."
        )
    options = dict(dtype=dtype, remat=remat, scan_layers=scan_layers, remat_policy=remat_policy)
    model_type = hf.get("model_type")
    if model_type == "qwen3":
        from vimrag_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config.from_hf(hf, **options)
        return Qwen3ForCausalLM(config, rngs=rngs)
    if model_type == "qwen3_vl":
        from vimrag_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        config = Qwen3VLConfig.from_hf(hf, **options)
        return Qwen3VLForConditionalGeneration(config, rngs=rngs)
    raise NotImplementedError(
        f"No model for model_type={model_type!r}; supported: 'qwen3', 'qwen3_vl'."
    )
