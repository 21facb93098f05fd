"""Tests for retrieval: exact and sharded top-k against a NumPy reference, the hashing embedder,
the on-disk corpus store (round trip, memory map, rebuild skipped, errors) and expert recall."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh

from vimrag_jax.envs.synthetic import SyntheticConfig, build, hop_query
from vimrag_jax.retrieval import corpus as corpus_module
from vimrag_jax.retrieval.corpus import (
    CorpusItem,
    CorpusStore,
    RetrievalError,
    StoreBuilder,
    corpus_fingerprint,
)
from vimrag_jax.retrieval.embedders import Embedder, HashingEmbedder
from vimrag_jax.retrieval.index import TopKIndex

MESH = Mesh(np.array(jax.devices()), ("corpus",))


def reference_top_k(queries, corpus, k):
    """Loop-level reference: sort each query's rows by (score descending, row ascending)."""
    rows, scores = [], []
    for query in queries:
        score = corpus.astype(np.float64) @ query.astype(np.float64)
        order = sorted(range(len(corpus)), key=lambda row: (-score[row], row))[:k]
        rows.append(order)
        scores.append(score[order])
    return np.array(rows, np.int32), np.array(scores, np.float32)


@settings(max_examples=30)
@given(
    n=st.sampled_from([3, 8, 13, 37]),
    k=st.sampled_from([1, 3]),
    data=st.data(),
)
def test_sharded_equals_unsharded_equals_reference(n, k, data):
    # Small integers make every inner product exact in float32, and make ties frequent.
    values = st.integers(-2, 2)
    corpus = np.array(
        data.draw(st.lists(st.lists(values, min_size=4, max_size=4), min_size=n, max_size=n)),
        np.float32,
    )
    queries = np.array(
        data.draw(st.lists(st.lists(values, min_size=4, max_size=4), min_size=1, max_size=5)),
        np.float32,
    )
    want_rows, want_scores = reference_top_k(queries, corpus, k)
    single = TopKIndex(corpus)
    sharded = TopKIndex(corpus, mesh=MESH)
    assert not single.sharded and sharded.sharded
    for index in (single, sharded):
        rows, scores = index.search(queries, k)
        assert rows.dtype == np.int32 and scores.dtype == np.float32
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_array_equal(scores, want_scores)


def test_ties_go_to_the_lower_row_on_every_shard_layout():
    corpus = np.ones((21, 2), np.float32)
    queries = np.ones((2, 2), np.float32)
    for index in (TopKIndex(corpus), TopKIndex(corpus, mesh=MESH)):
        rows, _ = index.search(queries, 3)
        np.testing.assert_array_equal(rows, [[0, 1, 2], [0, 1, 2]])


def test_index_errors():
    index = TopKIndex(np.eye(4, dtype=np.float32))
    with pytest.raises(RetrievalError, match="k=5"):
        index.search(np.ones((1, 4), np.float32), 5)
    with pytest.raises(RetrievalError, match="no queries"):
        index.search(np.zeros((0, 4), np.float32), 1)
    with pytest.raises(RetrievalError, match=r"float32\[q, 4\]"):
        index.search(np.ones((1, 3), np.float32), 1)
    with pytest.raises(RetrievalError, match="empty corpus"):
        TopKIndex(np.zeros((0, 4), np.float32))


def test_hashing_embedder_is_deterministic_and_normalised():
    embedder = HashingEmbedder()
    assert isinstance(embedder, Embedder)
    texts = ["Tovi Brask works for Quillex.", "", "the logo of Quillex"]
    first, second = embedder.embed_texts(texts), HashingEmbedder().embed_texts(texts)
    assert first.dtype == np.float32 and first.shape == (3, 256)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), [1, 0, 1], atol=1e-6)
    # Word order matters: the subject of a relation is not its object.
    query = embedder.embed_texts(["Tovi Brask was mentored by whom?"])[0]
    gold, swapped = embedder.embed_texts(
        ["Tovi Brask was mentored by Ada Lunn.", "Ada Lunn was mentored by Tovi Brask."]
    )
    assert query @ gold > query @ swapped


# -- the on-disk store ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    return build(SyntheticConfig(num_entities=24, num_questions=40, seed=5))


