"""Learner checkpoints (save, restore into another mesh, keep-N, resume) and policy publishing."""

import logging
import os

import jax
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from learner_cases import optim_config

from vimrag_jax import checkpointing, optim, publish
from vimrag_jax.models.standin import StandinConfig, StandinPolicy
from vimrag_jax.parallel import mesh as mesh_lib
from vimrag_jax.parallel import step

OPTIM = optim_config(warmup_steps=2, total_steps=10, accumulate_steps=2)


def _model_fn(embed_dim=16):
    return lambda: StandinPolicy(StandinConfig(embed_dim=embed_dim), rngs=nnx.Rngs(0))


def _state(mesh):
    return step.create_train_state(_model_fn(), optim.make_optimizer(OPTIM), mesh)[1:]


def _abstract(mesh, embed_dim=16):
    optimizer = optim.make_optimizer(OPTIM)
    return checkpointing.abstract_train_state(_model_fn(embed_dim), optimizer, mesh)


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_save_then_restore_into_another_mesh_keeps_values_and_latest(tmp_path):
    state, _ = _state(mesh_lib.make_mesh(2, 4, 1))
    saved = {}
    with checkpointing.Checkpointer(tmp_path, every_steps=2, keep=2) as ckpt:
        for i in range(7):
            state = state.replace(step=state.step + 1)
            if ckpt.save(i, state, data_state={"shard": i}, metadata={"policy_version": i}):
                saved[i] = _host(state)
        assert not ckpt.should_save(7)
    assert sorted(saved) == [0, 2, 4, 6]

    # A new run (as after a restart) on a different mesh shape resumes from the newest step.
    abstract = _abstract(mesh_lib.make_mesh(1, 2, 4))
    ckpt = checkpointing.Checkpointer(tmp_path, every_steps=2, keep=2)
    assert ckpt.all_steps() == [4, 6]  # keep=2
    state, data_state, metadata = ckpt.restore_latest(abstract)
    ckpt.close()
    assert data_state == {"shard": 6} and metadata == {"policy_version": 6}
    assert int(state.step) == 7
    for got, want in zip(_host(state), saved[6], strict=True):
        np.testing.assert_array_equal(got, want)
    kernel = state.params["up_current"]["kernel"].get_value()
    assert kernel.sharding == abstract.params["up_current"]["kernel"].get_value().sharding
    assert kernel.addressable_shards[0].data.shape == (8, 8)  # fsdp=2 x tensor=4


def test_empty_workdir_restores_nothing_and_mismatch_is_named(tmp_path):
    mesh = mesh_lib.make_mesh(8, 1, 1)
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    tree = {
        "w": jax.device_put(np.arange(16.0), sharding),
        "b": jax.device_put(np.ones(8), sharding),
    }
    abstract = checkpointing.abstract_state(tree, jax.tree.map(lambda _: sharding, tree))
    with checkpointing.Checkpointer(tmp_path, every_steps=1, keep=1, async_save=False) as ckpt:
        assert ckpt.restore_latest(abstract) is None
        ckpt.save(0, tree)
    with checkpointing.Checkpointer(tmp_path, every_steps=1, keep=1) as ckpt:
        restored = ckpt.restore_latest(abstract)
        np.testing.assert_array_equal(restored.state["w"], np.arange(16.0))
        abstract["w"] = jax.ShapeDtypeStruct((8,), np.float32, sharding=sharding)
        abstract["extra"] = abstract["b"]
        with pytest.raises(checkpointing.CheckpointMismatchError) as err:
            ckpt.restore_latest(abstract)
    message = str(err.value)
    assert "w: saved (16,), expected (8,)" in message
    assert "not in the checkpoint: ['extra']" in message


def test_bad_items_and_options_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.checkpoint"):
        checkpointing.Checkpointer(tmp_path, every_steps=0, keep=1)
    with checkpointing.Checkpointer(tmp_path, every_steps=1, keep=1) as ckpt:
        with pytest.raises(TypeError, match="data item is not JSON-serialisable"):
            ckpt.save(0, {"x": np.zeros(2)}, data_state={"bad": object()})


