"""Scripted policies as a sampler backend: expert and noisy trajectories as model-style text.

``ScriptedSampler.generate`` has the sampler's call shape plus ``contexts``: the agent loop hands
every prompt's ``RowContext`` (episode key, question, ``EpisodeView``) to backends that set
``wants_contexts = True``. The sampler keeps one ``ScriptedPolicy`` per episode key, asks it for
the next action, turns the policy's ``information_id`` convention (the corpus item id, ``"17"``)
into the label the observation showed (``"Picture 2"``, the protocol's convention), formats the
call with ``protocol.format_tool_call``, appends the end-of-turn token and tokenizes the text.
Log-probs are 0 (the policy is deterministic). These trajectories are the cold-start SFT data
and the loop's test fixtures: every call they emit parses back to the scripted action.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from vimrag_jax.agent.episode import RowContext
from vimrag_jax.agent.protocol import ROOT_ID, format_tool_call
from vimrag_jax.envs import scripted
from vimrag_jax.sampling.sampler import Completion

PolicyFactory = Callable[[RowContext], scripted.ScriptedPolicy]


def episode_seed(key: str, seed: int = 0) -> int:
    """A policy seed from the episode key: independent of batch position and batch size."""
    return zlib.crc32(f"{seed}/{key}".encode()) & 0x7FFFFFFF


def expert_factory(*, max_calls: int = 20, seed: int = 0) -> PolicyFactory:
    """``ExpertPolicy`` per episode."""

    def make(context: RowContext) -> scripted.ScriptedPolicy:
        return scripted.ExpertPolicy(
            context.question, seed=episode_seed(context.key, seed), max_calls=max_calls
        )

    return make


def noisy_factory(
    entities: dict[str, str],
    *,
    noise: scripted.NoiseConfig | None = None,
    max_calls: int = 20,
    seed: int = 0,
) -> PolicyFactory:
    """``NoisyPolicy`` per episode (``entities`` from ``synthetic.entity_kinds``)."""

    def make(context: RowContext) -> scripted.ScriptedPolicy:
        return scripted.NoisyPolicy(
            context.question,
            entities,
            noise=noise or scripted.NoiseConfig(),
            seed=episode_seed(context.key, seed),
            max_calls=max_calls,
        )

    return make


def labelled(tool: str, arguments: dict, labels: dict[str, str]) -> dict:
    """``arguments`` with memorize ``information_id``s turned from corpus ids into labels."""
    if tool != scripted.MEMORIZE:
        return arguments
    entries = []
    for entry in arguments["memorize"]:
        if entry["information_id"] not in labels:
            raise ValueError(
                f"scripted memorize names item {entry['information_id']!r}, which is not among "
                f"the pending results {sorted(labels)}"
            )
        entries.append({**entry, "information_id": labels[entry["information_id"]]})
    return {**arguments, "memorize": entries}


class ScriptedSampler:
    """A ``generate`` backend driven by scripted policies (see the module docstring).

    Args:
      tokenizer: encodes the call text (``encode``) and names the end-of-turn token.
      factory: builds the policy of a new episode from its first ``RowContext``.
      end_of_turn: text appended to every call (default: the tokenizer's eos token).
    """

    wants_contexts = True

    def __init__(self, tokenizer: Any, factory: PolicyFactory, *, end_of_turn: str | None = None):
        self.tokenizer = tokenizer
        self.factory = factory
        self.end_of_turn = tokenizer.eos_token if end_of_turn is None else end_of_turn
        self._policies: dict[str, scripted.ScriptedPolicy] = {}

    def policy(self, context: RowContext) -> scripted.ScriptedPolicy:
        """The episode's policy, made on first use."""
        if context.key not in self._policies:
            self._policies[context.key] = self.factory(context)
        return self._policies[context.key]

    def call_text(self, context: RowContext) -> str:
        """The next turn's text for one episode (the call plus the end-of-turn token)."""
        policy = self.policy(context)
        tool, arguments = policy.act(context.view)
        if tool == scripted.ANSWER:
            self._policies.pop(context.key, None)  # the episode ends here
        return format_tool_call(tool, labelled(tool, arguments, context.labels)) + self.end_of_turn

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        contexts: Sequence[RowContext],
        max_new_tokens: int | None = None,
        **unused: Any,
    ) -> list[Completion]:
        """One completion per prompt; ``prompts`` are ignored, ``contexts`` decide."""
        if len(contexts) != len(prompts):
            raise ValueError(f"{len(contexts)} contexts for {len(prompts)} prompts")
        out = []
        for context in contexts:
            text = self.call_text(context)
            tokens = list(self.tokenizer.encode(text, add_special_tokens=False))
            reason = "stop"
            if max_new_tokens is not None and len(tokens) > max_new_tokens:
                tokens, reason = tokens[:max_new_tokens], "length"
            out.append(Completion(tokens, [0.0] * len(tokens), reason))
        return out


__all__ = [
    "PolicyFactory",
    "ScriptedSampler",
    "episode_seed",
    "expert_factory",
    "labelled",
    "noisy_factory",
]


def prompt_rule_action(prompt: str, *, answer: str = "no idea") -> str:
    """The next model turn of a rule policy that reads only the rendered prompt text, what a
    served model sees: after a search's results, memorize every one of them; otherwise add a
    search node under the newest node (the root first) until there are two, then answer from
    both. Deterministic; the fake served model of the serving tests (`tests/fake_servers.py`)
    and of ``benchmarks/serving_client.py``, whose episodes thereby carry pictures and video
    frames both as results and from memory."""
    tail = prompt.rsplit("<|im_start|>user", 1)[-1]
    if "<tool_response>" in tail and "summarize_and_memorize" in tail:
        entries = [
            {"information_id": f"{kind} {n}", "is_useful": True, "priority_score": 5}
            | ({"key_timestamp": [0.0, 1.0]} if kind == "Video" else {})
            for kind, n in re.findall(r"^(Text|Picture|Video) (\d+):", tail, re.M)
        ]
        call = format_tool_call(
            "summarize_and_memorize", {"summarize": "seen", "memorize": entries}
        )
    else:
        nodes = re.findall(r"^\[(n\d)\] parents", prompt, re.M)
        question = re.search(r"Question: (.*)", prompt).group(1)
        if len(nodes) < 2:
            parent = nodes[-1] if nodes else ROOT_ID
            arguments = {"id": f"n{len(nodes) + 1}", "parent_ids": [parent], "query": question}
            call = format_tool_call("add_search_node", arguments)
        else:
            call = format_tool_call("add_answer_node", {"parent_ids": nodes, "answer": answer})
    return call + "<|im_end|>"
