"""Generation through vLLM's OpenAI-compatible chat endpoint with images, checked token for token
against our prompt ids; weight reloads through vLLM's documented development endpoints.

``rollout.backend = "vllm"``. vLLM's ``/v1/completions`` takes token ids but no images, so a
vision prompt goes to ``POST /v1/chat/completions`` (``ChatCompletionRequest`` in
``vllm/entrypoints/openai/protocol.py``) as one user message whose ``content`` is our prompt
cut at its pictures and videos (`content_parts`):

- text parts: our prompt ids decoded between the visual placeholders (the chat markup included:
  the prompt is already a rendered chat), each expanded placeholder run removed (vLLM expands
  placeholders itself; a video's ``<t seconds>`` markers go too, its processor writes them);
- ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` per picture at
  its budgeted size, and ``{"type": "video_url", "video_url": {"url":
  "data:video/jpeg;base64,<frame>,<frame>,..."}}`` per video: vLLM's ``VideoMediaIO.load_base64``
  (``vllm/multimodal/video.py``) splits a ``video/jpeg`` data URL at commas and opens each frame
  with PIL, which reads our PNG frames by their content (that PNG frames pass is our reading of
  the code, not documented, and not re-read in this revision);
- ``chat_template``: `PASSTHROUGH_TEMPLATE`, which writes text parts verbatim and one
  ``<|vision_start|><|image_pad|><|vision_end|>`` / ``<|video_pad|>`` placeholder per picture /
  video part; ``add_generation_prompt: false`` (the prompt ends with the assistant header
  already) and ``add_special_tokens: false``. The server must accept a request template and hand
  it the parts (launch flags ``--chat-template-content-format openai``; recent versions also
  ``--trust-request-chat-template``);
- sampling: ``max_tokens``, ``temperature``, ``top_p``, ``n: 1``, ``seed``, ``stop_token_ids``,
  ``stop``, ``include_stop_str_in_output: true``, ``skip_special_tokens: false``,
  ``logprobs: true``, ``top_logprobs: 0``, and ``return_token_ids: true`` (vLLM >= 0.10.2: the
  answer then holds ``prompt_token_ids`` and each choice's ``token_ids``).

Confirmed in vllm-project/vllm ``vllm/entrypoints/openai/protocol.py`` @ ec3b890c
(``ChatCompletionRequest``): ``chat_template`` (a per-request Jinja template),
``add_special_tokens`` (default false for chat), ``add_generation_prompt``, ``seed``,
``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``, ``logprobs`` /
``top_logprobs``, and ``return_token_ids``, whose description names ``prompt_token_ids`` and
``token_ids`` in the result. Not re-confirmed in this revision (kept from the earlier reading):
the exact place of those two in the non-streaming response (top level / per choice),
``--logprobs-mode raw_logprobs`` as the V1 default, the dev-mode ``/collective_rpc`` and
``/reset_prefix_cache`` routes, and whether vLLM's Qwen3-VL processing writes the ``<t seconds>``
markers the way `content_parts` assumes; the exact ``prompt_token_ids`` comparison below fails
loudly if any of these differ.

Read back: ``prompt_token_ids`` must equal our prompt ids exactly. vLLM expands every image
placeholder to the token count of the image its processor sees; if that differs from ours (a
server processor resizing our pictures, other video timestamps, a placeholder expanded twice)
the ids differ and `GenerationError` names the first difference: nothing is trained on ids the
server did not run. Sampled ids are ``choices[0].token_ids``, their log-probs
``choices[0].logprobs.content[i].logprob``; ``finish_reason`` is ``stop`` or ``length``
(``stop_reason``: the stop string, if one ended it).

Log-probs before temperature: vLLM's V1 engine reports log-softmax of the raw logits by default
(``--logprobs-mode raw_logprobs``; ``processed_logprobs`` would report the sampling
distribution and must not be used).

Weights (`VLLMSampler._reload`): vLLM documents no HTTP endpoint that loads weights from a new
path in its production server. With ``VLLM_SERVER_DEV_MODE=1`` it serves ``POST
/collective_rpc`` (``{"method", "args", "kwargs", "timeout"}``, the worker method run on every
GPU worker) and ``POST /reset_prefix_cache`` (``vllm/entrypoints/openai/api_server.py``). The
worker method ``reload_weights`` re-reads the weights of the served model path. So the server is
launched on a stable path, ``serving_link`` (a symbolic link, by default
``WORKDIR/policy/serving``), and a reload points that link at the new version's Hugging Face
directory (atomically), then calls ``reload_weights`` and resets the prefix cache (its KV
entries came from the old weights). vLLM reports no weight version: a reload that answers 200 is
the confirmation.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vimrag_jax.sampling.http import (
    GenerationError,
    Media,
    Request,
    ServerSampler,
    check_logprob,
    check_token_id,
    post_json,
)
from vimrag_jax.sampling.sampler import Completion

#: Writes text parts verbatim and one placeholder per picture / video part (see the docstring).
PASSTHROUGH_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ('image', 'image_url') -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] in ('video', 'video_url') -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
)
_TIMESTAMP = re.compile(r"<\d+(?:\.\d+)? seconds>$")
_PIXELS_PER_TOKEN = 32 * 32


def _video_url(media: Media) -> str:
    frames = [url.partition(",")[2] for url in media.urls]
    return "data:video/jpeg;base64," + ",".join(frames)


def content_parts(
    prompt: Sequence[int], media: Sequence[Media], tokenizer: Any, special: Mapping[str, int]
) -> list[dict[str, Any]]:
    """Our prompt ids as chat content parts with the pictures and videos in place (see the
    module docstring). ``special`` maps ``vision_start``, ``vision_end``, ``image_pad`` and
    ``video_pad`` to their ids. Raises GenerationError when the placeholders and ``media`` do not
    match (our own prompt would be inconsistent)."""
    start, end = special.get("vision_start", -1), special.get("vision_end", -1)
    pads = {
        special[k]: kind
        for k, kind in (("image_pad", "image"), ("video_pad", "video"))
        if k in special
    }
    parts: list[dict[str, Any]] = []
    text: list[int] = []
    items = iter(media)
    blocks_left = 0  # temporal-pair blocks left of the current video

    def flush(strip_timestamp: bool) -> None:
        decoded = tokenizer.decode(text, skip_special_tokens=False)
        if strip_timestamp:
            decoded = _TIMESTAMP.sub("", decoded)
        if decoded:
            parts.append({"type": "text", "text": decoded})
        text.clear()

    i, n = 0, len(prompt)
    while i < n:
        token = prompt[i]
        kind = pads.get(prompt[i + 1]) if token == start and i + 1 < n else None
        if kind is None:
            text.append(token)
            i += 1
            continue
        k = i + 1
        while k < n and prompt[k] == prompt[i + 1]:
            k += 1
        if k >= n or prompt[k] != end:
            raise GenerationError(f"prompt position {i}: a placeholder run is not closed")
        count = k - i - 1
        if kind == "video" and blocks_left:
            flush(strip_timestamp=True)  # between two pairs of one video: only its marker
            blocks_left -= 1
        else:
            item = next(items, None)
            if item is None or item.modality != kind:
                raise GenerationError(
                    f"prompt position {i}: a {kind} placeholder without its {kind}"
                )
            flush(strip_timestamp=kind == "video")
            if kind == "image":
                parts.append({"type": "image_url", "image_url": {"url": item.urls[0]}})
            else:
                parts.append({"type": "video_url", "video_url": {"url": _video_url(item)}})
                blocks_left = len(item.urls) // 2 - 1
            if count != item.height * item.width // _PIXELS_PER_TOKEN:
                raise GenerationError(
                    f"prompt position {i}: {count} placeholder tokens for a {item.height}x"
                    f"{item.width} {kind}"
                )
        i = k + 1
    if blocks_left or next(items, None) is not None:
        raise GenerationError("the prompt's placeholders do not cover all of its pictures/videos")
    flush(strip_timestamp=False)
    return parts


def chat_payload(
    request: Request, model: str, tokenizer: Any, special: Mapping[str, int]
) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body of one prompt (see the module docstring)."""
    payload: dict[str, Any] = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": content_parts(request.prompt, request.media, tokenizer, special),
            }
        ],
        "chat_template": PASSTHROUGH_TEMPLATE,
        "add_generation_prompt": False,
        "add_special_tokens": False,
        "max_tokens": request.max_new_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "n": 1,
        "stop_token_ids": request.stop_token_ids,
        "stop": request.stop_strings,
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
        "logprobs": True,
        "top_logprobs": 0,
        "return_token_ids": True,
    }
    if request.seed is not None:
        payload["seed"] = request.seed
    return payload


