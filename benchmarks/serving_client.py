"""Times the server backends' client: a rollout worker's batches against a fake SGLang server.

Runs the agent of the rollout worker on the tiny Qwen3-VL config (``configs/ggpo.py`` with the
``tiny-vl`` model, pictures and videos in the synthetic corpus, built in a temporary workdir)
with the SGLang backend against a loopback server that answers at once: it decodes the prompt
ids and answers with a few text rules (search, memorize every result, search again, answer),
so episodes carry pictures and video frames. Printed:

- rollouts/s through HTTP, and of a baseline in the same run: a no-op backend that returns the
  same completions in-process (no PNG data URLs, no JSON, no HTTP);
- the client's time per request: the PNG data URLs of the prompt's pictures and frames
  (``ServerVisuals.prompt_inputs``, cached per frame as in the worker; the warm-up batch
  repeats the first timed one, so its frames are cached), the request's JSON, HTTP on loopback
  and the answer's parsing, summed over the ``rollout.max_inflight`` request threads (on a
  loaded machine that includes their waits for the interpreter lock); the fake server's own
  time (decoding the ids, its rules, its JSON) is measured in its handler and subtracted;
- that time's share of a realistic step: the server-side generation of one Qwen3-VL-2B
  response, assumed to be ``ASSUMED_TOKENS`` tokens (a tool call of the agent) at
  ``ASSUMED_TOKENS_PER_S`` tokens/s per sequence (one H100 decoding a batch of sequences of a
  2B model); the goal is < 5 %.

The real SGLang backend refuses videos (``sampling/sglang.py``: its ``/generate`` takes encoded
videos only). To carry the same bytes as a vLLM request, this benchmark's client sends each
video's frames as PNG data URLs in ``video_data`` (a list per video); the fake server ignores
them. The client work measured is the same as a vLLM request's but for vLLM's text decoding of
the parts between placeholders.

    nice -n 15 python benchmarks/serving_client.py [--batches 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from vimrag_jax.envs.scripted_sampler import prompt_rule_action

ASSUMED_TOKENS = 150
ASSUMED_TOKENS_PER_S = 100.0


class Answers:
    """The fake policy's completion of a prompt (ids, log-probs), cached per prompt."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[tuple[int, ...], list[int]] = {}

    def __call__(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        key = tuple(prompt)
        if key not in self._cache:
            text = self.tokenizer.decode(prompt, skip_special_tokens=False)
            action = prompt_rule_action(text)
            self._cache[key] = self.tokenizer(action, add_special_tokens=False)["input_ids"]
        return self._cache[key][:max_new_tokens]


class FakeSGLang:
    """``POST /generate`` on 127.0.0.1 answering at once; ``seconds`` sums its handler time."""

    def __init__(self, answers: Answers, end_id: int):
        self.seconds, self.requests, self.bytes_in = 0.0, 0, 0
        fake, lock = self, threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                began = time.perf_counter()
                body = json.loads(raw)
                out = answers(body["input_ids"], body["sampling_params"]["max_new_tokens"])
                finish = {"type": "stop", "matched": end_id} if out[-1] == end_id else None
                meta = {
                    "prompt_tokens": len(body["input_ids"]),
                    "completion_tokens": len(out),
                    "finish_reason": finish or {"type": "length", "length": len(out)},
                    "output_token_logprobs": [[-0.1, t, None] for t in out],
                }
                data = json.dumps({"output_ids": out, "meta_info": meta}).encode()
                with lock:
                    fake.seconds += time.perf_counter() - began
                    fake.requests += 1
                    fake.bytes_in += len(raw)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()

    from vimrag_jax.experiment import Experiment
    from vimrag_jax.rollout.trajectory import run_records
    from vimrag_jax.rollout.worker import experiment_agent
    from vimrag_jax.sampling import sglang
    from vimrag_jax.sampling.sampler import Completion

    spec = importlib.util.spec_from_file_location("ggpo", "configs/ggpo.py")
    ggpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ggpo)
    cfg = ggpo.get_config()
    cfg.model.name, cfg.model.dtype = "tiny-vl", "float32"
    cfg.env.update(
        num_entities=8, num_questions=12, eval_questions=2, sft_questions=0, min_hops=1,
        max_hops=1, near_duplicates=4, distractors_per_entity=1, image_height=32, image_width=64,
        video_frames=4, answer_modalities=("image", "video"), tokenizer_vocab_size=2048,
    )  # fmt: skip
    cfg.data.max_segment_tokens = 1536
    cfg.graph.update(max_nodes=8, max_items=3, max_keyframes=4)
    cfg.rollout.update(
        backend="sglang", server_url="http://127.0.0.1:1", group_size=2, questions_per_batch=2,
        max_model_calls=6, max_new_tokens=256, prompt_style="compact", max_inflight=4,
    )  # fmt: skip

    class FrameListPayload(sglang.SGLangSampler):
        """Sends videos as frame lists (the same bytes as a vLLM request; see the docstring)."""

        def _complete(self, url, request):
            still = [m for m in request.media if m.modality != "video"]
            payload = sglang.generate_payload(
                sglang.Request(**{**request.__dict__, "media": still})
            )
            videos = [list(m.urls) for m in request.media if m.modality == "video"]
            if videos:
                payload["video_data"] = videos
            answer = sglang.post_json(f"{url}/generate", payload, **self.transport)
            return sglang.parse_generate(answer, request, url)

    with tempfile.TemporaryDirectory() as workdir:
        experiment = Experiment.from_config(cfg, workdir)
        tok = experiment.tokenizer
        end_id = tok.convert_tokens_to_ids("<|im_end|>")
        answers = Answers(tok)
        fake = FakeSGLang(answers, end_id)
        rc = experiment.rollout_config()
        inflight = int(cfg.rollout.max_inflight)
        client = FrameListPayload(fake.url, max_inflight=inflight, backoff_s=0.01)
        timed = {"visuals": 0.0, "complete": 0.0, "requests": 0, "pictures": 0, "frames": 0}
        lock = threading.Lock()
        visuals = client.visuals(experiment.store)
        prompt_inputs = visuals.prompt_inputs

        def timed_inputs(refs):
            began = time.perf_counter()
            out = prompt_inputs(refs)
            with lock:
                timed["visuals"] += time.perf_counter() - began
                for media in out["media"]:
                    timed["pictures" if media.modality == "image" else "frames"] += len(media.urls)
            return out

        visuals.prompt_inputs = timed_inputs
        client.visuals = lambda store: visuals
        complete = client._complete

        def timed_complete(url, request):
            began = time.perf_counter()
            out = complete(url, request)
            with lock:
                timed["complete"] += time.perf_counter() - began
                timed["requests"] += 1
            return out

        client._complete = timed_complete

        class NoOp:
            """The baseline: the same completions in-process (no pictures, JSON or HTTP)."""

            takes_prefill_inputs = False

            def generate(self, prompts, *, max_new_tokens, **kwargs):
                out = []
                for prompt in prompts:
                    ids = answers(list(prompt), max_new_tokens)
                    finish = "stop" if ids[-1] == end_id else "length"
                    out.append(Completion(ids, [-0.1] * len(ids), finish, None))
                return out

        def run(backend, batches: int) -> tuple[float, int]:
            agent = experiment_agent(experiment, backend, rc)
            questions = experiment.train_questions
            count, began = 0, time.perf_counter()
            for b in range(batches):
                batch = [questions[(b * 2 + i) % len(questions)] for i in range(2)]
                records, _ = run_records(agent, batch, group_size=rc.group_size, seed=b)
                count += len(records)
            return time.perf_counter() - began, count

        run(client, 1)  # warm-up: caches, the answers of the fake policy
        run(NoOp(), 1)
        for key in timed:
            timed[key] = 0 if isinstance(timed[key], int) else 0.0
        fake.seconds, fake.requests, fake.bytes_in = 0.0, 0, 0
        http_s, http_n = run(client, args.batches)
        base_s, base_n = run(NoOp(), args.batches)
        client.close()
        fake.close()

    n = max(timed["requests"], 1)
    client_s = (timed["visuals"] + timed["complete"] - fake.seconds) / n
    step_s = ASSUMED_TOKENS / ASSUMED_TOKENS_PER_S
    print(f"tiny Qwen3-VL world, SGLang client, {args.batches} batches of {base_n // args.batches}")
    print(
        f"requests {timed['requests']}, per request {timed['pictures'] / n:.2f} pictures and "
        f"{timed['frames'] / n:.2f} video frames, {fake.bytes_in / n / 1024:.1f} KiB of JSON"
    )
    print(f"rollouts/s  HTTP client {http_n / http_s:.2f}   no-op baseline {base_n / base_s:.2f}")
    print(f"wall time ratio HTTP / baseline {http_s / base_s:.2f}")
    print(
        f"client time per request {1000 * client_s:.2f} ms (data URLs "
        f"{1000 * timed['visuals'] / n:.2f} ms, JSON + HTTP + parsing "
        f"{1000 * (timed['complete'] - fake.seconds) / n:.2f} ms; fake server "
        f"{1000 * fake.seconds / n:.2f} ms subtracted)"
    )
    print(
        f"realistic step: {ASSUMED_TOKENS} tokens at {ASSUMED_TOKENS_PER_S:.0f} tokens/s = "
        f"{step_s:.2f} s; client share {100 * client_s / step_s:.2f} % (goal < 5 %)"
    )


if __name__ == "__main__":
    main()
