"""Rollouts and GGPO / GSPO updates of the toy agent: ``make_train(config)`` → pure ``train(key)``.

As in purejaxrl, one training run is a pure function of its key (``lax.scan`` over updates,
over episode steps and over minibatches), so ``jax.jit(jax.vmap(train))`` runs many seeds at
once. Each update samples ``questions`` questions, ``rollouts`` episodes of each (a GSPO
group), and trains on them with the project's objective: ``rl.losses``' GSPO loss with one
segment per step (the action is the segment's only policy token, so the sequence ratio is the
step's ratio), the group advantage over the rollouts of a question, and for GGPO the keep mask
of ``rl.ggpo`` computed from each episode's memory graph. The batch is split into
``minibatches`` updated one after the other; ``π_old`` is the policy that sampled the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from vimrag_jax.memory.graph import NodeKind
from vimrag_jax.rl.ggpo import is_positive, node_keep_mask, segment_keep_mask
from vimrag_jax.rl.losses import LossConfig, get_policy_loss
from vimrag_jax.toy import env as toy_env
from vimrag_jax.toy.env import EnvConfig, EnvState, Question
from vimrag_jax.toy.memories import (
    Observation,
    Params,
    encode,
    init_policy,
    memory_id,
    policy_logits,
)

# GGPO, GSPO, and two ablations: GGPO's rule for positive trajectories only (dead ends masked,
# failures trained on every step) and for negative ones only (relevant retrievals masked).
ALGORITHMS = {
    "ggpo": (True, True),
    "gspo": (False, False),
    "ggpo_positive_only": (True, False),
    "ggpo_negative_only": (False, True),
}
# The two presets share the GSPO ratio loss and its clip range; only the mask differs, so it
# can be a traced flag and one compiled program trains both.
LOSS = LossConfig.for_algorithm("ggpo")
assert LossConfig.for_algorithm("gspo") == LossConfig.for_algorithm("ggpo", ggpo_mask=False)


class Setting(NamedTuple):
    """Which memory and algorithm a run uses: arrays, so they can be traced (see ``setting``)."""

    memory: jax.Array  # int32[], index in ``memories.MEMORIES``
    mask_positive: jax.Array  # bool[], GGPO's mask on positive trajectories
    mask_negative: jax.Array  # bool[], GGPO's mask on negative trajectories


def setting(algorithm: str, memory: str) -> Setting:
    """The ``Setting`` of an algorithm (a key of ``ALGORITHMS``) and a memory name."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    positive, negative = ALGORITHMS[algorithm]
    return Setting(
        jnp.asarray(memory_id(memory), jnp.int32), jnp.asarray(positive), jnp.asarray(negative)
    )


class TrainConfig(NamedTuple):
    """Sizes and optimizer of a training run (static under jit)."""

    env: EnvConfig = EnvConfig()
    window: int = 2  # nodes the linear memory keeps
    questions: int = 8  # groups per update
    rollouts: int = 8  # G, episodes per question
    minibatches: int = 4
    updates: int = 400
    learning_rate: float = 1e-2
    hidden: int = 32
    eval_episodes: int = 256


class Steps(NamedTuple):
    """One episode's model calls, ``[T, ...]``."""

    obs: Observation  # what the policy saw
    action: jax.Array  # int32
    logp: jax.Array  # float32, log-prob under the policy that sampled it (π_old)
    node: jax.Array  # int32, the node the call created (-1 after the episode ended)
    valid: jax.Array  # bool, the call happened
    search: jax.Array  # bool, a search call
    repeated: jax.Array  # bool, a search of a sub-query the episode had already issued


class EpisodeStats(NamedTuple):
    """Per-episode outcome (batch it with a leading axis)."""

    reward: jax.Array
    searches: jax.Array
    repeated: jax.Array


