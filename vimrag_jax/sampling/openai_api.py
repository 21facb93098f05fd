"""Generation through an OpenAI-compatible server (vLLM, SGLang): token ids in, token ids out.

`OpenAICompletionsSampler.generate` has the call shape of the embedded JAX sampler, so the agent
loop can use either backend. Prompts go to ``POST {base_url}/completions`` as token ids and the
sampled token ids come back exactly, so the learner never re-tokenizes text (SPEC §6).

Request fields sent (one request holds a list of prompts; choices are matched by ``index``):
``model``, ``prompt`` (a list of token-id lists), ``max_tokens``, ``temperature``, ``top_p``,
``n=1``, ``logprobs=1``, ``echo=false``, ``stream=false``, ``stop`` (stop strings),
``stop_token_ids``, ``include_stop_str_in_output=true``, ``skip_special_tokens=false``,
``return_tokens_as_token_ids=true``, ``return_token_ids=true`` and ``seed`` when given.
The last five are vLLM extensions; servers that do not know a field should ignore it.

Response fields read, per choice: ``index``; ``finish_reason`` (``"stop"`` or ``"length"``,
anything else is an error); ``stop_reason`` (vLLM: the stop string that ended the completion, an
int for a stop token, null for EOS) for ``Completion.stop_text``; ``logprobs.token_logprobs``; and
the sampled ids, from ``token_ids`` (a list of ints: vLLM >= 0.10.2 with ``return_token_ids``) when
present, else parsed from ``logprobs.tokens``, which vLLM renders as ``"token_id:123"`` strings
when ``return_tokens_as_token_ids`` is set (per request, or server-wide with the
``--return-tokens-as-token-ids`` flag). A server that returns neither (e.g. one that only sends
token text) cannot be used: decoding text back to ids is not exact, so that is a
`GenerationError`, never a silent re-tokenization.

Log-probs: ``Completion.logprobs`` are the server's ``token_logprobs`` of the sampled tokens, taken
as they are. SPEC wants the policy's log-probs before temperature / top-p (what the learner
recomputes). vLLM's V1 engine gives exactly that by default: its ``--logprobs-mode`` server option
defaults to ``raw_logprobs`` (log-softmax of the raw logits, before penalties, temperature and
top-k/top-p); ``processed_logprobs`` would report the sampling distribution instead and must not be
used here, and ``raw_logits`` / ``processed_logits`` are not log-probs at all. vLLM's old V0 engine
reported processed (post-temperature) log-probs. With SGLang, check the server version's behaviour
before training at temperature != 1. The learner-vs-sampler log-prob gap metric (SPEC §4) exposes
a wrong setting quickly. Suggested vLLM launch: ``vllm serve MODEL --logprobs-mode raw_logprobs
--return-tokens-as-token-ids``.

Transport: `sampling.http.post_json` (stdlib ``urllib``; re-exported here for the judge,
`vimrag_jax.envs.judge`) retries connection errors, timeouts, HTTP 429 and 5xx with exponential
backoff and raises `GenerationError` naming the URL and the last cause; other HTTP errors and
malformed responses fail at once.

This is the text-only fallback (``rollout.backend = "openai"``): ``/v1/completions`` takes no
images. A vision policy is served through `sampling.sglang` or `sampling.vllm`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vimrag_jax.sampling.http import GenerationError, post_json
from vimrag_jax.sampling.sampler import Completion

_TOKEN_ID_PREFIX = "token_id:"


def _token_id(value: Any, url: str) -> int:
    """One sampled id, from an int or a ``"token_id:123"`` string."""
    if isinstance(value, bool):
        raise GenerationError(f"{url}: a token id is a bool ({value!r})")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.startswith(_TOKEN_ID_PREFIX):
        digits = value[len(_TOKEN_ID_PREFIX) :]
        if digits.isascii() and digits.isdigit():
            return int(digits)
    raise GenerationError(
        f"{url}: cannot read a token id from {value!r}; start the server with "
        "--return-tokens-as-token-ids (vLLM) or use one that returns 'token_ids'"
    )


def _logprob(value: Any, url: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise GenerationError(f"{url}: a token log-prob is not a number ({value!r})")
    return float(value)


def parse_choice(choice: Any, url: str = "server") -> Completion:
    """A `Completion` from one ``choices[i]`` of a ``/v1/completions`` response.

    Raises `GenerationError` for anything missing or malformed (see the module docstring).
    """
    if not isinstance(choice, Mapping):
        raise GenerationError(f"{url}: a choice is not an object: {choice!r:.100}")
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, Mapping):
        raise GenerationError(f"{url}: choice has no 'logprobs' object (request logprobs=1)")
    values = logprobs.get("token_logprobs")
    if not isinstance(values, list):
        raise GenerationError(f"{url}: choice.logprobs has no 'token_logprobs' list")
    raw_ids = choice.get("token_ids")
    if raw_ids is None:
        raw_ids = logprobs.get("tokens")
    if not isinstance(raw_ids, list):
        raise GenerationError(f"{url}: choice has neither 'token_ids' nor 'logprobs.tokens'")
    tokens = [_token_id(t, url) for t in raw_ids]
    if any(t < 0 for t in tokens):
        raise GenerationError(f"{url}: negative token id in {tokens[:10]}")
    if len(values) != len(tokens):
        raise GenerationError(
            f"{url}: {len(tokens)} token ids but {len(values)} log-probs in one choice"
        )
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length"):
        raise GenerationError(f"{url}: unsupported finish_reason {finish!r}")
    stop_reason = choice.get("stop_reason")
    stop_text = stop_reason if finish == "stop" and isinstance(stop_reason, str) else None
    return Completion(
        tokens=tokens,
        logprobs=[_logprob(v, url) for v in values],
        finish_reason=finish,
        stop_text=stop_text,
    )


def parse_completions(response: Any, count: int, url: str = "server") -> list[Completion]:
    """``count`` completions in prompt order, matched by ``choices[i].index``."""
    choices = response.get("choices") if isinstance(response, Mapping) else None
    if not isinstance(choices, list):
        raise GenerationError(f"{url}: response has no 'choices' list: {response!r:.200}")
    if len(choices) != count:
        raise GenerationError(f"{url}: expected {count} choices, got {len(choices)}")
    ordered: list[Completion | None] = [None] * count
    for choice in choices:
        index = choice.get("index") if isinstance(choice, Mapping) else None
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise GenerationError(f"{url}: choice index {index!r} is not in [0, {count})")
        if ordered[index] is not None:
            raise GenerationError(f"{url}: two choices with index {index}")
        ordered[index] = parse_choice(choice, url)
    return ordered  # type: ignore[return-value]  # every slot filled: count distinct indices


class OpenAICompletionsSampler:
    """Token-in / token-out generation against an OpenAI-compatible ``/v1/completions`` server.

    Args:
      base_url: the server's API root, e.g. ``http://127.0.0.1:8000/v1``.
      model: the served model name (``--served-model-name``).
      timeout_s, max_retries, backoff_s, api_key: transport settings (`post_json`).
      max_prompts_per_request: larger batches are split into several requests.
      concurrency: requests in flight at once.
      reload_url: the server's weight-reload endpoint (server-specific, see `reload_weights`);
        None makes `reload_weights` a no-op.
      extra_body: extra request fields merged into every request (server-specific options).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        model: str = "default",
        *,
        timeout_s: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        api_key: str | None = None,
        max_prompts_per_request: int = 64,
        concurrency: int = 8,
        reload_url: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if max_prompts_per_request < 1 or concurrency < 1:
            raise ValueError("max_prompts_per_request and concurrency must be >= 1")
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.reload_url = reload_url
        self.policy_version: int | None = None
        self._transport = dict(
            timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s, api_key=api_key
        )
        self._per_request = max_prompts_per_request
        self._concurrency = concurrency
        self._extra = dict(extra_body or {})

    def _payload(self, prompts: list[list[int]], settings: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model, "prompt": prompts, **settings, **self._extra}

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        stop_token_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[Completion]:
        """Completes each prompt (token ids); one `Completion` per prompt, in prompt order.

        ``greedy`` sends temperature 0. Without ``seed`` prompts are batched into few requests.
        With one, every prompt goes in its own request with seed ``seed + i``: a server applies a
        request's seed to each of its prompts, so a batch of identical prompts (the G rollouts of
        a question) would otherwise all get the same sample.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature must be > 0 (or greedy=True), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        batch = [[int(t) for t in p] for p in prompts]
        if any(not p for p in batch):
            raise ValueError("every prompt needs at least one token")
        settings: dict[str, Any] = {
            "max_tokens": int(max_new_tokens),
            "temperature": 0.0 if greedy else float(temperature),
            "top_p": 1.0 if greedy else float(top_p),
            "n": 1,
            "logprobs": 1,
            "echo": False,
            "stream": False,
            "stop": list(stop_strings),
            "stop_token_ids": [int(t) for t in stop_token_ids],
            "include_stop_str_in_output": True,
            "skip_special_tokens": False,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
        }
        if seed is None:
            step = self._per_request
            jobs = [
                (list(range(i, min(i + step, len(batch)))), settings)
                for i in range(0, len(batch), step)
            ]
        else:
            jobs = [([i], {**settings, "seed": (int(seed) + i) % 2**63}) for i in range(len(batch))]

        def run(job: tuple[list[int], dict[str, Any]]) -> list[Completion]:
            rows, job_settings = job
            payload = self._payload([batch[i] for i in rows], job_settings)
            response = post_json(self.url, payload, **self._transport)
            return parse_completions(response, len(rows), self.url)

        if len(jobs) <= 1:
            results = [run(job) for job in jobs]
        else:
            with ThreadPoolExecutor(min(self._concurrency, len(jobs))) as pool:
                results = list(pool.map(run, jobs))
        return [completion for chunk in results for completion in chunk]

    def reload_weights(self, path: str, version: int) -> bool:
        """Asks the server to load the policy weights at ``path`` as ``version``.

        Server-specific: with ``reload_url`` set, POSTs ``{"model_path": path, "weight_version":
        str(version)}``, the body of SGLang's ``/update_weights_from_disk``. vLLM's OpenAI server
        has no such endpoint; put a small admin proxy in front of it or restart it. A JSON
        response with ``"success": false`` raises `GenerationError`. Returns False (nothing done)
        when no ``reload_url`` is configured, True once the server confirmed.
        """
        if self.reload_url is None:
            return False
        body = {"model_path": str(path), "weight_version": str(int(version))}
        response = post_json(self.reload_url, body, **self._transport)
        if isinstance(response, Mapping) and response.get("success") is False:
            message = response.get("message", "")
            raise GenerationError(f"{self.reload_url} refused to load {path}: {message}")
        self.policy_version = int(version)
        return True


__all__ = [
    "GenerationError",
    "OpenAICompletionsSampler",
    "parse_choice",
    "parse_completions",
    "post_json",
]
