"""OpenAI-compatible generation backend against a scripted local fake server (the LLM judge:
tests/test_judge.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from loopback import Loopback, read_json, send_json

from vimrag_jax.sampling.openai_api import (
    GenerationError,
    OpenAICompletionsSampler,
    parse_choice,
    post_json,
)
from vimrag_jax.sampling.sampler import Completion


class FakeServer:
    """An HTTP server on 127.0.0.1 that answers each POST with the next scripted reply.

    A reply is ``(status, body)`` with ``body`` bytes or a JSON-able object, ``("sleep", s)`` to
    stall past the client timeout, or a callable of the request JSON returning ``(status, body)``.
    Requests (path, JSON) are recorded in order.
    """

    def __init__(self):
        self.replies: list = []
        self.requests: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                request = read_json(self)
                with server.lock:
                    server.requests.append((self.path, request))
                    reply = server.replies.pop(0) if server.replies else (500, b"no reply")
                if callable(reply):
                    reply = reply(request)
                if reply[0] == "sleep":
                    time.sleep(reply[1])
                    reply = (200, {})
                send_json(self, *reply)

        self.loopback = Loopback(Handler)
        self.url = self.loopback.url + "/v1"

    def close(self):
        self.loopback.close()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    yield fake
    fake.close()


def choice(index, tokens, logprobs, finish="length", stop_reason=None, *, as_ids=False):
    """A vLLM-shaped completion choice."""
    body = {
        "index": index,
        "text": "…",
        "finish_reason": finish,
        "stop_reason": stop_reason,
        "logprobs": {
            "tokens": list(tokens) if as_ids else [f"token_id:{t}" for t in tokens],
            "token_logprobs": list(logprobs),
            "top_logprobs": [],
            "text_offset": [],
        },
    }
    if as_ids:
        body["token_ids"] = list(tokens)
        body["logprobs"]["tokens"] = ["?"] * len(tokens)
    return body


def completions(*choices) -> tuple[int, dict]:
    return 200, {"id": "cmpl-1", "object": "text_completion", "choices": list(choices)}


def sampler(server: FakeServer, **kwargs) -> OpenAICompletionsSampler:
    settings = dict(timeout_s=0.3, max_retries=2, backoff_s=0.01)
    settings.update(kwargs)
    return OpenAICompletionsSampler(server.url, "policy", **settings)


def test_batch_happy_path_orders_by_index_and_sends_token_ids(server):
    server.replies.append(
        completions(
            choice(1, [7, 8, 9], [-0.5, -0.25, -1.0], "stop", None, as_ids=True),
            choice(0, [4, 5], [-0.1, -0.2], "length"),
        )
    )
    out = sampler(server).generate(
        [[1, 2, 3], [1, 2]],
        max_new_tokens=2,
        temperature=0.7,
        top_p=0.9,
        stop_token_ids=[9],
        stop_strings=["</tool_call>"],
    )
    assert out == [
        Completion([4, 5], [-0.1, -0.2], "length", None),
        Completion([7, 8, 9], [-0.5, -0.25, -1.0], "stop", None),
    ]
    path, request = server.requests[0]
    assert path == "/v1/completions"
    assert request["prompt"] == [[1, 2, 3], [1, 2]]
    assert request["model"] == "policy"
    assert request["max_tokens"] == 2
    assert request["temperature"] == 0.7 and request["top_p"] == 0.9
    assert request["stop_token_ids"] == [9] and request["stop"] == ["</tool_call>"]
    assert request["return_tokens_as_token_ids"] is True and request["logprobs"] == 1
    assert "seed" not in request


def test_stop_string_and_finish_reasons_are_mapped(server):
    server.replies.append(
        completions(
            choice(0, [3, 4], [-1.0, -2.0], "stop", "</tool_call>"),
            choice(1, [5], [-0.5], "stop", 151645),  # a stop token: no stop text
            choice(2, [6], [-0.5], "length"),
        )
    )
    out = sampler(server).generate([[1], [2], [3]], max_new_tokens=4, greedy=True)
    assert [(c.finish_reason, c.stop_text) for c in out] == [
        ("stop", "</tool_call>"),
        ("stop", None),
        ("length", None),
    ]
    request = server.requests[0][1]
    assert request["temperature"] == 0.0 and request["top_p"] == 1.0


def test_retries_after_503_and_429_then_succeeds(server):
    server.replies += [(503, b"busy"), (429, b"slow down"), completions(choice(0, [1], [-0.3]))]
    out = sampler(server).generate([[5, 6]], max_new_tokens=1)
    assert out == [Completion([1], [-0.3], "length")]
    assert len(server.requests) == 3


def test_gives_up_after_last_retry_naming_url_and_cause(server):
    server.replies += [(503, b"overloaded")] * 3
    with pytest.raises(GenerationError, match=r"completions.*3 attempts.*HTTP 503.*overloaded"):
        sampler(server).generate([[1]], max_new_tokens=1)
    assert len(server.requests) == 3


def test_client_error_is_not_retried(server):
    server.replies.append((400, {"error": "max_tokens too large"}))
    with pytest.raises(GenerationError, match="HTTP 400.*max_tokens too large"):
        sampler(server).generate([[1]], max_new_tokens=1)
    assert len(server.requests) == 1


def test_timeout_becomes_generation_error(server):
    server.replies += [("sleep", 0.5), ("sleep", 0.5)]
    start = time.monotonic()
    with pytest.raises(GenerationError, match="2 attempts.*timed out"):
        sampler(server, timeout_s=0.1, max_retries=1).generate([[1]], max_new_tokens=1)
    assert time.monotonic() - start < 1.0


def test_connection_refused_becomes_generation_error():
    fake = FakeServer()
    url = fake.url
    fake.close()  # nothing listens there any more
    client = OpenAICompletionsSampler(url, "m", timeout_s=0.2, max_retries=1, backoff_s=0.0)
    with pytest.raises(GenerationError, match=r"127\.0\.0\.1.*2 attempts"):
        client.generate([[1]], max_new_tokens=1)


@pytest.mark.parametrize(
    "reply, message",
    [
        ((200, b"{not json"), "not JSON"),
        ((200, {"object": "error"}), "no 'choices'"),
        (completions(), "expected 1 choices, got 0"),
        (completions(choice(3, [1], [-1.0])), "index 3"),
        (completions(choice(0, [1, 2], [-1.0])), "2 token ids but 1 log-probs"),
        (completions({**choice(0, [1], [-1.0]), "finish_reason": "abort"}), "finish_reason"),
        (completions({**choice(0, [1], [-1.0]), "logprobs": None}), "no 'logprobs'"),
        (completions(choice(0, [1.5], [-1.0], as_ids=True)), "token id"),
        (
            completions(
                {**choice(0, [1], [-1.0]), "logprobs": {"tokens": ["hi"], "token_logprobs": [-1.0]}}
            ),
            "return-tokens-as-token-ids",
        ),
        (completions(choice(0, [1], ["x"])), "not a number"),
        (completions(choice(0, [1], [-1.0]), choice(0, [2], [-1.0])), "expected 1 choices"),
    ],
)
def test_malformed_responses_raise_generation_error(server, reply, message):
    server.replies.append(reply)
    with pytest.raises(GenerationError, match=message):
        sampler(server).generate([[1]], max_new_tokens=2)


def test_duplicate_index_is_an_error():
    response = completions(choice(0, [1], [-1.0]), choice(0, [2], [-1.0]))[1]
    from vimrag_jax.sampling.openai_api import parse_completions

    with pytest.raises(GenerationError, match="two choices with index 0"):
        parse_completions(response, 2)


def test_seeded_batch_sends_one_request_per_prompt_with_distinct_seeds(server):
    def reply(request):
        prompt = request["prompt"][0]
        return completions(choice(0, [prompt[0] * 10], [-float(request["seed"])]))

    server.replies += [reply] * 3
    out = sampler(server).generate([[1], [2], [3]], max_new_tokens=1, seed=40)
    assert [c.tokens for c in out] == [[10], [20], [30]]
    assert [c.logprobs for c in out] == [[-40.0], [-41.0], [-42.0]]


def test_large_batches_are_split(server):
    def reply(request):
        return completions(*(choice(i, [p[0]], [-1.0]) for i, p in enumerate(request["prompt"])))

    server.replies += [reply] * 3
    out = sampler(server, max_prompts_per_request=2).generate(
        [[i] for i in range(5)], max_new_tokens=1
    )
    assert [c.tokens for c in out] == [[i] for i in range(5)]
    assert sorted(len(r["prompt"]) for _, r in server.requests) == [1, 2, 2]


def test_bad_arguments_fail_before_any_request(server):
    client = sampler(server)
    with pytest.raises(ValueError, match="max_new_tokens"):
        client.generate([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        client.generate([[1]], max_new_tokens=1, temperature=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        client.generate([[]], max_new_tokens=1)
    with pytest.raises(ValueError, match="base_url"):
        OpenAICompletionsSampler("127.0.0.1:8000", "m")
    assert server.requests == []


def test_reload_weights_posts_to_admin_url_or_does_nothing(server):
    assert sampler(server).reload_weights("/ckpt/7", 7) is False
    assert server.requests == []
    server.replies += [(200, {"success": True}), (200, {"success": False, "message": "bad"})]
    client = sampler(server, reload_url=server.url + "/update_weights_from_disk")
    assert client.reload_weights("/ckpt/7", 7) is True and client.policy_version == 7
    assert server.requests[0][1] == {"model_path": "/ckpt/7", "weight_version": "7"}
    with pytest.raises(GenerationError, match="refused.*bad"):
        client.reload_weights("/ckpt/8", 8)
    assert client.policy_version == 7


def test_parse_choice_reads_plain_token_ids():
    parsed = parse_choice(choice(0, [11, 12], [-1.0, -2.0], "stop", "x", as_ids=True))
    assert parsed == Completion([11, 12], [-1.0, -2.0], "stop", "x")


def test_post_json_backoff_doubles(server):
    server.replies += [(502, b"")] * 4
    waits: list[float] = []
    with pytest.raises(GenerationError):
        post_json(server.url, {}, timeout_s=0.5, max_retries=3, backoff_s=0.5, sleep=waits.append)
    assert waits == [0.5, 1.0, 2.0]
