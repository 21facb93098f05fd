"""VimRAG trained with GGPO (GSPO + graph-guided masks) and its baselines: the experiments.

The argument after the colon is ``[PRESET][,ALGORITHM]`` (either order), overrides come with
``--config.KEY=VALUE``::

    python -m vimrag_jax.train --config=configs/ggpo.py --workdir=/tmp/run   # tiny, GGPO, one CPU
    python -m vimrag_jax.train --config=configs/ggpo.py:qwen3vl_8b --workdir=/mnt/shared/run \
        --config.model.path=/ckpt/Qwen3-VL-8B-Instruct --config.mesh.fsdp=8
    python -m vimrag_jax.train --config=configs/ggpo.py:tiny,gspo --workdir=/tmp/gspo
    python -m vimrag_jax.train --config=configs/ggpo.py:sft --workdir=/tmp/sft  # warm start alone

``tiny`` (the default preset) runs end to end on one CPU machine with a small
Qwen3-architecture policy and the synthetic multimodal corpus. The ``qwen3vl_*``
presets are the paper's policies (SPEC §8) and need ``model.path`` set to a
local Hugging Face checkpoint directory. They are planned for 80 GB devices (GPUs, and TPU
v5p's 95 GB as they are): 2B and 4B on 8, 8B on 16. On TPU v6e (32 GB per chip) the planner
(``python -m vimrag_jax.plan``; docs/benchmarks.md, "Planner") fits 2B on 8 chips as it is, 4B
on 16 with ``--config.mesh.device_memory_gb=32 --config.optim.micro_batches=4`` and 8B on 32
with ``--config.mesh.device_memory_gb=32 --config.optim.micro_batches=8``.

The algorithm (``ggpo`` by default) is one of ``ALGORITHMS``: an RL algorithm switches the
``loss`` block to its preset (``with_algorithm``; ``vimrag_jax.rl.losses.LossConfig.for_algorithm``)
and ``sft`` trains the supervised warm start alone (``supervised_only``). The ``loss`` block is
what the learner trains with, and ``config_checks`` rejects a loss block whose ``name`` or
``ggpo_mask`` contradicts ``config.algorithm``. Nothing here depends on the workdir: empty
paths mean "the default place under ``--workdir``".
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from vimrag_jax.config_checks import ALGORITHMS
from vimrag_jax.rl.losses import LossConfig

ALGORITHM = "ggpo"
PRESETS = ("tiny", "smoke", "qwen3vl_2b", "qwen3vl_4b", "qwen3vl_8b")


def base_config() -> ml_collections.ConfigDict:
    """Settings shared by every preset (the paper's method constants included)."""
    c = ml_collections.ConfigDict()
    c.preset = "tiny"
    c.algorithm = ALGORITHM  # ggpo | gspo | gspo_token | grpo (the loss preset) | sft
    c.seed = 0
    c.step = "pjit"  # pjit (jit over NamedSharding) | pmap (data parallel only)

    # Devices: data × fsdp × tensor must equal the device count; -1 fills one axis.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # Memory of one device in GiB: config_checks refuses a config whose estimated peak
    # (vimrag_jax.footprint) exceeds it; 0 skips the check. Plan with python -m vimrag_jax.plan.
    c.mesh.device_memory_gb = 0.0

    c.model = ml_collections.ConfigDict()
    c.model.name = "tiny"  # a preset of vimrag_jax.models, or "hf" to read model.path
    c.model.path = ""  # local Hugging Face checkpoint directory (config.json + safetensors)
    c.model.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    # The learner's stored parameters: bfloat16 halves them (Adam's moments stay float32).
    c.model.param_dtype = "float32"
    c.model.remat = False
    # Scan the decoder layers (and the vision blocks between DeepStack taps) instead of
    # unrolling them: compile time stops growing with depth, and remat's memory saving shows
    # in XLA's planning on every backend (benchmarks/cpu_remat_memory.py).
    c.model.scan_layers = False
    c.model.remat_policy = "nothing_saveable"  # what a rematerialised layer keeps

    # The Multimodal Memory Graph (SPEC §1): fixed capacities of the padded arrays.
    c.graph = ml_collections.ConfigDict()
    c.graph.max_nodes = 16  # root + up to 14 steps + answer; 20 model calls ≈ 10 searches
    c.graph.max_items = 3  # memory slots per node = retrieval top-k
    c.graph.max_keyframes = 4
    c.graph.max_query_tokens = 32
    c.graph.max_summary_tokens = 64

    # Graph-modulated visual memory encoding (SPEC §2).
    c.memory = ml_collections.ConfigDict()
    c.memory.lam = 0.1
    c.memory.gamma = 0.3
    c.memory.top_k = 5
    c.memory.total_pixels = 5 * 256 * 32 * 32
    c.memory.rollout_budget = "averaged"  # the paper trains with the averaged budget
    c.memory.eval_budget = "energy"

    # Policy objective (SPEC §4): GSPO sequence ratios with the GGPO mask. The
    # baselines are the same block with other values (vimrag_jax.rl.losses.LossConfig).
    c.loss = loss_block(ALGORITHM)

    # vimrag_jax.optim: AdamW, warmup + cosine; steps count optimizer updates, each over
    # accumulate_steps micro-batches of data.batch_segments segments.
    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6
    c.optim.schedule = "warmup_cosine"  # warmup_cosine | warmup_constant
    c.optim.warmup_steps = 10
    c.optim.total_steps = 200
    c.optim.final_lr_ratio = 0.1  # cosine decays to learning_rate * final_lr_ratio
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01  # on kernels and embeddings, not on norms and biases
    c.optim.grad_clip = 1.0  # global norm; 0 disables
    c.optim.accumulate_steps = 1
    # Sequential forward/backward passes inside each optimizer update (gradient accumulated,
    # loss normalised by the whole update's valid segments): activation memory of 1/k of the
    # rows. The planner (python -m vimrag_jax.plan) says which k fits.
    c.optim.micro_batches = 1

    # Optional supervised warm start on scripted-expert trajectories (the `sft` algorithm runs
    # it alone). sft.steps = 0 skips it.
    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 0
    c.sft.learning_rate = 1e-5
    c.sft.warmup_steps = 10
    c.sft.batch_segments = 0  # segments per warm-start step; 0: data.batch_segments
    c.sft.data = ""  # shard directory of expert trajectories; empty: generate with the env
    c.sft.num_trajectories = 256  # generated when sft.data is empty

    # Rollouts (SPEC §1, §7).
    c.rollout = ml_collections.ConfigDict()
    c.rollout.group_size = 8  # G rollouts per question
    c.rollout.max_model_calls = 20
    c.rollout.retrieval_top_k = 3
    # Segments sampled more than this many versions (of the surviving timeline) before the
    # policy they would update are dropped at the update (late_segments); groups already that
    # old when the pipeline reads them are counted (data/stale_*).
    c.rollout.max_policy_lag = 2
    c.rollout.max_shards_per_version = 0  # a worker waits for a newer policy after this many
    c.rollout.embedded_workers = 1  # local worker processes the trainer starts (0 on pods)
    # embedded (JAX KV-cache sampler) | sglang | vllm (servers; the worker builds no model)
    # | openai (text-only /v1/completions fallback). README: "Serving with SGLang or vLLM".
    c.rollout.backend = "embedded"
    # embedded: devices one worker's sampler splits the policy over (tensor parallel: heads,
    # MLP, vocabulary and so the KV cache) and the weights' dtype ("" keeps the model's).
    c.rollout.sampler_tensor = 1
    c.rollout.sampler_dtype = ""
    # Server roots, one or several (comma-separated): http://host:30000 (sglang),
    # http://host:8000 (vllm), http://host:8000/v1 (openai). Requests go to the least loaded.
    c.rollout.server_url = ""
    c.rollout.server_model = ""  # vllm / openai: the served model name
    c.rollout.max_inflight = 8  # server backends: requests in flight at once per worker
    c.rollout.serving_path = ""  # vllm: the path it serves (a link); empty: WORKDIR/policy/serving
    c.rollout.connect_timeout_s = 10.0
    c.rollout.request_timeout_s = 300.0
    c.rollout.max_retries = 3
    c.rollout.retry_backoff_s = 1.0  # first wait before a retry (doubles, at most 30 s)
    # The agent (vimrag_jax.agent.config.RolloutConfig reads these).
    c.rollout.agent = "vimrag"  # vimrag | react | summary | mem1 (the paper's baselines)
    c.rollout.questions_per_batch = 4  # questions per worker batch (x group_size episodes)
    c.rollout.max_new_tokens = 256  # per model call
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.invalid_action_policy = "continue"  # continue | end
    c.rollout.max_invalid_actions = 5
    c.rollout.max_visuals = 64  # visual inputs per segment prompt
    # em | f1 (reward 1 when the metric passes the threshold, best over the accepted answers)
    # | judge (an LLM judge over an OpenAI-compatible chat server, vimrag_jax.envs.judge).
    c.rollout.reward_metric = "em"
    c.rollout.reward_threshold = 0.5
    # The judge (read only with reward_metric="judge"): the server's API root, e.g.
    # http://host:8000/v1, and the model name it serves; a judge failure scores 0 and is counted.
    c.rollout.judge_url = ""
    c.rollout.judge_model = ""
    c.rollout.judge_batch = 16  # judge requests in flight at once per worker
    c.rollout.judge_max_tokens = 64  # the reply "<judge>True</judge>" needs a few
    c.rollout.judge_timeout_s = 60.0
    c.rollout.judge_max_retries = 3  # on timeouts, connection errors, HTTP 429 / 5xx
    c.rollout.judge_cache = "judge_cache.jsonl"  # verdict cache under the workdir; "": none
    c.rollout.judge_api_key_env = ""  # environment variable holding the API key; "": none
    c.rollout.prompt_style = "full"  # full (tool JSON schemas) | compact (tiny models)

    # The built-in synthetic multimodal world (vimrag_jax.envs.synthetic.SyntheticConfig);
    # its seed is config.seed. Used when data.corpus is empty.
    c.env = ml_collections.ConfigDict()
    c.env.num_entities = 48
    c.env.num_questions = 200
    c.env.min_hops = 1  # questions chain 1..4 relations (SyntheticQA-style multi-hop)
    c.env.max_hops = 4
    c.env.answer_modalities = ("text", "image", "video")  # what the final attribute may be
    c.env.image_height = 64  # the synthetic pictures and video frames, in pixels
    c.env.image_width = 64
    c.env.video_frames = 8
    c.env.near_duplicates = 4  # look-alike pictures per entity (retrieval distractors)
    c.env.distractors_per_entity = 1
    c.env.eval_questions = 20  # the last ones: held out for eval
    # The first ones: the scripted expert's, for the warm start; the RL workers get the rest.
    # 0: the warm start draws from the RL questions.
    c.env.sft_questions = 0
    c.env.tokenizer_vocab_size = 2048  # the tiny model's BPE tokenizer

    # Learner batches of segments (one model call = one segment).
    c.data = ml_collections.ConfigDict()
    c.data.batch_segments = 32  # global: each process feeds batch_segments / processes rows
    c.data.max_segment_tokens = 1024
    # Each batch's token axis is cut after its last trained token, rounded up to a multiple
    # of this (exact: the policy is causal); one compile per length met. 0: never cut.
    c.data.length_bucket = 256
    # Drop groups whose G rollouts all got the same reward (zero advantage: no policy
    # gradient, only a diluted batch). Off in the paper's setting; counted in data/.
    c.data.skip_uniform_groups = False
    c.data.corpus = ""  # store dir (retrieval.import_corpus); empty: the synthetic corpus
    c.data.questions = ""  # with data.corpus: the question file (JSONL, vimrag_jax.envs.dataset)
    c.data.shard_dir = ""  # trajectory shards; empty: WORKDIR/rollouts
    c.data.prefetch = 2  # batches prepared ahead of the step
    c.data.max_wait_s = 600.0  # the learner gives up (exit 3) after this long without rollouts

    # vimrag_jax.checkpointing: orbax, one folder per step under WORKDIR/checkpoints.
    # JAX's persistent compilation cache: a restarted learner or worker reuses the programs the
    # last one compiled (minutes for a big model). Empty dir: WORKDIR/compile_cache; "off": none.
    c.compile_cache = ml_collections.ConfigDict({"dir": "", "min_compile_time_s": 1.0})

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50  # in step calls (TrainState.step)
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True  # save in the background while training goes on

    # vimrag_jax.publish: policy weights for the rollout workers under WORKDIR/policy.
    c.publish = ml_collections.ConfigDict()
    c.publish.every_steps = 1  # optimizer updates between published versions
    c.publish.keep = 3  # versions kept on disk (workers may still be reading older ones)
    # Each version also in Hugging Face layout (bf16) for SGLang / vLLM: auto (with those
    # backends) | on | off.
    c.publish.hf_layout = "auto"
    c.publish.background = True  # write versions on a thread, overlapping the next updates

    # vimrag_jax.metrics: TensorBoard + WORKDIR/metrics.jsonl every step; console line below.
    c.metrics = ml_collections.ConfigDict()
    c.metrics.every_steps = 10  # console progress line interval

    # vimrag_jax.eval: greedy episodes on the held-out questions (energy budget).
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # optimizer updates between evaluations; 0: only at the end
    c.eval.num_questions = 0  # 0: all of env.eval_questions
    c.eval.at_end = True

    # The final policy as a Hugging Face checkpoint under WORKDIR/export (with the tokenizer).
    c.export = ml_collections.ConfigDict()
    c.export.hf = True
    c.export.dtype = "bfloat16"  # bfloat16 | float32

    # vimrag_jax.distributed: multi-host JAX. enabled=None detects SLURM / TPU pod /
    # JAX_COORDINATOR_ADDRESS; True forces jax.distributed.initialize(), False never calls it.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = config_dict.placeholder(bool)
    c.distributed.coordinator_address = ""  # host:port; empty: from the cluster environment
    c.distributed.num_processes = -1  # -1: from the cluster environment
    c.distributed.process_id = -1  # -1: from the cluster environment
    c.distributed.initialization_timeout_s = 300
    return c


def loss_block(algorithm: str) -> ml_collections.ConfigDict:
    """The ``loss`` block of an algorithm preset (``LossConfig.for_algorithm``)."""
    return ml_collections.ConfigDict(dataclasses.asdict(LossConfig.for_algorithm(algorithm)))


# Loss settings that belong to the run, not to the algorithm: how the ratio's denominator
# is obtained and the KL anchor (a preset such as tiny sets them for every algorithm alike).
RUN_LOSS_KEYS = ("old_logprobs", "tis_cap", "kl_coef", "num_minibatches")


def with_algorithm(c: ml_collections.ConfigDict, algorithm: str) -> ml_collections.ConfigDict:
    """``c`` switched to ``algorithm`` (one of ``ALGORITHMS``) in place and returned.

    An RL algorithm gets its loss preset, keeping the run's ``RUN_LOSS_KEYS`` (so GGPO and its
    baselines differ only in the algorithm); ``sft`` is ``supervised_only``.
    """
    if algorithm == "sft":
        return supervised_only(c)
    kept = {key: c.loss[key] for key in RUN_LOSS_KEYS}
    c.algorithm = algorithm
    c.loss = loss_block(algorithm)
    c.loss.update(kept)
    return c


def supervised_only(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``c`` switched to the supervised warm start alone, no RL (``algorithm="sft"``).

    Token cross-entropy on the policy-generated tokens of scripted-expert trajectories (the
    loss mask of SPEC §6) for ``sft.steps`` updates at ``sft.learning_rate``; with ``sft.data``
    empty the trajectories come from the synthetic environment's scripted expert. A later RL
    run can start from this run's checkpoint.
    """
    c.algorithm = "sft"
    c.rollout.embedded_workers = 0  # no rollouts: the data are expert trajectories
    # The SFT phase's optimizer is config.optim with sft.learning_rate / warmup_steps / steps
    # (vimrag_jax.optim.sft_optim_config), so those keys are the only ones to set here.
    c.sft.steps = {"tiny": 100, "smoke": 1}.get(c.preset, 500)
    return c


def apply_preset(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """Sizes ``c`` for ``preset`` (one of ``PRESETS``) in place and returns it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    c.preset = preset
    if preset == "tiny":
        return _tiny(c)
    if preset == "smoke":
        return _smoke(_tiny(c))
    size = preset.removeprefix("qwen3vl_")
    c.model.update(name="hf", dtype="bfloat16", remat=True, scan_layers=True)
    c.rollout.embedded_workers = 0
    # GSPO as published: 4 minibatches per rollout batch against the log-probs of the policy
    # that started it (the clip binds from the second), the sampler's only through the
    # truncated importance weight (its numerical gap to the learner exceeds ε = 3e-4 alone).
    c.loss.update(num_minibatches=4, old_logprobs="recompute")
    # One version per rollout batch; intervals in whole batches of 4 updates.
    c.publish.every_steps = 4
    c.checkpoint.every_steps = 48
    # At most four compiles of the big step (length buckets of 2048).
    c.data.update(
        max_segment_tokens=8192,
        length_bucket=2048,
        batch_segments={"2b": 256, "4b": 256, "8b": 512}[size],
    )
    c.mesh.update(fsdp=-1, data=1, tensor={"2b": 1, "4b": 1, "8b": 2}[size])
    # 80 GB GPUs: 2B and 4B on 8, 8B on 16. Each optimizer update (a minibatch) runs one
    # segment row per device per pass; python -m vimrag_jax.plan prints the per-device figures
    # (docs/benchmarks.md, "Planner").
    c.mesh.device_memory_gb = 80.0
    c.optim.micro_batches = {"2b": 8, "4b": 8, "8b": 16}[size]
    return c


def _tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``tiny`` preset: one CPU machine, a policy trained from scratch."""
    # A 1.0M-parameter Qwen3 trained from scratch (the `tiny-agent` model preset): after
    # the warm start it makes well-formed tool calls (the 205k `tiny` breaks ~half of
    # them), but neither learns in minutes to copy names out of its context, so searches
    # and answers are partly memorised, partly guessed; RL raises the training reward
    # only slowly (0.19 -> 0.25 over 90 updates; README, issue 5's notes).
    c.model.name = "tiny-agent"
    # The policy is text-only: ask only about facts stated in text, in one hop (the corpus
    # keeps its pictures, videos and distractors as retrieval candidates). One text fact per
    # entity: the world holds 52 distinct one-hop questions (48 entities and 4 twins). The
    # last 12 are held out; eval entities are never asked about in training.
    c.env.update(answer_modalities=("text",), max_hops=1, num_questions=52, eval_questions=12)
    # A text-only tiny model sees pictures only as placeholder tokens: keep them few
    # (4 tokens per picture at the top-K budget) and the system prompt short.
    c.memory.total_pixels = 5 * 4 * 32 * 32
    c.rollout.update(prompt_style="compact", max_new_tokens=192)
    # Warm start on scripted-expert trajectories: token NLL ~0.07 after 300 steps. Segments
    # are cut to 128-token multiples past their last trained token (exact; ~1.6x faster).
    c.data.update(max_segment_tokens=1024, length_bucket=128)
    c.sft.update(steps=300, num_trajectories=1024, learning_rate=3e-3, batch_segments=16)
    # Then GGPO. One worker process on the same CPU runs ahead of the learner: the ratio is
    # taken to the learner's own log-probs before the update (truncated importance weight
    # to the sampler's), groups with one reward for all are skipped, sampling is cool (a
    # tiny policy derails at temperature 1). Without a KL anchor the failed groups'
    # negative advantages broke the tool-call format at lr 3e-4 (invalid actions 0 -> 95%
    # in 20 updates); with a k3 KL to the warm start at 0.5 the format holds at 1.5e-4.
    c.loss.update(old_logprobs="recompute", kl_coef=0.5)
    c.data.skip_uniform_groups = True
    c.rollout.update(temperature=0.3, group_size=4, max_policy_lag=4)
    # The worker shares the CPU with the learner. 3 shards (48 rollouts, ~150 segments, about
    # half of them in uniform groups) per version is a little more than an update of 48
    # segments uses: the learner never waits, and what falls 4 versions behind is dropped
    # (~20 % of segments). With 2 nothing lags, but the learner waits ~7 s per update.
    c.rollout.max_shards_per_version = 3
    c.data.batch_segments = 48
    c.optim.update(learning_rate=1.5e-4, final_lr_ratio=0.2, total_steps=90, warmup_steps=5)
    c.checkpoint.every_steps = 30
    c.eval.update(every_steps=30, num_questions=12)
    c.export.dtype = "float32"
    return c


def _smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``smoke`` preset: ``tiny`` shrunk so that every part runs in about a minute on two
    cores (one warm-start step on four expert trajectories, then RL with a local worker, a
    checkpoint every step, an evaluation of two questions and the export at the end); the
    end-to-end tests and the kill drill run it. It checks the machinery, nothing learns."""
    c.model.name = "tiny"  # the smallest policy
    c.data.skip_uniform_groups = False  # a random policy's groups all get reward 0: keep them
    c.sft.update(steps=1, warmup_steps=1, num_trajectories=4)
    c.optim.warmup_steps = 1
    c.rollout.update(group_size=2, questions_per_batch=2, max_model_calls=9, max_new_tokens=192)
    c.data.update(batch_segments=8, max_wait_s=240)
    c.checkpoint.every_steps = 1
    c.metrics.every_steps = 1
    c.eval.update(every_steps=0, num_questions=2)
    return c


def parse_arg(arg: str | None) -> tuple[str, str]:
    """``(preset, algorithm)`` of a config argument ``[PRESET][,ALGORITHM]``, in either order.

    ``tiny`` and ``ggpo`` stand in for what is not named: ``"qwen3vl_8b,grpo"``, ``"gspo"``.
    """
    tokens = [token.strip() for token in (arg or "").split(",") if token.strip()]
    presets = [token for token in tokens if token in PRESETS]
    algorithms = [token for token in tokens if token in ALGORITHMS]
    unknown = [token for token in tokens if token not in PRESETS + ALGORITHMS]
    if unknown or len(presets) > 1 or len(algorithms) > 1:
        what = (
            f"unknown preset {unknown[0]!r} (nor an algorithm)"
            if unknown
            else "more than one preset or algorithm"
        )
        raise ValueError(
            f"{what} in the config argument {arg!r}; it is [PRESET][,ALGORITHM] with a preset "
            f"of {', '.join(PRESETS)} and an algorithm of {', '.join(ALGORITHMS)}"
        )
    return (presets or ["tiny"])[0], (algorithms or [ALGORITHM])[0]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of ``[PRESET][,ALGORITHM]`` (``parse_arg``; ``tiny`` with GGPO by default)."""
    preset, algorithm = parse_arg(arg)
    return with_algorithm(apply_preset(base_config(), preset), algorithm)
