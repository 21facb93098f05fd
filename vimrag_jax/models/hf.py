"""Imports Hugging Face checkpoints (config.json + safetensors) into our NNX models.

Tensors are read with the `safetensors` numpy API (no torch, no pickle). numpy has no bfloat16,
so BF16 tensors are read from their raw bytes with the offsets in the file's header and viewed as
`ml_dtypes.bfloat16`. The model is first built abstractly (`nnx.eval_shape`), so no random
weights are materialised; every parameter is then filled from exactly one checkpoint tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from vimrag_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

_INDEX_FILE = "model.safetensors.index.json"

# name -> (the parameter to fill, checkpoint shape, checkpoint array -> our layout)
Target = tuple[nnx.Param, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {str(path)!r} does not exist.")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.json in checkpoint directory {str(path)!r}.")
    return json.loads(config_file.read_text())


def _safetensors_files(path: Path) -> list[Path]:
    index_file = path / _INDEX_FILE
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted({path / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{_INDEX_FILE} in {str(path)!r} names missing shards: {missing}"
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors files in checkpoint directory {str(path)!r}.")
    return files


def _bf16_tensor(file: Path, name: str) -> np.ndarray:
    # Layout: u64 little-endian header size, JSON header, then the data block it indexes.
    with open(file, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(header_size))[name]
        start, end = entry["data_offsets"]
        f.seek(8 + header_size + start)
        raw = f.read(end - start)
    return np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(entry["shape"])


def iter_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(name, numpy array)` for every tensor of a checkpoint directory, shard by shard."""
    for file in _safetensors_files(Path(path)):
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                if f.get_slice(name).get_dtype() == "BF16":
                    yield name, _bf16_tensor(file, name)
                else:
                    yield name, f.get_tensor(name)


def transposed(shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    # Torch Linear weights are [out, in]; our kernels are [in, out], then split into `shape`.
    return lambda w: w.T.reshape(shape)


def identity(w: np.ndarray) -> np.ndarray:
    return w


def _qwen3_targets(model: Qwen3ForCausalLM) -> dict[str, Target]:
    c = model.config
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    h, g, k = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    targets: dict[str, Target] = {
        "model.embed_tokens.weight": (model.embed_vd, (v, d), identity),
        "model.norm.weight": (model.final_norm.scale, (d,), identity),
    }
    if model.lm_head_dv is not None:
        targets["lm_head.weight"] = (model.lm_head_dv, (v, d), transposed((d, v)))
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn, mlp = layer.attn, layer.mlp
        targets |= {
            p + "input_layernorm.weight": (layer.input_norm.scale, (d,), identity),
            p + "post_attention_layernorm.weight": (layer.post_attn_norm.scale, (d,), identity),
            p + "self_attn.q_proj.weight": (attn.q_dhk, (h * k, d), transposed((d, h, k))),
            p + "self_attn.k_proj.weight": (attn.k_dgk, (g * k, d), transposed((d, g, k))),
            p + "self_attn.v_proj.weight": (attn.v_dgk, (g * k, d), transposed((d, g, k))),
            p + "self_attn.o_proj.weight": (attn.o_hkd, (d, h * k), transposed((h, k, d))),
            p + "self_attn.q_norm.weight": (attn.q_norm.scale, (k,), identity),
            p + "self_attn.k_norm.weight": (attn.k_norm.scale, (k,), identity),
            p + "mlp.gate_proj.weight": (mlp.gate_df, (f, d), transposed((d, f))),
            p + "mlp.up_proj.weight": (mlp.up_df, (f, d), transposed((d, f))),
            p + "mlp.down_proj.weight": (mlp.down_fd, (d, f), transposed((f, d))),
        }
    return targets


def fill_from_checkpoint(
    model: nnx.Module,
    targets: dict[str, Target],
    path: str | os.PathLike,
    *,
    ignore: Callable[[str], bool] = lambda name: False,
) -> None:
    """Fills every target parameter of an abstract `model` from the checkpoint at `path`.

    `targets` maps checkpoint tensor names to (parameter, checkpoint shape, converter);
    tensors for which `ignore(name)` is true are skipped. Raises ValueError naming the tensor
    for an unexpected, missing or misshapen one, and AssertionError when a parameter of the
    model has no target (a bug in the targets, not in the checkpoint).
    """
    filled: set[str] = set()
    for name, array in iter_safetensors(path):
        if ignore(name):
            continue
        if name not in targets:
            raise ValueError(f"Unexpected tensor {name!r} in checkpoint {str(path)!r}.")
        param, expected_shape, to_ours = targets[name]
        if tuple(array.shape) != expected_shape:
            raise ValueError(
                f"Tensor {name!r} has shape {tuple(array.shape)} in the checkpoint but the "
                f"config implies {expected_shape}."
            )
        param.set_value(jnp.asarray(to_ours(array).astype(np.float32)))
        filled.add(name)
    missing = sorted(set(targets) - filled)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"Checkpoint {str(path)!r} lacks {len(missing)} tensors: {shown}")
    abstract = [
        p
        for p, v in nnx.to_flat_state(nnx.state(model))
        if isinstance(v.get_value(), jax.ShapeDtypeStruct)
    ]
    if abstract:
        raise AssertionError(f"Parameters left unloaded: {abstract}")


def load_qwen3(path: str | os.PathLike, *, dtype: str = "float32") -> Qwen3ForCausalLM:
    """Loads a `Qwen3ForCausalLM` checkpoint directory; parameters are float32 on the host device.

    `dtype` is the compute dtype. Raises FileNotFoundError for a missing directory, config.json or
    safetensors files, and ValueError naming the tensor for a missing, unexpected or misshapen one.
    """
    path = Path(path)
    config = Qwen3Config.from_hf(read_config(path), dtype=dtype)
    model = nnx.eval_shape(lambda: Qwen3ForCausalLM(config, rngs=nnx.Rngs(0)))
    # Some tied checkpoints store the (identical) head anyway.
    tied_head = config.tie_word_embeddings
    fill_from_checkpoint(
        model,
        _qwen3_targets(model),
        path,
        ignore=lambda name: tied_head and name == "lm_head.weight",
    )
    return model


def from_pretrained(path: str | os.PathLike, *, dtype: str = "float32") -> nnx.Module:
    """Loads a Hugging Face checkpoint directory, choosing the model from its config.json."""
    hf = read_config(Path(path))
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if "Qwen3VLForConditionalGeneration" in architectures or model_type == "qwen3_vl":
        from vimrag_jax.models.qwen3_vl import load_qwen3_vl  # vision code loads on demand

        return load_qwen3_vl(path, dtype=dtype)
    if "Qwen3ForCausalLM" in architectures or (not architectures and model_type == "qwen3"):
        return load_qwen3(path, dtype=dtype)
    raise NotImplementedError(
        f"No importer for architectures={architectures} model_type={model_type!r}; "
        "supported: Qwen3ForCausalLM, Qwen3VLForConditionalGeneration."
    )
