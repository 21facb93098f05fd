"""VimRAG trained with GGPO (GSPO + graph-guided masks): the project's main experiment.

Presets are chosen after a colon, overrides with ``--config.KEY=VALUE``::

    python -m vimrag_jax.train --config=configs/ggpo.py                # tiny, one CPU machine
    python -m vimrag_jax.train --config=configs/ggpo.py:qwen3vl_8b \
        --config.model.path=/ckpt/Qwen3-VL-8B-Instruct --config.mesh.fsdp=8

``tiny`` (the default) runs end to end on one CPU machine with a small
Qwen3-architecture policy and the synthetic multimodal corpus. The ``qwen3vl_*``
presets are the paper's policies (SPEC §8) and need ``model.path`` set to a
local Hugging Face checkpoint directory.
"""

from __future__ import annotations

import ml_collections

PRESETS = ("tiny", "qwen3vl_2b", "qwen3vl_4b", "qwen3vl_8b")


def base_config() -> ml_collections.ConfigDict:
    """Settings shared by every preset (the paper's method constants included)."""
    c = ml_collections.ConfigDict()
    c.preset = "tiny"
    c.seed = 0
    c.step = "pjit"  # pjit (jit over NamedSharding) | pmap (data parallel only)

    # Devices: data × fsdp × tensor must equal the device count; -1 fills one axis.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.model = ml_collections.ConfigDict()
    c.model.name = "tiny"  # a preset of vimrag_jax.models, or "hf" to read model.path
    c.model.path = ""  # local Hugging Face checkpoint directory (config.json + safetensors)
    c.model.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    c.model.remat = False

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
    c.loss = ml_collections.ConfigDict()
    c.loss.name = "gspo"
    c.loss.ggpo_mask = True
    c.loss.clip_low = 3e-4
    c.loss.clip_high = 4e-4
    c.loss.positive_threshold = 1.0
    c.loss.kl_coef = 0.0

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 10
    c.optim.total_steps = 200
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0

    # Rollouts (SPEC §1, §7).
    c.rollout = ml_collections.ConfigDict()
    c.rollout.group_size = 8  # G rollouts per question
    c.rollout.max_model_calls = 20
    c.rollout.retrieval_top_k = 3
    c.rollout.max_policy_lag = 2
    c.rollout.embedded_workers = 1  # local worker processes the trainer starts (0 on pods)

    # Learner batches of segments (one model call = one segment).
    c.data = ml_collections.ConfigDict()
    c.data.batch_segments = 32
    c.data.max_segment_tokens = 1024
    c.data.corpus = ""  # empty: the synthetic multimodal corpus

    c.checkpoint = ml_collections.ConfigDict({"every_steps": 50, "keep": 3})
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config for a preset (``tiny`` when none is given)."""
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    c = base_config()
    c.preset = preset
    if preset == "tiny":
        c.optim.learning_rate = 3e-4
        c.rollout.group_size = 4
        c.data.batch_segments = 16
        c.data.max_segment_tokens = 256
        return c
    size = preset.removeprefix("qwen3vl_")
    c.model.name = "hf"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.rollout.embedded_workers = 0
    c.data.max_segment_tokens = 8192
    c.data.batch_segments = {"2b": 256, "4b": 256, "8b": 512}[size]
    c.mesh.fsdp = -1
    c.mesh.data = 1
    c.mesh.tensor = {"2b": 1, "4b": 1, "8b": 2}[size]
    return c
