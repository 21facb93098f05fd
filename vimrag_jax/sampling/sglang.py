"""Generation through SGLang's native ``/generate``: our token ids and pictures in, ids and
log-probs out; weight reloads from disk, confirmed by the server's weight version.

``rollout.backend = "sglang"``. One request per prompt (`http.ServerSampler`). Fields, as read in
the sources (repository sgl-project/sglang; the commits are those of the stored copies read):

- ``GenerateReqInput`` (``python/sglang/srt/managers/io_struct.py`` @ 001067ff): ``input_ids``;
  ``image_data`` ("an image instance, file name, URL, or base64 encoded string"); ``video_data``
  ("Like image data, it can be a file name, a url, or base64 encoded string"): one encoded video
  per item, not a list of frames; ``sampling_params``; ``return_logprob``;
- ``SamplingParams`` (``python/sglang/srt/sampling/sampling_params.py`` @ 00c17caf):
  ``max_new_tokens``, ``temperature``, ``top_p``, ``stop_token_ids``, ``stop``,
  ``skip_special_tokens``, ``no_stop_trim``, and the per-request seed ``sampling_seed``.

What is sent: ``input_ids`` exactly the prompt ids the learner trains on, placeholders expanded
(one ``<|image_pad|>`` per merged visual token, as `agent.prompts` writes them); ``image_data``:
the prompt's pictures in placeholder order, PNG ``data:`` URLs at the size the memory budget
gave them; ``sampling_params`` as above with ``skip_special_tokens: false``, ``no_stop_trim:
true`` and ``sampling_seed`` when the call has a seed; ``return_logprob: true``.

Videos are refused (`GenerationError` naming the limitation, before anything is sent): SGLang's
Qwen-VL processor (``python/sglang/srt/multimodal/processors/qwen_vl.py`` @ 02065f00,
``preprocess_video``) takes each video as a decoded file (a reader with ``get_avg_fps`` /
``get_batch``), re-samples it at 2 frames per second (at least 4 frames) and resizes the frames
to multiples of 28 with at least 128·28² pixels, then lets the Hugging Face Qwen3-VL processor
write the ``<t seconds>`` markers from that sampling. Our prompts lay a video out as its own
frames at the budgeted size with their corpus timestamps (`agent.prompts.video_placeholder`),
so no encoded video could make the server run the ids the learner trains on; sending the
frames as pictures would change the placeholders (``<|image_pad|>`` for ``<|video_pad|>``, no
timestamps) and so the ids too. Serve corpora with videos with the vLLM backend.

Response (one object per request): ``meta_info.output_token_logprobs`` is a list of
``[logprob, token_id, text_or_null]`` per sampled token (ids and log-probs are read from it and
must agree with ``output_ids`` when that is present); ``meta_info.finish_reason`` is
``{"type": "stop", "matched": id_or_string}`` or ``{"type": "length", ...}`` (``"abort"`` or
anything else is an error); ``meta_info.prompt_tokens`` is the length of the prompt the server
ran, and ``meta_info.weight_version`` the version it holds.

Placeholders: the Qwen-VL processor collapses each expanded
``<|vision_start|>(<|image_pad|>)+<|vision_end|>`` run (its ``image_token_regex``) and expands it
again from the image it loaded, after resizing raw images to multiples of 28 (``resize_image``
there); the Hugging Face processor then works in multiples of 32: for our sizes (multiples of
32) the token count comes back the same but the pixels are resampled twice. The check here is
the count: ``meta_info.prompt_tokens`` must equal ``len(input_ids)``, else `GenerationError`.
Gap: a same-length prompt with other content cannot be detected from what is read back.
``GenerateReqInput`` has a ``return_prompt_token_ids`` flag (@ 001067ff), but where its ids
appear in the response, and from which version, was not confirmed, so it is not used; the
learner-vs-sampler log-prob gap shows such a mismatch.

Log-probs before temperature: SGLang's sampler reports the log-probs of the distribution it
sampled from (after temperature) unless the server runs with the environment variable
``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` (``python/sglang/srt/layers/sampler.py``: then
``log_softmax`` of the raw logits; not re-read in this revision). Launch with it set whenever
``rollout.temperature != 1``.

Weights (`SGLangSampler._reload`): ``POST /update_weights_from_disk`` with ``model_path`` (the
published version's Hugging Face directory) and ``weight_version`` (``UpdateWeightFromDiskReqInput``
in ``io_struct.py``; answer ``{"success", "message"}``), then ``GET /model_info`` (older
servers: ``GET /get_weight_version``) must report that ``weight_version``. Each generation's
``meta_info.weight_version`` must then equal the tag too (`http.VersionChanged` otherwise, e.g.
when another worker reloaded a shared server). Launch with ``--weight-version 0`` so the initial
policy's version is 0.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from vimrag_jax.sampling.http import (
    GenerationError,
    Request,
    ServerSampler,
    ServerVisuals,
    VersionChanged,
    check_logprob,
    check_token_id,
    get_json,
    post_json,
)
from vimrag_jax.sampling.sampler import Completion

VIDEO_LIMITATION = (
    "the SGLang backend cannot send a video: SGLang's /generate takes a video only as an encoded "
    "file / URL / base64 string that its Qwen-VL processor re-samples at 2 fps and resizes, so "
    "the server would not run the frames and timestamps the learner trains on (see "
    "sampling/sglang.py); serve corpora with videos with rollout.backend='vllm'"
)


def generate_payload(request: Request) -> dict[str, Any]:
    """The ``/generate`` body of one prompt (see the module docstring)."""
    params: dict[str, Any] = {
        "max_new_tokens": request.max_new_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stop_token_ids": request.stop_token_ids,
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if request.stop_strings:
        params["stop"] = request.stop_strings
    if request.seed is not None:
        params["sampling_seed"] = request.seed
    if any(m.modality == "video" for m in request.media):
        raise GenerationError(VIDEO_LIMITATION)
    payload: dict[str, Any] = {
        "input_ids": request.prompt,
        "sampling_params": params,
        "return_logprob": True,
    }
    images = [m.urls[0] for m in request.media if m.modality == "image"]
    if images:
        payload["image_data"] = images
    return payload


def parse_generate(
    response: Any, request: Request, where: str, expected_version: str | None = None
) -> Completion:
    """A `Completion` from one ``/generate`` answer; `GenerationError` for anything missing,
    malformed, truncated, or a prompt the server expanded to another length."""
    if isinstance(response, list) and len(response) == 1:
        response = response[0]
    if not isinstance(response, Mapping):
        raise GenerationError(f"{where}: the answer is not an object: {response!r:.200}")
    meta = response.get("meta_info")
    if not isinstance(meta, Mapping):
        raise GenerationError(f"{where}: the answer has no 'meta_info' object")
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list):
        raise GenerationError(
            f"{where}: meta_info has no 'output_token_logprobs' list (send return_logprob)"
        )
    tokens, logprobs = [], []
    for entry in entries:
        if not isinstance(entry, list | tuple) or len(entry) < 2:
            raise GenerationError(f"{where}: an output_token_logprobs entry is {entry!r:.80}")
        logprobs.append(check_logprob(entry[0], where))
        tokens.append(check_token_id(entry[1], where))
    output_ids = response.get("output_ids")
    if output_ids is not None and list(output_ids) != tokens:
        raise GenerationError(f"{where}: output_ids disagree with output_token_logprobs")
    prompt_tokens = meta.get("prompt_tokens")
    if prompt_tokens != len(request.prompt):
        raise GenerationError(
            f"{where}: the server ran a prompt of {prompt_tokens!r} tokens for our "
            f"{len(request.prompt)}: it expanded the image/video placeholders differently (start "
            "it so that its processor keeps our image sizes, see sampling/sglang.py); the sample "
            "is not recorded"
        )
    completion = meta.get("completion_tokens")
    if completion is not None and completion != len(tokens):
        raise GenerationError(f"{where}: completion_tokens={completion} for {len(tokens)} ids")
    finish = meta.get("finish_reason")
    kind = finish.get("type") if isinstance(finish, Mapping) else None
    if kind not in ("stop", "length"):
        raise GenerationError(f"{where}: unsupported finish_reason {finish!r:.100}")
    if kind == "length" and len(tokens) != request.max_new_tokens:
        raise GenerationError(
            f"{where}: finished by length after {len(tokens)} of {request.max_new_tokens} tokens"
        )
    if not tokens:
        raise GenerationError(f"{where}: no tokens were sampled")
    version = meta.get("weight_version")
    if expected_version is not None and version is not None and str(version) != expected_version:
        raise VersionChanged(
            f"{where}: the server answered with weight_version {version!r}, but this worker tags "
            f"its rollouts with {expected_version!r}"
        )
    matched = finish.get("matched")
    stop_text = matched if kind == "stop" and isinstance(matched, str) else None
    return Completion(tokens, logprobs, kind, stop_text)


class SGLangSampler(ServerSampler):
    """Generation and weight reloads against SGLang servers (see the module docstring).

    Args:
      urls: the servers' roots, e.g. ``http://127.0.0.1:30000`` (one, a comma-separated string
        or a list); see `http.ServerSampler` for the rest.
    """

    name = "sglang"

    def __init__(self, urls: str | Sequence[str], **kwargs: Any):
        super().__init__(urls, **kwargs)
        self._confirmed: set[str] = set()  # servers whose weight_version we set

    def visuals(self, store: Any) -> ServerVisuals:
        """The pictures builder; warns at startup when the corpus holds videos, which this
        backend refuses (`VIDEO_LIMITATION`) when a prompt shows one."""
        videos = sum(getattr(info, "modality", "") == "video" for info in store)
        if videos:
            logging.warning("%d videos in the corpus: %s", videos, VIDEO_LIMITATION)
        return super().visuals(store)

    def _complete(self, url: str, request: Request) -> Completion:
        where = f"SGLang server {url}"
        response = post_json(f"{url}/generate", generate_payload(request), **self.transport)
        expected = str(self.policy_version) if url in self._confirmed else None
        return parse_generate(response, request, where, expected)

    def served_version(self, url: str) -> str:
        """The ``weight_version`` a server reports (``/model_info``, else
        ``/get_weight_version``)."""
        transport = {**self.transport, "max_retries": 0}
        errors = []
        for path in ("/model_info", "/get_weight_version", "/get_model_info"):
            try:
                answer = get_json(f"{url}{path}", **transport)
            except GenerationError as error:
                errors.append(str(error))
                continue
            if isinstance(answer, Mapping) and answer.get("weight_version") is not None:
                return str(answer["weight_version"])
            errors.append(f"GET {url}{path} gave no weight_version: {answer!r:.100}")
        raise GenerationError(f"SGLang server {url} does not report its weight version: {errors}")

    def _reload(self, url: str, path: str, version: int) -> None:
        body = {"model_path": path, "weight_version": str(version)}
        answer = post_json(f"{url}/update_weights_from_disk", body, **self.transport)
        if not isinstance(answer, Mapping) or answer.get("success") is not True:
            message = answer.get("message", "") if isinstance(answer, Mapping) else answer
            raise GenerationError(
                f"SGLang server {url} did not load {path} as version {version}: {message!r:.300}"
            )
        served = self.served_version(url)
        if served != str(version):
            raise GenerationError(
                f"SGLang server {url} reports weight_version {served!r} after loading version "
                f"{version}"
            )
        self._confirmed.add(url)

    def _still_serving(self, url: str) -> int | None:
        try:
            served = self.served_version(url)
        except GenerationError:
            return None
        initial = self.policy_version == 0 and url not in self._confirmed and served == "default"
        if served == str(self.policy_version) or initial:  # "default": launched without a version
            return self.policy_version
        return None


__all__ = ["VIDEO_LIMITATION", "SGLangSampler", "generate_payload", "parse_generate"]
