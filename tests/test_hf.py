"""Hugging Face export (transformers reads it back) and loading straight into sharded arrays."""

import dataclasses
import json
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tiny_models import tiny_qwen3

from vimrag_jax.models.hf import (
    export_checkpoint,
    from_pretrained,
    identity,
    iter_safetensors,
    load_qwen3,
    qwen3_targets,
    save_pretrained,
    transposed,
)
from vimrag_jax.models.presets import PRESETS, init_model, preset_config
from vimrag_jax.parallel.mesh import make_mesh
from vimrag_jax.parallel.sharding import param_shardings

_TINY = tiny_qwen3(vocab_size=96, max_position_embeddings=64, rope_theta=1e6)
_IDS = np.random.default_rng(0).integers(0, _TINY["vocab_size"], size=(2, 10)).astype(np.int32)


def _save_tiny(directory, tied: bool, torch_dtype=torch.float32) -> None:
    torch.manual_seed(1)
    config = transformers.Qwen3Config(**_TINY, tie_word_embeddings=tied, bos_token_id=3)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # ones would hide a misplaced norm
                param.uniform_(0.5, 1.5)
    model.to(torch_dtype).save_pretrained(directory)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def source(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("source")
    _save_tiny(directory, tied=request.param)
    return directory, from_pretrained(directory)


def _params(model) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, path)): np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


@nnx.jit
def _logits(model, input_ids):
    return model(input_ids)


def _torch_logits(directory, dtype=torch.float32) -> np.ndarray:
    model = transformers.Qwen3ForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(_IDS).long()).logits.float().numpy()


def _header(file) -> dict:
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def test_float32_export_loads_in_transformers_with_equal_logits(source, tmp_path):
    _, ours = source
    save_pretrained(ours, tmp_path, dtype="float32", extra_config={"bos_token_id": 3})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert config["dtype"] == "float32" and config["bos_token_id"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    names = set(_header(tmp_path / "model.safetensors")) - {"__metadata__"}
    assert ("lm_head.weight" in names) != ours.config.tie_word_embeddings
    np.testing.assert_allclose(
        _torch_logits(tmp_path), np.asarray(_logits(ours, _IDS)), rtol=1e-4, atol=1e-5
    )


def test_float32_export_reloads_to_equal_parameters(source, tmp_path):
    _, ours = source
    save_pretrained(ours, tmp_path, dtype="float32")
    back = from_pretrained(tmp_path)
    assert back.config == ours.config
    theirs, mine = _params(back), _params(ours)
    assert theirs.keys() == mine.keys()
    for key in mine:
        np.testing.assert_array_equal(theirs[key], mine[key], err_msg=key)


def test_bfloat16_export_writes_bf16_tensors(source, tmp_path):
    directory, ours = source
    save_pretrained(ours, tmp_path)  # bfloat16 is the default
    header = _header(tmp_path / "model.safetensors")
    assert {entry["dtype"] for name, entry in header.items() if name != "__metadata__"} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    back = _params(from_pretrained(tmp_path))
    for key, value in _params(ours).items():
        rounded = value.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(back[key], rounded, err_msg=key)
    # transformers reads it too, and its bf16 logits stay near the f32 ones.
    reference = _torch_logits(directory)
    bf16 = _torch_logits(tmp_path, dtype=torch.bfloat16)
    assert np.linalg.norm(bf16 - reference) / np.linalg.norm(reference) < 3e-2


def test_sharded_export_round_trips(source, tmp_path):
    directory, ours = source
    save_pretrained(ours, tmp_path, dtype="float32", max_shard_bytes=40_000)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    for file in files:  # every tensor here is smaller than the limit, so every shard fits
        data = sum(
            np.prod(e["shape"]) * 4 for n, e in _header(tmp_path / file).items() if n[0] != "_"
        )
        assert 0 < data <= 40_000, file
    back = _params(from_pretrained(tmp_path))
    for key, value in _params(ours).items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    np.testing.assert_allclose(
        _torch_logits(tmp_path), _torch_logits(directory), rtol=1e-5, atol=1e-6
    )
    # Exporting again, unsharded, into the same directory leaves no stale shards behind.
    save_pretrained(ours, tmp_path, dtype="float32")
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_export_uses_the_import_table(source):
    _, ours = source
    for name, (param, shape, converter) in qwen3_targets(ours).items():
        value = np.asarray(param.get_value())
        checkpoint = converter.inverse(value, shape)
        assert checkpoint.shape == shape, name
        np.testing.assert_array_equal(converter(checkpoint), value, err_msg=name)


def test_converters():
    w = np.arange(24, dtype=np.float32).reshape(6, 4)  # torch [out=2*3, in=4]
    conv = transposed((4, 2, 3))
    np.testing.assert_array_equal(conv(w), w.T.reshape(4, 2, 3))
    np.testing.assert_array_equal(conv.inverse(conv(w), (6, 4)), w)
    o = np.arange(24, dtype=np.float32).reshape(4, 6)  # o_proj: [out=d, in=h*k]
    conv_o = transposed((2, 3, 4))
    np.testing.assert_array_equal(conv_o(o), o.T.reshape(2, 3, 4))
    np.testing.assert_array_equal(conv_o.inverse(conv_o(o), (4, 6)), o)
    assert np.shares_memory(conv(w), w)  # a view, so sharded loading can slice it lazily
    assert identity(w) is w


def test_export_errors(source, tmp_path):
    _, ours = source
    with pytest.raises(ValueError, match="dtype"):
        save_pretrained(ours, tmp_path, dtype="float16")
    with pytest.raises(ValueError, match="contradicts"):
        save_pretrained(ours, tmp_path, extra_config={"hidden_size": 3})
    with pytest.raises(NotImplementedError, match="Qwen3ForCausalLM"):
        save_pretrained(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), tmp_path)
    param = nnx.Param(np.zeros((2, 2), np.float32))
    with pytest.raises(TypeError, match="inverse"):
        export_checkpoint({"w": (param, (2, 2), lambda w: w)}, {}, tmp_path)