def rollout(
    config: TrainConfig, memory: jax.Array, params: Params, question: Question, key: jax.Array
) -> tuple[EnvState, Steps]:
    """One episode of ``config.env.max_steps`` calls (no-ops after it ends)."""
    env = config.env

    def call(state: EnvState, key_t: jax.Array):
        obs = encode(env, memory, question, state, config.window)
        logp_all = jax.nn.log_softmax(policy_logits(params, obs))
        action = jax.random.categorical(key_t, logp_all).astype(jnp.int32)
        graph = state.graph
        issued = graph.node_valid & (graph.node_kind == NodeKind.SEARCH)
        search = action < env.num_queries
        repeated = search & jnp.any(issued & (graph.query_tokens[:, 0] == action))
        new_state, node = toy_env.step(env, question, state, action)
        valid = ~state.done
        steps = Steps(obs, action, logp_all[action], node, valid, valid & search, valid & repeated)
        return new_state, steps

    keys = jax.random.split(key, env.max_steps)
    return jax.lax.scan(call, toy_env.reset(env), keys)


def episode_stats(final: EnvState, steps: Steps) -> EpisodeStats:
    """Reward, searches and repeated searches of episodes (``steps`` with a trailing T axis)."""
    return EpisodeStats(
        final.reward,
        jnp.sum(steps.search, -1, jnp.float32),
        jnp.sum(steps.repeated, -1, jnp.float32),
    )


