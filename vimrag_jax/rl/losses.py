"""Policy losses (GSPO, GSPO-token, GRPO, SFT, k3 KL), their registry and group advantages.

All losses work on segment-major arrays: one row per segment (model call), ``[S, L]``
token arrays, ``[S]`` per-segment advantages and keep masks. They return the NEGATED
objective of SPEC §4 (a loss to minimize),

    J = (1/S) Σ_s keep_s · min(ρ_s·Â_s, clip(ρ_s, 1−ε_low, 1+ε_high)·Â_s),

where ``S`` counts every valid segment (one with at least one policy token), masked
ones included, so GGPO pruning lowers the weight of a batch instead of re-scaling it.

Masked segments and padding may hold anything (garbage, ±inf log-probs): every log
ratio is masked with ``jnp.where`` before ``exp`` and every masked term is selected
away, never multiplied by 0, so they get exactly zero gradient and nothing turns NaN.

Metrics are ``vimrag_jax.rl.stats`` pytrees of LOCAL sums and extrema; the pmap step
reduces them across devices. ``num_segments`` lets that step pass the global ``S`` so
per-device losses add up exactly to the loss of the whole batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vimrag_jax.rl.stats import Max, Mean, Min, Stat

Metrics = dict[str, Stat]
PolicyLossFn = Callable[..., tuple[jax.Array, Metrics]]

_POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator registering ``fn(logp, old_logp, token_mask, advantages, segment_keep, *,
    clip_low, clip_high, num_segments=None) -> (loss, metrics)`` under ``name``."""

    def register(fn: PolicyLossFn) -> PolicyLossFn:
        if name in _POLICY_LOSSES:
            raise ValueError(f"a policy loss named {name!r} is already registered")
        _POLICY_LOSSES[name] = fn
        return fn

    return register


def get_policy_loss(name: str) -> PolicyLossFn:
    """The registered loss ``name``; KeyError naming the known ones otherwise."""
    if name not in _POLICY_LOSSES:
        raise KeyError(f"unknown policy loss {name!r}; known: {', '.join(policy_loss_names())}")
    return _POLICY_LOSSES[name]


def policy_loss_names() -> tuple[str, ...]:
    return tuple(sorted(_POLICY_LOSSES))


# --- shared pieces ----------------------------------------------------------------


class _Segments(NamedTuple):
    """Masks and weights every loss derives the same way."""

    token_mask: jax.Array  # bool[S, L], policy tokens of valid segments
    valid: jax.Array  # bool[S], at least one policy token
    keep: jax.Array  # bool[S], valid and kept by GGPO
    train: jax.Array  # bool[S, L], tokens that get a gradient
    advantage: jax.Array  # float32[S], 0 where not kept
    denominator: jax.Array  # float32[], S clamped to >= 1


def _segments(token_mask, advantages, segment_keep, num_segments) -> _Segments:
    token_mask = jnp.asarray(token_mask, bool)
    valid = jnp.any(token_mask, axis=-1)
    keep = jnp.asarray(segment_keep, bool) & valid
    if num_segments is None:
        num_segments = jnp.sum(valid)
    denominator = jnp.maximum(jnp.asarray(num_segments, jnp.float32), 1.0)
    advantage = jnp.where(keep, jnp.asarray(advantages, jnp.float32), 0.0)
    return _Segments(token_mask, valid, keep, token_mask & keep[:, None], advantage, denominator)


def masked_mean(x_sl: jax.Array, mask_sl: jax.Array) -> jax.Array:
    """float32[S]: mean of each row over its masked entries (0 for an empty row)."""
    count_s = jnp.sum(mask_sl, axis=-1)
    return jnp.sum(jnp.where(mask_sl, x_sl, 0.0), axis=-1) / jnp.maximum(count_s, 1)


def log_ratio(logp_sl, old_sl, mask_sl) -> jax.Array:
    """float32[S, L]: ``logp − old`` on masked tokens, 0 elsewhere (safe to exponentiate)."""
    diff = jnp.asarray(logp_sl, jnp.float32) - jnp.asarray(old_sl, jnp.float32)
    return jnp.where(mask_sl, diff, 0.0)


def _clipped_objective(ratio, advantage, clip_low, clip_high) -> jax.Array:
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.minimum(ratio * advantage, clipped * advantage)


def _outside(ratio, clip_low, clip_high) -> jax.Array:
    return (ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)