@pytest.fixture(scope="module")
def store_dir(world, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("store"))
    store = CorpusStore.build(world[0], directory)
    assert not store.reused
    return directory


def test_store_round_trip_and_memory_map(world, store_dir):
    items = world[0]
    store = CorpusStore.open(store_dir)
    assert len(store) == len(items)
    assert isinstance(store.embeddings, np.memmap)
    np.testing.assert_array_equal(store.embeddings, HashingEmbedder().embed_items(items))
    for item in items:
        info = store.item(item.item_id)
        assert (info.modality, info.title, info.text, info.timestamps) == (
            item.modality,
            item.title,
            item.text,
            item.timestamps,
        )
        if item.modality == "image":
            np.testing.assert_array_equal(store.load_visual(item.item_id), item.pixels)
        elif item.modality == "video":
            for frame in range(item.num_frames):
                loaded = store.load_visual(item.item_id, frame)
                assert loaded.dtype == np.uint8
                np.testing.assert_array_equal(loaded, item.pixels[frame])
            np.testing.assert_array_equal(store.load_item(item.item_id).pixels, item.pixels)


def test_rebuild_is_skipped_for_the_same_corpus(world, store_dir):
    stamp = {
        name: os.stat(os.path.join(store_dir, name)).st_mtime_ns for name in os.listdir(store_dir)
    }
    store = CorpusStore.build(world[0], store_dir)
    assert store.reused
    assert stamp == {
        n: os.stat(os.path.join(store_dir, n)).st_mtime_ns for n in os.listdir(store_dir)
    }


def test_changed_corpus_is_rebuilt(world, tmp_path):
    directory = str(tmp_path / "store")
    first = CorpusStore.build(world[0][:20], directory)
    second = CorpusStore.build(world[0][:21], directory)
    assert not second.reused and len(second) == 21 and first.fingerprint != second.fingerprint
    assert CorpusStore.open(directory).fingerprint == second.fingerprint


def test_search_finds_the_item_and_sharding_changes_nothing(world, store_dir):
    items, questions = world
    store = CorpusStore.open(store_dir)
    sharded = CorpusStore.open(store_dir, mesh=MESH)
    queries = [hop_query(hop) for q in questions for hop in q.chain]
    ids, scores = store.search(queries, k=3)
    assert ids.shape == scores.shape == (len(queries), 3)
    assert ids.dtype == np.int32 and scores.dtype == np.float32
    assert np.all(np.diff(scores, axis=1) <= 0)
    sharded_ids, sharded_scores = sharded.search(queries, k=3)
    np.testing.assert_array_equal(ids, sharded_ids)
    np.testing.assert_allclose(scores, sharded_scores, rtol=1e-6)
    exact, _ = store.search([items[7].text], k=1)
    assert exact[0, 0] == 7


def test_expert_hop_queries_recall_at_3():
    """Over every hop of 200 questions of the default world (measured: 1.000)."""
    items, questions = build(SyntheticConfig(num_questions=200))
    embedder = HashingEmbedder()
    index = TopKIndex(embedder.embed_items(items))
    hops = [hop for q in questions for hop in q.chain]
    rows, _ = index.search(embedder.embed_texts([hop_query(hop) for hop in hops]), 3)
    recall = np.mean([hop.evidence_id in row for hop, row in zip(hops, rows, strict=True)])
    assert recall >= 0.97, recall


def test_request_errors(store_dir):
    store = CorpusStore.open(store_dir)
    with pytest.raises(RetrievalError, match="at least one query"):
        store.search([])
    with pytest.raises(RetrievalError, match="query 1 is empty"):
        store.search(["logo", "   "])
    with pytest.raises(RetrievalError, match="single string"):
        store.search("logo")
    with pytest.raises(RetrievalError, match=f"k={len(store) + 1}"):
        store.search(["logo"], k=len(store) + 1)
    with pytest.raises(RetrievalError, match="item id 999999"):
        store.item(999999)
    text_id = next(info.item_id for info in store if info.modality == "text")
    with pytest.raises(RetrievalError, match="no pixels"):
        store.load_visual(text_id)
    image_id = next(info.item_id for info in store if info.modality == "image")
    with pytest.raises(RetrievalError, match="frame 1 is out of range"):
        store.load_visual(image_id, 1)


