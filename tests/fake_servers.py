"""Fake SGLang, vLLM and OpenAI-compatible servers for the serving tests, bound to loopback.

The fakes (stdlib ``http.server`` on 127.0.0.1, port 0, in a thread) implement exactly the
request and response fields the backends use, as the servers document them:

- SGLang ``POST /generate`` (sgl-project/sglang: ``GenerateReqInput`` in
  ``python/sglang/srt/managers/io_struct.py`` @ 001067ff, ``SamplingParams`` in
  ``python/sglang/srt/sampling/sampling_params.py`` @ 00c17caf): ``input_ids``, ``image_data``,
  ``sampling_params`` (with ``sampling_seed``), ``return_logprob``; the answer's ``output_ids``
  and ``meta_info`` (``output_token_logprobs`` as ``[logprob, id, text]``, ``finish_reason``,
  ``prompt_tokens``, ``completion_tokens``, ``weight_version``). Like SGLang's Qwen-VL processor
  (``python/sglang/srt/multimodal/processors/qwen_vl.py`` @ 02065f00) the fake collapses each
  expanded picture placeholder run and expands it again from the picture it got. ``video_data``
  takes encoded videos only (file / URL / base64 string, re-sampled by the server): the fake
  refuses anything else with 400, and the client sends no video at all (sampling/sglang.py), so
  the SGLang worker tests run a policy that answers at once (no retrieval results) and the
  pictures path is tested on its own. ``POST /update_weights_from_disk``
  (``UpdateWeightFromDiskReqInput``: ``model_path``, ``weight_version``; answer ``success``,
  ``message``) and ``GET /model_info``.
- vLLM ``POST /v1/chat/completions`` (``ChatCompletionRequest`` in
  ``vllm/entrypoints/openai/protocol.py``; ``return_token_ids`` gives ``prompt_token_ids`` and
  ``choices[].token_ids``; log-probs in ``choices[].logprobs.content[].logprob``): the fake
  renders the parts as the request's passthrough template says, tokenizes and expands each
  placeholder from its picture (a video as temporal pairs at 1 frame per second), as vLLM's
  processor would. ``video/jpeg`` data URLs are split at commas (``vllm/multimodal/video.py``).
  ``POST /collective_rpc`` (``method``) and ``POST /reset_prefix_cache`` (dev mode).

The worker runs on the tiny Qwen3-VL config (pictures and videos in the corpus); the fakes' policy
is a few lines of text rules (search, memorize every result, search again, answer), so episodes
show pictures and video frames both as retrieval results and from memory.
"""

from __future__ import annotations

import http.server
import time
from pathlib import Path

import numpy as np
from loopback import Loopback, read_json, send_json

from vimrag_jax.agent.prompts import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START
from vimrag_jax.agent.protocol import ROOT_ID, format_tool_call
from vimrag_jax.envs.scripted_sampler import prompt_rule_action
from vimrag_jax.sampling.http import (
    decode_data_url,
)
from vimrag_jax.sampling.vllm import PASSTHROUGH_TEMPLATE

PIXELS_PER_TOKEN = 32 * 32


# --- the fakes' policy ----------------------------------------------------------------------


def _logprobs(prompt: list[int], count: int) -> list[float]:
    """The fakes' log-probs: deterministic per prompt and position, never 0."""
    base = (sum(prompt) % 97) / 1000
    return [-(0.05 + base + 0.001 * k) for k in range(count)]


# --- the fakes --------------------------------------------------------------------------------


