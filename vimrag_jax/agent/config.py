"""Typed rollout settings: the agent's view of the experiment config (``RolloutConfig``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from vimrag_jax.agent import prompts
from vimrag_jax.memory.energy import PIXELS_PER_TOKEN, TOTAL_PIXELS

INVALID_POLICIES = ("continue", "end")
AGENTS = ("vimrag", "react", "summary", "mem1")


#: "em" / "f1": string checks (``envs.rewards``); "judge": an LLM judge (``envs.judge``,
#: configured by the ``rollout.judge_*`` keys, which the agent itself does not read).
REWARD_METRICS = ("em", "f1", "judge")

#: Where each field comes from in the experiment config (``memory.budget`` is special: the
#: rollout or evaluation budget, see ``RolloutConfig.from_config``).
CONFIG_KEYS = {
    **{
        name: f"rollout.{name}"
        for name in (
            "agent",
            "group_size",
            "questions_per_batch",
            "max_model_calls",
            "retrieval_top_k",
            "max_new_tokens",
            "temperature",
            "top_p",
            "invalid_action_policy",
            "max_invalid_actions",
            "max_visuals",
            "reward_metric",
            "reward_threshold",
            "prompt_style",
        )
    },
    "max_segment_tokens": "data.max_segment_tokens",
    **{
        name: f"graph.{name}"
        for name in (
            "max_nodes",
            "max_items",
            "max_keyframes",
            "max_query_tokens",
            "max_summary_tokens",
        )
    },
    **{name: f"memory.{name}" for name in ("lam", "gamma", "top_k", "total_pixels")},
}
_TYPES = {"int": int, "float": float, "str": str}


def config_value(cfg: Any, path: str) -> Any:
    """The value at a dotted ``path`` of a ConfigDict; a missing key is an error naming it."""
    value = cfg
    for key in path.split("."):
        try:
            value = value[key]
        except (KeyError, TypeError, AttributeError):
            raise KeyError(f"the experiment config has no {path} (read by RolloutConfig)") from None
    return value


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Typed rollout settings: a checked view of the experiment config.

    ``from_config`` reads every field from the config (``CONFIG_KEYS``: ``rollout.*``,
    ``data.max_segment_tokens``, ``graph.*``, ``memory.*``, and ``memory.rollout_budget`` or,
    for evaluation, ``memory.eval_budget`` as ``budget``); a missing key is an error. The field
    defaults serve direct construction in tests only. ``prompt_style`` is ``"full"`` or
    ``"compact"`` (see ``prompts.system_prompt``); ``reward_threshold`` is the token-F1 pass
    mark of ``reward_metric="f1"``; ``reward_metric="judge"`` is graded by an
    ``envs.judge.Judge`` the worker or evaluator builds from the config.
    """

    agent: str = "vimrag"
    group_size: int = 4
    questions_per_batch: int = 4
    max_model_calls: int = 20
    retrieval_top_k: int = 3
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    invalid_action_policy: str = "continue"
    max_invalid_actions: int = 5
    max_visuals: int = 64
    reward_metric: str = "em"
    reward_threshold: float = 0.5
    prompt_style: str = "full"
    max_segment_tokens: int = 2048
    max_nodes: int = 16
    max_items: int = 3
    max_keyframes: int = 4
    max_query_tokens: int = 32
    max_summary_tokens: int = 64
    budget: str = "averaged"
    lam: float = 0.1
    gamma: float = 0.3
    top_k: int = 5
    total_pixels: int = TOTAL_PIXELS

    def __post_init__(self):
        if self.agent not in AGENTS:
            raise ValueError(f"rollout.agent must be one of {AGENTS}, got {self.agent!r}")
        if self.invalid_action_policy not in INVALID_POLICIES:
            raise ValueError(
                f"rollout.invalid_action_policy must be one of {INVALID_POLICIES}, "
                f"got {self.invalid_action_policy!r}"
            )
        if self.prompt_style not in prompts.PROMPT_STYLES:
            raise ValueError(
                f"rollout.prompt_style must be one of {prompts.PROMPT_STYLES}, "
                f"got {self.prompt_style!r}"
            )
        if self.reward_metric not in REWARD_METRICS:
            raise ValueError(
                f"rollout.reward_metric must be one of {REWARD_METRICS}, got {self.reward_metric!r}"
            )
        if not 0.0 < self.reward_threshold <= 1.0:
            raise ValueError(
                f"rollout.reward_threshold must be in (0, 1], got {self.reward_threshold}"
            )
        if self.budget not in ("averaged", "energy"):
            raise ValueError(f"memory budget must be 'averaged' or 'energy', got {self.budget!r}")
        if self.retrieval_top_k > self.max_items:
            raise ValueError(
                f"rollout.retrieval_top_k={self.retrieval_top_k} exceeds graph.max_items="
                f"{self.max_items}: every retrieved item needs a memory slot"
            )
        if self.max_new_tokens >= self.max_segment_tokens:
            raise ValueError(
                f"rollout.max_new_tokens={self.max_new_tokens} leaves no room for a prompt in "
                f"data.max_segment_tokens={self.max_segment_tokens}"
            )
        for name in ("group_size", "questions_per_batch", "max_model_calls", "max_visuals"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, cfg: Any, *, evaluation: bool = False) -> RolloutConfig:
        """From an experiment ConfigDict; every key must be there (see the class docstring)."""
        types = {f.name: _TYPES[f.type] for f in dataclasses.fields(cls)}
        fields = {name: types[name](config_value(cfg, path)) for name, path in CONFIG_KEYS.items()}
        budget = "memory.eval_budget" if evaluation else "memory.rollout_budget"
        fields["budget"] = str(config_value(cfg, budget))
        return cls(**fields)

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_segment_tokens - self.max_new_tokens

    @property
    def observation_pixels(self) -> int:
        """The pixel budget of one retrieved image (a video splits it over its frames)."""
        return max(self.total_pixels // max(self.top_k, 1), PIXELS_PER_TOKEN)

    @property
    def max_visual_patches(self) -> int:
        """An upper bound on the patch rows (16-px patches of a 2-frame temporal patch; a
        merged visual token is 4) of one prompt's images and videos: the learner's
        ``data.vision.VisualInputs`` cap when the config sets no ``data.max_patches``.

        VimRAG shows its visual memory (at most ``total_pixels`` in all) plus one retrieval
        observation (``retrieval_top_k`` items of ``observation_pixels`` each); a video's
        frames pair up, so its patches are at most its pixels / 256 as an image's are. The
        slack covers the one-token minimum of small items and odd frame counts. The
        baselines may show up to ``max_visuals`` references of any budget.
        """
        minimum = 4 * (self.max_nodes * self.max_items * (self.max_keyframes + 1))
        minimum += 4 * self.retrieval_top_k * prompts.MAX_VIDEO_FRAMES
        if self.agent == "vimrag":
            pixels = self.total_pixels + self.retrieval_top_k * self.observation_pixels
        else:
            pixels = self.max_visuals * max(self.total_pixels, self.observation_pixels)
        return -(-(pixels // 256 + minimum) // 4) * 4


__all__ = [
    "AGENTS",
    "CONFIG_KEYS",
    "INVALID_POLICIES",
    "REWARD_METRICS",
    "RolloutConfig",
    "config_value",
]
