"""The synthetic multimodal multi-hop QA environment: a made-up world, its corpus and questions.

Modelled on the paper's SyntheticQA. A seeded generator invents people, companies and cities with
made-up names, links them by functional relations and gives each a text and a visual attribute:

- person: ``mentor`` (another person), ``employer`` (a company), ``hobby`` (text), ``badge`` (an
  image of a coloured shape);
- company: ``headquarters`` (a city), ``founded`` (a year, text), ``logo`` (an image);
- city: ``river`` (text), ``parade`` (a video whose balloon colour shows only in some frames).

Every relation and text attribute is stated by one passage; every visual attribute is only in the
pixels — the caption names the entity, never the colour or shape. Videos are frame stacks at 1 fps
and the balloon appears only in a contiguous run of frames (``Hop.key_timestamps``).

A question of h hops follows h − 1 relations from a start entity and asks for an attribute of the
entity reached, e.g. (4 hops) "What colour is the balloon in the parade video of the city where the
employer of the mentor of Tovi Brask is headquartered?". It carries its gold answer, its chain (one
``Hop`` per evidence item, subject → answer) and the gold evidence ids, one per hop. No two
questions ask the same thing (start entity, path, attribute), so a split of the list into train
and eval questions holds the eval ones out; a world too small for ``num_questions`` distinct
questions is an error that says how many it has.

Distractors: every entity has ``distractors_per_entity`` extra passages that name it without stating
any asked-for fact; ``near_duplicates`` entities get a twin whose name differs by one vowel and who
has its own, different facts, images and videos. Everything is deterministic in ``config.seed``:
the same config gives byte-identical items and questions.

The entities, their facts and the items stating them are made in ``synthetic_world``; this module
holds the config, the questions and what is read off them (queries, fact sentences, wrong answers).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from vimrag_jax.envs.synthetic_world import (
    ATTRIBUTES,
    CAPTIONS,
    COLOURS,
    HOBBIES,
    RELATIONS,
    RIVERS,
    SHAPES,
    Entity,
    make_items,
    make_world,
    statement,
)
from vimrag_jax.retrieval.store_format import CorpusItem

# Relation paths by number of relation hops, with the type they start from.
_PATHS = {
    0: [("person", ()), ("company", ()), ("city", ())],
    1: [("person", ("mentor",)), ("person", ("employer",)), ("company", ("headquarters",))],
    2: [("person", ("mentor", "employer")), ("person", ("employer", "headquarters"))],
    3: [("person", ("mentor", "employer", "headquarters"))],
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and seed of a synthetic world. Near-duplicate twins come on top of ``num_entities``."""

    num_entities: int = 48
    num_questions: int = 200
    min_hops: int = 1
    max_hops: int = 4
    image_height: int = 64
    image_width: int = 64
    video_frames: int = 8
    near_duplicates: int = 4
    distractors_per_entity: int = 1
    # Evidence modalities a question's final attribute may have; ("text",) keeps the corpus
    # multimodal but asks only what a text-only policy can read (the tiny CPU preset).
    answer_modalities: tuple[str, ...] = ("text", "image", "video")
    seed: int = 0

    def __post_init__(self):
        modalities = tuple(self.answer_modalities)
        if not modalities or set(modalities) - {"text", "image", "video"}:
            raise ValueError(
                "answer_modalities must be a non-empty subset of ('text', 'image', 'video'), "
                f"got {self.answer_modalities!r}"
            )
        object.__setattr__(self, "answer_modalities", modalities)
        if self.num_entities < 6:
            raise ValueError(f"num_entities must be at least 6, got {self.num_entities}")
        if self.num_questions < 0:
            raise ValueError(f"num_questions must be >= 0, got {self.num_questions}")
        if not 1 <= self.min_hops <= self.max_hops <= 4:
            raise ValueError(
                f"hops range must satisfy 1 <= min_hops <= max_hops <= 4, "
                f"got {self.min_hops}..{self.max_hops}"
            )
        if self.image_height < 16 or self.image_width < 16:
            raise ValueError(
                f"images must be at least 16x16, got {self.image_height}x{self.image_width}"
            )
        if not 2 <= self.video_frames <= 32:
            raise ValueError(f"video_frames must be in [2, 32], got {self.video_frames}")
        if self.near_duplicates < 0 or self.distractors_per_entity < 0:
            raise ValueError(
                f"near_duplicates and distractors_per_entity must be >= 0, got "
                f"{self.near_duplicates} and {self.distractors_per_entity}"
            )


