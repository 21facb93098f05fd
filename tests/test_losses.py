"""Policy losses, k3 KL, group advantages and the batch objective against loop references."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import rl_reference as ref
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vimrag_jax.rl import losses
from vimrag_jax.rl.ggpo import ggpo_loss, num_valid_segments, policy_objective
from vimrag_jax.rl.losses import (
    LossConfig,
    get_policy_loss,
    group_advantages,
    kl_k3,
    register_policy_loss,
)
from vimrag_jax.rl.stats import reduce_stats, to_scalars

S, L = 6, 5  # fixed shapes: one compile per function for every example
CLIPS = {"gspo": (3e-4, 4e-4), "gspo_token": (3e-4, 4e-4), "grpo": (0.2, 0.2)}
LOSS_NAMES = tuple(CLIPS)


def _value_and_grad(name):
    clip_low, clip_high = CLIPS[name]
    fn = functools.partial(get_policy_loss(name), clip_low=clip_low, clip_high=clip_high)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))


VALUE_AND_GRAD = {name: _value_and_grad(name) for name in LOSS_NAMES}
ggpo_jit = jax.jit(ggpo_loss)
kl_jit = jax.jit(kl_k3)


def advantages_by_group(rewards, groups, valid):
    """`group_advantages` of each group's valid rows, in place in a batch (0 elsewhere)."""
    out = np.zeros(len(rewards), np.float32)
    for group in np.unique(groups[valid]):
        rows = np.flatnonzero(valid & (groups == group))
        out[rows] = group_advantages(rewards[rows])
    return out


def _objective(config):
    fn = functools.partial(policy_objective, config=config)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))


