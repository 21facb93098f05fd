"""The Qwen3-VL embedder: parity with transformers' Qwen3-VL on a tiny random checkpoint (text,
image, video; right and left padding), the model card's input format, pooling, batching and
sharding invariance, and use as a corpus store's embedder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec
from tiny_models import tiny_qwen3
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vimrag_jax.agent.tokenizer import build_tokenizer
from vimrag_jax.data.vision import video_patches
from vimrag_jax.parallel.mesh import make_mesh
from vimrag_jax.retrieval.corpus import CorpusStore
from vimrag_jax.retrieval.store_format import CorpusItem
from vimrag_jax.retrieval.vl_embedder import (
    DOCUMENT_INSTRUCTION,
    QUERY_INSTRUCTION,
    Qwen3VLEmbedder,
    embedding_prompt,
    format_instruction,
    length_buckets,
)

TEXTS = [
    "the red fox jumps over the lazy dog",
    "a lazy dog sleeps in the sun",
    "retrieve images or text relevant to the user's query",
    "represent the user's input",
] * 3
SETTINGS = dict(
    batch_size=4, image_max_pixels=64 * 96, video_max_pixels=64 * 64, min_pixels=32 * 32
)
_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    patch_size=16,  # the pixel pipeline's patches
    temporal_patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=64,
    num_position_embeddings=16,
    deepstack_visual_indexes=[0, 1],
)
RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (64, 96, 3), dtype=np.uint8)  # already at its target size
VIDEO = RNG.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)  # odd: the last frame repeats
VIDEO_TIMES = (10.0, 11.0, 12.0, 13.0, 14.0)
QUERY = "where does the red fox jump?"


def _items() -> list[CorpusItem]:
    return [
        CorpusItem(0, "text", "fox", "the red fox jumps over the lazy dog"),
        CorpusItem(1, "image", "pic", "a picture", IMAGE),
        CorpusItem(2, "video", "clip", "a clip", VIDEO, VIDEO_TIMES),
        CorpusItem(3, "text", "dog", "a lazy dog sleeps in the sun, all afternoon long"),
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen3-VL checkpoint (norm scales randomised too) with a tiny tokenizer
    that has the Qwen chat and vision tokens."""
    directory = tmp_path_factory.mktemp("qwen3_vl_embedding")
    tokenizer = build_tokenizer(TEXTS, vocab_size=400)
    tokenizer.save_pretrained(directory)
    ids = tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    )
    text = tiny_qwen3(
        vocab_size=400,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    )
    config = transformers.Qwen3VLConfig(
        text_config=text,
        vision_config=_VISION,
        image_token_id=ids[0],
        video_token_id=ids[1],
        vision_start_token_id=ids[2],
        vision_end_token_id=ids[3],
    )
    torch.manual_seed(0)
    theirs = transformers.Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    theirs.save_pretrained(directory, safe_serialization=True)
    return directory, theirs, tokenizer


@pytest.fixture(scope="module")
def embedder(checkpoint):
    return Qwen3VLEmbedder(checkpoint[0], **SETTINGS)


@pytest.fixture(scope="module")
def ours(embedder):
    """Our vectors of the query, then the four items (one batch with every kind)."""
    return embedder.embed_texts([QUERY]), embedder.embed_items(_items())


# ---- the reference: transformers on the prompts as the model card writes them ---------------


def _literal_prompts() -> list[str]:
    """The three parity inputs spelled out by hand in the card's chat format: an image of
    2x3 merged tokens, a video of three frame pairs of 2x2 tokens at 0.5, 2.5 and 4.0 s."""
    head = "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n"
    tail = "<|im_end|>\n<|im_start|>assistant\n"
    doc = head.format("Represent the user's input.")
    frame = "<|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>"
    return [
        head.format("Retrieve images or text relevant to the user's query.") + QUERY + tail,
        doc + "<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>" + tail,
        doc + "".join(f"<{t} seconds>{frame}" for t in ("0.5", "2.5", "4.0")) + tail,
    ]


def _reference(checkpoint, side: str) -> np.ndarray:
    """Last-token-pooled, normalised last hidden states of transformers' Qwen3VLModel, padded
    on ``side``, pooled at each row's last mask position (as the embedder script does)."""
    _, theirs, tokenizer = checkpoint
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in _literal_prompts()]
    length = max(map(len, rows))
    ids = np.full((len(rows), length), tokenizer.pad_token_id, np.int64)
    mask = np.zeros_like(ids)
    for b, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[b, span], mask[b, span] = row, 1
    config = theirs.config
    types = np.where(ids == config.image_token_id, 1, np.where(ids == config.video_token_id, 2, 0))
    image = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 96},
    )(images=IMAGE, return_tensors="np")
    video_values, video_grid = video_patches(VIDEO, 64, 64)
    with torch.no_grad():
        hidden = theirs.model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            mm_token_type_ids=torch.from_numpy(types),
            pixel_values=torch.from_numpy(np.asarray(image["pixel_values"])),
            image_grid_thw=torch.from_numpy(np.asarray(image["image_grid_thw"])),
            pixel_values_videos=torch.from_numpy(video_values),
            video_grid_thw=torch.tensor([video_grid]),
        ).last_hidden_state
    last = length - 1 - mask[:, ::-1].argmax(axis=1)
    pooled = hidden[torch.arange(len(rows)), torch.from_numpy(last)]
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.parametrize("side", ["right", "left"])
def test_vectors_match_transformers(checkpoint, ours, side):
    expected = _reference(checkpoint, side)
    query, items = ours
    got = np.concatenate([query, items[1:3]])
    assert got.dtype == np.float32 and got.shape == (3, 64)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
    # The three are different inputs: a wrong pooling position or modality would not agree.
    assert np.abs(expected @ expected.T - np.eye(3)).max() > 0.05


