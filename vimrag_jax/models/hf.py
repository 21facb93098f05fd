"""Hugging Face checkpoints (config.json + safetensors): import into NNX models, and export.

Tensors are read through a memory map of each safetensors file (the format is an 8-byte header
length, a JSON header of dtype/shape/offsets, then raw little-endian data), so no torch, no
pickle, and BF16 works although numpy lacks it (`ml_dtypes.bfloat16`). The model is first built
abstractly (`nnx.eval_shape`), so no random weights are materialised; every parameter is then
filled from exactly one checkpoint tensor, named by a `targets` table
`{checkpoint name: (parameter, checkpoint shape, converter)}`. Export walks the same table
backwards through each converter's `inverse`, so import and export cannot drift apart.

With a mesh, each parameter is created directly as a sharded `jax.Array`
(`jax.make_array_from_callback`): every addressable device's block is cut out of the memory map,
so only the pages holding that block are read and the host never holds more than one
device block (plus the OS page cache, which is reclaimable) at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vimrag_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from vimrag_jax.parallel.sharding import DEFAULT_RULES, Rules, logical_to_mesh_spec

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_EXPORT_DTYPES = {"float32": "F32", "bfloat16": "BF16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' own default shard size
M = TypeVar("M", bound=nnx.Module)


class Converter(Protocol):
    """Maps a checkpoint tensor to our layout (`__call__`) and back (`inverse`).

    `__call__` should return a view (reshape/transpose) where it can: sharded loading applies it
    to a memory-mapped tensor and slices the result, which then reads only the needed pages.
    `inverse(ours, checkpoint_shape)` returns the checkpoint layout.
    """

    def __call__(self, w: np.ndarray) -> np.ndarray: ...

    def inverse(self, x: np.ndarray, checkpoint_shape: tuple[int, ...]) -> np.ndarray: ...


# name -> (the parameter to fill, checkpoint shape, converter)
Target = tuple[nnx.Param, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


@dataclasses.dataclass(frozen=True)
class _Identity:
    """Checkpoint and our layout agree."""

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return w

    def inverse(self, x: np.ndarray, checkpoint_shape: tuple[int, ...] = ()) -> np.ndarray:
        return x


identity = _Identity()


@dataclasses.dataclass(frozen=True)
class Transposed:
    """A torch Linear weight `[out, in]` to our kernel `shape = in_dims + out_dims`.

    Equivalent to `w.T.reshape(shape)`, written as reshape-then-transpose so it stays a view.
    """

    shape: tuple[int, ...]

    def _split(self, in_size: int) -> int:
        # Number of leading dims of `shape` that make up the checkpoint's `in` axis.
        for split in range(len(self.shape) + 1):
            if math.prod(self.shape[:split]) == in_size:
                return split
        raise ValueError(f"Cannot split {self.shape} into in={in_size} x out dims.")

    def __call__(self, w: np.ndarray) -> np.ndarray:
        out_size, in_size = w.shape
        split = self._split(in_size)
        in_dims, out_dims = self.shape[:split], self.shape[split:]
        if math.prod(out_dims) != out_size:
            raise ValueError(f"Cannot view a {w.shape} weight as {self.shape}.")
        n_out = len(out_dims)
        order = tuple(range(n_out, n_out + split)) + tuple(range(n_out))
        return w.reshape(out_dims + in_dims).transpose(order)

    def inverse(self, x: np.ndarray, checkpoint_shape: tuple[int, ...]) -> np.ndarray:
        out_size, in_size = checkpoint_shape
        return x.reshape(in_size, out_size).T


def transposed(shape: tuple[int, ...]) -> Transposed:
    """Converter from a torch Linear weight `[out, in]` to our kernel of `shape` (in dims first)."""
    return Transposed(tuple(shape))


def _invert(converter: Any, x: np.ndarray, checkpoint_shape: tuple[int, ...]) -> np.ndarray:
    inverse = getattr(converter, "inverse", None)
    if inverse is None:
        raise TypeError(f"Converter {converter!r} has no `inverse`, so it cannot be exported.")
    # A one-argument inverse gives the right values in some layout of the right size.
    if len(inspect.signature(inverse).parameters) == 1:
        return np.reshape(inverse(x), checkpoint_shape)
    return inverse(x, checkpoint_shape)


# --------------------------------------------------------------------------- reading


def read_config(path: Path) -> dict[str, Any]:
    """The `config.json` dict of a checkpoint directory; FileNotFoundError names what is missing."""
    path = Path(path)
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


def _map_file(file: Path) -> dict[str, np.ndarray]:
    """Memory-mapped, read-only arrays for every tensor of one safetensors file."""
    with open(file, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
        if os.fstat(f.fileno()).st_size == 8 + header_size:
            buffer = np.zeros(0, np.uint8)  # mmap refuses empty data blocks
        else:
            buffer = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise ValueError(
                f"Tensor {name!r} in {str(file)!r} has dtype {entry['dtype']}; "
                f"supported: {sorted(_DTYPES)}."
            )
        start, end = entry["data_offsets"]
        data = buffer[8 + header_size + start : 8 + header_size + end]
        arrays[name] = data.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return arrays


def _map_checkpoint(path: Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for file in _safetensors_files(path):
        arrays |= _map_file(file)
    return arrays


def iter_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(name, numpy array)` for every tensor of a checkpoint directory, shard by shard."""
    for file in _safetensors_files(Path(path)):
        for name, array in _map_file(file).items():
            yield name, np.array(array)


