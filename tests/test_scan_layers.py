"""Scanned decoder layers (`Qwen3Config.scan_layers`): the same forward and gradients as the
unrolled loop, for Qwen3 and Qwen3-VL with DeepStack, with and without remat; an HLO that does
not grow with depth; the same update under the learner's FSDP pjit step."""

from __future__ import annotations

import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import learner_cases
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_qwen3

from vimrag_jax.learner import Learner
from vimrag_jax.models import from_pretrained, init_model, save_pretrained
from vimrag_jax.models.presets import preset_config
from vimrag_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from vimrag_jax.models.qwen3_vl import prepare_inputs
from vimrag_jax.parallel.mesh import make_mesh
from vimrag_jax.rl.losses import LossConfig

IMAGE, VIDEO, START, END = 150, 151, 152, 153
_PATCH_DIM = 3 * 2 * 4 * 4


def _equations(fn, *args, primitive: str) -> list:
    """The `primitive` equations of `fn`'s jaxpr, at the outermost level and nested ones."""
    found = []

    def walk(jaxpr) -> None:
        found.extend(eqn for eqn in jaxpr.eqns if eqn.primitive.name == primitive)
        for sub in jax.extend.core.subjaxprs(jaxpr):
            walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _scan_lengths(fn, *args) -> list[int]:
    """The lengths of the `scan`s in `fn`'s jaxpr."""
    return [int(eqn.params["length"]) for eqn in _equations(fn, *args, primitive="scan")]


def _assert_trees_close(got, want, *, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    """Leaf by leaf; `atol` is relative to each leaf's largest magnitude (at least 1)."""
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves) > 0
    for x, y in zip(got_leaves, want_leaves, strict=True):
        y = np.asarray(y)
        scale = max(1.0, float(np.max(np.abs(y))))
        np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=atol * scale)


def _value_and_grads(model: nnx.Module, forward) -> tuple[jax.Array, nnx.State]:
    """`forward(model)` and the gradient of a random projection of it w.r.t. the parameters."""
    out = forward(model)
    weights = jax.random.normal(jax.random.key(1), out.shape, out.dtype)
    grads = nnx.grad(lambda m: jnp.sum(forward(m) * weights))(model)
    return out, grads


# ---- Qwen3 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_qwen3_equals_unrolled(remat):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 9)), jnp.int32)
    mask = jnp.asarray(np.r_[[[0, 0] + [1] * 7], [[1] * 9]], jnp.int32)  # a left-padded row
    results = {}
    for scan in (False, True):
        config = Qwen3Config(**tiny_qwen3(num_hidden_layers=4), remat=remat, scan_layers=scan)
        model = Qwen3ForCausalLM(config, rngs=nnx.Rngs(0))
        # The scanned forward holds one scan over the 4 layers; the unrolled one none.
        assert _scan_lengths(lambda m: m.hidden_states(ids, mask), model) == ([4] if scan else [])
        hidden = nnx.jit(lambda m: m.hidden_states(ids, mask))(model)
        results[scan] = (
            hidden,
            *nnx.jit(_value_and_grads, static_argnums=1)(model, lambda m: m(ids, mask)),
        )
    (hidden, logits, grads), (hidden_s, logits_s, grads_s) = results[False], results[True]
    _assert_trees_close(hidden_s, hidden)
    _assert_trees_close(logits_s, logits)
    _assert_trees_close(grads_s, grads)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads_s.layers))


def test_remat_policy_is_checked_and_keeps_the_result():
    with pytest.raises(ValueError, match="remat_policy='bogus'"):
        Qwen3Config(**tiny_qwen3(), remat_policy="bogus")
    ids = jnp.arange(8, dtype=jnp.int32)[None]
    base = Qwen3Config(**tiny_qwen3(num_hidden_layers=3), remat=True, scan_layers=True)
    outs = []
    for policy in ("nothing_saveable", "dots_saveable"):
        model = Qwen3ForCausalLM(dataclasses.replace(base, remat_policy=policy), rngs=nnx.Rngs(0))
        # The scanned body is checkpointed under that policy.
        (remat,) = _equations(lambda m: m(ids), model, primitive="remat2")
        assert remat.params["policy"] == getattr(jax.checkpoint_policies, policy)
        outs.append(nnx.jit(_value_and_grads, static_argnums=1)(model, lambda m: m(ids)))
    # Saving the matmuls instead of recomputing them only reorders float32 rounding.
    _assert_trees_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_scan_layers_reaches_the_models_through_the_builders(tmp_path):
    for name in ("tiny", "tiny-vl"):
        model = nnx.eval_shape(
            lambda name=name: init_model(name, rngs=nnx.Rngs(0), scan_layers=True)
        )
        text = getattr(model.config, "text", model.config)
        assert text.scan_layers and not text.remat and text.remat_policy == "nothing_saveable"
    # Checkpoints are the same either way: a model saved unrolled loads scanned, same logits.
    model = init_model("tiny", rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path, dtype="float32")
    loaded = from_pretrained(tmp_path, scan_layers=True, remat=True, remat_policy="dots_saveable")
    assert loaded.config.scan_layers and loaded.config.remat_policy == "dots_saveable"
    ids = jnp.arange(10, dtype=jnp.int32)[None]
    _assert_trees_close(nnx.jit(lambda m: m(ids))(loaded), nnx.jit(lambda m: m(ids))(model))


# ---- Qwen3-VL with DeepStack ---------------------------------------------------------------