def group_advantages_jnp(rewards: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``rl.losses.group_advantages`` in jnp, vectorised over the last axis (the group):
    ``(r − mean r) / (std r + eps)`` from deviations to the group's largest reward."""
    deviation = rewards - jnp.max(rewards, axis=-1, keepdims=True)
    centered = deviation - jnp.mean(deviation, axis=-1, keepdims=True)
    return centered / (jnp.sqrt(jnp.mean(centered**2, axis=-1, keepdims=True)) + eps)


def segment_keep(run: Setting, final: EnvState, node: jax.Array, valid: jax.Array) -> jax.Array:
    """bool[T]: the steps that keep their gradient: the ``rl.ggpo`` mask of the episode's
    graph at each step's node (``node``, ``valid``: ``Steps``') where the setting masks this
    kind of trajectory (always for GGPO), else every valid step (always for GSPO)."""
    graph = final.graph
    node_keep = node_keep_mask(
        graph.adjacency,
        graph.node_valid,
        graph.answer_node,
        final.reward,
        final.relevant,
        positive_threshold=LOSS.positive_threshold,
    )
    positive = is_positive(final.reward, LOSS.positive_threshold)
    masked = jnp.where(positive, run.mask_positive, run.mask_negative)
    return jnp.where(masked, segment_keep_mask(node_keep, node, valid), valid)


class Batch(NamedTuple):
    """Training rows, one per episode (``[E, T, ...]``)."""

    obs: Observation
    action: jax.Array
    old_logp: jax.Array
    valid: jax.Array
    keep: jax.Array
    advantage: jax.Array  # float32[E], broadcast over the episode's steps


def policy_loss(params: Params, batch: Batch, loss: LossConfig = LOSS) -> jax.Array:
    """−J of SPEC §4 for a minibatch: the registry's ratio loss, one segment per step."""
    logp_all = jax.nn.log_softmax(policy_logits(params, batch.obs))
    logp = jnp.take_along_axis(logp_all, batch.action[..., None], -1)[..., 0]
    advantage = jnp.broadcast_to(batch.advantage[:, None], batch.valid.shape)
    value, _ = get_policy_loss(loss.name)(
        logp.reshape(-1, 1),
        batch.old_logp.reshape(-1, 1),
        batch.valid.reshape(-1, 1),
        advantage.reshape(-1),
        batch.keep.reshape(-1),
        clip_low=loss.clip_low,
        clip_high=loss.clip_high,
    )
    return value


def _sample_groups(config: TrainConfig, memory: jax.Array, params: Params, key: jax.Array):
    """Episodes ``[B, G]`` of ``B`` fresh questions, ``G`` rollouts each."""
    k_q, k_r = jax.random.split(key)
    questions = jax.vmap(toy_env.sample_question, (0, None))(
        jax.random.split(k_q, config.questions), config.env
    )
    keys = jax.random.split(k_r, (config.questions, config.rollouts))
    one = lambda q, k: rollout(config, memory, params, q, k)  # noqa: E731
    return jax.vmap(jax.vmap(one, (None, 0)), (0, 0))(questions, keys)


def make_train(config: TrainConfig) -> Callable[[jax.Array, Setting], dict[str, jax.Array]]:
    """A pure ``train(key, setting)``: per-update curves and the final evaluation of one run.

    ``jax.jit(jax.vmap(train, (0, None)))`` runs many seeds of one setting at once; the
    setting is traced, so every (algorithm, memory) pair reuses one compiled program.
    """
    episodes = config.questions * config.rollouts
    if episodes % config.minibatches:
        raise ValueError(f"{episodes} episodes do not split into {config.minibatches} minibatches")
    optimizer = optax.adam(config.learning_rate)
    grad_fn = jax.grad(policy_loss)

    def minibatch_step(carry, minibatch: Batch):
        params, opt_state = carry
        updates, opt_state = optimizer.update(grad_fn(params, minibatch), opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    def update(carry, key, run: Setting):
        params, opt_state = carry
        k_roll, k_perm = jax.random.split(key)
        final, steps = _sample_groups(config, run.memory, params, k_roll)
        keep = jax.vmap(jax.vmap(lambda f, s: segment_keep(run, f, s.node, s.valid)))(final, steps)
        batch = Batch(
            steps.obs,
            steps.action,
            steps.logp,
            steps.valid,
            keep,
            group_advantages_jnp(final.reward),
        )
        flat = jax.tree.map(lambda x: x.reshape(episodes, *x.shape[2:]), batch)
        order = jax.random.permutation(k_perm, episodes).reshape(config.minibatches, -1)
        minibatches = jax.tree.map(lambda x: x[order], flat)
        carry, _ = jax.lax.scan(minibatch_step, (params, opt_state), minibatches)
        stats = episode_stats(final, steps)
        kept = jnp.sum(keep) / jnp.maximum(jnp.sum(steps.valid), 1)
        curve = {**{k: jnp.mean(v) for k, v in stats._asdict().items()}, "kept_fraction": kept}
        return carry, curve

    def evaluate(params: Params, memory: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
        k_q, k_r = jax.random.split(key)
        questions = jax.vmap(toy_env.sample_question, (0, None))(
            jax.random.split(k_q, config.eval_episodes), config.env
        )
        keys = jax.random.split(k_r, config.eval_episodes)
        final, steps = jax.vmap(lambda q, k: rollout(config, memory, params, q, k))(questions, keys)
        stats = episode_stats(final, steps)
        return {
            "accuracy": jnp.mean(stats.reward),
            "searches": jnp.mean(stats.searches),
            "repeated_searches": jnp.mean(stats.repeated),
        }

    def train(key: jax.Array, run: Setting) -> dict[str, jax.Array]:
        k_init, k_train, k_eval = jax.random.split(key, 3)
        params = init_policy(k_init, config.env, config.hidden)
        carry = (params, optimizer.init(params))
        (params, _), curves = jax.lax.scan(
            lambda c, k: update(c, k, run), carry, jax.random.split(k_train, config.updates)
        )
        return {"curves": curves, "eval": evaluate(params, run.memory, k_eval)}

    return train


@functools.cache
def compiled_train(
    config: TrainConfig, quick_compile: bool = False
) -> Callable[[jax.Array, Setting], dict[str, jax.Array]]:
    """``jit(vmap(train))`` over seeds (keys ``[seeds]``), one per config for the process.

    ``quick_compile`` turns XLA's backend optimizations off: a third of the compile time for
    tiny test runs, at the price of a slower program.
    """
    options = {"xla_backend_optimization_level": 0} if quick_compile else None
    return jax.jit(jax.vmap(make_train(config), in_axes=(0, None)), compiler_options=options)
