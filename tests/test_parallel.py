"""Mesh, sharding rules, and the equivalence of the single-device, pjit and pmap update steps."""

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from vimrag_jax.models.standin import StandinConfig, StandinPolicy
from vimrag_jax.parallel import mesh as mesh_lib
from vimrag_jax.parallel import sharding, step
from vimrag_jax.rl.losses import LossConfig

ROWS, LENGTH, NODES = 16, 8, 6
MODEL = StandinConfig(vocab_size=32, embed_dim=16, mlp_dim=32)
LOSS = LossConfig.for_algorithm("ggpo")
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


# --- mesh --------------------------------------------------------------------------


def test_make_mesh_fills_the_remaining_devices_with_auto_axes():
    mesh = mesh_lib.make_mesh(2, -1, 1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3


def test_mesh_from_config_reads_the_three_axes():
    cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=2))
    assert dict(mesh_lib.mesh_from_config(cfg).shape) == {"data": 4, "fsdp": 1, "tensor": 2}


def test_mesh_errors_name_the_product_devices_and_config_keys():
    with pytest.raises(ValueError, match=r"multiply to 6 but there are 8 devices.*config\.mesh"):
        mesh_lib.make_mesh(2, 3, 1)
    with pytest.raises(ValueError, match=r"At most one mesh axis may be -1"):
        mesh_lib.make_mesh(-1, -1, 2)
    with pytest.raises(ValueError, match=r"config\.mesh\.fsdp=-1.*multiply to 3"):
        mesh_lib.make_mesh(3, -1, 1)


# --- rules -------------------------------------------------------------------------


def test_logical_rules_map_to_mesh_axes():
    spec = sharding.logical_to_mesh_spec
    assert spec(("vocab", "embed")) == PartitionSpec("tensor", "fsdp")
    assert spec(("batch", "length")) == PartitionSpec(("data", "fsdp"), None)
    assert spec(("embed", "heads", "head_dim")) == PartitionSpec("fsdp", "tensor", None)
    # A mesh axis shards one dimension only: the later use is dropped.
    assert spec(("heads", "vocab")) == PartitionSpec("tensor", None)
    with pytest.raises(ValueError, match="No sharding rule for logical axis 'experts'"):
        spec(("experts", "embed"))


def test_rules_fall_back_to_replication_when_sizes_do_not_divide():
    mesh = mesh_lib.make_mesh(2, 4, 1)
    spec = sharding.logical_to_mesh_spec
    # 6 rows: data x fsdp = 8 does not divide, data = 2 does.
    assert spec(("batch", "embed"), shape=(6, 16), mesh=mesh) == PartitionSpec("data", "fsdp")
    assert spec(("embed",), shape=(6,), mesh=mesh) == PartitionSpec(None)
    shardings = sharding.batch_shardings({"x": np.zeros((16, 3)), "s": np.zeros(())}, mesh)
    assert shardings["x"].spec == PartitionSpec(("data", "fsdp"), None)
    assert shardings["s"].spec == PartitionSpec()


# --- the update step ---------------------------------------------------------------


def _random_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """4 trajectories x 4 segments; segment_valid is uneven across every 2-row shard."""
    rng = np.random.default_rng(seed)
    num_trajectories = ROWS // 4
    adjacency = np.zeros((num_trajectories, NODES, NODES), bool)
    node_valid = np.zeros((num_trajectories, NODES), bool)
    answer_node = np.zeros(num_trajectories, np.int32)
    for t in range(num_trajectories):  # test data only, built on the host
        n = int(rng.integers(3, NODES + 1))
        node_valid[t, :n] = True
        for child in range(1, n):
            parents = rng.random(child) < 0.4
            parents[rng.integers(child)] = True
            adjacency[t, :child, child] = parents
        answer_node[t] = n - 1 if t != 3 else -1
    reward = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
    relevant = (rng.random((num_trajectories, NODES)) < 0.5) & node_valid
    trajectory = np.repeat(np.arange(num_trajectories), 4)
    prompt_length = rng.integers(2, LENGTH - 1, ROWS)
    positions = np.arange(LENGTH)[None, :]
    segment_valid = np.array([1, 1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0], bool)
    return {
        "tokens": rng.integers(0, MODEL.vocab_size, (ROWS, LENGTH)).astype(np.int32),
        "loss_mask": positions >= prompt_length[:, None],
        "behavior_logprobs": np.zeros((ROWS, LENGTH), np.float32),  # filled on-policy below
        "segment_valid": segment_valid,
        "segment_node": rng.integers(0, 3, ROWS).astype(np.int32),
        "advantage": np.where(reward > 0, 1.0, -1.0)[trajectory].astype(np.float32),
        "reward": reward[trajectory],
        "answer_node": answer_node[trajectory],
        "adjacency": adjacency[trajectory],
        "node_valid": node_valid[trajectory],
        "relevant": relevant[trajectory],
    }


def _model_fn():
    return StandinPolicy(MODEL, rngs=nnx.Rngs(0))


