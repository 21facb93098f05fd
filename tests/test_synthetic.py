"""Tests for the synthetic multimodal multi-hop environment: determinism, derivable answers, facts
only in the pixels (and only in the listed video frames), hop counts and distractors."""

import hashlib
import re

import numpy as np
import pytest

from vimrag_jax.envs import synthetic
from vimrag_jax.envs.synthetic import COLOURS, SyntheticConfig, build

CONFIG = SyntheticConfig(num_entities=30, num_questions=80, seed=3)


@pytest.fixture(scope="module")
def world():
    items, questions = build(CONFIG)
    return items, questions, {item.item_id: item for item in items}


def _digest(items, questions) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(repr((item.item_id, item.modality, item.title, item.text)).encode())
        digest.update(repr(item.timestamps).encode())
        if item.pixels is not None:
            digest.update(repr(item.pixels.shape).encode() + item.pixels.tobytes())
    for question in questions:
        digest.update(repr(question).encode())
    return digest.hexdigest()


# -- a loop-level pixel reader, independent of the renderer ------------------------------------


def _palette_mask(pixels: np.ndarray) -> tuple[np.ndarray, set[str]]:
    """Pixels that are not grey, and the palette colours they have (error if any is off-palette)."""
    coloured = ~((pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2]))
    names = set()
    for value in {tuple(int(c) for c in p) for p in pixels[coloured]}:
        matches = [name for name, rgb in COLOURS.items() if rgb == value]
        assert matches, f"off-palette colour {value}"
        names.add(matches[0])
    return coloured, names


def _read_emblem(pixels: np.ndarray) -> str:
    mask, names = _palette_mask(pixels)
    assert len(names) == 1, names
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    fill = box.mean()
    top_width, bottom_width = box[0].sum(), box[-1].sum()
    if fill > 0.95:
        shape = "square"
    elif top_width < 0.3 * bottom_width:
        shape = "triangle"
    else:
        shape = "circle"
    return f"{names.pop()} {shape}"


def _check_question(question, by_id) -> None:
    """Follows the chain hop by hop through the gold items; the answer must come out of them."""
    assert question.hops == len(question.chain) == len(question.evidence_ids)
    assert question.evidence_ids == tuple(hop.evidence_id for hop in question.chain)
    for position, hop in enumerate(question.chain):
        item = by_id[hop.evidence_id]
        assert item.title == hop.subject and hop.subject in item.text
        assert item.modality == hop.modality
        if item.modality == "text":
            assert re.search(rf"\b{re.escape(hop.answer)}\.$", item.text), (item.text, hop)
        elif item.modality == "image":
            assert _read_emblem(item.pixels) == hop.answer
        else:
            frames = zip(item.timestamps, item.pixels, strict=True)
            shown = [t for t, frame in frames if _palette_mask(frame)[1]]
            assert tuple(shown) == hop.key_timestamps and shown
            assert all(_palette_mask(item.pixels[int(t)])[1] == {hop.answer} for t in shown)
        if position + 1 < len(question.chain):
            assert question.chain[position + 1].subject == hop.answer
    assert question.chain[-1].answer == question.answer


def test_same_seed_same_bytes_and_other_seed_differs(world):
    items, questions, _ = world
    again = build(CONFIG)
    assert _digest(items, questions) == _digest(*again)
    other = build(SyntheticConfig(num_entities=30, num_questions=80, seed=4))
    assert _digest(items, questions) != _digest(*other)


def test_every_answer_derives_along_its_chain(world):
    items, questions, by_id = world
    assert [item.item_id for item in items] == list(range(len(items)))
    for question in questions:
        _check_question(question, by_id)


def test_visual_facts_only_in_pixels_and_listed_frames(world):
    items, questions, by_id = world
    words = set(COLOURS) | set(synthetic.SHAPES)
    for item in items:
        assert not words & set(re.findall(r"[a-z]+", item.text.lower())), item.text
    videos = [hop for q in questions for hop in q.chain if hop.modality == "video"]
    assert videos
    for hop in videos:
        video = by_id[hop.evidence_id]
        assert video.pixels.shape == (CONFIG.video_frames, 64, 64, 3)
        assert video.timestamps == tuple(float(t) for t in range(CONFIG.video_frames))
        for t, frame in zip(video.timestamps, video.pixels, strict=True):
            assert bool(_palette_mask(frame)[1]) == (t in hop.key_timestamps)
        assert len(hop.key_timestamps) < CONFIG.video_frames