# --------------------------------------------------------------------------- import


def _sharding_of(param: nnx.Variable, mesh: Mesh, rules: Rules) -> NamedSharding:
    # Same mapping as vimrag_jax.parallel.sharding.param_shardings, for one Variable.
    logical = param.get_metadata().get("out_sharding")
    if not logical:
        return NamedSharding(mesh, PartitionSpec())
    shape = param.get_value().shape
    return NamedSharding(mesh, logical_to_mesh_spec(tuple(logical), rules, shape=shape, mesh=mesh))


def _sharded_array(ours: np.ndarray, sharding: NamedSharding) -> jax.Array:
    blocks: dict[tuple, np.ndarray] = {}  # replicated devices ask for the same block

    def block(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in blocks:
            blocks[key] = np.asarray(ours[index], dtype=np.float32)
        return blocks[key]

    return jax.make_array_from_callback(ours.shape, sharding, block)


def fill_from_checkpoint(
    model: nnx.Module,
    targets: dict[str, Target],
    path: str | os.PathLike,
    *,
    ignore: Callable[[str], bool] = lambda name: False,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> None:
    """Fills every target parameter of an abstract `model` from the checkpoint at `path`.

    `targets` maps checkpoint tensor names to (parameter, checkpoint shape, converter);
    tensors for which `ignore(name)` is true are skipped. Parameters become float32; without a
    mesh they live on the default device, with one they are sharded by their logical axes under
    `rules` and built block by block (see the module docstring). Raises ValueError naming the
    tensor for an unexpected, missing or misshapen one, and AssertionError when a parameter of
    the model has no target (a bug in the targets, not in the checkpoint).
    """
    arrays = _map_checkpoint(Path(path))
    names = [name for name in arrays if not ignore(name)]
    unexpected = [name for name in names if name not in targets]
    if unexpected:
        raise ValueError(f"Unexpected tensor {unexpected[0]!r} in checkpoint {str(path)!r}.")
    missing = sorted(set(targets) - set(names))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"Checkpoint {str(path)!r} lacks {len(missing)} tensors: {shown}")
    for name in names:
        param, expected_shape, to_ours = targets[name]
        array = arrays[name]
        if tuple(array.shape) != tuple(expected_shape):
            raise ValueError(
                f"Tensor {name!r} has shape {tuple(array.shape)} in the checkpoint but the "
                f"config implies {tuple(expected_shape)}."
            )
        ours = to_ours(array)
        if mesh is None:
            param.set_value(jnp.asarray(np.asarray(ours, dtype=np.float32)))
        else:
            param.set_value(_sharded_array(ours, _sharding_of(param, mesh, rules)))
    del arrays  # drops the memory maps
    abstract = [
        p
        for p, v in nnx.to_flat_state(nnx.state(model))
        if isinstance(v.get_value(), jax.ShapeDtypeStruct)
    ]
    if abstract:
        raise AssertionError(f"Parameters left unloaded: {abstract}")


def decoder_targets(model: Any, config: Qwen3Config, prefix: str) -> dict[str, Target]:
    """The checkpoint-name table of a Qwen3 text decoder (embeddings, layers, final norm) whose
    tensors sit under `prefix` (`"model."` for Qwen3, `"model.language_model."` for Qwen3-VL);
    the LM head is the caller's, since its name does not share the prefix."""
    c = config
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    h, g, k = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    targets: dict[str, Target] = {
        prefix + "embed_tokens.weight": (model.embed_vd, (v, d), identity),
        prefix + "norm.weight": (model.final_norm.scale, (d,), identity),
    }
    for i, layer in enumerate(model.layers):
        p = f"{prefix}layers.{i}."
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


def lm_head_targets(model: Any, config: Qwen3Config) -> dict[str, Target]:
    """`lm_head.weight` when the head is untied, else nothing."""
    if model.lm_head_dv is None:
        return {}
    d, v = config.hidden_size, config.vocab_size
    return {"lm_head.weight": (model.lm_head_dv, (v, d), transposed((d, v)))}


def qwen3_targets(model: Qwen3ForCausalLM) -> dict[str, Target]:
    """The checkpoint-name table of a (possibly abstract) `Qwen3ForCausalLM`."""
    return decoder_targets(model, model.config, "model.") | lm_head_targets(model, model.config)


_qwen3_targets = qwen3_targets  # older private name


def load_qwen3(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    remat: bool = False,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    scan_layers: bool = False,
    remat_policy: str = "nothing_saveable",
) -> Qwen3ForCausalLM:
    """Loads a `Qwen3ForCausalLM` checkpoint directory; parameters are float32.

    `dtype` is the compute dtype; `remat` recomputes each layer in the backward pass (keeping
    what `remat_policy` names); `scan_layers` runs the layers of the full forward as one scan
    (the parameters, and so the checkpoint layout, are the same either way). Without
    `mesh` the parameters go to the default device; with one, each is created sharded over it
    (logical axes mapped by `rules`) and only the blocks the local devices hold are read.
    Raises FileNotFoundError for a missing directory, config.json or safetensors files, and
    ValueError naming the tensor for a missing, unexpected or misshapen one.
    """
    config = Qwen3Config.from_hf(
        read_config(Path(path)),
        dtype=dtype,
        remat=remat,
        scan_layers=scan_layers,
        remat_policy=remat_policy,
    )
    build = functools.partial(Qwen3ForCausalLM, config)
    return load_decoder_model(path, build, qwen3_targets, mesh=mesh, rules=rules)


def load_decoder_model(
    path: str | os.PathLike,
    build: Callable[..., M],
    targets_of: Callable[[M], dict[str, Target]],
    *,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> M:
    """Builds `build(rngs=...)` abstractly and fills it from the checkpoint at `path`.

    `targets_of(model)` is the model's checkpoint-name table; a tied model (no `lm_head_dv`)
    skips the `lm_head.weight` some tied checkpoints store anyway. See `fill_from_checkpoint`
    for `mesh`, `rules` and the errors.
    """
    model = nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0)))
    tied_head = model.lm_head_dv is None
    fill_from_checkpoint(
        model,
        targets_of(model),
        path,
        ignore=lambda name: tied_head and name == "lm_head.weight",
        mesh=mesh,
        rules=rules,
    )
    return model


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    remat: bool = False,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    scan_layers: bool = False,
    remat_policy: str = "nothing_saveable",
) -> nnx.Module:
    """Loads a Hugging Face checkpoint directory, choosing the model from its config.json.

    `dtype` is the compute dtype, `remat` rematerialises each decoder layer in the backward
    pass (keeping what `remat_policy` names), `scan_layers` runs the decoder layers of the
    full forward as one scan; with `mesh`, parameters are created sharded (see `load_qwen3`).
    """
    options = dict(dtype=dtype, remat=remat, scan_layers=scan_layers, remat_policy=remat_policy)
    hf = read_config(Path(path))
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if "Qwen3VLForConditionalGeneration" in architectures or model_type == "qwen3_vl":
        # Vision code loads on demand. As `qwen3_vl_hf.load_qwen3_vl`, with the text options.
        from vimrag_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration
        from vimrag_jax.models.qwen3_vl_hf import qwen3_vl_targets

        build = functools.partial(
            Qwen3VLForConditionalGeneration, Qwen3VLConfig.from_hf(hf, **options)
        )
        return load_decoder_model(path, build, qwen3_vl_targets, mesh=mesh, rules=rules)
    if "Qwen3ForCausalLM" in architectures or (not architectures and model_type == "qwen3"):
        return load_qwen3(path, mesh=mesh, rules=rules, **options)
    raise NotImplementedError(
        f"No importer for architectures={architectures} model_type={model_type!r}; "
        "supported: Qwen3ForCausalLM, Qwen3VLForConditionalGeneration."
    )