def test_inputs_are_tokenized_as_the_card_writes_them(checkpoint, embedder):
    _, _, tokenizer = checkpoint
    literal = _literal_prompts()
    items = _items()
    encoded = [
        embedder.encode(QUERY, instruction=embedder.query_instruction),
        embedder.encode_item(items[1]),
        embedder.encode_item(items[2]),
    ]
    for want, got in zip(literal, encoded, strict=True):
        assert got.ids.tolist() == tokenizer(want, add_special_tokens=False)["input_ids"]
    assert [v.grid for v in encoded[1].visuals] == [(1, 4, 6)]
    assert [v.grid for v in encoded[2].visuals] == [(3, 4, 4)]
    # The pooled token is the newline that ends the generation prompt.
    assert tokenizer.decode(encoded[0].ids[-1:]) == "\n"
    assert tokenizer.decode(encoded[0].ids).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_instruction_format():
    assert format_instruction("Find the slide") == "Find the slide."
    assert format_instruction("  Which clip shows it?  ") == "Which clip shows it?"
    assert format_instruction("Trouvez l'image…") == "Trouvez l'image…"  # ellipsis: punctuation
    assert format_instruction("") == format_instruction(None) == DOCUMENT_INSTRUCTION
    assert format_instruction(" ", default=QUERY_INSTRUCTION) == QUERY_INSTRUCTION
    assert embedding_prompt("Do it.", "") == (
        "<|im_start|>system\nDo it.<|im_end|>\n<|im_start|>user\nNULL<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_documents_and_queries_use_their_instructions(checkpoint, embedder, ours):
    _, _, tokenizer = checkpoint
    passage = embedder.encode_item(_items()[0])
    assert tokenizer.decode(passage.ids).startswith(
        "<|im_start|>system\nRepresent the user's input.<|im_end|>"
    )
    # The same words as a query and as a document are different inputs, so different vectors.
    as_query = embedder.embed_texts([_items()[0].text])
    assert np.abs(as_query[0] - ours[1][0]).max() > 1e-3
    custom = embedder.embed_texts([_items()[0].text], instruction="Represent the user's input")
    np.testing.assert_allclose(custom[0], ours[1][0], atol=2e-5)


def test_vectors_are_unit_length(ours):
    for vectors in ours:
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)


def test_a_vector_does_not_depend_on_its_batch(embedder, ours):
    items = _items()
    # Alone: the passages run the text-only path, each visual item its own padded batch.
    alone = np.concatenate([embedder.embed_items([item]) for item in items])
    np.testing.assert_allclose(alone, ours[1], rtol=0, atol=2e-5)
    # Mixed with queries of other lengths (other length bucket, padding rows).
    queries = [QUERY, "fox?", "the red fox jumps over the lazy dog " * 3]
    together = embedder.embed_texts(queries)
    np.testing.assert_allclose(together[0], ours[0][0], rtol=0, atol=2e-5)
    np.testing.assert_allclose(
        embedder.embed_texts(queries[1:2])[0], together[1], rtol=0, atol=2e-5
    )


def test_sharded_over_eight_devices_equals_one_device(checkpoint, ours):
    mesh = make_mesh(2, 2, 2)  # batch over data x fsdp = 4, parameters over fsdp and tensor
    sharded = Qwen3VLEmbedder(checkpoint[0], mesh=mesh, **SETTINGS)
    np.testing.assert_allclose(sharded.embed_items(_items()), ours[1], rtol=0, atol=2e-5)
    (ids,) = sharded.place((np.zeros((4, 32), np.int32),))
    assert ids.sharding.spec == PartitionSpec(("data", "fsdp"), None)
    assert len(ids.sharding.device_set) == 8
    # Five inputs: a full batch and one padded batch, on the same compiled shapes.
    five = sharded.embed_texts([QUERY, "fox", "dog", "a fox", "the dog"])
    np.testing.assert_allclose(five[0], ours[0][0], rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="multiple of the 4 batch shards"):
        Qwen3VLEmbedder(checkpoint[0], mesh=mesh, **{**SETTINGS, "batch_size": 6})