class FakeServer:
    """A loopback HTTP server; ``faults`` is a queue of replies that replace the next
    generation answers: ``(status, body)``, ``("sleep", seconds)`` before answering, or
    ``("close",)``: the connection closed without an answer. ``down`` (one such fault) replaces
    every generation answer while set."""

    generate_path = ""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = {
            t: tokenizer.convert_tokens_to_ids(t)
            for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
        }
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.faults: list = []
        self.down: tuple | None = None
        self.seen: dict[tuple[int, ...], list] = {}  # prompt ids -> [(media, out ids, logprobs)]
        self.requests = 0
        self.pads = lambda height, width: height * width // PIXELS_PER_TOKEN
        self.on_generate = None
        self.answer_at_once = False  # the policy answers at its first call (no retrieval)
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, body):
                send_json(self, status, body)

            def do_GET(self):
                self._reply(*fake.get(self.path))

            def do_POST(self):
                body = read_json(self)
                if self.path == fake.generate_path:
                    fake.requests += 1
                    fault = fake.down or (fake.faults.pop(0) if fake.faults else None)
                    if fault is not None and fault[0] == "close":
                        self.close_connection = True
                        return
                    if fault is not None and fault[0] != "sleep":
                        return self._reply(*fault)
                    if fault is not None:
                        time.sleep(fault[1])
                    if fake.on_generate is not None:
                        fake.on_generate()
                self._reply(*fake.post(self.path, body))

        self.loopback = Loopback(Handler)
        self.url = self.loopback.url

    def close(self):
        self.loopback.close()

    def expand(self, ids: list[int], media: list[tuple[str, list[np.ndarray]]]) -> list[int]:
        """``ids`` with each placeholder run (collapsed or expanded) expanded from ``media``."""
        start, end = self.ids[VISION_START], self.ids[VISION_END]
        pads = {self.ids[IMAGE_PAD]: "image", self.ids[VIDEO_PAD]: "video"}
        out, items, i, pairs_left = [], iter(media), 0, 0
        while i < len(ids):
            if ids[i] == start and i + 1 < len(ids) and ids[i + 1] in pads:
                pad, k = ids[i + 1], i + 1
                while ids[k] == pad:
                    k += 1
                assert ids[k] == end
                if pads[pad] == "image" or not pairs_left:
                    kind, frames = next(items)
                    assert kind == pads[pad]
                    pairs_left = len(frames) // 2 if kind == "video" else 0
                height, width = frames[0].shape[:2]
                out += [start] + [pad] * self.pads(height, width) + [end]
                pairs_left -= kind == "video"
                i = k + 1
            else:
                out.append(ids[i])
                i += 1
        assert next(items, None) is None
        return out

    def sample(self, prompt: list[int], media, max_new_tokens: int):
        text = self.tokenizer.decode(prompt, skip_special_tokens=False)
        action = prompt_rule_action(text)
        if self.answer_at_once:
            call = format_tool_call("add_answer_node", {"parent_ids": [ROOT_ID], "answer": "no"})
            action = call + "<|im_end|>"
        out = self.tokenizer(action, add_special_tokens=False)["input_ids"]
        out = out[:max_new_tokens]
        logprobs = _logprobs(prompt, len(out))
        self.seen.setdefault(tuple(prompt), []).append((media, out, logprobs))
        return out, logprobs


class FakeSGLang(FakeServer):
    generate_path = "/generate"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.answer_at_once = True  # no retrieval results: no videos, which SGLang cannot take
        self.weight_version = "0"
        self.reloads: list[dict] = []
        self.fail_reload = False

    def get(self, path):
        if path in ("/model_info", "/get_weight_version"):
            return 200, {"model_path": "policy", "weight_version": self.weight_version}
        return 404, {"error": path}

    def post(self, path, body):
        if path == "/update_weights_from_disk":
            self.reloads.append(body)
            if self.fail_reload or not (Path(body["model_path"]) / "config.json").is_file():
                return 200, {"success": False, "message": "cannot load", "num_paused_requests": 0}
            self.weight_version = body["weight_version"]
            return 200, {"success": True, "message": "ok", "num_paused_requests": 0}
        assert path == "/generate" and body["return_logprob"] is True
        params = body["sampling_params"]
        assert params["skip_special_tokens"] is False and self.end_id in params["stop_token_ids"]
        assert isinstance(params.get("sampling_seed", 0), int)
        if not all(isinstance(v, str) for v in body.get("video_data", [])):
            return 400, {"error": "video_data items are file names, URLs or base64 videos"}
        assert "video_data" not in body  # an encoded video would be re-sampled: never sent
        prompt = body["input_ids"]
        ordered = [("image", [decode_data_url(u)]) for u in body.get("image_data", [])]
        served = self.expand(prompt, ordered)
        out, logprobs = self.sample(prompt, ordered, params["max_new_tokens"])
        finish = (
            {"type": "stop", "matched": self.end_id}
            if out[-1] == self.end_id
            else {"type": "length", "length": len(out)}
        )
        meta = {
            "id": "r", "finish_reason": finish, "prompt_tokens": len(served),
            "completion_tokens": len(out), "weight_version": self.weight_version,
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, out, strict=True)],
        }  # fmt: skip
        return 200, {"text": "", "output_ids": out, "meta_info": meta}