def _vl_config(**options) -> dict:
    text = tiny_qwen3(
        vocab_size=160,
        num_hidden_layers=5,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=64,
        num_position_embeddings=25,
        deepstack_visual_indexes=[0, 2],  # DeepStack after text layers 0 and 1
    )
    return {
        "model_type": "qwen3_vl",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": IMAGE,
        "video_token_id": VIDEO,
        "vision_start_token_id": START,
        "vision_end_token_id": END,
    }


def _vl_inputs(config) -> dict:
    """Two left-padded rows with three images between random text."""
    rng = np.random.default_rng(3)
    grids = np.asarray([(1, 4, 6), (1, 6, 4), (1, 4, 4)], np.int64)

    def image(grid):
        return [START] + [IMAGE] * (int(np.prod(grid)) // 4) + [END]

    def text(n):
        return list(rng.integers(0, IMAGE, n))

    rows = [
        text(4) + image(grids[0]) + text(2) + image(grids[1]),
        text(3) + image(grids[2]) + text(5),
    ]
    length = max(len(r) for r in rows)
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :], mask[b, length - len(row) :] = row, 1
    pixels = rng.standard_normal((int(grids.prod(-1).sum()), _PATCH_DIM)).astype(np.float32)
    return prepare_inputs(
        config, ids, pixel_values=pixels, image_grid_thw=grids, attention_mask=mask
    )


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_qwen3_vl_with_deepstack_equals_unrolled(remat):
    results = {}
    for scan in (False, True):
        model = init_model(_vl_config(), rngs=nnx.Rngs(0), remat=remat, scan_layers=scan)
        inputs = _vl_inputs(model.config)
        # DeepStack's two layers run unrolled, the other three as one scan.
        assert model.hooked_layers() == 2
        scans = _scan_lengths(lambda m, inputs=inputs: m(**inputs), model)
        assert scans.count(3) == (1 if scan else 0) and 5 not in scans
        results[scan] = nnx.jit(_value_and_grads, static_argnums=1)(
            model, lambda m, inputs=inputs: m(**inputs)
        )
    (logits, grads), (logits_s, grads_s) = results[False], results[True]
    _assert_trees_close(logits_s, logits, rtol=1e-5, atol=1e-6)
    # The vision blocks between DeepStack taps scan too (blocks 1-2 here): a few gradient
    # entries differ in float summation order (one of 2,048 by 3.5e-5 of a 7.8e-3 entry).
    _assert_trees_close(grads_s, grads, rtol=1e-4, atol=1e-5)
    # DeepStack is active: its mergers get a gradient through the unrolled prefix.
    for g in jax.tree.leaves(grads_s.visual.deepstack_mergers):
        assert float(jnp.max(jnp.abs(g))) > 0


# ---- compile size --------------------------------------------------------------------------


def _lowered_text_size(layers: int, scan: bool) -> int:
    """Characters of the StableHLO of a tiny Qwen3's loss gradient, lowered abstractly."""
    config = Qwen3Config(**tiny_qwen3(num_hidden_layers=layers), remat=True, scan_layers=scan)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3ForCausalLM(config, rngs=nnx.Rngs(0))))
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def loss(state, ids):
        return jnp.mean(nnx.merge(graphdef, state)(ids)[..., 0])

    return len(jax.jit(jax.grad(loss)).lower(state, ids).as_text())


def test_scanned_hlo_does_not_grow_with_depth():
    scanned = {n: _lowered_text_size(n, scan=True) for n in (2, 8)}
    unrolled = {n: _lowered_text_size(n, scan=False) for n in (2, 8)}
    # Unrolled: one copy of the layer's forward and backward per layer (~52 kB of text each).
    # Scanned: one body whatever the depth; only the stacking of the parameters and the slicing
    # of their gradients (a reshape or slice per parameter and layer, ~5 kB a layer) grows.
    assert unrolled[8] > 2.5 * unrolled[2], unrolled
    assert scanned[8] < 1.5 * scanned[2], scanned
    assert scanned[8] - scanned[2] < 0.15 * (unrolled[8] - unrolled[2]), (scanned, unrolled)


# ---- the learner's FSDP step ---------------------------------------------------------------


def test_fsdp_learner_step_scanned_equals_unrolled():
    def model_fn(scan: bool):
        hf = preset_config("tiny") | {"vocab_size": learner_cases.VOCAB, "num_hidden_layers": 3}
        return lambda: init_model(hf, rngs=nnx.Rngs(0), remat=True, scan_layers=scan)

    # The learner's forward (memory-lean log-probs through `hidden_states`) does scan.
    tokens = jnp.zeros((2, 8), jnp.int32)
    scans = _scan_lengths(lambda m: m.hidden_states(tokens), nnx.eval_shape(model_fn(True)))
    assert scans == [3]
    mesh = make_mesh(1, 8, 1)
    runs = {}
    for scan in (False, True):
        learner = Learner(
            model_fn(scan), learner_cases.optimizer(), LossConfig.for_algorithm("ggpo"), mesh
        )
        learner.initialize()
        metrics = [learner.train_step(learner_cases.batch(seed)) for seed in (0, 1)]
        runs[scan] = metrics, jax.device_get(learner.params())
    (metrics, params), (metrics_s, params_s) = runs[False], runs[True]
    for m, m_s in zip(metrics, metrics_s, strict=True):
        for key in ("loss", "grad_norm", "logprob_gap"):
            np.testing.assert_allclose(m_s[key], m[key], rtol=2e-5, atol=1e-7, err_msg=key)
    # Two Adam steps: where a gradient is near zero, float reassociation between the two
    # programs moves m / sqrt(v) by up to a few parts per million of the parameters' scale.
    _assert_trees_close(params_s, params, rtol=1e-5, atol=5e-6)
