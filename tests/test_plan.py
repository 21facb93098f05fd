"""The planner (`python -m vimrag_jax.plan`), the analytic footprint `config_checks` uses, and the
activation pinning that keeps FSDP from replicating the batch (`parallel.sharding`)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import ggpo
from vimrag_jax import config_checks, footprint, plan
from vimrag_jax.models.attention import blocked_attend
from vimrag_jax.parallel.mesh import make_mesh
from vimrag_jax.parallel.sharding import constrain_rows, row_shards, under_mesh

ROOT = Path(__file__).resolve().parents[1]
GIB = footprint.GIB


def _small_config(rows: int, micro: int = 1):
    """The tiny preset with a long segment: big enough that the batch, not the model, decides."""
    cfg = ggpo.get_config("tiny")
    cfg.mesh.update(data=1, fsdp=-1)
    cfg.data.update(batch_segments=rows, max_segment_tokens=1024)
    cfg.optim.micro_batches = micro
    return cfg


@pytest.fixture(scope="module")
def plans():
    """One absurd batch (512 segments of 1,024 tokens in one pass) and the same batch in 16
    micro-batches, each compiled once for 8 devices of 2 GiB (one pass peaks at ~3.9 GiB per
    device, the micro-batched step at ~0.26 GiB)."""
    return {micro: plan.make_plan(_small_config(512, micro), 8, 2 * GIB) for micro in (1, 16)}


def test_an_absurd_batch_in_one_pass_does_not_fit_and_micro_batches_fix_it(plans):
    whole, split = plans[1], plans[16]
    assert not whole["fits"] and whole["bytes_per_device"] > 2 * GIB
    assert split["fits"] and split["bytes_per_device"] <= 2 * GIB
    # Activations scale with the rows of one pass; the state and the batch do not change.
    assert whole["activation_bytes"] > 8 * split["activation_bytes"]
    for key in ("params_bytes", "optimizer_bytes", "batch_bytes", "flops_per_step"):
        assert whole[key] == split[key], key
    assert whole["rows_per_pass"] == 64 and split["rows_per_pass"] == 4


def test_plan_figures_add_up(plans):
    p = plans[16]
    assert p["bytes_per_device"] == (
        p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["activation_bytes"]
    )
    # The arguments are the train state and the batch, as the shardings size them (within
    # 15 % on this 1M-parameter model, whose small replicated arrays XLA lays out apart).
    state_and_batch = p["params_bytes"] + p["optimizer_bytes"] + p["batch_bytes"]
    assert abs(p["argument_bytes"] - state_and_batch) < 0.15 * state_and_batch
    assert p["alias_bytes"] > 0.9 * (p["params_bytes"] + p["optimizer_bytes"])  # donated
    assert p["flops_per_step"] > 6 * 512 * 1024 * 1e6  # 6 N T with ~1M parameters
    text = plan.format_plan(p)
    assert "fits: peak" in text and "activations + temporaries" in text
    assert "DOES NOT FIT" in plan.format_plan(plans[1])


def test_the_command_ends_with_one_json_line():
    args = [
        sys.executable, "-m", "vimrag_jax.plan", "--config=configs/ggpo.py", "--devices=8",
        "--device_memory_gb=0.01", "--json", "--config.data.batch_segments=8",
    ]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]  # does not fit in 10 MiB
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for key in (
        "devices", "device_memory_bytes", "bytes_per_device", "fits", "params_bytes",
        "optimizer_bytes", "activation_bytes", "flops_per_step",
    ):  # fmt: skip
        assert key in out, key
    assert out["devices"] == 8 and out["fits"] is False
    assert out["device_memory_bytes"] == int(0.01 * GIB)
    assert "DOES NOT FIT" in done.stdout


def test_config_checks_refuse_what_cannot_fit_before_compiling(tmp_path):
    from vimrag_jax.models.presets import preset_config

    (tmp_path / "config.json").write_text(json.dumps(preset_config("qwen3-vl-2b-instruct")))
    cfg = ggpo.get_config("qwen3vl_2b")
    cfg.model.path = str(tmp_path)
    cfg.optim.micro_batches = 1  # 8 segments of 8,192 tokens per device in one pass
    cfg.mesh.device_memory_gb = 16.0
    problems = config_checks.find_problems(cfg, 8)
    assert (
        len(problems) == 1
        and "per device, more than config.mesh.device_memory_gb=16.0" in (problems[0])
    )
    assert "raise config.optim.micro_batches" in problems[0]
    cfg.mesh.device_memory_gb = 0.0  # unknown: not checked
    assert config_checks.find_problems(cfg, 8) == []
    cfg.mesh.device_memory_gb = -1
    assert config_checks.find_problems(cfg, 8) == [
        "config.mesh.device_memory_gb must be a number >= 0, got -1.0"
    ]


def test_footprint_state_is_exact_per_device():
    cfg = ggpo.get_config("qwen3vl_2b")
    need = footprint.estimate(cfg, 8)
    hf = footprint.model_hf_config(cfg)
    from flax import nnx

    model = nnx.eval_shape(footprint.model_fn(cfg, hf))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert 2.0e9 < count < 2.3e9  # Qwen3-VL-2B
    # float32 parameters split 8 ways (a few small replicated ones on top), Adam's two moments.
    assert count * 4 / 8 <= need.params_bytes < count * 4 / 8 * 1.05
    assert abs(need.optimizer_bytes - 2 * need.params_bytes) < 1e-3 * need.params_bytes
    # bfloat16 parameters (model.param_dtype): half the parameters, the same float32 moments.
    cfg.model.param_dtype = "bfloat16"
    narrow = footprint.estimate(cfg, 8)
    assert abs(narrow.params_bytes - need.params_bytes / 2) < 1e-3 * need.params_bytes
    assert narrow.optimizer_bytes == need.optimizer_bytes


def test_constrain_rows_pins_the_batch_axis_only_under_a_mesh():
    mesh = make_mesh(1, 8, 1)
    x = jnp.ones((16, 4))
    assert constrain_rows(x) is x and row_shards(16) == 1  # no mesh: unchanged
    fn = jax.jit(under_mesh(lambda x: constrain_rows(x * 2.0), mesh))
    out = fn(jax.device_put(x, NamedSharding(mesh, PartitionSpec())))
    assert out.sharding.spec[0] == ("data", "fsdp") or out.sharding.spec[0] == "fsdp"
    assert out.sharding.shard_shape(out.shape) == (2, 4)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert row_shards(16) == 8 and row_shards(12) == 1  # 8 does not divide 12


def test_blocked_attention_loops_within_each_devices_rows():
    # On CPU the attention takes 2 rows at a time; under a mesh each step takes 2 rows of every
    # device's block (no rows move between devices) and the result is unchanged.
    mesh = make_mesh(1, 8, 1)
    rng = np.random.default_rng(0)
    b, length, h, g, k = 32, 160, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, length, h, k)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(2, b, length, g, k)), jnp.float32)
    allowed = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (b, length, length))
    tiled = functools.partial(blocked_attend, block=64, batch_block=2)
    plain = jax.jit(tiled)
    meshed = jax.jit(under_mesh(tiled, mesh))
    want = plain(q, kv[0], kv[1], allowed)
    got = meshed(q, kv[0], kv[1], allowed)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_the_learner_reads_the_checkpoint_straight_into_its_shards(tmp_path):
    # Experiment.initial_params loads model.path with the mesh: every parameter arrives as a
    # sharded array (fsdp over 8 devices) equal to the whole-model load.
    import types

    import ml_collections
    from flax import nnx

    from vimrag_jax.experiment import Experiment
    from vimrag_jax.models.hf import from_pretrained, save_pretrained
    from vimrag_jax.models.presets import init_model, preset_config

    hf = preset_config("tiny")
    save_pretrained(init_model(hf, rngs=nnx.Rngs(3)), tmp_path, dtype="float32")
    cfg = ml_collections.ConfigDict(
        {"model": {"name": "hf", "path": str(tmp_path), "dtype": "float32"}}
    )
    mesh = make_mesh(1, 8, 1)
    params = Experiment.initial_params(types.SimpleNamespace(cfg=cfg), mesh)
    whole = nnx.state(from_pretrained(tmp_path), nnx.Param)
    leaves = jax.tree.leaves(params)
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in leaves)  # fmt: skip
    for got, want in zip(leaves, jax.tree.leaves(whole), strict=True):
        assert got.sharding.mesh.shape == mesh.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
