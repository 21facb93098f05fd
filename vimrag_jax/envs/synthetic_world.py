"""The synthetic world's entities and their evidence: names, facts, rendered pixels and passages.

``make_world`` invents the people, companies and cities and draws their facts; ``make_items`` turns
every fact into the corpus item that states it (a passage, an image or a video) plus the
distractor passages, and records which item is each fact's evidence. Both draw from the one
generator ``synthetic.build`` passes along, in a fixed order, so a seed gives the same world.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from vimrag_jax.retrieval.store_format import CorpusItem

if TYPE_CHECKING:
    from vimrag_jax.envs.synthetic import SyntheticConfig

#: Palette colours of shapes and balloons. Backgrounds are pure greys (r = g = b), so a pixel shows
#: a fact exactly when it has one of these colours.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (50, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 190),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
HOBBIES = (
    "falconry", "fencing", "pottery", "chess", "archery", "rowing",
    "origami", "beekeeping", "sailing", "juggling", "knitting", "gardening",
)  # fmt: skip
RIVERS = ("Ossel", "Varrow", "Lindel", "Murra", "Tashk", "Ebbin", "Corrant", "Fennow")
_TOPICS = ("tidal power", "glass making", "old maps", "bird songs", "rope bridges", "lichen")
_SPORTS = ("curling", "polo", "handball", "cycling", "lacrosse", "squash")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_FOODS = ("smoked eel", "rye cakes", "plum wine", "goat cheese", "salt bread", "honey nuts")

#: Entity-to-entity relations: (subject type, object type).
RELATIONS = {
    "mentor": ("person", "person"),
    "employer": ("person", "company"),
    "headquarters": ("company", "city"),
}
#: Attributes: (entity type, evidence modality).
ATTRIBUTES = {
    "hobby": ("person", "text"),
    "badge": ("person", "image"),
    "founded": ("company", "text"),
    "logo": ("company", "image"),
    "river": ("city", "text"),
    "parade": ("city", "video"),
}


# -- names ------------------------------------------------------------------------------------

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "pr", "r", "s",
           "st", "t", "tr", "v", "z", "sh", "th", "h", "j")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "n", "r", "l", "s", "x", "m", "k", "sk", "nd")


def _word(rng: np.random.Generator, syllables: int) -> str:
    parts = [
        _ONSETS[rng.integers(len(_ONSETS))]
        + _VOWELS[rng.integers(len(_VOWELS))]
        + _CODAS[rng.integers(len(_CODAS))]
        for _ in range(syllables)
    ]
    return "".join(parts).capitalize()


def _new_name(rng: np.random.Generator, kind: str, taken: set[str]) -> str:
    while True:
        if kind == "person":  # first and last name
            name = f"{_word(rng, 2)} {_word(rng, 1 + int(rng.integers(2)))}"
        elif kind == "company":
            name = _word(rng, 2 + int(rng.integers(2)))
        else:
            name = _word(rng, 2)
        if name not in taken:
            taken.add(name)
            return name


def _twin_name(rng: np.random.Generator, name: str, taken: set[str]) -> str:
    """The name with one vowel changed (a near duplicate), unique among ``taken``."""
    positions = [i for i, ch in enumerate(name) if ch in "aeiou"]
    for _ in range(100):
        i = positions[rng.integers(len(positions))]
        vowel = "aeiou"[rng.integers(5)]
        twin = name[:i] + vowel + name[i + 1 :]
        if twin not in taken:
            taken.add(twin)
            return twin
    raise RuntimeError(f"no free near-duplicate name for {name!r}")


# -- pixels -----------------------------------------------------------------------------------


def _grey_background(rng: np.random.Generator, height: int, width: int, shift: int = 0):
    """A grey gradient with grey noise: never a palette colour."""
    base = int(rng.integers(90, 190))
    ramp = (np.arange(width) + shift) % width * (40.0 / width)
    grey = base + ramp[None, :] + rng.integers(-8, 9, size=(height, width))
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _draw_shape(canvas: np.ndarray, shape: str, colour: str, box: tuple[int, int, int]):
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    x0, y0, size = box
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([x0, y0, x0 + size - 1, y0 + size - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x0 + size - 1, y0 + size - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon(
            [(x0 + (size - 1) / 2, y0), (x0, y0 + size - 1), (x0 + size - 1, y0 + size - 1)],
            fill=fill,
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.array(image, np.uint8)


def render_emblem(rng: np.random.Generator, shape: str, colour: str, height: int, width: int):
    """uint8[H, W, 3]: one coloured ``shape`` on a grey background (badges and logos)."""
    side = min(height, width)
    size = int(rng.integers(int(side * 0.4), int(side * 0.7) + 1))
    x0 = int(rng.integers(0, width - size + 1))
    y0 = int(rng.integers(0, height - size + 1))
    return _draw_shape(_grey_background(rng, height, width), shape, colour, (x0, y0, size))


def render_parade(
    rng: np.random.Generator, colour: str, frames: int, height: int, width: int
) -> tuple[np.ndarray, tuple[int, ...]]:
    """(uint8[F, H, W, 3], frames showing the balloon): a panning grey street, a dark crowd, and a
    ``colour`` balloon rising through a contiguous run of frames."""
    run = int(rng.integers(2, max(2, frames // 2) + 1))
    start = int(rng.integers(0, frames - run + 1))
    shown = tuple(range(start, start + run))
    size = max(4, min(height, width) // 4)
    x = int(rng.integers(0, width - size + 1))
    crowd = int(rng.integers(20, 60))
    video = []
    for t in range(frames):
        frame = _grey_background(rng, height, width, shift=3 * t)
        frame[height - height // 5 :, :, :] = crowd
        if t in shown:
            y = int(round((height - height // 5 - size) * (1 - (t - start + 1) / (run + 1))))
            frame = _draw_shape(frame, "circle", colour, (x, y, size))
        video.append(frame)
    return np.stack(video), shown


# -- text -------------------------------------------------------------------------------------


def statement(relation: str, subject: str, value: str) -> str:
    """The passage stating ``relation(subject) = value`` (relations and text attributes)."""
    return {
        "mentor": f"{subject} was mentored by {value}.",
        "employer": f"{subject} works for {value}.",
        "headquarters": f"{subject} is headquartered in {value}.",
        "hobby": f"The hobby of {subject} is {value}.",
        "founded": f"{subject} was founded in {value}.",
        "river": f"{subject} lies on the river {value}.",
    }[relation]


CAPTIONS = {
    "badge": "The badge of {}.",
    "logo": "The logo of {}.",
    "parade": "A parade video of {}.",
}


# -- world ------------------------------------------------------------------------------------


@dataclass
class Entity:
    """A person, company or city with its facts and the ids of the items stating them."""

    name: str
    kind: str
    facts: dict  # relation/attribute -> value (names for relations, strings for attributes)
    evidence: dict  # relation/attribute -> item id (filled when items are made)
    key_frames: tuple[int, ...] = ()


def make_world(config: SyntheticConfig, rng: np.random.Generator) -> list[Entity]:
    """The entities (near-duplicate twins last) with all their facts drawn; no evidence yet."""
    n = config.num_entities
    counts = {"person": n // 2, "company": (3 * n) // 10}
    counts["city"] = n - counts["person"] - counts["company"]
    taken: set[str] = set()
    entities = [
        Entity(_new_name(rng, kind, taken), kind, {}, {})
        for kind in ("person", "company", "city")
        for _ in range(counts[kind])
    ]
    twins = min(config.near_duplicates, len(entities))
    bases = rng.choice(len(entities), size=twins, replace=False)
    for base in sorted(int(b) for b in bases):
        entities.append(
            Entity(_twin_name(rng, entities[base].name, taken), entities[base].kind, {}, {})
        )
    by_kind = {kind: [e for e in entities if e.kind == kind] for kind in counts}
    for entity in entities:
        if entity.kind == "person":
            others = [p for p in by_kind["person"] if p is not entity]
            entity.facts["mentor"] = others[rng.integers(len(others))].name
            entity.facts["employer"] = by_kind["company"][
                rng.integers(len(by_kind["company"]))
            ].name
            entity.facts["hobby"] = HOBBIES[rng.integers(len(HOBBIES))]
            entity.facts["badge"] = _emblem_value(rng)
        elif entity.kind == "company":
            entity.facts["headquarters"] = by_kind["city"][rng.integers(len(by_kind["city"]))].name
            entity.facts["founded"] = str(int(rng.integers(1850, 2020)))
            entity.facts["logo"] = _emblem_value(rng)
        else:
            entity.facts["river"] = RIVERS[rng.integers(len(RIVERS))]
            entity.facts["parade"] = list(COLOURS)[rng.integers(len(COLOURS))]
    return entities


def _emblem_value(rng: np.random.Generator) -> str:
    return f"{list(COLOURS)[rng.integers(len(COLOURS))]} {SHAPES[rng.integers(len(SHAPES))]}"


def _distractor(rng: np.random.Generator, entity: Entity, cities: list[str]) -> str:
    pick = int(rng.integers(2))
    name = entity.name
    if entity.kind == "person":
        if pick:
            return f"{name} gave a talk about {_TOPICS[rng.integers(len(_TOPICS))]}."
        return f"{name} once visited {cities[rng.integers(len(cities))]}."
    if entity.kind == "company":
        if pick:
            return f"{name} sponsors a {_SPORTS[rng.integers(len(_SPORTS))]} team."
        return f"{name} opened a new office on a {_WEEKDAYS[rng.integers(len(_WEEKDAYS))]}."
    if pick:
        return f"{name} hosts a market every {_WEEKDAYS[rng.integers(len(_WEEKDAYS))]}."
    return f"{name} is known for its {_FOODS[rng.integers(len(_FOODS))]}."


def make_items(config: SyntheticConfig, rng: np.random.Generator, entities: list[Entity]):
    """The corpus items, ids 0..n−1 in a random order; fills each entity's ``evidence``."""
    h, w = config.image_height, config.image_width
    cities = [e.name for e in entities if e.kind == "city"]
    # (entity, fact key or None for a distractor, modality, text, pixels, timestamps)
    drafts = []
    for entity in entities:
        for key, value in entity.facts.items():
            modality = "text" if key in RELATIONS else ATTRIBUTES[key][1]
            if modality == "text":
                drafts.append((entity, key, "text", statement(key, entity.name, value), None, ()))
            elif modality == "image":
                colour, shape = value.split()
                pixels = render_emblem(rng, shape, colour, h, w)
                caption = CAPTIONS[key].format(entity.name)
                drafts.append((entity, key, "image", caption, pixels, ()))
            else:
                pixels, shown = render_parade(rng, value, config.video_frames, h, w)
                entity.key_frames = shown
                times = tuple(float(t) for t in range(config.video_frames))  # 1 fps
                caption = CAPTIONS[key].format(entity.name)
                drafts.append((entity, key, "video", caption, pixels, times))
        for _ in range(config.distractors_per_entity):
            drafts.append((entity, None, "text", _distractor(rng, entity, cities), None, ()))
    order = rng.permutation(len(drafts))  # item ids carry no hint of what an item is about
    items = []
    for item_id, draft_index in enumerate(order):
        entity, key, modality, text, pixels, times = drafts[int(draft_index)]
        items.append(CorpusItem(item_id, modality, entity.name, text, pixels, times))
        if key is not None:
            entity.evidence[key] = item_id
    return items


__all__ = [
    "ATTRIBUTES",
    "CAPTIONS",
    "COLOURS",
    "HOBBIES",
    "RELATIONS",
    "RIVERS",
    "SHAPES",
    "Entity",
    "make_items",
    "make_world",
    "render_emblem",
    "render_parade",
    "statement",
]
