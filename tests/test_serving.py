"""Rollout workers against fake SGLang and vLLM servers: our token ids and pictures in, the
server's ids and log-probs out, weight reloads per published version, and failures that never
leave a partial shard.

The fakes and the server documentation they follow are in `tests/fake_servers.py`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fake_servers import PIXELS_PER_TOKEN, FakeCompletions, FakeServer, FakeSGLang, FakeVLLM
from flax import nnx

from configs import ggpo
from vimrag_jax import publish
from vimrag_jax.agent.prompts import IMAGE_PAD, VISION_END, VISION_START
from vimrag_jax.data.vision import resize_image
from vimrag_jax.experiment import Experiment
from vimrag_jax.rollout import worker
from vimrag_jax.rollout.records import list_shards, read_shard
from vimrag_jax.sampling.http import (
    GenerationError,
    Media,
    ServerPool,
    png_data_url,
)
from vimrag_jax.sampling.sglang import SGLangSampler


def _config(backend: str, url: str):
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
        backend=backend, server_url=url, server_model="policy", group_size=2,
        questions_per_batch=2, max_model_calls=6, max_new_tokens=256, prompt_style="compact",
        request_timeout_s=2.0, max_retries=2, retry_backoff_s=0.01, max_inflight=3,
    )  # fmt: skip
    return cfg


# --- fixtures ---------------------------------------------------------------------------------


@dataclasses.dataclass
class World:
    template: Path  # a workdir with the corpus and tokenizer built
    experiment: Experiment
    params: dict  # a policy's parameters (random)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    template = tmp_path_factory.mktemp("template")
    experiment = Experiment.from_config(_config("sglang", "http://127.0.0.1:1"), template)
    model = experiment.abstract_model()
    rng = np.random.default_rng(0)
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    for _, var in flat:
        var.set_value(0.05 * rng.standard_normal(var.get_value().shape).astype(np.float32))
    return World(template, experiment, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _workdir(world: World, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    for name in ("corpus", "tokenizer"):
        shutil.copytree(world.template / name, workdir / name)
    return workdir


@pytest.fixture(params=["sglang", "vllm"])
def served(request, world):
    fake = (FakeSGLang if request.param == "sglang" else FakeVLLM)(world.experiment.tokenizer)
    yield request.param, fake
    fake.close()


def _records(directory: Path) -> list[list[dict]]:
    return [list(read_shard(path)) for path in list_shards(directory)]


def _check_against_server(records: list[dict], fake: FakeServer, store) -> tuple[int, int]:
    """Every segment's prompt is one the server saw, its pictures and frames in order at the
    recorded sizes, its sampled ids and log-probs the server's. Returns (pictures, frames)."""
    pictures = frames = 0
    for record in records:
        for s in np.flatnonzero(record["segment_valid"]):
            mask = record["loss_mask"][s]
            first, last = np.flatnonzero(mask)[[0, -1]]
            prompt = tuple(int(t) for t in record["tokens"][s, :first])
            assert prompt in fake.seen, "a prompt the server never ran was recorded"
            media, out, logprobs = fake.seen[prompt][0]
            assert record["tokens"][s, first : last + 1].tolist() == out
            np.testing.assert_array_equal(
                record["behavior_logprobs"][s, first : last + 1], np.float32(logprobs)
            )
            sent = [image for _, images in media for image in images]
            refs = record["segment_visuals"][s][record["segment_visual_valid"][s]]
            assert len(sent) == len(refs)
            for image, (item, frame, height, width) in zip(sent, refs, strict=True):
                expected = resize_image(store.load_visual(int(item), int(frame)), height, width)
                np.testing.assert_array_equal(image, expected)
            pictures += sum(kind == "image" for kind, _ in media)
            frames += sum(len(images) for kind, images in media if kind == "video")
    return pictures, frames


# --- tests --------------------------------------------------------------------------------------


def _no_model(monkeypatch) -> None:
    """Makes building the policy model fail; its abstract shape (for the HF layout) still works."""
    build = Experiment.initial_model
    abstract = lambda self: nnx.eval_shape(lambda: build(self))  # noqa: E731
    monkeypatch.setattr(Experiment, "abstract_model", abstract)

    def refuse(self):
        raise AssertionError("a server worker built the JAX model")

    monkeypatch.setattr(Experiment, "initial_model", refuse)


