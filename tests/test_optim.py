"""Optimizer: schedule values, clipping, decay mask, accumulation = one big-batch step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from learner_cases import optim_config

from vimrag_jax import checkpointing, optim
from vimrag_jax.models.standin import StandinConfig, StandinPolicy
from vimrag_jax.parallel import mesh as mesh_lib


def _cfg(**overrides) -> ml_collections.ConfigDict:
    base = dict(learning_rate=1.0, warmup_steps=4, total_steps=12, weight_decay=0.0)
    return optim_config(**{**base, "grad_clip": 0.0, **overrides})


def test_schedule_values_by_hand():
    lr = optim.learning_rate_schedule(_cfg())
    # Warmup reaches the peak at t = warmup - 1; cosine from t = 4 to t = 12, then flat.
    expected = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 8: 0.1 + 0.9 * 0.5, 12: 0.1, 30: 0.1}
    for t, value in expected.items():
        assert float(lr(t)) == pytest.approx(value, abs=1e-6), t
    assert float(lr(6)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.25)), abs=1e-6)
    constant = optim.learning_rate_schedule(_cfg(schedule="warmup_constant"))
    assert [float(constant(t)) for t in (1, 4, 30)] == pytest.approx([0.5, 1.0, 1.0])
    assert float(optim.learning_rate_schedule(_cfg(warmup_steps=0))(0)) == pytest.approx(1.0)


def test_learning_rate_at_counts_updates_not_micro_steps():
    cfg = _cfg(accumulate_steps=2)
    assert optim.micro_steps(cfg) == 24
    assert optim.learning_rate_at(cfg, 0) == pytest.approx(0.25)
    assert optim.learning_rate_at(cfg, 3) == pytest.approx(0.5)  # second update
    assert optim.learning_rate_at(cfg, 9) == pytest.approx(1.0)


def test_global_norm_clipping():
    # With a huge eps, Adam's first step is lr * g / (|g| + eps): proportional to g, so clipping
    # shows in the update (with eps ~ 0 Adam would hide any rescaling of g).
    eps = 1e3
    cfg = _cfg(grad_clip=1.0, eps=eps, warmup_steps=0)
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.array([6.0, 8.0])}  # norm 10 -> clipped to [0.6, 0.8]
    tx = optim.make_optimizer(cfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    clipped = np.array([0.6, 0.8])
    np.testing.assert_allclose(updates["w"], -clipped / (clipped + eps), rtol=1e-5)
    plain = optim.make_optimizer(_cfg(eps=eps, warmup_steps=0))
    unclipped, _ = plain.update(grads, plain.init(params), params)
    np.testing.assert_allclose(
        unclipped["w"], -np.array([6.0, 8.0]) / (np.array([6, 8]) + eps), rtol=1e-5
    )


def test_weight_decay_skips_vectors():
    cfg = _cfg(weight_decay=0.5, warmup_steps=0)
    params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3), "scale": jnp.ones(3)}
    tx = optim.make_optimizer(cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.5 * np.ones((2, 3)))  # -lr * wd * param
    np.testing.assert_array_equal(updates["bias"], 0.0)
    np.testing.assert_array_equal(updates["scale"], 0.0)


def _quadratic_loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def test_accumulation_equals_one_big_batch_step():
    rng = np.random.default_rng(0)
    k, micro, updates = 4, 3, 3
    x = rng.normal(size=(updates, k * micro, 5)).astype(np.float32)
    y = rng.normal(size=(updates, k * micro, 2)).astype(np.float32)
    init = {"w": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32), "b": jnp.zeros(2)}
    base = dict(learning_rate=0.1, warmup_steps=1, total_steps=updates, weight_decay=0.1)
    # grad_clip below the gradient norms, so clipping must act on the accumulated mean too.
    base["grad_clip"] = 0.5

    def make_step(tx):
        @jax.jit
        def train_step(params, state, x, y):
            step_updates, state = tx.update(jax.grad(_quadratic_loss)(params, x, y), state, params)
            return optax.apply_updates(params, step_updates), state

        return train_step

    big = optim.make_optimizer(_cfg(**base))
    big_step = make_step(big)
    params, state = init, big.init(init)
    for u in range(updates):
        params, state = big_step(params, state, x[u], y[u])
    expected = params

    accumulated = optim.make_optimizer(_cfg(accumulate_steps=k, **base))
    micro_step = make_step(accumulated)
    params, state = init, accumulated.init(init)
    for u in range(updates):
        for m in range(k):
            rows = slice(m * micro, (m + 1) * micro)
            params, state = micro_step(params, state, x[u, rows], y[u, rows])
            if u == 0 and m < k - 1:  # micro-steps before the k-th leave the parameters alone
                jax.tree.map(np.testing.assert_array_equal, params, init)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, expected
    )
    moved = np.abs(np.asarray(expected["w"]) - np.asarray(init["w"])).max()
    assert moved > 1e-2


def test_accumulation_state_is_sharded_like_the_params():
    mesh = mesh_lib.make_mesh(2, 4, 1)
    tx = optim.make_optimizer(_cfg(accumulate_steps=2, weight_decay=0.01))
    model_fn = lambda: StandinPolicy(StandinConfig(), rngs=nnx.Rngs(0))  # noqa: E731
    abstract = checkpointing.abstract_train_state(model_fn, tx, mesh)
    param = abstract.params["up_current"]["kernel"].get_value()
    accumulated = abstract.opt_state.acc_grads["up_current"]["kernel"].get_value()
    assert accumulated.sharding == param.sharding
    assert param.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert abstract.opt_state.mini_step.sharding.spec == jax.sharding.PartitionSpec()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="config.optim.accumulate_steps"):
        optim.make_optimizer(_cfg(accumulate_steps=0))
    with pytest.raises(ValueError, match="config.optim.schedule"):
        optim.make_optimizer(_cfg(schedule="linear"))
    with pytest.raises(ValueError, match="config.optim.grad_clip"):
        optim.make_optimizer(_cfg(grad_clip=-1.0))


def test_sft_optim_config_overrides_three_keys():
    cfg = ml_collections.ConfigDict(
        {"optim": _cfg().to_dict(), "sft": dict(learning_rate=0.5, warmup_steps=2, steps=7)}
    )
    sft = optim.sft_optim_config(cfg)
    assert (sft.learning_rate, sft.warmup_steps, sft.total_steps) == (0.5, 2, 7)
    assert sft.grad_clip == cfg.optim.grad_clip and cfg.optim.learning_rate == 1.0