class FakeVLLM(FakeServer):
    generate_path = "/v1/chat/completions"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.rpcs: list[dict] = []
        self.resets = 0
        self.link: Path | None = None
        self.loaded: list[str] = []

    def get(self, path):
        return 404, {"error": path}

    def post(self, path, body):
        if path == "/collective_rpc":
            self.rpcs.append(body)
            self.loaded.append(str(self.link.resolve()))
            assert (self.link / "config.json").is_file()
            return 200, {"results": [None]}
        if path == "/reset_prefix_cache":
            self.resets += 1
            return 200, b""
        assert body["chat_template"] == PASSTHROUGH_TEMPLATE and body["return_token_ids"] is True
        assert body["logprobs"] is True and body["add_generation_prompt"] is False
        (message,) = body["messages"]
        text, media = "", []
        for part in message["content"]:
            if part["type"] == "text":
                text += part["text"]
            elif part["type"] == "image_url":
                text += VISION_START + IMAGE_PAD + VISION_END
                media.append(("image", [decode_data_url(part["image_url"]["url"])]))
            else:
                head, _, frames = part["video_url"]["url"].partition(",")
                assert head == "data:video/jpeg;base64"
                decoded = [decode_data_url("data:image/png;base64," + f) for f in frames.split(",")]
                media.append(("video", decoded))
                text += "".join(
                    f"<{k + 0.5:.1f} seconds>" + VISION_START + VIDEO_PAD + VISION_END
                    for k in range(0, len(decoded), 2)
                )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt = self.expand(ids, media)
        out, logprobs = self.sample(prompt, media, body["max_tokens"])
        finish = "stop" if out[-1] == self.end_id else "length"
        content = [
            {"token": "x", "logprob": lp, "bytes": None, "top_logprobs": []} for lp in logprobs
        ]
        choice = {
            "index": 0, "message": {"role": "assistant", "content": "x"},
            "logprobs": {"content": content}, "finish_reason": finish,
            "stop_reason": self.end_id if finish == "stop" else None, "token_ids": out,
        }  # fmt: skip
        return 200, {"id": "c", "object": "chat.completion", "model": body["model"],
                     "prompt_token_ids": prompt, "choices": [choice]}  # fmt: skip


class FakeCompletions(FakeServer):
    """An OpenAI-compatible ``/v1/completions`` server (token ids in and out, no images)."""

    generate_path = "/v1/completions"

    def get(self, path):
        return 404, {"error": path}

    def post(self, path, body):
        choices = []
        for index, prompt in enumerate(body["prompt"]):
            out, logprobs = self.sample(prompt, [], body["max_tokens"])
            finish = "stop" if out[-1] == self.end_id else "length"
            choices.append(
                {
                    "index": index,
                    "token_ids": out,
                    "finish_reason": finish,
                    "stop_reason": None,
                    "logprobs": {"token_logprobs": logprobs},
                }  # fmt: skip
            )
        return 200, {"choices": choices}
