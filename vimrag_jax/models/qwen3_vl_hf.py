"""Qwen3-VL checkpoints: the Hugging Face name map, import (optionally sharded) and export config.

`qwen3_vl_targets` maps every transformers 5 tensor name (`model.language_model.*`,
`model.visual.*`, `lm_head.weight`) to our parameter with an invertible converter, so the same
table serves `load_qwen3_vl` (through `hf.load_decoder_model`) and `hf.save_pretrained`
(through `hf.export_checkpoint` with `qwen3_vl_hf_config`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from vimrag_jax.models.hf import (
    Target,
    decoder_targets,
    identity,
    lm_head_targets,
    load_decoder_model,
    read_config,
    transposed,
)
from vimrag_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from vimrag_jax.models.qwen3_vl_vision import VisionTower
from vimrag_jax.parallel.sharding import DEFAULT_RULES, Rules


@dataclasses.dataclass(frozen=True)
class Reshaped:
    """Converter: a checkpoint tensor reshaped (not transposed) to our layout; `inverse` undoes
    it for export."""

    shape: tuple[int, ...]
    checkpoint_shape: tuple[int, ...]

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return w.reshape(self.shape)

    def inverse(self, w: np.ndarray) -> np.ndarray:
        return w.reshape(self.checkpoint_shape)


@dataclasses.dataclass(frozen=True)
class ConvAsMatmul:
    """Converter: a stride == kernel Conv3d weight `[out, C, T, P, P]` to the matmul kernel
    `[C*T*P*P, out]`; `inverse` gives the Conv3d weight back."""

    checkpoint_shape: tuple[int, ...]

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return w.reshape(w.shape[0], -1).T

    def inverse(self, w: np.ndarray) -> np.ndarray:
        return w.T.reshape(self.checkpoint_shape)


def _linear_targets(name: str, kernel: nnx.Param, bias: nnx.Param) -> dict[str, Target]:
    d_in, d_out = kernel.shape
    return {
        name + ".weight": (kernel, (d_out, d_in), transposed((d_in, d_out))),
        name + ".bias": (bias, (d_out,), identity),
    }


def _norm_targets(name: str, norm: Any) -> dict[str, Target]:
    (dim,) = norm.scale.shape
    return {
        name + ".weight": (norm.scale, (dim,), identity),
        name + ".bias": (norm.bias, (dim,), identity),
    }


def _vision_targets(tower: VisionTower, prefix: str) -> dict[str, Target]:
    c = tower.config
    d, h, k = c.hidden_size, c.num_heads, c.head_dim
    conv_shape = (d, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
    targets: dict[str, Target] = {
        prefix + "patch_embed.proj.weight": (
            tower.patch_kernel,
            conv_shape,
            ConvAsMatmul(conv_shape),
        ),
        prefix + "patch_embed.proj.bias": (tower.patch_bias, (d,), identity),
        prefix + "pos_embed.weight": (tower.pos_embed, (c.num_position_embeddings, d), identity),
    }
    for i, block in enumerate(tower.blocks):
        p = f"{prefix}blocks.{i}."
        attn = block.attn
        targets |= _norm_targets(p + "norm1", block.norm1)
        targets |= _norm_targets(p + "norm2", block.norm2)
        targets |= {
            p + "attn.qkv.weight": (attn.qkv_d3hk, (3 * d, d), transposed((d, 3, h, k))),
            p + "attn.qkv.bias": (attn.qkv_bias_3hk, (3 * d,), Reshaped((3, h, k), (3 * d,))),
            p + "attn.proj.weight": (attn.proj_hkd, (d, d), transposed((h, k, d))),
            p + "attn.proj.bias": (attn.proj_bias, (d,), identity),
        }
        targets |= _linear_targets(p + "mlp.linear_fc1", block.mlp.fc1_df, block.mlp.fc1_bias)
        targets |= _linear_targets(p + "mlp.linear_fc2", block.mlp.fc2_fd, block.mlp.fc2_bias)
    mergers = [(prefix + "merger.", tower.merger)] + [
        (f"{prefix}deepstack_merger_list.{j}.", m) for j, m in enumerate(tower.deepstack_mergers)
    ]
    for p, merger in mergers:
        targets |= _norm_targets(p + "norm", merger.norm)
        targets |= _linear_targets(p + "linear_fc1", merger.fc1_ww, merger.fc1_bias)
        targets |= _linear_targets(p + "linear_fc2", merger.fc2_we, merger.fc2_bias)
    return targets


def qwen3_vl_targets(model: Qwen3VLForConditionalGeneration) -> dict[str, Target]:
    """Checkpoint tensor name -> (parameter, checkpoint shape, converter), transformers 5 names.

    Converters are `identity`, `transposed(shape)`, or `Reshaped` / `ConvAsMatmul`, which carry
    an `inverse` for export.
    """
    text = model.config.text
    targets = decoder_targets(model, text, "model.language_model.")
    targets |= _vision_targets(model.visual, "model.visual.")
    return targets | lm_head_targets(model, text)


def qwen3_vl_hf_config(config: Qwen3VLConfig, *, dtype: str = "bfloat16") -> dict[str, Any]:
    """The transformers `config.json` dict of a `Qwen3VLForConditionalGeneration` with this
    config (everything `Qwen3VLConfig.from_hf` reads, so export and import round-trip)."""
    text, vision = config.text, config.vision
    rope = {
        **text.rope.to_hf(),
        "mrope_section": list(config.mrope_section),
        "mrope_interleaved": True,  # the only MRoPE layout of Qwen3-VL (and of this port)
    }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": text.vocab_size,
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "head_dim": text.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": text.rms_norm_eps,
            "max_position_embeddings": text.max_position_embeddings,
            "rope_parameters": rope,
            "attention_bias": False,
            "tie_word_embeddings": text.tie_word_embeddings,
            "dtype": dtype,
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision",
            "depth": vision.depth,
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_heads": vision.num_heads,
            "out_hidden_size": vision.out_hidden_size,
            "num_position_embeddings": vision.num_position_embeddings,
            "deepstack_visual_indexes": list(vision.deepstack_visual_indexes),
            "in_channels": vision.in_channels,
            "patch_size": vision.patch_size,
            "temporal_patch_size": vision.temporal_patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "hidden_act": vision.hidden_act,
            "rope_parameters": {"rope_type": "axial", "rope_theta": vision.rope_theta},
            "dtype": dtype,
        },
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "tie_word_embeddings": text.tie_word_embeddings,
        "dtype": dtype,
    }


def load_qwen3_vl(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    remat: bool = False,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> Qwen3VLForConditionalGeneration:
    """Loads a `Qwen3VLForConditionalGeneration` checkpoint directory (float32 parameters).

    `dtype` is the compute dtype; `remat` recomputes each text decoder layer in the backward
    pass. With `mesh`, every parameter is created sharded over it (logical axes mapped by
    `rules`), reading only the blocks the local devices hold (see `hf.fill_from_checkpoint`).
    Raises FileNotFoundError for a missing directory, config.json or safetensors files, and
    ValueError naming the tensor for a missing, unexpected or misshapen one.
    """
    config = Qwen3VLConfig.from_hf(read_config(Path(path)), dtype=dtype, remat=remat)
    build = functools.partial(Qwen3VLForConditionalGeneration, config)
    return load_decoder_model(path, build, qwen3_vl_targets, mesh=mesh, rules=rules)