def parse_chat(response: Any, request: Request, where: str) -> Completion:
    """A `Completion` from one chat answer; GenerationError for anything missing, malformed,
    truncated, or a prompt the server ran with other ids than ours."""
    if not isinstance(response, Mapping):
        raise GenerationError(f"{where}: the answer is not an object: {response!r:.200}")
    served = response.get("prompt_token_ids")
    if not isinstance(served, list):
        raise GenerationError(
            f"{where}: the answer has no 'prompt_token_ids' (vLLM >= 0.10.2 with return_token_ids)"
        )
    if served != request.prompt:
        at = next(
            (i for i, (a, b) in enumerate(zip(served, request.prompt, strict=False)) if a != b),
            min(len(served), len(request.prompt)),
        )
        raise GenerationError(
            f"{where}: the server ran {len(served)} prompt tokens for our {len(request.prompt)}, "
            f"first different at position {at} (server {served[at : at + 3]}, ours "
            f"{request.prompt[at : at + 3]}): its image/video placeholders were expanded "
            "differently (a placeholder expanded twice, or a picture resized); not recorded"
        )
    choices = response.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], Mapping):
        raise GenerationError(f"{where}: expected one choice, got {choices!r:.200}")
    choice = choices[0]
    raw_ids = choice.get("token_ids")
    content = (
        choice.get("logprobs", {}).get("content")
        if isinstance(choice.get("logprobs"), Mapping)
        else None
    )
    if not isinstance(raw_ids, list) or not isinstance(content, list):
        raise GenerationError(f"{where}: the choice lacks 'token_ids' or 'logprobs.content'")
    tokens = [check_token_id(t, where) for t in raw_ids]
    if len(content) != len(tokens):
        raise GenerationError(f"{where}: {len(tokens)} token ids but {len(content)} log-probs")
    logprobs = [
        check_logprob(entry.get("logprob") if isinstance(entry, Mapping) else entry, where)
        for entry in content
    ]
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length"):
        raise GenerationError(f"{where}: unsupported finish_reason {finish!r}")
    if finish == "length" and len(tokens) != request.max_new_tokens:
        raise GenerationError(
            f"{where}: finished by length after {len(tokens)} of {request.max_new_tokens} tokens"
        )
    if not tokens:
        raise GenerationError(f"{where}: no tokens were sampled")
    stop_reason = choice.get("stop_reason")
    stop_text = stop_reason if finish == "stop" and isinstance(stop_reason, str) else None
    return Completion(tokens, logprobs, finish, stop_text)