def _optimizer():
    # SGD: its step is proportional to the gradient, so a wrong loss normalisation would show
    # (Adam's first step is about lr * sign(grad) and would hide it).
    return optax.inject_hyperparams(optax.sgd)(learning_rate=5.0)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _pjit_run(mesh, batch):
    optimizer = _optimizer()
    graphdef, state, state_shardings = step.create_train_state(_model_fn, optimizer, mesh)
    initial_params = _host(state.params)
    train_step = step.make_pjit_step(
        graphdef=graphdef,
        optimizer=optimizer,
        loss_config=LOSS,
        mesh=mesh,
        state_shardings=state_shardings,
        batch_shardings=sharding.batch_shardings(batch, mesh),
    )
    new_state, metrics = train_step(state, batch)
    return initial_params, new_state, _host(metrics)


@pytest.fixture(scope="module")
def reference():
    """One step on a single device, with behaviour log-probs near the initial policy's."""
    batch = _random_batch()
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, state, _ = step.create_train_state(_model_fn, _optimizer(), mesh)

    @jax.jit
    def logprobs(params, tokens):
        return step.token_logprobs(nnx.merge(graphdef, params)(tokens), tokens)

    logp = np.asarray(logprobs(state.params, batch["tokens"]))
    # Half the rows exactly on-policy, half slightly off so some GSPO ratios clip.
    noise = np.random.default_rng(1).normal(0.0, 2e-3, logp.shape).astype(np.float32)
    noise[::2] = 0.0
    batch["behavior_logprobs"] = np.where(batch["loss_mask"], logp + noise, 0.0)
    del state
    initial_params, new_state, metrics = _pjit_run(mesh, batch)
    return batch, initial_params, _host(new_state.params), metrics


def _assert_same_params(actual, expected):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, **TOLERANCE), actual, expected)


def _assert_same_metrics(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], err_msg=name, **TOLERANCE)


def test_reference_step_trains_something(reference):
    _, initial_params, params, metrics = reference
    assert metrics["grad_norm"] > 1e-3
    assert 0.0 < metrics["clip_fraction"] < 1.0
    assert "learning_rate" not in metrics  # the train loop logs optim.learning_rate_at
    moved = max(
        np.max(np.abs(a - b))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(initial_params), strict=True)
    )
    assert moved > 1e-3


@pytest.mark.parametrize(
    "shape, param_path, expected_spec, shard_shape",
    [
        # Size-1 mesh axes stay in the spec: they divide everything and shard nothing.
        ((2, 4, 1), ("embed", "embedding"), PartitionSpec("tensor", "fsdp"), (32, 4)),
        ((4, 1, 2), ("up_current", "kernel"), PartitionSpec("fsdp", "tensor"), (16, 16)),
    ],
    ids=["fsdp4xdata2", "tensor2xdata4"],
)
def test_pjit_step_matches_single_device(reference, shape, param_path, expected_spec, shard_shape):
    batch, initial_params, params, metrics = reference
    mesh = mesh_lib.make_mesh(*shape)
    got_initial, new_state, got_metrics = _pjit_run(mesh, batch)
    _assert_same_params(got_initial, initial_params)

    param = new_state.params[param_path[0]][param_path[1]].get_value()
    assert param.sharding.spec == expected_spec
    assert param.addressable_shards[0].data.shape == shard_shape

    _assert_same_params(_host(new_state.params), params)
    _assert_same_metrics(got_metrics, metrics)


def test_pmap_step_matches_single_device(reference):
    batch, initial_params, params, metrics = reference
    devices = jax.local_devices()
    optimizer = _optimizer()
    graphdef, _ = nnx.split(nnx.eval_shape(_model_fn), nnx.Param)
    host_state = step.TrainState(
        step=np.zeros((), np.int32),
        params=initial_params,
        opt_state=optimizer.init(initial_params),
    )
    train_step = step.make_pmap_step(graphdef=graphdef, optimizer=optimizer, loss_config=LOSS)
    new_state, got_metrics = train_step(
        step.replicate_for_pmap(host_state, devices), step.shard_batch_for_pmap(batch, devices)
    )
    new_state, got_metrics = step.unreplicate(new_state), _host(step.unreplicate(got_metrics))
    assert int(new_state.step) == 1
    _assert_same_params(_host(new_state.params), params)
    _assert_same_metrics(got_metrics, metrics)


def test_shard_batch_for_pmap_rejects_uneven_rows():
    batch = {"tokens": np.zeros((12, 4), np.int32)}
    with pytest.raises(ValueError, match="12 segment rows, not divisible by the 8 pmap devices"):
        step.shard_batch_for_pmap(batch, jax.local_devices())


def test_token_logprobs_reads_the_previous_position():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, (2, 5)).astype(np.int32)
    logp = np.asarray(step.token_logprobs(logits, tokens))
    log_softmax = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    expected = np.take_along_axis(log_softmax[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(logp[:, 1:], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(logp[:, 0], 0.0)