def test_build_errors(world, tmp_path):
    with pytest.raises(RetrievalError, match="empty corpus"):
        CorpusStore.build([], str(tmp_path / "empty"))
    twice = [world[0][0], world[0][0]]
    with pytest.raises(RetrievalError, match="appears twice"):
        CorpusStore.build(twice, str(tmp_path / "dup"))
    with pytest.raises(ValueError, match="pixels must be uint8"):
        CorpusItem(0, "image", "x", "a caption", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="modality"):
        CorpusItem(0, "audio", "x", "a caption")


@pytest.mark.parametrize("damage", ["missing", "truncated", "manifest", "absent"])
def test_damaged_store_is_rejected(store_dir, tmp_path, damage):
    directory = str(tmp_path / "copy")
    shutil.copytree(store_dir, directory)
    if damage == "missing":
        os.remove(os.path.join(directory, "embeddings.npy"))
        match = "embeddings.npy is missing"
    elif damage == "truncated":
        path = os.path.join(directory, "pixels.array_record")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        match = "pixels.array_record has"
    elif damage == "manifest":
        with open(os.path.join(directory, "manifest.json"), "w") as f:
            f.write("{not json")
        match = "corrupt corpus store manifest"
    else:
        shutil.rmtree(directory)
        match = "manifest.json is missing"
    with pytest.raises(RetrievalError, match=match):
        CorpusStore.open(directory)


def test_open_refuses_a_different_embedder(store_dir):
    with pytest.raises(RetrievalError, match="not with the given embedder"):
        CorpusStore.open(store_dir, HashingEmbedder(dim=128))
    manifest = json.load(open(os.path.join(store_dir, "manifest.json")))
    assert manifest["embedder"]["kind"] == "hashing"


# --- the Hugging Face embedder --------------------------------------------------------------