@dataclass(frozen=True)
class Hop:
    """One step of a question's chain: ``relation(subject) = answer``, stated by one item.

    ``key_timestamps`` lists the seconds of the video frames that show the fact (videos only).
    """

    subject: str
    relation: str
    answer: str
    evidence_id: int
    modality: str
    key_timestamps: tuple[float, ...] = ()


@dataclass(frozen=True)
class Question:
    """A multi-hop question with its gold answer and gold evidence (one item id per hop)."""

    question_id: str
    text: str
    answer: str
    evidence_ids: tuple[int, ...]
    hops: int
    chain: tuple[Hop, ...]


# -- questions --------------------------------------------------------------------------------


def hop_query(hop: Hop, variant: int = 0) -> str:
    """A search query naming the hop's subject and relation (never its answer).

    Variant 0 mirrors how the corpus states the fact; variant 1 is a terse keyword form, for a
    second try when the first query missed the evidence.
    """
    s = hop.subject
    if variant == 0:
        return {
            "mentor": f"{s} was mentored by whom?",
            "employer": f"{s} works for which company?",
            "headquarters": f"{s} is headquartered in which city?",
            "hobby": f"What is the hobby of {s}?",
            "founded": f"{s} was founded in which year?",
            "river": f"{s} lies on which river?",
            "badge": f"the badge of {s}",
            "logo": f"the logo of {s}",
            "parade": f"parade video of {s}",
        }[hop.relation]
    keyword = {
        "mentor": "mentor",
        "employer": "employer company",
        "headquarters": "headquarters city",
        "hobby": "hobby",
        "founded": "founding year",
        "river": "river",
        "badge": "badge picture",
        "logo": "logo picture",
        "parade": "parade video balloon",
    }[hop.relation]
    return f"{s} {keyword}"


def fact_sentence(hop: Hop) -> str:
    """The hop's fact as one sentence (what a memorize summary records)."""
    if hop.relation in ("badge", "logo"):
        return f"The {hop.relation} of {hop.subject} shows a {hop.answer}."
    if hop.relation == "parade":
        seconds = ", ".join(f"{t:.1f}" for t in hop.key_timestamps)
        return (
            f"The balloon in the parade video of {hop.subject} is {hop.answer} "
            f"(seen at {seconds} seconds)."
        )
    return statement(hop.relation, hop.subject, hop.answer)


def _describe(start: str, path: tuple[str, ...]) -> str:
    description = start
    for relation in path:
        description = {
            "mentor": "the mentor of {}",
            "employer": "the employer of {}",
            "headquarters": "the city where {} is headquartered",
        }[relation].format(description)
    return description


def _ask(attribute: str, description: str) -> str:
    return {
        "hobby": "What is the hobby of {}?",
        "badge": "What does the badge of {} show?",
        "founded": "In which year was {} founded?",
        "logo": "What does the logo of {} show?",
        "river": "On which river does {} lie?",
        "parade": "What colour is the balloon in the parade video of {}?",
    }[attribute].format(description)