def _ratio_stats(ratio, mask) -> Metrics:
    ratio = jax.lax.stop_gradient(ratio)
    return {
        "ratio_mean": Mean.of(ratio, mask),
        "ratio_min": Min.of(ratio, mask),
        "ratio_max": Max.of(ratio, mask),
    }


def _sequence_ratio_stats(logp, old_logp, seg: _Segments) -> Metrics:
    """Sequence ratios of all valid segments, GGPO-masked ones included (no gradient)."""
    log_ratio_s = masked_mean(
        log_ratio(jax.lax.stop_gradient(logp), old_logp, seg.token_mask), seg.token_mask
    )
    return _ratio_stats(jnp.exp(log_ratio_s), seg.valid)


def _kept_sum(objective_s: jax.Array, seg: _Segments) -> jax.Array:
    """J: per-segment objectives summed over kept segments, divided by S."""
    return jnp.sum(jnp.where(seg.keep, objective_s, 0.0)) / seg.denominator


def _token_ratio_loss(ratio_sl, seg: _Segments, clip_low, clip_high) -> tuple[jax.Array, Metrics]:
    """Per-token clipped objective, averaged within segments; token-level metrics."""
    objective_sl = _clipped_objective(ratio_sl, seg.advantage[:, None], clip_low, clip_high)
    loss = -_kept_sum(masked_mean(objective_sl, seg.train), seg)
    metrics = {
        "clip_fraction": Mean.of(_outside(ratio_sl, clip_low, clip_high), seg.train),
        "kept_fraction": Mean.of(seg.keep, seg.valid),
        **_ratio_stats(ratio_sl, seg.train),
    }
    return loss, metrics


# --- registered losses ------------------------------------------------------------


@register_policy_loss("gspo")
def gspo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    token_mask: jax.Array,
    advantages: jax.Array,
    segment_keep: jax.Array,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    num_segments: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """GSPO: one ratio per segment, ``exp(mean_t(logp − old))``, clipped per segment."""
    seg = _segments(token_mask, advantages, segment_keep, num_segments)
    log_ratio_s = masked_mean(log_ratio(logp, old_logp, seg.train), seg.train)
    ratio_s = jnp.exp(log_ratio_s)  # exactly 1 on masked segments
    objective_s = _clipped_objective(ratio_s, seg.advantage, clip_low, clip_high)
    loss = -_kept_sum(objective_s, seg)
    metrics = {
        "clip_fraction": Mean.of(_outside(ratio_s, clip_low, clip_high), seg.keep),
        "kept_fraction": Mean.of(seg.keep, seg.valid),
        **_sequence_ratio_stats(logp, old_logp, seg),
    }
    return loss, metrics


@register_policy_loss("gspo_token")
def gspo_token_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    token_mask: jax.Array,
    advantages: jax.Array,
    segment_keep: jax.Array,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    num_segments: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """GSPO-token: ``s_{i,t} = sg[s_i]·π(y_t)/sg[π(y_t)]``, clipped per token.

    Its value is GSPO's; the gradient differs only when advantages vary per token
    (here they are per segment, so it matches GSPO too). Ratio and clip metrics are
    token-level over the tokens that get a gradient.
    """
    seg = _segments(token_mask, advantages, segment_keep, num_segments)
    logp_sl = jnp.where(seg.train, jnp.asarray(logp, jnp.float32), 0.0)
    log_ratio_s = masked_mean(log_ratio(logp, old_logp, seg.train), seg.train)
    sg = jax.lax.stop_gradient
    ratio_sl = jnp.exp(logp_sl - sg(logp_sl) + sg(log_ratio_s)[:, None])
    return _token_ratio_loss(ratio_sl, seg, clip_low, clip_high)


@register_policy_loss("grpo")
def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    token_mask: jax.Array,
    advantages: jax.Array,
    segment_keep: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    num_segments: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """GRPO/PPO token ratios ``exp(logp_t − old_t)``, clipped per token.

    Token objectives are averaged within a segment, then summed over kept segments
    and divided by ``S`` like GSPO, so the baselines differ only in the ratio.
    Ratio and clip metrics are token-level over the tokens that get a gradient.
    """
    seg = _segments(token_mask, advantages, segment_keep, num_segments)
    ratio_sl = jnp.exp(log_ratio(logp, old_logp, seg.train))
    return _token_ratio_loss(ratio_sl, seg, clip_low, clip_high)