def test_batches_are_padded_to_length_buckets(embedder):
    assert length_buckets(4096)[:6] == (32, 48, 64, 96, 128, 192)
    assert length_buckets(4096)[-3:] == (2048, 3072, 4096)
    assert length_buckets(100) == (32, 48, 64, 96, 100)
    sizes = (1, 2, 3, 4, 12, 14, 16, 18, 40, 50, 60, 70, 120)  # 13 queries: 4 batches
    texts = ["fox " * n for n in sizes]
    lengths = sorted(len(embedder.encode(t, instruction=QUERY_INSTRUCTION).ids) for t in texts)
    expected = {
        (min(b for b in embedder.length_buckets if b >= max(lengths[i : i + 4])), 0)
        for i in range(0, len(texts), 4)
    }
    embedder.shapes.clear()
    vectors = embedder.embed_texts(texts)
    assert embedder.shapes == expected and len(expected) >= 3
    np.testing.assert_allclose(vectors[3], embedder.embed_texts(texts[3:4])[0], atol=2e-5)


def test_long_text_is_cut_and_oversized_visuals_refused(checkpoint):
    _, _, tokenizer = checkpoint
    short = Qwen3VLEmbedder(checkpoint[0], **{**SETTINGS, "max_length": 64})
    encoded = short.encode("the lazy dog " * 40)
    assert len(encoded.ids) == 64
    decoded = tokenizer.decode(encoded.ids)
    assert decoded.startswith("<|im_start|>system\nRepresent the user's input.<|im_end|>\n")
    assert decoded.endswith("the lazy dog the<|im_end|>\n<|im_start|>assistant\n")
    vector = short.embed_texts(["the lazy dog " * 40])
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, rtol=1e-6)
    big = np.zeros((32 * 9, 32 * 9, 3), np.uint8)  # 81 tokens under a larger budget
    roomy = Qwen3VLEmbedder(checkpoint[0], **{**SETTINGS, "image_max_pixels": 81 * 1024})
    roomy.max_length = 64
    with pytest.raises(ValueError, match="more than max_length = 64"):
        roomy.encode(image=big)


def test_store_built_with_the_embedder_finds_the_picture(tmp_path, checkpoint, embedder, ours):
    _, _, tokenizer = checkpoint
    items = _items()
    store = CorpusStore.build(items, str(tmp_path / "store"), embedder)
    np.testing.assert_allclose(store.embeddings, ours[1], rtol=0, atol=2e-5)
    ids, scores = store.search([QUERY], k=4)
    expected = np.argsort(-(ours[1] @ ours[0][0]), kind="stable")
    assert ids[0].tolist() == [items[i].item_id for i in expected]
    np.testing.assert_allclose(scores[0], np.sort(ours[1] @ ours[0][0])[::-1], atol=1e-5)
    reopened = CorpusStore.open(
        str(tmp_path / "store"), Qwen3VLEmbedder.from_spec(embedder.spec(), batch_size=4)
    )
    assert reopened.embedder.spec() == embedder.spec()
    other = Qwen3VLEmbedder(checkpoint[0], **{**SETTINGS, "with_caption": True, "max_frames": 3})
    picture = tokenizer.decode(other.encode_item(items[1]).ids)
    assert picture.endswith("<|vision_end|>a picture<|im_end|>\n<|im_start|>assistant\n")
    clip = other.encode_item(items[2])  # frames 10, 12 and 14 s: pairs at 1.0 and 4.0 s
    assert clip.visuals[0].grid == (2, 4, 4)
    assert "<1.0 seconds>" in tokenizer.decode(clip.ids)
    assert "<4.0 seconds>" in tokenizer.decode(clip.ids)
    with pytest.raises(Exception, match="was embedded with"):
        CorpusStore.open(str(tmp_path / "store"), other)


def test_progress_is_logged(embedder, caplog):
    with caplog.at_level(logging.INFO, logger="vimrag_jax.retrieval.vl_embedder"):
        embedder.embed_items(_items()[:1])
    assert "embedded 1/1 items" in caplog.text and "items embedded so far" in caplog.text


def test_rebuilt_from_its_spec_and_named_on_the_command_line(checkpoint, embedder, ours):
    from vimrag_jax.retrieval.embedders import embedder_from_spec
    from vimrag_jax.retrieval.import_corpus import parse_embedder

    rebuilt = embedder_from_spec(embedder.spec())  # what a store's manifest reopens with
    assert isinstance(rebuilt, Qwen3VLEmbedder) and rebuilt.spec() == embedder.spec()
    np.testing.assert_allclose(rebuilt.embed_items(_items()[:2]), ours[1][:2], rtol=0, atol=2e-5)
    named = parse_embedder(f"qwen3_vl:{checkpoint[0]}")  # --embedder=qwen3_vl:DIR, defaults
    assert isinstance(named, Qwen3VLEmbedder)
    assert named.spec()["path"] == str(Path(checkpoint[0]).resolve())
    assert named.image_max_pixels == 480 * 32 * 32  # the class defaults, not the test's
    np.testing.assert_allclose(named.embed_texts([QUERY]), ours[0], rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="unknown 'qwen3_vl' setting"):
        parse_embedder(f'{{"kind": "qwen3_vl", "path": "{checkpoint[0]}", "pooling": "mean"}}')