def point_link(link: str | os.PathLike, target: str | os.PathLike) -> None:
    """Makes ``link`` a symbolic link to ``target``, replacing any old link atomically."""
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp-{uuid.uuid4().hex}")
    os.symlink(os.path.abspath(target), tmp)
    os.replace(tmp, link)


class VLLMSampler(ServerSampler):
    """Generation and weight reloads against vLLM servers (see the module docstring).

    Args:
      urls: the servers' roots, e.g. ``http://127.0.0.1:8000`` (``/v1`` is added).
      tokenizer: the policy's tokenizer (decodes the text between placeholders).
      model: the served model name (``--served-model-name``).
      serving_link: the path the servers were launched on (``vllm serve PATH``): a reload
        points it at the new version before asking the servers to re-read it.
    """

    name = "vllm"

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        tokenizer: Any,
        model: str = "default",
        serving_link: str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        super().__init__(urls, **kwargs)
        self.tokenizer = tokenizer
        self.model = model
        self.serving_link = None if serving_link is None else Path(serving_link)
        ids = {
            key: tokenizer.convert_tokens_to_ids(token)
            for key, token in (
                ("vision_start", "<|vision_start|>"),
                ("vision_end", "<|vision_end|>"),
                ("image_pad", "<|image_pad|>"),
                ("video_pad", "<|video_pad|>"),
            )
        }
        self.special = {k: int(v) for k, v in ids.items() if v is not None}
        self._linked: str | None = None

    def _complete(self, url: str, request: Request) -> Completion:
        payload = chat_payload(request, self.model, self.tokenizer, self.special)
        answer = post_json(f"{url}/v1/chat/completions", payload, **self.transport)
        return parse_chat(answer, request, f"vLLM server {url}")

    def _reload(self, url: str, path: str, version: int) -> None:
        if self.serving_link is None:
            raise GenerationError(
                "the vLLM backend needs serving_link (the path the server was launched on) to "
                "reload weights"
            )
        if self._linked != path:
            try:
                point_link(self.serving_link, path)
            except OSError as error:
                raise GenerationError(
                    f"cannot point {self.serving_link} at {path}: {error}"
                ) from error
            self._linked = path
        where = f"vLLM server {url}"
        body = {"method": "reload_weights", "args": [], "kwargs": {}}
        try:
            post_json(f"{url}/collective_rpc", body, **self.transport)
            post_json(f"{url}/reset_prefix_cache", {}, **self.transport)
        except GenerationError as error:
            raise GenerationError(
                f"{where} did not reload {path} as version {version} (is it running with "
                f"VLLM_SERVER_DEV_MODE=1 on {self.serving_link}?): {error}"
            ) from error


__all__ = [
    "PASSTHROUGH_TEMPLATE",
    "VLLMSampler",
    "chat_payload",
    "content_parts",
    "parse_chat",
    "point_link",
]
