"""The learner on the real (tiny) Qwen3 policy: pjit and pmap steps agree, checkpoints resume."""

from __future__ import annotations

import jax
import learner_cases
import numpy as np
import pytest

from vimrag_jax.checkpointing import Checkpointer
from vimrag_jax.learner import (
    Learner,
    batch_token_counts,
    loss_inputs,
    trim_tokens,
)
from vimrag_jax.parallel.mesh import make_mesh
from vimrag_jax.rl.losses import LossConfig
from vimrag_jax.schema import LOSS_KEYS

_VOCAB, _DIMS = learner_cases.VOCAB, learner_cases.DIMS
_model_fn, _optimizer, _batch = learner_cases.model_fn, learner_cases.optimizer, learner_cases.batch


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(8, 1, 1)


def _learner(mesh, kind: str, length_bucket: int = 0) -> Learner:
    learner = Learner(
        _model_fn,
        _optimizer(),
        LossConfig.for_algorithm("ggpo"),
        mesh,
        step_kind=kind,
        length_bucket=length_bucket,
    )
    learner.initialize()
    return learner


def test_pjit_and_pmap_learners_agree(mesh):
    pjit, pmap = _learner(mesh, "pjit"), _learner(mesh, "pmap")
    for seed in range(2):
        batch = _batch(seed)
        m_pjit, m_pmap = pjit.train_step(batch), pmap.train_step(batch)
        for key in ("loss", "grad_norm", "clip_fraction", "masked_fraction_positive"):
            np.testing.assert_allclose(m_pjit[key], m_pmap[key], rtol=2e-5, atol=1e-7, err_msg=key)
    assert pjit.step == pmap.step == 2
    a, b = jax.device_get(pjit.params()), jax.device_get(pmap.params())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_fsdp_and_tensor_parallel_agree_with_data_parallel(mesh):
    # The real model's custom backward passes (attention, dense, SwiGLU, LM head) under a
    # mesh that splits parameters (fsdp) and heads / hidden units (tensor).
    plain, split = _learner(mesh, "pjit"), _learner(make_mesh(2, 2, 2), "pjit")
    batch = _batch(3)
    m_plain, m_split = plain.train_step(batch), split.train_step(batch)
    for key in ("loss", "grad_norm", "logprob_gap"):
        np.testing.assert_allclose(m_plain[key], m_split[key], rtol=2e-5, atol=1e-7, err_msg=key)
    a, b = jax.device_get(plain.params()), jax.device_get(split.params())
    # Adam's first step is ~lr * sign(g): a gradient entry near 0 whose float32 rounding
    # differs between the layouts can move by a fraction of lr (1e-3); all others agree.
    diffs = np.concatenate(
        [np.abs(np.asarray(x) - np.asarray(y)).ravel() for x, y in zip(
            jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
    )  # fmt: skip
    assert diffs.max() < 1e-4 and np.mean(diffs > 1e-6) < 1e-3


def test_trim_tokens_cuts_after_the_last_trained_token():
    batch = loss_inputs(_batch(0))
    batch["loss_mask"][:, 14:] = False  # last trained position: 13 -> 14 tokens needed
    for bucket, length in ((0, 24), (1, 14), (5, 15), (8, 16), (16, 16), (100, 24)):
        trimmed = trim_tokens(batch, bucket)
        for key, value in trimmed.items():
            want = (8, length) if key in ("tokens", "loss_mask", "behavior_logprobs") else None
            assert value.shape == (want or batch[key].shape), (bucket, key)
    batch["loss_mask"][:] = False  # nothing trained: one bucket survives
    assert trim_tokens(batch, 8)["tokens"].shape == (8, 8)
    with pytest.raises(ValueError, match="bucket"):
        trim_tokens(batch, -1)


def test_trimmed_batches_train_exactly_like_full_ones(mesh):
    # The causal policy makes the cut exact: same metrics, same parameters after two updates
    # (one of them cut to 16 of 24 tokens, one not cut at all).
    full, cut = _learner(mesh, "pjit"), _learner(mesh, "pjit", length_bucket=8)
    for seed, last in ((0, 13), (1, 23)):
        batch = _batch(seed)
        batch["loss_mask"][:, last + 1 :] = False
        m_full, m_cut = full.train_step(batch), cut.train_step(batch)
        for key in ("loss", "grad_norm", "clip_fraction", "logprob_gap"):
            np.testing.assert_allclose(m_full[key], m_cut[key], rtol=2e-5, atol=1e-7, err_msg=key)
    a, b = jax.device_get(full.params()), jax.device_get(cut.params())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        # Summation order differs with the length; Adam's normalisation can magnify the
        # float32 noise of a near-zero gradient entry to ~1e-6.
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_checkpoint_resume_restores_state_and_data_position(mesh, tmp_path):
    learner = _learner(mesh, "pjit")
    with Checkpointer(tmp_path, every_steps=1, keep=2, async_save=False) as ckpt:
        learner.train_step(_batch(0))
        learner.save(ckpt, 1, data_state={"cursor": 7}, metadata={"phase": "rl"})
        saved = jax.device_get(learner.params())
        learner.train_step(_batch(1))  # not saved: lost on "restart"
    resumed = Learner(
        _model_fn, _optimizer(), LossConfig.for_algorithm("ggpo"), mesh, step_kind="pmap"
    )
    with Checkpointer(tmp_path, every_steps=1, keep=2, async_save=False) as ckpt:
        restored = resumed.restore(ckpt)
        data_state, metadata = restored.data_state, restored.metadata
    assert (data_state, metadata, resumed.step) == ({"cursor": 7}, {"phase": "rl"}, 1)
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(resumed.params()), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_loss_inputs_and_token_counts():
    batch = _batch(0)
    batch["policy_version"] = np.zeros(8, np.int32)
    assert set(loss_inputs(batch)) == set(LOSS_KEYS)
    tokens, trained = batch_token_counts(batch, pad_token_id=0)
    assert (tokens, trained) == (6 * _DIMS.tokens, 6 * _DIMS.tokens // 2)
    del batch["advantage"]
    with pytest.raises(KeyError, match="advantage"):
        loss_inputs(batch)


def test_kl_to_the_frozen_reference_policy(mesh):
    loss_config = LossConfig.for_algorithm("ggpo", kl_coef=0.5)
    learner = Learner(_model_fn, _optimizer(), loss_config, mesh, step_kind="pjit")
    learner.initialize()
    batch = _batch(0)
    # At the start the policy is its own reference: k3 KL is exactly 0.
    first = learner.train_step(batch)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    second = learner.train_step(batch)  # one update later the policy has moved away
    assert second["kl"] > 0
    ref = learner.reference_logprobs(batch["tokens"])
    now = jax.device_get(learner._ref_fn(learner.params(), batch["tokens"]))
    assert not np.allclose(ref, now)


def test_recomputed_old_logprobs_reach_the_loss(mesh):
    loss_config = LossConfig.for_algorithm("ggpo", old_logprobs="recompute")
    learner = Learner(_model_fn, _optimizer(), loss_config, mesh, step_kind="pjit")
    learner.initialize()
    metrics = learner.train_step(_batch(0))
    # The ratio's denominator is the learner's own pre-update policy: every ratio is 1.
    assert metrics["ratio_min"] == pytest.approx(1.0) and metrics["ratio_max"] == pytest.approx(1.0)
    assert metrics["clip_fraction"] == 0.0 and metrics["tis_weight"] > 0.0


def test_minibatches_update_in_turn_against_the_policy_that_started_the_batch():
    # GSPO as published (loss.num_minibatches): pi_old's log-probs are computed once, before
    # the first minibatch; each minibatch is one update; the clip can bind only from the second.
    import dataclasses
    import functools

    from flax import nnx

    from vimrag_jax.optim import make_optimizer
    from vimrag_jax.parallel import step as step_lib

    config = dataclasses.replace(
        LossConfig.for_algorithm("ggpo"), old_logprobs="recompute", num_minibatches=2
    )
    optimizer = make_optimizer(learner_cases.optim_config(learning_rate=3e-2, warmup_steps=0))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, state, _ = step_lib.create_train_state(learner_cases.model_fn, optimizer, mesh)
    batch = loss_inputs(learner_cases.batch(3, rows=8))
    kwargs = dict(graphdef=graphdef, optimizer=optimizer, loss_config=config)
    new_state, metrics = jax.jit(functools.partial(step_lib.update, **kwargs))(state, batch)

    # The loop reference: two plain updates, each given the starting policy's log-probs.
    policy = nnx.merge(graphdef, state.params)
    old = np.asarray(step_lib.policy_logprobs(policy, batch["tokens"]))
    single = {**kwargs, "loss_config": dataclasses.replace(config, num_minibatches=1)}
    one = jax.jit(functools.partial(step_lib.update, **single))
    ref_state, states = state, []
    for rows in (slice(0, None, 2), slice(1, None, 2)):  # minibatch m: rows m, m + M, ...
        minibatch = {key: value[rows] for key, value in batch.items()}
        ref_state, ref_metrics = one(ref_state, {**minibatch, "old_logprobs": old[rows]})
        states.append(jax.device_get(ref_metrics))
    assert int(new_state.step) == int(state.step) + 2
    # Equal up to float reassociation, which Adam magnifies on parameters with a near-zero
    # second moment (about one entry in a thousand moves 1e-5 to 5e-4 at lr 3e-2).
    diffs = np.concatenate(
        [
            np.abs(np.asarray(a) - np.asarray(b)).ravel()
            for a, b in zip(
                jax.tree.leaves(jax.device_get(new_state.params)),
                jax.tree.leaves(jax.device_get(ref_state.params)),
                strict=True,
            )
        ]
    )
    assert diffs.max() < 1e-3 and diffs.mean() < 1e-6 and np.mean(diffs > 1e-5) < 2e-3
    clip = [float(metrics[f"clip_fraction/mb{m}"]) for m in range(2)]
    np.testing.assert_allclose(clip, [s["clip_fraction"] for s in states], atol=1e-6)
    assert clip[0] == 0.0 and clip[1] > 0.0  # ratio 1 on the first minibatch only
    want = max(float(s["ratio_max"]) for s in states)
    assert float(metrics["ratio_max"]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", ["pjit", "pmap"])
def test_both_steps_run_the_minibatches(mesh, kind):
    import dataclasses

    config = dataclasses.replace(
        LossConfig.for_algorithm("ggpo"), old_logprobs="recompute", num_minibatches=2
    )
    learner = Learner(_model_fn, _optimizer(), config, mesh, step_kind=kind)
    learner.initialize()
    metrics = learner.train_step(learner_cases.batch(5, rows=16))
    assert learner.step == 2  # one rollout batch, two optimizer updates
    assert metrics["clip_fraction/mb0"] == 0.0 and np.isfinite(metrics["loss"])


def test_micro_batches_accumulate_exactly_the_one_pass_gradient():
    # optim.micro_batches: K sequential passes, each normalised by the whole batch's S (SPEC
    # §4), so the summed loss, the gradient and the update equal one pass over all rows; the
    # metrics are merged from sums and extrema, not averaged per micro-batch. With K = 4 the
    # batch's padding rows (the last two) leave micro-batches of 2, 2, 1 and 1 valid segments,
    # which a mean of per-micro-batch means would weight unequally.
    import functools

    import optax

    from vimrag_jax.parallel import step as step_lib

    config = LossConfig.for_algorithm("ggpo", old_logprobs="recompute")
    optimizer = optax.sgd(1.0)  # the parameter change is the gradient itself (Adam's is ~sign)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, state, _ = step_lib.create_train_state(learner_cases.model_fn, optimizer, mesh)
    batch = loss_inputs(learner_cases.batch(4, rows=8))
    kwargs = dict(graphdef=graphdef, optimizer=optimizer, loss_config=config)
    results = {}
    for micro in (1, 2, 4):
        fn = jax.jit(functools.partial(step_lib.update, **kwargs, micro_batches=micro))
        copy = jax.tree.map(lambda x: x.copy(), state)
        results[micro] = jax.device_get(fn(copy, batch))
    (ref_state, ref_metrics) = results[1]
    for micro in (2, 4):
        new_state, metrics = results[micro]
        for key in ("loss", "grad_norm", "clip_fraction", "ratio_max", "tis_weight"):
            np.testing.assert_allclose(
                metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-7, err_msg=f"{micro}:{key}"
            )
        for x, y in zip(
            jax.tree.leaves(new_state.params), jax.tree.leaves(ref_state.params), strict=True
        ):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_micro_batches_compose_with_minibatches_on_both_steps(mesh):
    config = LossConfig.for_algorithm("ggpo", old_logprobs="recompute", num_minibatches=2)
    batch = learner_cases.batch(6, rows=32)
    out = {}
    for kind in ("pjit", "pmap"):
        for micro in (1, 2):
            learner = Learner(
                _model_fn, _optimizer(), config, mesh, step_kind=kind, micro_batches=micro
            )
            learner.initialize()
            out[kind, micro] = learner.train_step(batch), jax.device_get(learner.params())
    ref_metrics, ref_params = out["pjit", 1]
    for key, (metrics, params) in out.items():
        for name in ("loss", "grad_norm", "clip_fraction/mb1"):
            np.testing.assert_allclose(
                metrics[name], ref_metrics[name], rtol=2e-5, atol=1e-7, err_msg=f"{key}:{name}"
            )
        # Two Adam updates divide each gradient by its own size: where a gradient is near 0,
        # the rounding of another accumulation order moves that weight by up to ~2e-5 (seen:
        # 1 element of 8,192), while the loss and the gradient norm agree to 2e-5.
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=5e-5, err_msg=str(key))


def test_micro_batches_must_split_the_rows():
    from vimrag_jax.parallel.step import check_parts, take_part

    parts = [take_part({"x": np.arange(6)}, 3, p)["x"] for p in range(3)]
    np.testing.assert_array_equal(parts, [[0, 3], [1, 4], [2, 5]])
    with pytest.raises(ValueError, match="6 rows do not split into 4 micro-batches"):
        check_parts({"x": np.arange(6)}, 4, what="micro-batches")
    with pytest.raises(ValueError, match="micro_batches must be an int >= 1"):
        Learner(_model_fn, _optimizer(), LossConfig(), make_mesh(8, 1, 1), micro_batches=0)


def test_bfloat16_parameters_with_float32_optimizer_state():
    # model.param_dtype="bfloat16": the stored parameters are bf16 (half the memory), Adam's
    # moments float32; an update moves the parameters like the float32 learner's, to bf16
    # precision.
    import jax.numpy as jnp

    from vimrag_jax.footprint import with_param_dtype
    from vimrag_jax.optim import make_optimizer

    mesh = make_mesh(8, 1, 1)
    config = learner_cases.optim_config(learning_rate=1e-2, warmup_steps=0)
    learners = {}
    for dtype in ("float32", "bfloat16"):
        learner = Learner(
            lambda dtype=dtype: with_param_dtype(learner_cases.model_fn(), dtype),
            make_optimizer(config, param_dtype=dtype),
            LossConfig.for_algorithm("ggpo"),
            mesh,
        )
        learner.initialize()
        learners[dtype] = (learner, jax.device_get(learner.params()), learner.train_step(_batch(7)))
    narrow, before, metrics = learners["bfloat16"]
    wide, wide_before, wide_metrics = learners["float32"]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(narrow.params()))
    moments = [x for x in jax.tree.leaves(narrow.state.opt_state) if x.ndim >= 1]
    assert moments and all(x.dtype == jnp.float32 for x in moments)
    assert np.isfinite(metrics["loss"])
    np.testing.assert_allclose(metrics["loss"], wide_metrics["loss"], rtol=0.05, atol=1e-3)
    moved = [
        np.asarray(a, np.float32) - np.asarray(b, np.float32)
        for a, b in zip(jax.tree.leaves(narrow.params()), jax.tree.leaves(before), strict=True)
    ]
    wide_moved = [
        np.asarray(a) - np.asarray(b)
        for a, b in zip(jax.tree.leaves(wide.params()), jax.tree.leaves(wide_before), strict=True)
    ]
    # The same step to bf16's resolution: the moves correlate, parameters did change.
    flat, wide_flat = (
        np.concatenate([m.ravel() for m in moved]),
        np.concatenate([m.ravel() for m in wide_moved]),
    )
    assert np.abs(flat).max() > 0 and np.corrcoef(flat, wide_flat)[0, 1] > 0.9