@register_policy_loss("sft")
def sft_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    token_mask: jax.Array,
    advantages: jax.Array,
    segment_keep: jax.Array,
    *,
    clip_low: float = 0.0,
    clip_high: float = 0.0,
    num_segments: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Supervised warm start: token negative log-likelihood of the policy tokens.

    Each kept segment contributes ``−A_s · mean_t logp`` and the sum is divided by ``S``, the
    same normalisation as the RL losses; with the SFT pipeline's ``advantage = 1`` this is the
    per-segment mean cross-entropy. ``old_logp`` and the clip range are unused (accepted so the
    loss shares the registry's signature); the ratio metrics still report the gap to them.
    """
    del clip_low, clip_high
    seg = _segments(token_mask, advantages, segment_keep, num_segments)
    nll_s = -masked_mean(jnp.where(seg.train, jnp.asarray(logp, jnp.float32), 0.0), seg.train)
    loss = _kept_sum(seg.advantage * nll_s, seg)
    metrics = {
        "nll": Mean.of(jnp.where(seg.keep, nll_s, 0.0), seg.keep),
        "kept_fraction": Mean.of(seg.keep, seg.valid),
        **_sequence_ratio_stats(logp, old_logp, seg),
    }
    return loss, metrics


# --- KL and advantages ------------------------------------------------------------


def segment_kl_k3(logp, ref_logp, token_mask) -> jax.Array:
    """float32[S]: per-segment mean of k3 = ``exp(ref − logp) − (ref − logp) − 1``."""
    token_mask = jnp.asarray(token_mask, bool)
    delta = log_ratio(ref_logp, logp, token_mask)  # ref − logp, 0 off the mask
    # expm1 keeps the ~delta²/2 value accurate near the reference; exp(d) − 1 rounds it away
    return masked_mean(jnp.expm1(delta) - delta, token_mask)


def kl_k3(
    logp: jax.Array,
    ref_logp: jax.Array,
    token_mask: jax.Array,
    *,
    num_segments: jax.Array | None = None,
) -> jax.Array:
    """Scalar k3 KL estimate to a reference policy: segment means summed over valid
    segments, divided by ``S`` (or ``num_segments``) like the policy objective.

    It covers every valid segment, GGPO-masked ones too: it regularizes the policy
    towards the reference rather than assigning credit.
    """
    valid_s = jnp.any(jnp.asarray(token_mask, bool), axis=-1)
    if num_segments is None:
        num_segments = jnp.sum(valid_s)
    denominator = jnp.maximum(jnp.asarray(num_segments, jnp.float32), 1.0)
    kl_s = segment_kl_k3(logp, ref_logp, token_mask)
    return jnp.sum(jnp.where(valid_s, kl_s, 0.0)) / denominator


def group_advantages(rewards: Sequence[float] | np.ndarray, *, eps: float = 1e-6) -> np.ndarray:
    """float32[G]: ``(r − mean r) / (std r + eps)`` over the rewards of one group's rollouts.

    ``std`` is the population standard deviation (ddof = 0), so a one-rollout group or a group
    with equal rewards gets advantage 0. Computed on the host in float64 from deviations to the
    group's largest reward: equal rewards then give exactly 0, where a float mean would leave a
    rounding residue that ``eps`` = 1e-6 magnifies to advantages of ~0.05. The input pipeline
    calls this once per group; every row of a trajectory carries its advantage.
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 1 or rewards.size == 0:
        raise ValueError(f"rewards must be a non-empty 1-D array, got shape {rewards.shape}")
    if not np.all(np.isfinite(rewards)):
        raise ValueError("rewards must be finite")
    deviation = rewards - rewards.max()
    centered = deviation - deviation.mean()
    return (centered / (np.sqrt(np.mean(centered**2)) + eps)).astype(np.float32)


# --- configuration ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which policy loss to train with; frozen and hashable (a static jit argument)."""

    name: str = "gspo"
    ggpo_mask: bool = True
    clip_low: float = 3e-4
    clip_high: float = 4e-4
    positive_threshold: float = 1.0
    kl_coef: float = 0.0
    # "behavior": the ratio's denominator is the sampler's log-probs (the record's
    # behavior_logprobs). "recompute": the learner's own log-probs of the batch before the
    # update, with a truncated importance weight min(exp(mean_t(old - behavior)), tis_cap) per
    # segment for the sampler/learner mismatch. The learner trains each batch in one optimizer
    # update (micro-batches of an accumulated update share its parameters), so those are the
    # log-probs its forward computes, under stop_gradient; batch["old_logprobs"] overrides
    # them (e.g. a batch reused for several updates).
    old_logprobs: str = "behavior"
    tis_cap: float = 2.0
    # GSPO as published: each rollout batch is split into this many minibatches, updated one
    # after the other against the log-probs of the policy that started the batch (computed once,
    # before the first), so the clip binds from the second minibatch on (`parallel.step`).
    num_minibatches: int = 1

    def __post_init__(self):
        if self.name not in _POLICY_LOSSES:
            raise ValueError(
                f"unknown loss name {self.name!r}; known: {', '.join(policy_loss_names())}"
            )
        if not isinstance(self.ggpo_mask, bool):
            raise ValueError(f"ggpo_mask must be a bool, got {self.ggpo_mask!r}")
        for field in ("clip_low", "clip_high", "positive_threshold", "kl_coef"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{field} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{field} must be finite, got {value!r}")
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.old_logprobs not in ("behavior", "recompute"):
            raise ValueError(
                f"old_logprobs must be 'behavior' or 'recompute', got {self.old_logprobs!r}"
            )
        if isinstance(self.tis_cap, bool) or not isinstance(self.tis_cap, int | float):
            raise ValueError(f"tis_cap must be a number, got {self.tis_cap!r}")
        if not self.tis_cap > 0:
            raise ValueError(f"tis_cap must be > 0, got {self.tis_cap}")
        minibatches = self.num_minibatches
        if isinstance(minibatches, bool) or not isinstance(minibatches, int) or minibatches < 1:
            raise ValueError(f"num_minibatches must be an int >= 1, got {minibatches!r}")

    @classmethod
    def for_algorithm(cls, algorithm: str, **overrides: Any) -> LossConfig:
        """Preset for ``"ggpo"``, ``"gspo"``, ``"gspo_token"`` or ``"grpo"``, then overrides."""
        if algorithm not in _PRESETS:
            raise ValueError(f"unknown algorithm {algorithm!r}; known: {', '.join(_PRESETS)}")
        return dataclasses.replace(_PRESETS[algorithm], **overrides)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> LossConfig:
        """From a ``ConfigDict`` (or mapping) with this class's field names.

        Missing fields take their defaults; an unknown field is an error, so a typo
        in a config or on the command line cannot be silently ignored.
        """
        values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown loss config fields {unknown}; known: {sorted(fields)}")
        return cls(**values)


_PRESETS = {
    "ggpo": LossConfig(name="gspo", ggpo_mask=True),
    "gspo": LossConfig(name="gspo", ggpo_mask=False),
    "gspo_token": LossConfig(name="gspo_token", ggpo_mask=False),
    "grpo": LossConfig(name="grpo", ggpo_mask=False, clip_low=0.2, clip_high=0.2),
    "sft": LossConfig(name="sft", ggpo_mask=False, clip_low=0.0, clip_high=0.0),
}


def behavior_gap_warning(metrics: Mapping[str, float], loss_config: LossConfig) -> str | None:
    """A warning when the ratio's denominator is the sampler's log-probs
    (``loss.old_logprobs = "behavior"``) and the measured learner-vs-sampler gap already
    exceeds the clip range: the clip then acts on numerical noise and zeroes gradients at
    random (GSPO as published recomputes them: ``old_logprobs = "recompute"``). None otherwise.
    """
    gap = metrics.get("logprob_gap")
    epsilon = min(loss_config.clip_low, loss_config.clip_high)
    if loss_config.old_logprobs != "behavior" or gap is None or not gap > epsilon:
        return None
    return (
        f"the learner's log-probs differ from the sampler's by {gap:.2e} per token on average, "
        f"more than the clip range ({epsilon:g}) of loss.old_logprobs='behavior': the clip "
        "will bind on numerical noise; consider loss.old_logprobs='recompute' (with "
        "loss.num_minibatches > 1 for GSPO as published)"
    )


def __getattr__(name: str) -> Any:
    # SPEC §5 names `rl.losses.ggpo_loss`; it lives with the rest of GGPO in `rl/ggpo.py`,
    # which imports this module (so it cannot be imported here at the top).
    if name == "ggpo_loss":
        from vimrag_jax.rl.ggpo import ggpo_loss

        return ggpo_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