def test_hop_counts_modalities_and_distractors(world):
    items, questions, _ = world
    assert {q.hops for q in questions} == {1, 2, 3, 4}
    assert {hop.modality for q in questions for hop in q.chain} == {"text", "image", "video"}
    assert len({q.text for q in questions}) == len(questions)
    titles = sorted({item.title for item in items})
    twins = [
        (a, b)
        for a in titles
        for b in titles
        if a < b and len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1
    ]
    assert len(twins) >= CONFIG.near_duplicates
    fact = re.compile(r"mentored by|works for|headquartered in|hobby of|founded in|on the river")
    filler = [i for i in items if i.modality == "text" and not fact.search(i.text)]
    assert len(filler) == len(titles) * CONFIG.distractors_per_entity
    gold = {e for q in questions for e in q.evidence_ids}
    assert len(gold) < len(items)


def test_sizes_are_configurable_and_bad_configs_fail():
    items, questions = build(
        SyntheticConfig(
            num_entities=6,
            num_questions=8,
            image_height=96,
            image_width=128,
            video_frames=5,
            min_hops=2,
            max_hops=3,
            near_duplicates=0,
            distractors_per_entity=0,
        )
    )
    shapes = {item.modality: item.pixels.shape for item in items if item.pixels is not None}
    assert shapes == {"image": (96, 128, 3), "video": (5, 96, 128, 3)}
    assert {q.hops for q in questions} == {2, 3}
    with pytest.raises(ValueError, match="max_hops"):
        SyntheticConfig(min_hops=3, max_hops=5)
    with pytest.raises(ValueError, match="video_frames"):
        SyntheticConfig(video_frames=1)
    with pytest.raises(ValueError, match="num_entities"):
        SyntheticConfig(num_entities=2)


def test_corpus_texts_cover_everything_a_tokenizer_needs(world):
    items, questions, _ = world
    texts = synthetic.corpus_texts(items, questions)
    joined = "\n".join(texts)
    for question in questions:
        assert question.text in texts and question.answer in joined
    assert all(item.text in texts for item in items)
    assert all(synthetic.hop_query(q.chain[0]) in texts for q in questions)


def test_wrong_answer_differs_and_has_the_right_kind(world):
    _, questions, _ = world
    rng = np.random.default_rng(0)
    for question in questions:
        wrong = synthetic.wrong_answer(question, rng)
        assert wrong != question.answer
        assert len(wrong.split()) == len(question.answer.split())


def test_entity_kinds_recovers_every_entity(world):
    items, _, _ = world
    kinds = synthetic.entity_kinds(items)
    assert set(kinds) == {item.title for item in items}
    assert set(kinds.values()) == {"person", "company", "city"}


def test_answer_modalities_restrict_the_final_attribute():
    config = synthetic.SyntheticConfig(num_questions=40, answer_modalities=("text",))
    items, questions = synthetic.build(config)
    assert {q.chain[-1].modality for q in questions} == {"text"}
    assert {item.modality for item in items} == {"text", "image", "video"}  # corpus unchanged
    with pytest.raises(ValueError, match="answer_modalities"):
        synthetic.SyntheticConfig(answer_modalities=("audio",))


def test_questions_are_distinct_and_a_small_world_says_how_many_it_has():
    # One hop about text facts: one question per entity and twin, whatever the seed.
    one_hop = dict(num_entities=20, min_hops=1, max_hops=1, answer_modalities=("text",))
    _, questions = synthetic.build(synthetic.SyntheticConfig(num_questions=24, **one_hop))
    # 20 entities + 4 twins, one text fact each: the last draws are forced by exhaustion.
    assert len({q.chain[0].subject for q in questions}) == 24
    with pytest.raises(ValueError, match="only 24 distinct questions with 1..1 hops about text"):
        synthetic.build(synthetic.SyntheticConfig(num_questions=25, **one_hop))
    # Bigger worlds: still no repeats.
    _, questions = synthetic.build(CONFIG)
    assert len({q.text for q in questions}) == len(questions)