def test_worker_records_the_servers_tokens_and_reloads_once_per_version(
    served, world, tmp_path, monkeypatch
):
    kind, fake = served
    _no_model(monkeypatch)
    workdir = _workdir(world, tmp_path)
    cfg = _config(kind, fake.url)
    published = []

    def publish_v1_once():  # during the first batch: the second one must carry v1
        if not published:
            published.append(publish.publish_policy(world.params, workdir, version=1))

    fake.on_generate = publish_v1_once
    fake.link = workdir / "policy" / "serving"  # what `vllm serve` was launched on
    written = worker.run_worker(
        cfg, str(workdir), worker_id="w0", policy="model", max_trajectories=8
    )
    assert written == 8
    shards = _records(workdir / "rollouts")
    assert [[r["policy_version"] for r in shard] for shard in shards] == [[0] * 4, [1] * 4]
    pictures, frames = _check_against_server(
        [r for s in shards for r in s], fake, world.experiment.store
    )
    if kind == "vllm":
        assert pictures > 0 and frames > 0  # both kinds reached the server
    else:  # text prompts (answer at once): SGLang's pictures are tested on their own
        assert pictures == frames == 0
    hf = publish.version_dir(workdir, 1) / "hf"
    data = (hf / "model.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
    if kind == "sglang":
        assert fake.reloads == [{"model_path": str(hf), "weight_version": "1"}]
        assert fake.weight_version == "1"
    else:
        assert [r["method"] for r in fake.rpcs] == ["reload_weights"] and fake.resets == 1
        assert fake.loaded == [str(hf.resolve())]


def test_a_failed_reload_keeps_the_old_tag_and_is_counted(world, tmp_path, caplog):
    fake = FakeSGLang(world.experiment.tokenizer)
    fake.fail_reload = True
    workdir = _workdir(world, tmp_path)
    publish.publish_policy(world.params, workdir, version=1)
    with caplog.at_level("WARNING"):
        written = worker.run_worker(
            _config("sglang", fake.url), str(workdir), worker_id="w0", policy="model",
            max_trajectories=4,
        )  # fmt: skip
    fake.close()
    assert written == 4 and len(fake.reloads) == 1
    assert [r["policy_version"] for r in _records(workdir / "rollouts")[0]] == [0] * 4
    assert "reload of policy v1 failed (1 failed so far); rollouts stay tagged v0" in caplog.text


def test_http_500_is_retried(world, tmp_path):
    fake = FakeSGLang(world.experiment.tokenizer)
    fake.faults += [(500, {"error": "busy"}), (503, b"")]
    workdir = _workdir(world, tmp_path)
    written = worker.run_worker(
        _config("sglang", fake.url), str(workdir), worker_id="w0", policy="model",
        max_trajectories=4,
    )  # fmt: skip
    fake.close()
    assert written == 4 and fake.faults == []
    _check_against_server(_records(workdir / "rollouts")[0], fake, world.experiment.store)


@pytest.mark.parametrize(
    "faults, message",
    [
        ([(500, {"error": "down"})] * 40, "failed after 3 attempts; last: HTTP 500"),
        ([("sleep", 1.0)] * 40, "timed out"),
        ([(200, b"<html>oops")], "not JSON"),
        ([(200, {"meta_info": {"output_token_logprobs": [[-0.1, 5, None]]}})], "prompt of None"),
        ([(200, {"meta_info": {"output_token_logprobs": [[0.5, 5, None]]}})], "log-prob"),
    ],
    ids=["500", "timeout", "garbage", "truncated", "bad-logprob"],
)
def test_failed_requests_raise_and_leave_no_shard(world, tmp_path, faults, message):
    fake = FakeSGLang(world.experiment.tokenizer)
    fake.faults += faults
    cfg = _config("sglang", fake.url)
    cfg.rollout.request_timeout_s = 0.5
    workdir = _workdir(world, tmp_path)
    with pytest.raises(GenerationError, match=message) as failure:
        worker.run_worker(cfg, str(workdir), worker_id="w0", policy="model", max_trajectories=4)
    fake.close()
    assert fake.url in str(failure.value)
    rollouts = workdir / "rollouts"
    assert not list_shards(rollouts) and not list(rollouts.iterdir())


def test_placeholders_expanded_differently_are_refused(world, tmp_path):
    kind, fake = "vllm", FakeVLLM(world.experiment.tokenizer)
    fake.pads = lambda height, width: 2 * height * width // PIXELS_PER_TOKEN  # expanded twice
    workdir = _workdir(world, tmp_path)
    with pytest.raises(GenerationError, match="expanded") as failure:
        worker.run_worker(
            _config(kind, fake.url), str(workdir), worker_id="w0", policy="model",
            max_trajectories=4,
        )  # fmt: skip
    fake.close()
    assert fake.url in str(failure.value)
    assert not list_shards(workdir / "rollouts")


def _picture_prompt(world, fake, height=32, width=64):
    """A prompt with one picture placeholder, and its `Media` (a corpus picture)."""
    tok = world.experiment.tokenizer
    store = world.experiment.store
    item = next(i.item_id for i in store if i.modality == "image")
    pixels = resize_image(store.load_visual(item, 0), height, width)
    head = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    tail = tok("Question: who?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    pads = [fake.ids[IMAGE_PAD]] * (height * width // PIXELS_PER_TOKEN)
    prompt = head + [fake.ids[VISION_START], *pads, fake.ids[VISION_END]] + tail["input_ids"]
    media = Media("image", (png_data_url(pixels),), height, width, ((item, 0, height, width),))
    return prompt, media, pixels


def test_sglang_sends_pictures_and_refuses_videos(world):
    fake = FakeSGLang(world.experiment.tokenizer)
    backend = SGLangSampler(fake.url, max_inflight=1, backoff_s=0.01)
    prompt, media, pixels = _picture_prompt(world, fake)
    (done,) = backend.generate(
        [prompt], max_new_tokens=64, stop_token_ids=[fake.end_id], seed=7,
        prefill_inputs=[{"media": [media]}],
    )  # fmt: skip
    ((sent, out, _),) = fake.seen[tuple(prompt)]
    np.testing.assert_array_equal(sent[0][1][0], pixels)
    assert done.tokens == out
    video = dataclasses.replace(media, modality="video", urls=media.urls * 2)
    with pytest.raises(GenerationError, match="cannot send a video"):
        backend.generate([prompt], max_new_tokens=8, prefill_inputs=[{"media": [video]}])
    assert fake.requests == 1
    fake.pads = lambda height, width: 2 * height * width // PIXELS_PER_TOKEN  # expanded twice
    with pytest.raises(GenerationError, match="expanded") as failure:
        backend.generate(
            [prompt], max_new_tokens=8, stop_token_ids=[fake.end_id],
            prefill_inputs=[{"media": [media]}],
        )  # fmt: skip
    assert fake.url in str(failure.value)
    backend.close()
    fake.close()


def test_a_server_reloaded_by_someone_else_drops_the_batch(world, tmp_path, caplog):
    fake = FakeSGLang(world.experiment.tokenizer)
    workdir = _workdir(world, tmp_path)
    publish.publish_policy(world.params, workdir, version=1)
    calls = []

    def reload_elsewhere():  # another worker moves the shared server on, once
        calls.append(1)
        if len(calls) == 3:
            fake.weight_version = "7"

    fake.on_generate = reload_elsewhere
    with caplog.at_level("WARNING"):
        written = worker.run_worker(
            _config("sglang", fake.url), str(workdir), worker_id="w0", policy="model",
            max_trajectories=4,
        )  # fmt: skip
    fake.close()
    assert written == 4 and "dropped unwritten (1 so far)" in caplog.text
    assert len(fake.reloads) == 2  # the first sync, and the one after the drop
    (shard,) = _records(workdir / "rollouts")
    assert [r["policy_version"] for r in shard] == [1] * 4


@pytest.mark.parametrize("down", [(500, {"error": "down"}), ("close",)], ids=["500", "closed"])
def test_a_down_server_fails_over_to_the_other(world, tmp_path, caplog, down):
    good, bad = (FakeSGLang(world.experiment.tokenizer) for _ in range(2))
    bad.down = down
    workdir = _workdir(world, tmp_path)
    cfg = _config("sglang", f"{bad.url},{good.url}")
    with caplog.at_level("WARNING"):
        written = worker.run_worker(
            cfg, str(workdir), worker_id="w0", policy="model", max_trajectories=8
        )
    good.close()
    bad.close()
    assert written == 8 and bad.requests > 0 and not bad.seen
    shards = _records(workdir / "rollouts")
    assert [[r["policy_version"] for r in shard] for shard in shards] == [[0] * 4, [0] * 4]
    _check_against_server([r for s in shards for r in s], good, world.experiment.store)
    # logged before the second batch: the failed tries, all on the bad server
    assert "request tries failed on unavailable servers so far" in caplog.text
    assert f"'{bad.url}': 0" not in caplog.text and f"'{good.url}': 0" in caplog.text


def test_every_server_down_names_them_all_and_leaves_no_shard(world, tmp_path):
    fakes = [FakeSGLang(world.experiment.tokenizer) for _ in range(2)]
    fakes[0].down, fakes[1].down = (503, b""), ("close",)
    workdir = _workdir(world, tmp_path)
    cfg = _config("sglang", ",".join(f.url for f in fakes))
    with pytest.raises(GenerationError, match="all 2 server") as failure:
        worker.run_worker(cfg, str(workdir), worker_id="w0", policy="model", max_trajectories=4)
    for fake in fakes:
        fake.close()
        assert fake.url in str(failure.value)
    # each server was given its retry budget (3 tries) per request, never more
    assert "HTTP 503" in str(failure.value) and "failed after 3 attempts" in str(failure.value)
    assert not list_shards(workdir / "rollouts")


def test_a_failed_server_cools_down_then_comes_back():
    now = [0.0]
    pool = ServerPool(["http://a", "http://b"], cooldown_s=10.0, clock=lambda: now[0])
    url = pool.acquire(0)
    pool.release(url, ok=False)
    assert pool.failures == {url: 1, ({"http://a", "http://b"} - {url}).pop(): 0}
    other = ({"http://a", "http://b"} - {url}).pop()
    assert [pool.acquire(0) for _ in range(3)] == [other] * 3  # busy, but not cooling
    assert pool.cooling() == [url]
    assert pool.acquire(0, exclude=[other]) == url  # the only one left: still used
    with pytest.raises(GenerationError, match="every server of policy version 0 was tried"):
        pool.acquire(0, exclude=[url, other])
    for _ in range(3):
        pool.release(other)
    pool.release(url)
    now[0] = 11.0
    assert pool.cooling() == [] and {pool.acquire(0), pool.acquire(0)} == {url, other}


def test_requests_go_to_the_least_loaded_server_of_the_tagged_version():
    pool = ServerPool(["http://a", "http://b", "http://c"])
    first = [pool.acquire(0) for _ in range(3)]
    assert sorted(first) == ["http://a", "http://b", "http://c"]  # one each while all are busy
    pool.release("http://b")
    assert pool.acquire(0) == "http://b"  # the only one with a free slot
    for url in first:
        pool.release(url)
    pool.release("http://b")
    pool.versions["http://a"] = 1  # reloaded ahead of the others: not used for version 0
    assert {pool.acquire(0) for _ in range(4)} == {"http://b", "http://c"}
    with pytest.raises(GenerationError, match="no server serves policy version 2"):
        pool.acquire(2)


def test_a_partly_failed_reload_never_mislabels(world, tmp_path):
    # Two servers; one loads v1, the other refuses: the tag stays v0 and only the server still
    # serving v0 gets requests until both serve the same version.
    ok, refusing = (FakeSGLang(world.experiment.tokenizer) for _ in range(2))
    refusing.fail_reload = True
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    backend = SGLangSampler([ok.url, refusing.url], max_inflight=2, backoff_s=0.01)
    assert backend.sync_weights(str(hf), 1) is False
    assert backend.policy_version == 0 and backend.pool.versions == {ok.url: 1, refusing.url: 0}
    assert "did not load" in backend.last_reload_error
    text = "<|im_start|>user\nQuestion: who?<|im_end|>\n<|im_start|>assistant\n"
    prompts = [world.experiment.tokenizer(text, add_special_tokens=False)["input_ids"]]
    before = ok.requests
    completions = backend.generate(prompts * 4, max_new_tokens=64, stop_token_ids=[ok.end_id])
    assert len(completions) == 4 and ok.requests == before and refusing.requests == 4
    refusing.fail_reload = False
    assert backend.sync_weights(str(hf), 1) is True and backend.policy_version == 1
    backend.generate(prompts * 4, max_new_tokens=64, stop_token_ids=[ok.end_id])
    assert ok.requests > before
    backend.close()
    ok.close()
    refusing.close()


def test_hf_layout_written_inside_the_atomic_publish(world, tmp_path):
    from vimrag_jax.models.hf import save_pretrained

    def writer(directory):
        model = world.experiment.abstract_model()
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, world.params)
        nnx.update(model, state)
        save_pretrained(model, directory)

    path = publish.publish_policy(world.params, tmp_path, version=3, hf_writer=writer)
    assert (path / "hf" / "config.json").is_file() and (path / "hf" / "model.safetensors").is_file()
    again = publish.write_hf_layout(path, lambda: pytest.fail("must reuse the written layout"))
    assert again == path / "hf"
    with pytest.raises(FileNotFoundError, match="not a published policy version"):
        publish.write_hf_layout(tmp_path / "nothing", world.experiment.abstract_model)


def test_published_parameters_are_memory_mapped(tmp_path):
    import jax
    import ml_dtypes

    params = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.ones(4, ml_dtypes.bfloat16),
    }
    path = publish.publish_policy(params, tmp_path, version=0)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}
    loaded = publish.load_policy(path, abstract)
    for key, value in params.items():
        assert loaded[key].dtype == value.dtype and not loaded[key].flags.writeable
        np.testing.assert_array_equal(loaded[key], value)
    (tmp_path / "cut.safetensors").write_bytes((path / publish.PARAMS_FILE).read_bytes()[:20])
    with pytest.raises(ValueError, match="not a safetensors file"):
        publish.map_tensors(tmp_path / "cut.safetensors")


