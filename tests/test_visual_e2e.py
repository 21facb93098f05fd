"""A Qwen3-VL policy end to end: rollouts hand the sampler each prompt's images and videos, and
the learner, reading the recorded references back through the pipeline, sees the same pixels.

One tiny world (pictures and videos) and one tiny random Qwen3-VL (the ``tiny-vl`` preset with
the tokenizer's placeholder ids, as ``Experiment.initial_model`` builds it). A random model
never makes a valid tool call, so the episodes interleave it with the scripted expert: a row
whose prompt shows pictures or videos goes to the VL sampler, the next call of that row to the
expert (which moves the episode on), and so on. The sampler's segments are recorded with their
behaviour log-probs like any other; the learner must reproduce those log-probs from the
records alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from vimrag_jax.agent import prompts
from vimrag_jax.agent.loop import VimRAGAgent
from vimrag_jax.data.pipeline import PipelineOptions, make_pipeline, visual_stage_from_config
from vimrag_jax.data.vision import VisualPatches
from vimrag_jax.envs.scripted_sampler import ScriptedSampler, expert_factory
from vimrag_jax.experiment import Experiment
from vimrag_jax.learner import Learner, loss_inputs, trim_tokens
from vimrag_jax.memory.energy import TOTAL_PIXELS
from vimrag_jax.models.presets import init_model, preset_config
from vimrag_jax.parallel.mesh import make_mesh
from vimrag_jax.parallel.step import policy_logprobs, visual_inputs
from vimrag_jax.rl.losses import LossConfig
from vimrag_jax.rollout.records import ShardWriter, shard_name
from vimrag_jax.rollout.trajectory import record_dims, run_records
from vimrag_jax.sampling.logprobs import VISUAL_KEYS
from vimrag_jax.sampling.sampler import Sampler

SAMPLED_TOKENS = 8  # per call of the random model (the expert writes whole tool calls)
BATCH_SEGMENTS = 8


def _config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            model=dict(name="tiny-vl", path="", dtype="float32"),
            env=dict(
                num_entities=8,
                num_questions=12,
                eval_questions=2,
                sft_questions=0,
                min_hops=1,
                max_hops=1,
                near_duplicates=4,
                distractors_per_entity=1,
                image_height=32,
                image_width=64,
                video_frames=4,
                answer_modalities=("image", "video"),
                tokenizer_vocab_size=2048,
            ),
            data=dict(corpus="", max_segment_tokens=1536, batch_segments=BATCH_SEGMENTS),
            rollout=dict(
                backend="embedded",
                agent="vimrag",
                group_size=2,
                questions_per_batch=2,
                max_model_calls=8,
                retrieval_top_k=3,
                max_new_tokens=256,
                temperature=1.0,
                top_p=1.0,
                invalid_action_policy="continue",
                max_invalid_actions=5,
                max_visuals=64,
                reward_metric="em",
                reward_threshold=0.5,
                prompt_style="compact",
                max_policy_lag=2,
            ),
            # Every key RolloutConfig reads (it takes no defaults).
            graph=dict(
                max_nodes=16,
                max_items=3,
                max_keyframes=4,
                max_query_tokens=32,
                max_summary_tokens=64,
            ),
            memory=dict(
                lam=0.1,
                gamma=0.3,
                top_k=5,
                total_pixels=TOTAL_PIXELS,
                rollout_budget="averaged",
                eval_budget="energy",
            ),
        )
    )


class ExpertAndModel:
    """Sends a row whose prompt shows pictures or videos to the VL sampler (unless the model
    made the row's previous call), every other row to the scripted expert; records what the
    sampler got."""

    wants_contexts = True
    takes_prefill_inputs = True

    def __init__(self, expert: ScriptedSampler, sampler: Sampler):
        self.expert, self.sampler = expert, sampler
        self.model_made_last: dict[str, bool] = {}
        self.seen: list[tuple[list[int], dict | None]] = []  # every prompt and its inputs
        self.model_calls: list[tuple[list[int], dict, object]] = []

    def generate(self, prompt_ids, *, contexts, prefill_inputs, **kwargs):
        self.seen += list(zip(prompt_ids, prefill_inputs, strict=True))
        rows = [
            i
            for i, (context, inputs) in enumerate(zip(contexts, prefill_inputs, strict=True))
            if inputs and not self.model_made_last.get(context.key)
        ]
        out = [None] * len(prompt_ids)
        if rows:
            completions = self.sampler.generate(
                [prompt_ids[i] for i in rows],
                prefill_inputs=[prefill_inputs[i] for i in rows],
                **{**kwargs, "max_new_tokens": SAMPLED_TOKENS},
            )
            for i, completion in zip(rows, completions, strict=True):
                out[i] = completion
                self.model_calls.append((list(prompt_ids[i]), prefill_inputs[i], completion))
        rest = [i for i in range(len(prompt_ids)) if out[i] is None]
        if rest:
            completions = self.expert.generate(
                [prompt_ids[i] for i in rest], contexts=[contexts[i] for i in rest], **kwargs
            )
            for i, completion in zip(rest, completions, strict=True):
                out[i] = completion
        for i, context in enumerate(contexts):
            self.model_made_last[context.key] = i in rows
        return out


def _fill(model: nnx.Module, seed: int = 0) -> nnx.Module:
    """Random weights from NumPy (an eager init of every shape takes seconds)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        center = 1.0 if path[-1] == "scale" else 0.0  # norm scales near 1
        var.set_value(jnp.asarray(center + 0.08 * rng.standard_normal(shape), jnp.float32))
    return model


@dataclasses.dataclass
class Run:
    cfg: ml_collections.ConfigDict
    experiment: Experiment
    model: nnx.Module
    backend: ExpertAndModel
    records: list
    batches: list


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    cfg = _config()
    experiment = Experiment.from_config(cfg, tmp_path_factory.mktemp("vl"))
    model = _fill(nnx.eval_shape(experiment.initial_model))
    rc = experiment.rollout_config()
    sampler = Sampler(
        model,
        max_prompt_len=rc.max_prompt_tokens,
        max_new_tokens=SAMPLED_TOKENS,
        eos_token_ids=experiment.stop_token_ids(),
        pad_token_id=experiment.tokenizer.pad_token_id,
        batch_buckets=(4,),
        length_buckets=(rc.max_prompt_tokens,),
        patch_bucket=lambda patches: 256,
    )
    backend = ExpertAndModel(ScriptedSampler(experiment.tokenizer, expert_factory()), sampler)
    agent = VimRAGAgent(
        experiment.store,
        experiment.tokenizer,
        backend,
        rc,
        stop_token_ids=sampler.eos_token_ids,
        visual_patches=VisualPatches.from_store(experiment.store),
    )
    # One question answered by a picture, one by a video.
    store = experiment.store
    by_modality = {}
    for question in experiment.train_questions:
        by_modality.setdefault(store.item(question.evidence_ids[-1]).modality, question)
    records, _ = run_records(agent, [by_modality["image"], by_modality["video"]], seed=0)
    shards = tmp_path_factory.mktemp("shards")
    with ShardWriter(shards, name=shard_name("w0", 0), dims=record_dims(rc)) as writer:
        for record in records:
            writer.write(record)
    stage = visual_stage_from_config(
        cfg, experiment.initial_model, experiment.store, rc.max_visual_patches
    )
    options = PipelineOptions(
        directory=shards, dims=record_dims(rc), batch_segments=BATCH_SEGMENTS, follow=False
    )
    batches = list(iter(make_pipeline(options, visual_inputs=stage, prefetch=0)))
    return Run(cfg, experiment, model, backend, records, batches)


def _model_rows(batch) -> np.ndarray:
    """Rows sampled by the VL model (the expert's log-probs are exactly 0)."""
    mask = batch["loss_mask"] & batch["segment_valid"][:, None]
    return np.flatnonzero(np.any(mask & (batch["behavior_logprobs"] != 0), axis=1))


def _prompt(batch, row) -> np.ndarray:
    return batch["tokens"][row, : np.flatnonzero(batch["loss_mask"][row])[0]]


def test_a_vl_policy_is_wired_and_text_only_backends_are_not(run):
    config, tokenizer = run.model.config, run.experiment.tokenizer
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(prompts.IMAGE_PAD)
    assert config.video_token_id == tokenizer.convert_tokens_to_ids(prompts.VIDEO_PAD)
    assert run.experiment.make_backend(run.model).takes_prefill_inputs
    store = run.experiment.store
    text_model = nnx.eval_shape(lambda: init_model(preset_config("tiny"), rngs=nnx.Rngs(0)))
    text_sampler = Sampler(
        text_model, max_prompt_len=64, max_new_tokens=4, eos_token_ids=(), pad_token_id=0
    )
    assert not text_sampler.takes_prefill_inputs
    config = run.experiment.rollout_config()
    for backend in (text_sampler, ScriptedSampler(tokenizer, expert_factory())):
        assert VimRAGAgent(store, tokenizer, backend, config).visual_patches is None
    with pytest.raises(ValueError, match="prefill_inputs need a model"):
        text_sampler.generate([[1, 2]], prefill_inputs=[None])
    # A text-only policy's pipeline gets no visual stage.
    text_fn = lambda: init_model(preset_config("tiny"), rngs=nnx.Rngs(0))  # noqa: E731
    assert visual_stage_from_config(run.cfg, text_fn, store, 64) is None


def test_the_sampler_gets_each_prompts_recorded_pixels(run):
    config = run.model.config
    for prompt, inputs in run.backend.seen:  # text-only prompts get no pixel inputs
        shows = np.isin(prompt, [config.image_token_id, config.video_token_id]).any()
        assert bool(inputs) == bool(shows)
    calls = run.backend.model_calls
    assert len(calls) >= 4
    kinds = set()
    for prompt, inputs, _ in calls:
        for token, pixels, grid in (
            (config.image_token_id, "pixel_values", "image_grid_thw"),
            (config.video_token_id, "pixel_values_videos", "video_grid_thw"),
        ):
            placeholders = int(np.sum(np.asarray(prompt) == token))
            if pixels in inputs:
                kinds.add(pixels)
                assert placeholders == int(np.prod(inputs[grid], axis=1).sum()) // 4 > 0
                assert len(inputs[pixels]) == int(np.prod(inputs[grid], axis=1).sum())
            else:
                assert placeholders == 0
    assert kinds == {"pixel_values", "pixel_values_videos"}
    # The record's references rebuild exactly the arrays the sampler got.
    patches = VisualPatches.from_store(run.experiment.store)
    by_prompt = {tuple(prompt): inputs for prompt, inputs, _ in calls}
    matched = 0
    for record in run.records:
        for s in np.flatnonzero(record["segment_valid"]):
            prompt = tuple(record["tokens"][s, : np.flatnonzero(record["loss_mask"][s])[0]])
            if prompt not in by_prompt:
                continue
            refs = record["segment_visuals"][s][record["segment_visual_valid"][s]]
            rebuilt = patches.prompt_inputs(refs)
            assert rebuilt.keys() == by_prompt[prompt].keys()
            for key, value in rebuilt.items():
                np.testing.assert_array_equal(value, by_prompt[prompt][key])
            matched += 1
    assert matched == len(calls)


@nnx.jit
def _logprobs(model, tokens, visual):
    return policy_logprobs(model, tokens, visual)


def test_learner_logprobs_equal_the_samplers_behaviour_logprobs(run):
    video_id = run.model.config.video_token_id
    gaps, video_rows, rows_seen = [], 0, 0
    for batch in run.batches:
        logp = np.asarray(_logprobs(run.model, batch["tokens"], visual_inputs(batch)))
        for row in _model_rows(batch):
            mask = batch["loss_mask"][row]
            gaps.append(np.abs(logp[row, mask] - batch["behavior_logprobs"][row, mask]).max())
            video_rows += int(np.any(_prompt(batch, row) == video_id))
            rows_seen += 1
    assert rows_seen == len(run.backend.model_calls) and video_rows >= 1
    assert max(gaps) < 1e-4, gaps
    # The pixels matter: the same tokens with other pixels get other log-probs.
    batch = run.batches[0]
    changed = {**visual_inputs(batch), "pixel_values": -batch["pixel_values"]}
    other = np.asarray(_logprobs(run.model, batch["tokens"], changed))
    rows = _model_rows(batch)
    mask = batch["loss_mask"][rows]
    assert np.abs(other[rows][mask] - batch["behavior_logprobs"][rows][mask]).max() > 1e-3


def test_pjit_and_pmap_learner_steps_train_on_the_segments_pixels(run):
    batch = max(run.batches, key=lambda b: len(_model_rows(b)))
    batch = {**batch, "advantage": np.where(np.arange(BATCH_SEGMENTS) % 2, 1.0, -1.0)}
    batch["advantage"] = batch["advantage"].astype(np.float32)
    params = jax.tree.map(np.asarray, nnx.state(run.model, nnx.Param))
    # Two devices: the segments (and their pixels) are split across devices in both steps,
    # at a fraction of an 8-device compile's cost.
    mesh = make_mesh(2, 1, 1, devices=jax.devices()[:2])
    results = {}
    for kind in ("pjit", "pmap"):
        learner = Learner(
            run.experiment.initial_model,
            optax.sgd(1e-2),
            LossConfig.for_algorithm("ggpo"),
            mesh,
            step_kind=kind,
            length_bucket=128,
        )
        assert learner.takes_visuals
        learner.initialize(params)
        metrics = learner.train_step(batch)
        assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
        results[kind] = (metrics, jax.device_get(learner.params()))
    assert results["pjit"][0]["loss"] == pytest.approx(results["pmap"][0]["loss"], abs=1e-6)
    for a, b in zip(*(jax.tree.leaves(results[k][1]) for k in results), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # The update moved the vision tower too: its gradient came through the pixels.
    start = jax.tree.leaves(params["visual"])
    after = jax.tree.leaves(results["pjit"][1]["visual"])
    moved = [np.abs(np.asarray(x) - np.asarray(y)).max() for x, y in zip(start, after, strict=True)]
    assert max(moved) > 0


def test_visual_batches_are_checked_and_trimmed(run):
    batch = run.batches[0]
    inputs = loss_inputs(batch, visual=True)
    assert set(VISUAL_KEYS) <= set(inputs)
    text_only = {k: v for k, v in batch.items() if k not in VISUAL_KEYS}
    with pytest.raises(KeyError, match="visual stage"):
        loss_inputs(text_only, visual=True)
    assert not set(VISUAL_KEYS) & set(loss_inputs(batch))  # text-only learners ignore them
    trimmed = trim_tokens(inputs, 128)
    length = trimmed["tokens"].shape[1]
    assert length < batch["tokens"].shape[1]
    assert trimmed["position_ids"].shape == (BATCH_SEGMENTS, 3, length)
    assert trimmed["visual_token_index"].shape == (BATCH_SEGMENTS, length)
    assert trimmed["pixel_values"].shape == batch["pixel_values"].shape
    with pytest.raises(KeyError, match="lacks"):
        visual_inputs({k: v for k, v in batch.items() if k != "position_ids"})