@st.composite
def segment_batches(draw):
    """Random [S, L] segments; log-ratio scales straddle both clip ranges."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-4, 3e-4, 1e-3, 0.1, 0.5]))
    token_density = draw(st.sampled_from([0.2, 0.6, 1.0]))
    keep_density = draw(st.sampled_from([0.0, 0.5, 1.0]))
    old = rng.normal(-2.0, 1.0, (S, L)).astype(np.float32)
    return {
        "logp": (old + rng.normal(0.0, scale, (S, L))).astype(np.float32),
        "old_logp": old,
        "token_mask": rng.random((S, L)) < token_density,
        "advantages": rng.normal(0.0, 1.0, S).astype(np.float32),
        "segment_keep": rng.random(S) < keep_density,
    }


def _away_from_clip_edges(case, name):
    """Float32 and float64 may disagree about a ratio sitting right on a clip edge."""
    clip_low, clip_high = CLIPS[name]
    if name == "grpo":
        ratios = np.exp(case["logp"].astype(np.float64) - case["old_logp"])
    else:
        ratios = ref.seq_ratios(case["logp"], case["old_logp"], case["token_mask"])
    edges = np.array([1 - clip_low, 1 + clip_high])
    distance = np.abs(ratios[..., None] - edges)
    return not np.any(distance < 1e-6)


def _args(case):
    return (
        case["logp"],
        case["old_logp"],
        case["token_mask"],
        case["advantages"],
        case["segment_keep"],
    )


@pytest.mark.parametrize("name", LOSS_NAMES)
@given(case=segment_batches(), extra_segments=st.sampled_from([0, 0, 3]))
def test_loss_metrics_and_grad_match_reference(name, case, extra_segments):
    assume(_away_from_clip_edges(case, name))
    local_s = int(case["token_mask"].any(axis=1).sum())
    num_segments = np.float32(local_s + extra_segments)  # > local S: other devices' segments
    (loss, metrics), grad = VALUE_AND_GRAD[name](*_args(case), num_segments=num_segments)
    want_loss, want_metrics, want_grad = ref.policy_loss(
        name, *_args(case), *CLIPS[name], num_segments=num_segments
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    got = to_scalars(metrics)
    for key, want in want_metrics.items():
        np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-6, err_msg=key)


@given(segment_batches())
def test_ggpo_loss_is_gspo_with_the_default_denominator(case):
    assume(_away_from_clip_edges(case, "gspo"))
    want, _, _ = ref.policy_loss("gspo", *_args(case), *CLIPS["gspo"])
    np.testing.assert_allclose(ggpo_jit(*_args(case)), want, rtol=1e-5, atol=1e-6)


@settings(max_examples=20)
@given(segment_batches())
def test_gspo_token_matches_gspo_with_segment_advantages(case):
    (loss, _), grad = VALUE_AND_GRAD["gspo"](*_args(case))
    (loss_tok, _), grad_tok = VALUE_AND_GRAD["gspo_token"](*_args(case))
    np.testing.assert_allclose(loss_tok, loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad_tok, grad, rtol=1e-5, atol=1e-8)


# --- hand-made numbers ----------------------------------------------------------------


def _hand_case():
    """Three segments around logp 0 (exact in float32); S = 3."""
    old = np.zeros((3, 2), np.float32)
    logp = np.array([[2e-4, 0.0], [1e-3, 1e-3], [-1e-3, 0.0]], np.float32)
    mask = np.array([[1, 1], [1, 1], [1, 0]], bool)
    advantages = np.array([1.0, 1.0, -2.0], np.float32)
    return logp, old, mask, advantages


def test_gspo_on_hand_made_numbers():
    logp, old, mask, adv = _hand_case()
    # ratios: e^1e-4 (inside the clip range), e^1e-3 > 1.0004, e^-1e-3 < 0.9997 with Â < 0
    inside = np.exp(1e-4)
    want = (inside + 1.0004 + 0.9997 * -2.0) / 3
    keep = np.ones(3, bool)
    np.testing.assert_allclose(ggpo_loss(logp, old, mask, adv, keep), -want, atol=1e-6)
    # masking segment 1 drops its term but not its share of the denominator
    keep[1] = False
    np.testing.assert_allclose(
        ggpo_loss(logp, old, mask, adv, keep), -(inside + 0.9997 * -2.0) / 3, atol=1e-6
    )
    _, metrics = get_policy_loss("gspo")(logp, old, mask, adv, keep, clip_low=3e-4, clip_high=4e-4)
    got = to_scalars(metrics)
    assert got["kept_fraction"] == pytest.approx(2 / 3)
    assert got["clip_fraction"] == pytest.approx(1 / 2)  # of kept segments: segment 2
    assert got["ratio_max"] == pytest.approx(np.exp(1e-3), rel=1e-6)  # masked ones count


def test_gspo_gradient_on_hand_made_numbers():
    logp, old, mask, adv = _hand_case()
    grad = jax.grad(ggpo_loss)(logp, old, mask, adv, np.ones(3, bool))
    # segment 0: -Â·ρ/|T|/S per token; segments 1 and 2 are clipped: no gradient
    want = np.zeros((3, 2))
    want[0] = -np.exp(1e-4) / 2 / 3
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-9)


def test_grpo_clipping_engages_at_0_2():
    logp = np.array([[0.5, -0.5, 0.1]], np.float32)
    old = np.zeros_like(logp)
    mask, keep = np.ones((1, 3), bool), np.ones(1, bool)
    r = np.exp(logp[0].astype(np.float64))
    grpo = get_policy_loss("grpo")
    for a in (1.0, -1.0):
        adv = np.array([a], np.float32)
        (loss, metrics), grad = jax.value_and_grad(grpo, has_aux=True)(
            logp, old, mask, adv, keep, clip_low=0.2, clip_high=0.2
        )
        if a > 0:  # 1.65 is cut to 1.2 (no gradient); 0.61 stays (the min picks it)
            terms, live = [1.2, r[1], r[2]], [False, True, True]
        else:  # -1.65 stays; -0.61 is cut to -0.8 (no gradient)
            terms, live = [-r[0], -0.8, -r[2]], [True, False, True]
        np.testing.assert_allclose(loss, -np.mean(terms), rtol=1e-6)
        np.testing.assert_allclose(grad[0], -a * r * np.array(live) / 3, rtol=1e-5)
        assert to_scalars(metrics)["clip_fraction"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_masked_segments_get_exactly_zero_gradient_even_with_garbage(name):
    rng = np.random.default_rng(0)
    old = rng.normal(-2.0, 1.0, (S, L)).astype(np.float32)
    logp = (old + rng.normal(0.0, 1e-4, (S, L))).astype(np.float32)
    mask = np.ones((S, L), bool)
    mask[:, -1] = False  # padding tokens
    adv = rng.normal(0.0, 1.0, S).astype(np.float32)
    keep = np.array([1, 0, 1, 0, 1, 0], bool)
    clean = (logp, old, mask, adv, keep)
    dirty_logp, dirty_old, dirty_adv = logp.copy(), old.copy(), adv.copy()
    dirty_logp[1], dirty_old[1] = 1e30, -np.inf
    dirty_logp[3], dirty_old[5] = -np.inf, np.nan
    dirty_adv[[1, 3, 5]] = [np.inf, np.nan, -1e30]
    dirty_logp[:, -1] = np.inf  # garbage on padding tokens of kept segments too
    dirty_old[:, -1] = -np.inf
    dirty = (dirty_logp, dirty_old, mask, dirty_adv, keep)
    (loss, _), grad = VALUE_AND_GRAD[name](*clean)
    (dirty_loss, _), dirty_grad = VALUE_AND_GRAD[name](*dirty)
    assert np.isfinite(dirty_loss) and np.all(np.isfinite(dirty_grad))
    np.testing.assert_allclose(dirty_loss, loss, rtol=1e-6)
    np.testing.assert_array_equal(dirty_grad[~keep], 0.0)
    np.testing.assert_array_equal(dirty_grad[:, -1], 0.0)
    np.testing.assert_allclose(dirty_grad, grad, rtol=1e-6)
    assert np.any(grad[keep] != 0.0)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_all_segments_invalid_gives_zero_loss_and_metrics(name):
    logp = np.full((S, L), -1.0, np.float32)
    nothing = np.zeros((S, L), bool)
    (loss, metrics), grad = VALUE_AND_GRAD[name](
        logp, logp, nothing, np.ones(S, np.float32), np.ones(S, bool)
    )
    assert loss == 0.0 and np.all(grad == 0.0)
    got = to_scalars(metrics)
    assert got["clip_fraction"] == 0.0 and got["kept_fraction"] == 0.0
    assert got["ratio_max"] == -np.inf and got["ratio_min"] == np.inf


# --- KL and advantages ------------------------------------------------------------------


@given(segment_batches(), st.sampled_from([None, 0, 4]))
def test_kl_k3_matches_reference(case, extra_segments):
    ref_logp, mask = case["old_logp"], case["token_mask"]
    num_segments = None
    if extra_segments is not None:
        num_segments = np.float32(mask.any(axis=1).sum() + extra_segments)
    got = kl_jit(case["logp"], ref_logp, mask, num_segments=num_segments)
    want = ref.kl_k3(case["logp"], ref_logp, mask, num_segments=num_segments)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-12)
    assert got >= 0.0


def test_kl_k3_is_zero_at_the_reference_and_finite_off_the_mask():
    logp = np.full((2, 3), -1.0, np.float32)
    mask = np.array([[1, 1, 0], [0, 0, 0]], bool)
    assert kl_k3(logp, logp, mask) == 0.0
    ref_logp = logp.copy()
    ref_logp[:, 2], ref_logp[1] = np.inf, np.nan
    value, grad = jax.value_and_grad(kl_k3)(logp, ref_logp, mask)
    assert value == 0.0 and np.all(grad == 0.0)


@given(
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0, width=32)),
            st.integers(0, 3),
            st.booleans(),
        ),
        min_size=10,
        max_size=10,
    )
)
def test_group_advantages_match_reference(rows):
    rewards = np.array([r for r, _, _ in rows], np.float32)
    groups = np.array([g for _, g, _ in rows], np.int32)
    valid = np.array([v for _, _, v in rows])
    got = advantages_by_group(rewards, groups, valid)
    want = ref.group_advantages(rewards, groups, valid)
    # a near-zero std amplifies float32 rounding, hence the relative tolerance
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert group_advantages(rewards[:2]).dtype == np.float32


def test_group_advantages_edge_cases():
    rewards = np.array([1.0, 0.0, 1.0, 1.0, 0.5, np.nan, 0.0], np.float32)
    groups = np.array([0, 0, 1, 1, 2, 0, 3], np.int32)
    valid = np.array([1, 1, 1, 1, 1, 0, 0], bool)
    got = advantages_by_group(rewards, groups, valid)
    np.testing.assert_allclose(got[:2], [1.0, -1.0], atol=1e-5)  # std 0.5 (ddof = 0)
    np.testing.assert_array_equal(got[2:], 0.0)  # equal rewards, single member, invalid
    for bad in ([], [[1.0, 0.0]], [0.0, np.inf]):
        with pytest.raises(ValueError):
            group_advantages(np.asarray(bad, np.float32))


# --- configuration -----------------------------------------------------------------------


def test_loss_config_presets_and_overrides():
    assert LossConfig.for_algorithm("ggpo") == LossConfig()
    assert not LossConfig.for_algorithm("gspo").ggpo_mask
    assert LossConfig.for_algorithm("gspo_token").name == "gspo_token"
    grpo = LossConfig.for_algorithm("grpo", kl_coef=0.01)
    assert (grpo.name, grpo.clip_low, grpo.clip_high, grpo.ggpo_mask) == ("grpo", 0.2, 0.2, False)
    assert grpo.kl_coef == 0.01
    assert hash(grpo) == hash(LossConfig.for_algorithm("grpo", kl_coef=0.01))
    with pytest.raises(ValueError, match="unknown algorithm"):
        LossConfig.for_algorithm("ppo")


def test_loss_config_from_config_dict():
    cfg = ml_collections.ConfigDict({"name": "grpo", "clip_low": 0.2, "clip_high": 0.28})
    assert LossConfig.from_config(cfg) == LossConfig(name="grpo", clip_low=0.2, clip_high=0.28)
    bad = {
        "name": ("ppo", "unknown loss name 'ppo'; known: grpo, gspo, gspo_token"),
        "clip_low": (-0.1, "clip_low must be in"),
        "clip_high": (-0.1, "clip_high must be >= 0"),
        "kl_coef": (-1.0, "kl_coef must be >= 0"),
        "ggpo_mask": ("yes", "ggpo_mask must be a bool"),
        "clip_hihg": (0.1, "unknown loss config fields"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            LossConfig.from_config(ml_collections.ConfigDict({key: value}))


def test_registry():
    with pytest.raises(KeyError, match="known: grpo, gspo, gspo_token"):
        get_policy_loss("ppo")
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("gspo")(lambda *a, **k: None)
    assert get_policy_loss("gspo") is losses.gspo_loss


# --- the batch objective of the training step --------------------------------------------

B = 8  # segment rows
GGPO = LossConfig.for_algorithm("ggpo")
GSPO = LossConfig.for_algorithm("gspo")
objective_ggpo = _objective(GGPO)
objective_gspo = _objective(GSPO)


def _segment_batch(rng, trajectories, traj_of_row, segment_node):
    """Segment-major batch: row b is a segment of trajectory ``traj_of_row[b]``."""
    old = rng.normal(-2.0, 1.0, (B, L)).astype(np.float32)
    logp = (old + rng.normal(0.0, 3e-4, (B, L))).astype(np.float32)
    loss_mask = rng.random((B, L)) < 0.7
    loss_mask[:, 0] = True
    graph = {k: np.stack([trajectories[t][k] for t in traj_of_row]) for k in trajectories[0]}
    batch = {
        "tokens": rng.integers(0, 100, (B, L)).astype(np.int32),
        "loss_mask": loss_mask,
        "behavior_logprobs": old,
        "segment_valid": rng.random(B) < 0.85,
        "segment_node": np.asarray(segment_node, np.int32),
        "advantage": np.stack([trajectories[t]["advantage"] for t in traj_of_row]),
        "reward": graph["reward"],
        "answer_node": graph["answer_node"],
        "adjacency": graph["adjacency"],
        "node_valid": graph["node_valid"],
        "relevant": graph["relevant"],
        "ref_logprobs": (old + rng.normal(0.0, 0.05, (B, L))).astype(np.float32),
    }
    return logp, batch


@st.composite
def objective_cases(draw):
    trajectories = []
    for _ in range(2):
        g = ref.random_graph(draw, st)
        g.pop("positive_threshold")  # the config's 1.0 applies
        g["advantage"] = np.float32(draw(st.floats(-2.0, 2.0, width=32)))
        trajectories.append(g)
    traj_of_row = draw(st.lists(st.integers(0, 1), min_size=B, max_size=B))
    segment_node = draw(st.lists(st.integers(-1, ref.MAX_NODES - 1), min_size=B, max_size=B))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return _segment_batch(rng, trajectories, traj_of_row, segment_node)


def _reference_objective(logp, batch):
    token_mask = batch["loss_mask"] & batch["segment_valid"][:, None]
    keep = np.zeros(B, bool)
    for b in range(B):
        node_keep = ref.node_keep(
            batch["adjacency"][b],
            batch["node_valid"][b],
            int(batch["answer_node"][b]),
            float(batch["reward"][b]),
            batch["relevant"][b],
        )
        positive = float(batch["reward"][b]) >= 1.0
        keep[b] = ref.segment_keep(node_keep, batch["segment_node"][b : b + 1], [True], positive)[0]
    valid = token_mask.any(axis=1)
    loss, _, grad = ref.policy_loss(
        "gspo",
        logp,
        batch["behavior_logprobs"],
        token_mask,
        batch["advantage"],
        keep,
        *CLIPS["gspo"],
    )
    positive = batch["reward"] >= 1.0
    fractions = {
        "masked_fraction_positive": (~keep & valid & positive).sum()
        / max((valid & positive).sum(), 1),
        "masked_fraction_negative": (~keep & valid & ~positive).sum()
        / max((valid & ~positive).sum(), 1),
    }
    return loss, grad, fractions


@given(objective_cases())
def test_policy_objective_matches_reference(case):
    logp, batch = case
    old, mask = batch["behavior_logprobs"], batch["loss_mask"] & batch["segment_valid"][:, None]
    assume(_away_from_clip_edges({"logp": logp, "old_logp": old, "token_mask": mask}, "gspo"))
    (loss, metrics), grad = objective_ggpo(logp, batch)
    want_loss, want_grad, fractions = _reference_objective(logp, batch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    got = to_scalars(metrics)
    for key, want in fractions.items():
        np.testing.assert_allclose(got[key], want, rtol=1e-6, err_msg=key)
    valid = mask.any(axis=1)
    want_reward = batch["reward"][valid].mean() if valid.any() else 0.0
    np.testing.assert_allclose(got["reward_mean"], want_reward, rtol=1e-6, atol=1e-7)


def _fixed_case(seed=0, chain=True):
    """Two trajectories; with ``chain`` every node of a positive one is on P_ans."""
    rng = np.random.default_rng(seed)
    n = ref.MAX_NODES
    trajectories = []
    for reward, advantage in ((1.0, 1.0), (1.0, -0.5)):
        adjacency = np.zeros((n, n), bool)
        adjacency[np.arange(5), np.arange(1, 6)] = True  # chain 0 -> 1 -> ... -> 5
        if not chain:
            adjacency[0, 6] = True  # a dead end
        trajectories.append(
            {
                "adjacency": adjacency,
                "node_valid": np.arange(n) < 7 - chain,
                "answer_node": np.int32(5),
                "reward": np.float32(reward),
                "relevant": rng.random(n) < 0.5,
                "advantage": np.float32(advantage),
            }
        )
    traj_of_row = [0, 0, 0, 0, 1, 1, 1, 1]
    segment_node = [1, 2, 3, 5 + (not chain), 1, 2, 4, 5 + (not chain)]
    return _segment_batch(rng, trajectories, traj_of_row, segment_node)


def test_ggpo_equals_gspo_when_everything_is_kept():
    logp, batch = _fixed_case(chain=True)
    (loss, metrics), grad = objective_ggpo(logp, batch)
    (want_loss, _), want_grad = objective_gspo(logp, batch)
    assert loss == want_loss
    np.testing.assert_array_equal(grad, want_grad)
    assert to_scalars(metrics)["masked_fraction_positive"] == 0.0
    # a dead end on the last segment of each trajectory makes them differ
    logp, batch = _fixed_case(chain=False)
    (loss, metrics), _ = objective_ggpo(logp, batch)
    (want_loss, _), _ = objective_gspo(logp, batch)
    assert loss != want_loss
    assert to_scalars(metrics)["masked_fraction_positive"] > 0.0


def test_kl_term_and_missing_reference():
    logp, batch = _fixed_case()
    config = LossConfig.for_algorithm("ggpo", kl_coef=0.1)
    loss, metrics = policy_objective(logp, batch, config)
    base, _ = policy_objective(logp, batch, GGPO)
    mask = batch["loss_mask"] & batch["segment_valid"][:, None]
    kl = ref.kl_k3(logp, batch["ref_logprobs"], mask)
    np.testing.assert_allclose(loss, base + 0.1 * kl, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(to_scalars(metrics)["kl"], kl, rtol=1e-4)
    want_max = ref.kl_token_max(logp, batch["ref_logprobs"], mask)
    assert want_max > kl  # one token's term exceeds the segment-mean estimate
    np.testing.assert_allclose(to_scalars(metrics)["kl_token_max"], want_max, rtol=1e-4)
    del batch["ref_logprobs"]
    with pytest.raises(KeyError, match="ref_logprobs"):
        policy_objective(logp, batch, config)
    policy_objective(logp, batch, GGPO)  # not needed without KL


def test_pmap_shards_add_up_to_the_whole_batch():
    logp, batch = _fixed_case(chain=False)
    batch["segment_valid"][:] = True
    batch["segment_valid"][[2, 7]] = False  # unequal valid counts per shard

    def shard_step(logp, batch):
        total = jax.lax.psum(num_valid_segments(batch), "d")
        grad_fn = jax.value_and_grad(policy_objective, has_aux=True)
        (loss, metrics), grad = grad_fn(logp, batch, GGPO, num_segments=total)
        return jax.lax.psum(loss, "d"), reduce_stats(metrics, "d"), grad

    step = jax.pmap(shard_step, axis_name="d", devices=jax.devices()[:2])
    shard = lambda x: np.reshape(x, (2, B // 2, *np.shape(x)[1:]))  # noqa: E731
    loss, metrics, grad = step(shard(logp), jax.tree.map(shard, batch))
    (want_loss, want_metrics), want_grad = objective_ggpo(logp, batch)
    np.testing.assert_allclose(loss[0], want_loss, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.reshape(grad, (B, L)), want_grad, rtol=1e-6, atol=1e-10)
    got, want = to_scalars(jax.tree.map(lambda x: x[0], metrics)), to_scalars(want_metrics)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
    assert int(num_valid_segments(batch)) == 6


def test_group_advantages_equal_fractional_rewards_are_exactly_zero():
    # A float32 group mean of equal rewards like these is off by one ulp; divided by
    # std + 1e-6 that residue used to become an advantage of ~0.06.
    for value in (0.8241666555404663, 0.100445226, 0.3):
        rewards = np.array([0.0] * 7 + [value] * 3 + [0.3, 0.7], np.float32)
        groups = np.array([0] * 10 + [1, 1], np.int32)
        valid = np.array([False] * 7 + [True] * 5)
        got = advantages_by_group(rewards, groups, valid)
        assert got[:10].tolist() == [0.0] * 10, value
        np.testing.assert_allclose(got[10:], [-1.0, 1.0], rtol=1e-5)


def test_sft_loss_is_segment_mean_token_nll():
    logp = np.array([[-1.0, -2.0, -4.0], [-3.0, -9.0, -0.5]], np.float32)
    mask = np.array([[True, True, False], [False, False, True]])
    old = np.zeros_like(logp)
    loss, metrics = losses.get_policy_loss("sft")(
        jnp.asarray(logp), jnp.asarray(old), jnp.asarray(mask), jnp.ones(2), jnp.ones(2, bool)
    )
    # segment 0: mean(1, 2) = 1.5; segment 1: 0.5; divided by S = 2.
    np.testing.assert_allclose(float(loss), (1.5 + 0.5) / 2, rtol=1e-6)
    assert losses.LossConfig.for_algorithm("sft").name == "sft"
    # A dropped segment still counts in S but adds nothing.
    loss_kept, _ = losses.get_policy_loss("sft")(
        jnp.asarray(logp),
        jnp.asarray(old),
        jnp.asarray(mask),
        jnp.ones(2),
        jnp.array([True, False]),
    )
    np.testing.assert_allclose(float(loss_kept), 1.5 / 2, rtol=1e-6)


def test_recomputed_old_logprobs_with_truncated_importance_weights():
    logp, batch = _fixed_case(chain=False)
    config = LossConfig.for_algorithm("ggpo", old_logprobs="recompute", tis_cap=1.5)
    # The learner's pre-update log-probs differ from the sampler's by a per-segment shift.
    shift = np.linspace(-0.5, 0.8, len(batch["advantage"]), dtype=np.float32)
    batch["old_logprobs"] = (batch["behavior_logprobs"] + shift[:, None]).astype(np.float32)
    loss, metrics = policy_objective(batch["old_logprobs"], batch, config)
    # At logp == old every ratio is 1: GGPO's objective with advantages scaled by the weights.
    mask = batch["loss_mask"] & batch["segment_valid"][:, None]
    has_tokens = mask.any(axis=-1)
    weight = np.where(has_tokens, np.minimum(np.exp(shift), 1.5), 1.0)
    scaled = dict(batch, advantage=batch["advantage"] * weight)
    scaled["behavior_logprobs"] = batch["old_logprobs"]
    want, _ = policy_objective(batch["old_logprobs"], scaled, GGPO)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
    scalars = to_scalars(metrics)
    assert scalars["clip_fraction"] == 0.0
    np.testing.assert_allclose(scalars["tis_weight"], weight[has_tokens].mean(), rtol=1e-5)
    assert 0.0 < scalars["tis_truncated_fraction"] < 1.0
    # Without the key the denominator is the forward's own log-probs: same loss and gradient.
    same = {key: value for key, value in batch.items() if key != "old_logprobs"}

    def with_key(x):
        return policy_objective(x, dict(batch, old_logprobs=batch["old_logprobs"]), config)[0]

    at = jnp.asarray(batch["old_logprobs"])
    got, got_grad = jax.value_and_grad(lambda x: policy_objective(x, same, config)[0])(at)
    want, want_grad = jax.value_and_grad(with_key)(at)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-8)
    assert np.abs(np.asarray(got_grad)).max() > 0
    with pytest.raises(ValueError, match="old_logprobs"):
        LossConfig(old_logprobs="fresh")