class _Flatten:
    """A converter whose `inverse` takes one argument (as Qwen3-VL's `Reshaped` does)."""

    def __call__(self, w):
        return w.reshape(2, 3)

    def inverse(self, x):
        return x.reshape(6)


def test_export_accepts_one_argument_inverses(tmp_path):
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    targets = {"b": (nnx.Param(value), (6,), _Flatten())}
    export_checkpoint(targets, {"model_type": "x"}, tmp_path, dtype="float32")
    assert {n: a.tolist() for n, a in iter_safetensors(tmp_path)} == {"b": list(range(6))}


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(1, 4, 2)


@pytest.mark.parametrize("torch_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_sharded_load_equals_unsharded(mesh, tmp_path, torch_dtype):
    _save_tiny(tmp_path, tied=False, torch_dtype=torch_dtype)
    plain = load_qwen3(tmp_path)
    sharded = from_pretrained(tmp_path, mesh=mesh)
    expected = param_shardings(nnx.state(sharded, nnx.Param), mesh)
    flat_expected = dict(nnx.to_flat_state(expected))
    plain_params = _params(plain)
    split = 0
    for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        array = var.get_value()
        key = "/".join(map(str, path))
        want = flat_expected[path].get_value()
        assert isinstance(array.sharding, NamedSharding) and array.sharding == want, key
        assert array.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(array), plain_params[key], err_msg=key)
        split += want.spec != PartitionSpec()
    assert split >= 10  # most parameters really are split over the 8 devices
    q = sharded.layers[0].attn.q_dhk.get_value()
    assert q.sharding.spec == PartitionSpec("fsdp", "tensor", None)
    assert {shard.data.shape for shard in q.addressable_shards} == {(16, 2, 16)}
    np.testing.assert_allclose(
        np.asarray(_logits(sharded, _IDS)), np.asarray(_logits(plain, _IDS)), rtol=1e-5, atol=1e-5
    )
    # A sharded model exports like any other (gathered one shard file at a time).
    save_pretrained(sharded, tmp_path / "out", dtype="float32", max_shard_bytes=50_000)
    back = _params(load_qwen3(tmp_path / "out"))
    for key, value in plain_params.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