def _make_questions(config: SyntheticConfig, rng: np.random.Generator, entities: list[Entity]):
    by_name = {e.name: e for e in entities}
    by_kind: dict[str, list[Entity]] = {}
    for entity in entities:
        by_kind.setdefault(entity.kind, []).append(entity)

    def attributes(kind: str) -> list[str]:
        return [
            a
            for a, (k, modality) in ATTRIBUTES.items()
            if k == kind and modality in config.answer_modalities
        ]

    def walk(start: Entity, path: tuple[str, ...]) -> tuple[Entity, list[Hop]]:
        entity, chain = start, []
        for relation in path:
            target = entity.facts[relation]
            chain.append(Hop(entity.name, relation, target, entity.evidence[relation], "text"))
            entity = by_name[target]
        return entity, chain

    def unasked(hops: int) -> list[tuple[Entity, tuple[str, ...], str]]:
        # Every (start, path, attribute) of this hop count not asked yet, in a fixed order.
        return [
            (start, path, attribute)
            for kind, path in _PATHS[hops - 1]
            for start in by_kind[kind]
            for attribute in attributes(walk(start, path)[0].kind)
            if (start.name, path, attribute) not in seen
        ]

    hop_counts = list(range(config.min_hops, config.max_hops + 1))
    seen: set[tuple] = set()
    questions = []
    for index in range(config.num_questions):
        hops = hop_counts[index % len(hop_counts)]  # round robin: every hop count occurs
        for _attempt in range(50):  # a random draw; exhaustive once draws keep repeating
            kind, path = _PATHS[hops - 1][rng.integers(len(_PATHS[hops - 1]))]
            start = by_kind[kind][rng.integers(len(by_kind[kind]))]
            options = attributes(walk(start, path)[0].kind)
            attribute = options[rng.integers(len(options))]
            if (start.name, path, attribute) not in seen:
                break
        else:
            left = unasked(hops)
            if not left:
                raise ValueError(
                    f"this world has only {len(seen)} distinct questions with "
                    f"{config.min_hops}..{config.max_hops} hops about "
                    f"{'/'.join(config.answer_modalities)} facts, {config.num_questions} were "
                    "asked for: lower num_questions or raise num_entities"
                )
            start, path, attribute = left[rng.integers(len(left))]
        key = (start.name, path, attribute)
        entity, chain = walk(start, path)
        seen.add(key)
        modality = ATTRIBUTES[attribute][1]
        times = tuple(float(t) for t in entity.key_frames) if modality == "video" else ()
        chain.append(
            Hop(
                entity.name,
                attribute,
                entity.facts[attribute],
                entity.evidence[attribute],
                modality,
                times,
            )
        )
        questions.append(
            Question(
                question_id=f"syn-{config.seed}-{index:05d}",
                text=_ask(attribute, _describe(start.name, path)),
                answer=entity.facts[attribute],
                evidence_ids=tuple(hop.evidence_id for hop in chain),
                hops=hops,
                chain=tuple(chain),
            )
        )
    return questions


def build(config: SyntheticConfig = SyntheticConfig()) -> tuple[list[CorpusItem], list[Question]]:
    """(corpus items with ids 0..n−1, questions), deterministic in ``config``."""
    rng = np.random.default_rng(config.seed)
    entities = make_world(config, rng)
    items = make_items(config, rng, entities)
    questions = _make_questions(config, rng, entities)
    return items, questions


def entity_kinds(items: list[CorpusItem]) -> dict[str, str]:
    """Entity name -> kind ("person", "company", "city"), read off the visual items' captions."""
    kinds = {"badge": "person", "logo": "company", "parade": "city"}
    found = {}
    for item in items:
        if item.modality != "text":
            for attribute, template in CAPTIONS.items():
                if item.text == template.format(item.title):
                    found[item.title] = kinds[attribute]
    return found


def wrong_answer(question: Question, rng: np.random.Generator) -> str:
    """A plausible answer of the right kind that differs from the gold one."""
    attribute = question.chain[-1].relation
    if attribute in ("badge", "logo"):
        options = [f"{c} {s}" for c, s in itertools.product(COLOURS, SHAPES)]
    elif attribute == "parade":
        options = list(COLOURS)
    elif attribute == "hobby":
        options = list(HOBBIES)
    elif attribute == "river":
        options = list(RIVERS)
    else:
        options = [str(year) for year in range(1850, 2020)]
    options = [o for o in options if o != question.answer]
    return options[rng.integers(len(options))]


def corpus_texts(items: list[CorpusItem], questions: list[Question]) -> list[str]:
    """Every string of the environment, for training a tokenizer: passages, captions, questions,
    answers, hop queries (both variants), fact sentences and the answer vocabularies."""
    texts = [item.text for item in items]
    for question in questions:
        texts += [question.text, question.answer]
        for hop in question.chain:
            texts += [hop_query(hop, 0), hop_query(hop, 1), fact_sentence(hop)]
    texts += list(COLOURS) + list(SHAPES) + list(HOBBIES) + list(RIVERS)
    return texts


__all__ = [
    "ATTRIBUTES",
    "COLOURS",
    "HOBBIES",
    "RELATIONS",
    "RIVERS",
    "SHAPES",
    "Hop",
    "Question",
    "SyntheticConfig",
    "build",
    "corpus_texts",
    "entity_kinds",
    "fact_sentence",
    "hop_query",
    "wrong_answer",
]