def test_a_text_only_server_worker_builds_no_model_and_keeps_its_tag(
    world, tmp_path, caplog, monkeypatch
):
    _no_model(monkeypatch)
    fake = FakeCompletions(world.experiment.tokenizer)
    workdir = _workdir(world, tmp_path)
    publish.publish_policy(world.params, workdir, version=1)
    cfg = _config("openai", fake.url + "/v1")
    with caplog.at_level("WARNING"):
        written = worker.run_worker(cfg, str(workdir), worker_id="w0", policy="model",
                                    max_trajectories=4)  # fmt: skip
    fake.close()
    assert written == 4 and "cannot reload weights" in caplog.text
    (shard,) = _records(workdir / "rollouts")
    assert [r["policy_version"] for r in shard] == [0] * 4  # never the version it cannot load
    assert not (publish.version_dir(workdir, 1) / "hf").exists()


@pytest.mark.parametrize("kind", ["sglang", "vllm"])
def test_eval_brings_the_served_model_to_the_newest_version(world, tmp_path, kind):
    from vimrag_jax.benchmarks import evaluate as bench
    from vimrag_jax.eval import evaluate, served_policy, write_report

    fake = (FakeSGLang if kind == "sglang" else FakeVLLM)(world.experiment.tokenizer)
    workdir = _workdir(world, tmp_path)
    fake.link = workdir / "policy" / "serving"
    publish.publish_policy(world.params, workdir, version=2)
    experiment = Experiment.from_config(_config(kind, fake.url), workdir)
    backend = experiment.make_backend()
    version, confirmed = served_policy(experiment, backend)
    # reloaded through the worker's path; only SGLang reports the version it serves
    assert version == 2 and confirmed is (kind == "sglang")
    hf = publish.version_dir(workdir, 2) / "hf"
    if kind == "sglang":
        assert fake.reloads == [{"model_path": str(hf), "weight_version": "2"}]
    else:
        assert fake.loaded == [str(hf.resolve())]
    metrics = evaluate(experiment, backend, num_questions=1, policy_version=version)
    report = json.loads(
        write_report(workdir, version, {**metrics, "version_confirmed": confirmed}).read_text()
    )
    assert report["policy_version"] == 2 and report["version_confirmed"] is (kind == "sglang")
    backend.close()
    _, label, again, confirmed = bench.make_policy_backend(experiment, bench.Request())
    assert again == 2 and ("not confirmed" in label) is (kind == "vllm") and "v2" in label
    fake.close()