# Published total parameter counts (embeddings counted once when tied), in billions.
_PUBLISHED = {
    "qwen3-0.6b": 0.596,
    "qwen3-1.7b": 1.721,
    "qwen3-4b": 4.022,
    "qwen3-8b": 8.191,
    "qwen3-vl-2b-instruct": 2.128,
    "qwen3-vl-4b-instruct": 4.438,
    "qwen3-vl-8b-instruct": 8.767,
}


def _count(model) -> int:
    return sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _counts(hf: dict) -> tuple[int, int]:
    """(ours via nnx.eval_shape, transformers' on the meta device) parameter counts."""
    ours = nnx.eval_shape(lambda: init_model(hf, rngs=nnx.Rngs(0)))
    if hf["model_type"] == "qwen3":
        cls, config = transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**hf)
    else:
        cls = transformers.Qwen3VLForConditionalGeneration
        config = transformers.Qwen3VLConfig(**hf)
    with torch.device("meta"):  # shapes only, no memory
        theirs = sum(p.numel() for p in cls(config).parameters())
    return _count(ours), theirs


def _with_depths(hf: dict, text_layers: int, vision_depth: int) -> dict:
    hf = json.loads(json.dumps(hf))
    text = hf.get("text_config", hf)
    text["num_hidden_layers"] = text["max_window_layers"] = text_layers
    if "vision_config" in hf:
        vision = hf["vision_config"]
        deepstack = len(vision["deepstack_visual_indexes"])
        vision["depth"] = vision_depth + deepstack
        vision["deepstack_visual_indexes"] = list(range(deepstack))
    return hf


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts(name):
    """Real widths, few layers (full depth is slow to trace): every piece matches transformers,
    and the count extrapolated to the real depth is the published one."""
    hf = preset_config(name)
    text = hf.get("text_config", hf)
    depth = hf["vision_config"]["depth"] if "vision_config" in hf else 0
    deepstack = len(hf["vision_config"]["deepstack_visual_indexes"]) if depth else 0
    base, base_theirs = _counts(_with_depths(hf, 1, 1))
    layer, layer_theirs = _counts(_with_depths(hf, 2, 1))
    assert (base, layer) == (base_theirs, layer_theirs)
    total = base + (text["num_hidden_layers"] - 1) * (layer - base)
    if depth:
        block, block_theirs = _counts(_with_depths(hf, 1, 2))
        assert block == block_theirs
        total += (depth - deepstack - 1) * (block - base)
    if name in _PUBLISHED:
        assert round(total / 1e9, 3) == _PUBLISHED[name]
    if name == "tiny":
        assert total == _count(nnx.eval_shape(lambda: init_model(name, rngs=nnx.Rngs(0))))


def test_remat_is_passed_through(source, tmp_path):
    directory, ours = source
    assert not ours.config.remat
    assert load_qwen3(directory, remat=True).config.remat
    assert from_pretrained(directory, remat=True).config == dataclasses.replace(
        ours.config, remat=True
    )
    abstract = nnx.eval_shape(lambda: init_model("tiny", rngs=nnx.Rngs(0), remat=True))
    assert abstract.config.remat
    assert not nnx.eval_shape(lambda: init_model("tiny", rngs=nnx.Rngs(0))).config.remat


def test_presets_lookup_and_tiny_model_runs():
    assert preset_config("Qwen/Qwen3-VL-8B-Instruct") == preset_config("qwen3vl_8b")
    config = preset_config("tiny")
    config["vocab_size"] = 7  # a copy: the table itself is untouched
    assert preset_config("tiny")["vocab_size"] == 2048
    with pytest.raises(ValueError, match="qwen3-0.6b"):
        preset_config("llama-7b")
    with pytest.raises(NotImplementedError, match="model_type"):
        init_model({"model_type": "llama"}, rngs=nnx.Rngs(0))
    model = init_model("tiny", rngs=nnx.Rngs(0), dtype="bfloat16")
    assert model.config.dtype == "bfloat16" and model.config.tie_word_embeddings
    logits = _logits(model, _IDS % 2048)
    assert logits.shape == (2, 10, 2048) and np.isfinite(np.asarray(logits)).all()