# --------------------------------------------------------------------------- export


def qwen3_hf_config(config: Qwen3Config, *, dtype: str = "bfloat16") -> dict[str, Any]:
    """The transformers `config.json` dict of a `Qwen3ForCausalLM` with this config."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": config.rope.to_hf(),
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "use_sliding_window": False,
        "dtype": dtype,
    }


def _write_safetensors(file: Path, tensors: dict[str, np.ndarray], code: str) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, array in tensors.items():
        header[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the data block 8-byte aligned
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
    tmp.replace(file)


def export_checkpoint(
    targets: dict[str, Target],
    hf_config: dict[str, Any],
    path: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes `config.json` and the target parameters as a Hugging Face safetensors checkpoint.

    Each parameter is mapped back through its converter's `inverse` and cast to `dtype`
    ("bfloat16" writes real BF16 tensors, "float32" F32). Tensors go into shards of at most
    `max_shard_bytes` (a larger single tensor gets a shard of its own) named like transformers'
    (`model-00001-of-00003.safetensors` + `model.safetensors.index.json`), or one
    `model.safetensors`. Parameters are gathered one shard at a time, so the host holds at most
    one shard; every parameter must be fully addressable from this process.
    """
    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"Export dtype must be one of {sorted(_EXPORT_DTYPES)}, got {dtype!r}.")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    np_dtype = _DTYPES[_EXPORT_DTYPES[dtype]]
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, (_, shape, _) in targets.items():
        size = math.prod(shape) * np_dtype.itemsize
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [*path.glob("*.safetensors"), path / _INDEX_FILE]:
        stale.unlink(missing_ok=True)  # leftovers would be read back as part of the model
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        file = _SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}"
        file = file if file.endswith(".safetensors") else file + ".safetensors"
        tensors = {}
        for name in names:
            param, shape, converter = targets[name]
            ours = np.asarray(jax.device_get(param.get_value()), dtype=np.float32)
            array = _invert(converter, ours, tuple(shape)).astype(np_dtype)
            if array.shape != tuple(shape):
                raise AssertionError(f"Inverse of {name!r} gave {array.shape}, expected {shape}.")
            tensors[name] = array
            weight_map[name] = file
            total += array.nbytes
        _write_safetensors(path / file, tensors, _EXPORT_DTYPES[dtype])
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / _INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def save_pretrained(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Exports `model` as a Hugging Face checkpoint directory that transformers loads.

    `Qwen3ForCausalLM` and `Qwen3VLForConditionalGeneration` are supported. The config is
    rebuilt from the model's own config (everything that affects the math); `extra_config`
    adds top-level fields it does not hold (e.g. `bos_token_id`, `eos_token_id` from the
    source checkpoint) and must not contradict it. Raises NotImplementedError for other models.
    """
    if isinstance(model, Qwen3ForCausalLM):
        hf_config = qwen3_hf_config(model.config, dtype=dtype)
        targets = qwen3_targets(model)
    else:
        from vimrag_jax.models import qwen3_vl, qwen3_vl_hf  # vision code loads on demand

        if not isinstance(model, qwen3_vl.Qwen3VLForConditionalGeneration):
            raise NotImplementedError(
                "save_pretrained supports Qwen3ForCausalLM and Qwen3VLForConditionalGeneration, "
                f"got {type(model).__name__}; other models can call export_checkpoint with "
                "their own targets."
            )
        hf_config = qwen3_vl_hf.qwen3_vl_hf_config(model.config, dtype=dtype)
        targets = qwen3_vl_hf.qwen3_vl_targets(model)
    for key, value in (extra_config or {}).items():
        if key in hf_config and key != "dtype" and hf_config[key] != value:
            raise ValueError(
                f"extra_config[{key!r}]={value!r} contradicts the model's {hf_config[key]!r}."
            )
        hf_config.setdefault(key, value)
    export_checkpoint(targets, hf_config, path, dtype=dtype, max_shard_bytes=max_shard_bytes)