def test_run_metadata_holds_the_config_as_json():
    cfg = ml_collections.ConfigDict({"optim": OPTIM.to_dict(), "preset": "tiny"})
    meta = checkpointing.run_metadata(cfg, 3, note="x")
    assert meta["policy_version"] == 3 and meta["note"] == "x"
    assert meta["config"]["optim"]["accumulate_steps"] == 2


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _from_orbax(records):
    package = os.sep + "orbax" + os.sep
    return [r for r in records if package in r.pathname]


def test_orbax_info_lines_are_kept_off_the_console_but_warnings_pass(tmp_path):
    root, absl_logger = logging.getLogger(), logging.getLogger("absl")
    levels = root.level, absl_logger.level
    loud, quiet = _Collect(), _Collect()
    checkpointing.quiet_orbax_info(quiet)
    checkpointing.quiet_orbax_info(quiet)  # a second call adds no second filter
    assert len(quiet.filters) == 1
    for handler in (loud, quiet):
        root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    absl_logger.setLevel(logging.DEBUG)
    try:
        mesh = mesh_lib.make_mesh(8, 1, 1)
        with checkpointing.Checkpointer(tmp_path, every_steps=1, keep=1) as ckpt:
            ckpt.save(1, _state(mesh)[0])
        warning = logging.LogRecord(
            "absl", logging.WARNING, _from_orbax(loud.records)[0].pathname, 1, "w", None, None
        )
        for handler in (loud, quiet):
            handler.handle(warning)
        logging.getLogger("vimrag_jax.test").info("ours")
    finally:
        for handler in (loud, quiet):
            root.removeHandler(handler)
        root.setLevel(levels[0])
        absl_logger.setLevel(levels[1])
    assert len(_from_orbax(loud.records)) > 5  # a save does log at INFO
    assert _from_orbax(quiet.records) == [warning]
    assert [r.getMessage() for r in quiet.records if r.name == "vimrag_jax.test"] == ["ours"]


# --- policy publishing (vimrag_jax.publish) -------------------------------------------


def test_publish_then_load_gives_the_same_params_with_shardings(tmp_path):
    mesh = mesh_lib.make_mesh(2, 4, 1)
    abstract = _abstract(mesh).params
    params = jax.tree.map(
        lambda a: jax.device_put(
            np.random.default_rng(a.size).normal(size=a.shape).astype(a.dtype), a.sharding
        ),
        abstract,
    )
    assert publish.latest_policy(tmp_path) is None
    path = publish.publish_policy(params, tmp_path, version=1)
    assert publish.latest_policy(tmp_path) == (1, path)
    loaded = publish.load_policy(path, abstract)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == want.sharding
    # Host arrays in, host arrays out; bfloat16 survives the trip through safetensors.
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)}
    path = publish.publish_policy(tree, tmp_path, version=2)
    back = publish.load_policy(path, tree)
    assert back["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back["w"], tree["w"])
    with pytest.raises(ValueError, match="shape"):
        publish.load_policy(path, {"w": jax.ShapeDtypeStruct((3, 2), np.float32)})


def test_publish_is_atomic_monotonic_and_pruned(tmp_path):
    tree = {"b": np.zeros(3, np.float32)}
    for version in (1, 2, 5):
        publish.publish_policy({"b": tree["b"] + version}, tmp_path, version, keep=2)
    assert publish.published_versions(tmp_path) == [2, 5]
    with pytest.raises(ValueError, match="not newer"):
        publish.publish_policy(tree, tmp_path, 5)

    # A publisher that died mid-write left a temp dir (even a complete-looking one) behind.
    root = tmp_path / publish.POLICY_DIR
    crashed = root / ".tmp-v00000009-dead"
    crashed.mkdir()
    (crashed / publish.INFO_FILE).write_text('{"version": 9}')
    version, path = publish.latest_policy(tmp_path)
    assert version == 5
    np.testing.assert_array_equal(publish.load_policy(path, tree)["b"], 5.0)
    # A LATEST that is missing still resolves to the newest complete version.
    (root / publish.LATEST).unlink()
    assert publish.latest_policy(tmp_path)[0] == 5
    publish.publish_policy(tree, tmp_path, 6, keep=2)
    assert not crashed.exists()
    assert (root / publish.LATEST).read_text().strip() == "6"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["LATEST", publish.HISTORY_FILE, "v00000005", "v00000006"]