HF_TEXTS = [
    "The logo of Kaimlix is a red fox.",
    "A parade video of Prerbaom.",
    "Vorn was mentored by Ilsa in the northern city of Tarrow, long before the war began.",
    "",
    "river",
]


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny random Qwen3ForCausalLM saved by transformers, with a tiny tokenizer beside it."""
    import torch
    from tiny_models import tiny_qwen3
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from vimrag_jax.agent.tokenizer import build_tokenizer

    directory = tmp_path_factory.mktemp("qwen3_embedding")
    tokenizer = build_tokenizer(HF_TEXTS * 3, vocab_size=320)
    config = Qwen3Config(
        **tiny_qwen3(
            narrow=True, vocab_size=320, max_position_embeddings=256, tie_word_embeddings=True
        )
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def hf_embedder(hf_checkpoint):
    from vimrag_jax.retrieval.embedders import HFEmbedder

    return HFEmbedder(hf_checkpoint[0], max_length=24, batch_size=4)


def _torch_last_token(model, ids):
    import torch

    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1].double().numpy()
    return hidden / np.linalg.norm(hidden)


def test_hf_embedder_equals_torch_last_token_pooling(hf_checkpoint, hf_embedder):
    from vimrag_jax.retrieval.embedders import HFEmbedder

    directory, model = hf_checkpoint
    embedder = hf_embedder
    assert isinstance(embedder, Embedder) and embedder.dim == 32
    got = embedder.embed_texts(HF_TEXTS)
    assert got.shape == (len(HF_TEXTS), 32) and got.dtype == np.float32
    for text, row in zip(HF_TEXTS, got, strict=True):
        ids = embedder.token_ids(text)
        assert ids[-1] == embedder.tokenizer.eos_token_id and len(ids) <= 24
        np.testing.assert_allclose(row, _torch_last_token(model, ids), atol=1e-4, rtol=0)
    assert len(embedder.token_ids(HF_TEXTS[2] * 4)) == 24  # cut to max_length, eos kept
    # Vectors do not depend on batching or padding.
    one_by_one = np.concatenate([embedder.embed_texts([t]) for t in HF_TEXTS])
    np.testing.assert_allclose(one_by_one, got, atol=1e-5)
    mean = HFEmbedder(directory, pooling="mean", max_length=16, batch_size=1)
    ids = mean.token_ids(HF_TEXTS[0])
    import torch

    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0].double().numpy().mean(0)
    np.testing.assert_allclose(
        mean.embed_texts(HF_TEXTS[:1])[0], hidden / np.linalg.norm(hidden), atol=1e-4
    )
    assert mean.spec() != embedder.spec()
    with pytest.raises(ValueError, match="pooling"):
        HFEmbedder(directory, pooling="cls")
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFEmbedder(directory / "missing")


def test_corpus_store_with_the_hf_embedder(hf_checkpoint, hf_embedder, tmp_path):
    from vimrag_jax.retrieval.embedders import HFEmbedder

    directory, _ = hf_checkpoint
    embedder = hf_embedder
    pixels = np.zeros((8, 8, 3), np.uint8)
    items = [
        CorpusItem(7, "text", "Kaimlix", HF_TEXTS[0]),
        CorpusItem(11, "image", "Prerbaom", HF_TEXTS[1], pixels),
        CorpusItem(3, "text", "Vorn", HF_TEXTS[2]),
        CorpusItem(5, "text", "Tarrow", HF_TEXTS[4]),
    ]
    store = CorpusStore.build(items, str(tmp_path / "store"), embedder)
    ids, scores = store.search([item.text for item in items], k=2)
    assert ids[:, 0].tolist() == [7, 11, 3, 5]  # each item's own text finds it first
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    vectors = embedder.embed_items(items)
    np.testing.assert_allclose(scores[:, 1], np.sort(vectors @ vectors.T, axis=1)[:, -2], atol=1e-5)
    # The spec names the checkpoint: reopening rebuilds it, another model is refused.
    reopened = CorpusStore.open(str(tmp_path / "store"))
    assert reopened.embedder.spec() == embedder.spec()
    with pytest.raises(RetrievalError, match="embedded with"):
        CorpusStore.open(str(tmp_path / "store"), HashingEmbedder())
    other = tmp_path / "other"
    shutil.copytree(directory, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    with pytest.raises(RetrievalError, match="embedded with"):
        CorpusStore.open(str(tmp_path / "store"), HFEmbedder(other, max_length=24))


def _legacy_build(items, directory, embedder):
    """The in-memory writer ``CorpusStore.build`` used before ``StoreBuilder`` (kept verbatim in
    spirit): every file written from the whole item list at once. Stores written by it exist.
    Metadata rows and pixel records are the library's; what is compared is how files are made."""
    import hashlib

    import msgpack
    from array_record.python import array_record_module

    from vimrag_jax.retrieval.store_format import item_frames as frames
    from vimrag_jax.retrieval.store_format import metadata_row as metadata

    digest = hashlib.sha256(b"vimrag-corpus-v1")
    digest.update(json.dumps(embedder.spec(), sort_keys=True).encode())
    for item in items:
        digest.update(msgpack.packb(metadata(item, 0)))
        for frame in frames(item):
            digest.update(np.ascontiguousarray(frame).tobytes())
    os.makedirs(directory)
    writer = array_record_module.ArrayRecordWriter(
        os.path.join(directory, "pixels.array_record"), "group_size:1"
    )
    rows, record = [], 0
    for item in items:
        rows.append(metadata(item, record if item.pixels is not None else -1))
        for frame in frames(item):
            writer.write(np.ascontiguousarray(frame).tobytes())
            record += 1
    writer.close()
    with open(os.path.join(directory, "metadata.msgpack"), "wb") as f:
        f.write(msgpack.packb(rows))
    embeddings = np.asarray(embedder.embed_items(items), np.float32)
    np.save(os.path.join(directory, "embeddings.npy"), embeddings, allow_pickle=False)
    files = {
        name: os.path.getsize(os.path.join(directory, name))
        for name in ("metadata.msgpack", "pixels.array_record", "embeddings.npy")
    }
    manifest = {
        "format": 1,
        "fingerprint": digest.hexdigest(),
        "num_items": len(items),
        "num_pixel_records": record,
        "embedder": embedder.spec(),
        "files": files,
    }
    with open(os.path.join(directory, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def _store_bytes(directory):
    return {
        name: open(os.path.join(directory, name), "rb").read() for name in os.listdir(directory)
    }


@pytest.mark.parametrize("batch", [(1, 1 << 30), (7, 1 << 30), (64, 600)])
def test_streaming_builder_writes_the_in_memory_format_byte_for_byte(world, tmp_path, batch):
    items = world[0]
    assert {item.modality for item in items} == {"text", "image", "video"}
    embedder = HashingEmbedder(dim=32)
    legacy = str(tmp_path / "legacy")
    _legacy_build(items, legacy, embedder)
    streamed = str(tmp_path / "streamed")
    embed_batch, embed_batch_bytes = batch  # by count, or by pixel bytes (600: ~every image)
    with StoreBuilder(
        streamed, embedder, embed_batch=embed_batch, embed_batch_bytes=embed_batch_bytes
    ) as builder:
        for item in items:
            builder.add(item)
        assert builder.fingerprint == corpus_fingerprint(items, embedder)
        store = builder.finish()
    assert not store.reused and store.fingerprint == corpus_fingerprint(items, embedder)
    assert _store_bytes(streamed) == _store_bytes(legacy)
    assert sorted(os.listdir(tmp_path)) == ["legacy", "streamed"]  # no staging left behind
    # A store written by the old writer opens, and building the same corpus on it reuses it.
    old = CorpusStore.open(legacy)
    np.testing.assert_array_equal(old.embeddings, embedder.embed_items(items))
    video = next(item for item in items if item.modality == "video")
    np.testing.assert_array_equal(old.load_item(video.item_id).pixels, video.pixels)
    assert CorpusStore.build(items, legacy, embedder).reused


class _FailingEmbedder(HashingEmbedder):
    """Fails on its ``fail_on``-th call of ``embed_items``: a late error in a build."""

    def __init__(self, fail_on):
        super().__init__(dim=16)
        self.calls, self.fail_on = 0, fail_on

    def embed_items(self, items):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RetrievalError("embedder failed")
        return super().embed_items(items)


def test_failed_builds_leave_nothing_and_keep_the_old_store(world, tmp_path):
    items = world[0]
    target = str(tmp_path / "store")
    with pytest.raises(RetrievalError, match="embedder failed"):
        with StoreBuilder(target, _FailingEmbedder(fail_on=3), embed_batch=5) as builder:
            for item in items:
                builder.add(item)
            builder.finish()
    assert os.listdir(tmp_path) == []  # neither the store nor its staging directory
    with pytest.raises(RetrievalError, match="appears twice"):
        with StoreBuilder(target) as builder:
            builder.add(items[0])
            builder.add(items[1])
            builder.add(items[0])
    with pytest.raises(RetrievalError, match="empty corpus"):
        StoreBuilder(target).finish()
    assert os.listdir(tmp_path) == []
    first = CorpusStore.build(items[:10], target)
    before = _store_bytes(target)
    with pytest.raises(RetrievalError, match="embedder failed"):  # fails in finish's last batch
        CorpusStore.build(items[:12], target, _FailingEmbedder(fail_on=1))
    assert _store_bytes(target) == before and os.listdir(tmp_path) == ["store"]
    assert CorpusStore.open(target).fingerprint == first.fingerprint


def test_a_relative_store_directory_is_built_beside_itself(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = CorpusStore.build(world[0][:5], "rel")
    assert store.directory == "rel" and sorted(os.listdir(tmp_path)) == ["rel"]
    assert CorpusStore.open("rel").fingerprint == store.fingerprint


def test_a_killed_builds_staging_is_removed_by_the_next_build_of_this_host(world, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = corpus_module._host_tag()
    left = {
        "killed": f".store.building-{host}-{dead.pid}-0a1b2c3d",
        "live": f".store.building-{host}-{os.getpid()}-0a1b2c3d",
        "other host": f".store.building-{host}x-{dead.pid}-0a1b2c3d",
        "other store": f".other.building-{host}-{dead.pid}-0a1b2c3d",
    }
    for name in left.values():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "pixels.array_record").write_bytes(b"partial")
    CorpusStore.build(world[0][:4], str(tmp_path / "store"))
    kept = sorted(set(left.values()) - {left["killed"]})
    assert sorted(os.listdir(tmp_path)) == sorted([*kept, "store"])
