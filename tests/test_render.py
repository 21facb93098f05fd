"""Trajectory picture: layout decisions (depth, critical path, GGPO greying, budgets) and files."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vimrag_jax.memory.energy import allocate_pixels, memory_energy, smart_resize
from vimrag_jax.memory.graph import critical_path
from vimrag_jax.rl.ggpo import node_keep_mask
from vimrag_jax.rollout.render import graph_layout, main, node_depths, render_record

N, K = 6, 3
# References compiled once: eager calls would compile every scan / solve op separately (slow).
_keep = jax.jit(node_keep_mask)
_path = jax.jit(critical_path)
_pixels = jax.jit(lambda *a: allocate_pixels(memory_energy(*a), a[-1]))
EDGES = [(0, 1), (0, 2), (1, 3), (1, 4), (3, 4)]  # node 2 is a dead end, node 5 padding


def make_record(reward=1.0, answer_node=4, relevant=(2, 3)) -> dict:
    adjacency = np.zeros((N, N), bool)
    for i, j in EDGES:
        adjacency[i, j] = True
    node_valid = np.array([1, 1, 1, 1, 1, 0], bool)
    node_kind = np.array([0, 1, 1, 1, 2, 0], np.int8)
    if answer_node < 0:  # never answered: node 4 is just another search
        node_kind[4] = 1
    priority = np.zeros((N, K), np.float32)
    item_valid = np.zeros((N, K), bool)
    for (i, k), p in {(1, 0): 5, (1, 1): 3, (2, 0): 2, (3, 0): 4, (3, 1): 4, (3, 2): 1}.items():
        priority[i, k], item_valid[i, k] = p, True
    return {
        "adjacency": adjacency,
        "node_valid": node_valid,
        "node_kind": node_kind,
        "relevant": np.isin(np.arange(N), relevant),
        "priority": priority,
        "item_valid": item_valid,
        "answer_node": answer_node,
        "reward": reward,
        "question": "Which river flows through the city where the painter was born?",
        "gold_answer": "the Arno",
        "prediction": "Arno",
    }


def reference_sets(record) -> tuple[set[int], set[int]]:
    """Critical path and GGPO-greyed nodes straight from the project's mask functions."""
    args = [jnp.asarray(record["adjacency"]), jnp.asarray(record["node_valid"])]
    keep = np.asarray(_keep(*args, record["answer_node"], record["reward"], record["relevant"]))
    on_path = np.asarray(_path(*args, record["answer_node"]))
    valid = record["node_valid"]
    return set(np.flatnonzero(on_path).tolist()), set(np.flatnonzero(valid & ~keep).tolist())


@pytest.mark.parametrize(
    "reward, answer_node, relevant, critical, greyed",
    [
        (1.0, 4, (2, 3), {0, 1, 3, 4}, {2}),  # positive: dead end 2 masked
        (0.0, 4, (2, 3), {0, 1, 3, 4}, {2, 3}),  # negative: relevant retrievals masked
        (0.0, -1, (1,), set(), {1}),  # never answered
        (1.0, -1, (), set(), {0, 1, 2, 3, 4}),  # positive without answer: nothing earned it
    ],
)
def test_layout_sets_equal_mask_functions(reward, answer_node, relevant, critical, greyed):
    record = make_record(reward, answer_node, relevant)
    layout = graph_layout(record)
    assert (set(layout.critical), set(layout.greyed)) == (critical, greyed)
    assert (critical, greyed) == reference_sets(record)
    assert {b.index for b in layout.nodes if b.on_critical_path} == critical
    assert {b.index for b in layout.nodes if b.greyed} == greyed


def test_layout_depths_edges_and_columns():
    layout = graph_layout(make_record())
    assert [b.index for b in layout.nodes] == [0, 1, 2, 3, 4]  # padding node 5 not drawn
    assert {b.index: b.depth for b in layout.nodes} == {0: 0, 1: 1, 2: 1, 3: 2, 4: 3}
    assert set(layout.edges) == set(EDGES)
    xs = {b.depth: b.x for b in layout.nodes}
    assert xs[0] < xs[1] < xs[2] < xs[3]
    one, two = layout.node(1), layout.node(2)
    assert one.x == two.x and abs(one.y - two.y) >= max(one.height, two.height)  # no overlap
    assert layout.node(4).lines[0] == "#4 answer" and "a: Arno" in layout.node(4).lines
    assert "reward 1" in layout.title and "gold: the Arno" in layout.title


def test_node_depths_is_the_longest_path():
    adjacency = np.zeros((5, 5), bool)
    adjacency[0, 1] = adjacency[1, 2] = adjacency[2, 3] = adjacency[0, 3] = True
    valid = np.array([1, 1, 1, 1, 0], bool)
    assert node_depths(adjacency, valid).tolist() == [0, 1, 2, 3, -1]


def test_thumbnail_sizes_follow_the_energy_budget():
    record = make_record()
    layout = graph_layout(record)
    names = ("adjacency", "node_valid", "priority", "item_valid")
    pixels = np.asarray(_pixels(*(jnp.asarray(record[k]) for k in names)))
    drawn = {(b.index, t.slot): t for b in layout.nodes for t in b.thumbs}
    assert set(drawn) == {tuple(ix) for ix in np.argwhere(record["item_valid"])}
    for (i, k), thumb in drawn.items():
        assert thumb.pixels == pixels[i, k]
        assert 0 <= thumb.height * thumb.width <= max(thumb.pixels, 0)
        if thumb.pixels:
            assert thumb.height == thumb.width  # unknown source: a square image
    assert sum(t.pixels == 0 for t in drawn.values()) == 1  # six items, top-5 shown
    by_budget = sorted(drawn.values(), key=lambda t: t.pixels)
    areas = [t.height * t.width for t in by_budget]
    assert areas == sorted(areas)
    averaged = graph_layout(record, budget="averaged")
    assert {t.pixels for b in averaged.nodes for t in b.thumbs} == {1310720 // 6}


def test_png_and_svg_files_are_valid_images(tmp_path):
    record = make_record(reward=0.0)
    png = tmp_path / "graph.png"
    svg = tmp_path / "nested" / "graph.svg"
    render_record(record, png)
    render_record(record, svg)
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 100
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")


def test_record_without_answer_or_texts_renders(tmp_path):
    record = make_record(reward=0.0, answer_node=-1, relevant=())
    for key in ("question", "gold_answer", "prediction", "node_kind", "relevant"):
        record.pop(key)
    layout = render_record(record, tmp_path / "no_answer.png")
    assert layout.critical == frozenset() and layout.greyed == frozenset()
    assert layout.node(2).lines == ("#2 search",)  # indices only
    assert (tmp_path / "no_answer.png").stat().st_size > 0


def test_real_pixels_set_the_aspect_ratio(tmp_path):
    record = make_record()
    record["item_id"] = np.where(record["item_valid"], np.arange(N * K).reshape(N, K), -1)
    record["node_title"] = ["question", "painter", "museum", "birthplace", "answer", ""]
    record["node_query"] = ["", "who painted it", "where is it", "where was he born", "", ""]
    calls = []

    def load_visual(item_id, frame):
        calls.append((item_id, frame))
        if item_id == 3:  # node 1 slot 0 is missing from the corpus: a grey box instead
            raise KeyError(item_id)
        return np.full((200, 400, 3), item_id * 10, np.uint8)

    layout = render_record(record, tmp_path / "pixels.svg", load_visual=load_visual)
    assert sorted(calls) == sorted((int(i), 0) for i in record["item_id"][record["item_valid"]])
    thumb = next(t for t in layout.node(3).thumbs if t.slot == 0)
    assert thumb.item_id == 9 and thumb.width == 2 * thumb.height
    budget = thumb.pixels
    assert (thumb.height, thumb.width) == tuple(int(v) for v in smart_resize(200, 400, budget))
    assert layout.node(1).lines[0] == "#1 search: painter"
    ET.parse(tmp_path / "pixels.svg")


def test_bad_records_and_paths_raise_clear_errors(tmp_path):
    record = make_record()
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        render_record(record, tmp_path / "graph.jpg")
    with pytest.raises(KeyError, match="adjacency"):
        graph_layout({k: v for k, v in record.items() if k != "adjacency"})
    with pytest.raises(ValueError, match="shapes disagree"):
        graph_layout({**record, "priority": np.ones((N, K + 1), np.float32)})
    with pytest.raises(ValueError, match="node_query"):
        graph_layout({**record, "node_query": ["a"]})
    with pytest.raises(ValueError, match="budget"):
        graph_layout(record, budget="uniform")


def test_cli_renders_a_shard_record(tmp_path, capsys):
    from vimrag_jax.rollout.records import RecordDims, ShardWriter, blank_record

    dims = RecordDims(nodes=N, items=K, segments=2, tokens=4, visuals=1)
    writer = ShardWriter(tmp_path, name="shard-00000.array_record", dims=dims)
    fields = {k: v for k, v in make_record().items()}
    writer.write(blank_record(dims, question_id="q0", group_id="g0"))
    writer.write(blank_record(dims, question_id="q1", group_id="g1", **fields))
    shard = writer.close()
    out = tmp_path / "pic.png"
    assert main([f"--shard={shard}", "--index=1", f"--out={out}", "--corpus=/nonexistent"]) == 0
    assert "critical [0, 1, 3, 4]" in capsys.readouterr().out
    Image.open(out).verify()
    with pytest.raises(SystemExit):
        main([f"--shard={shard}", "--index=5", f"--out={out}"])


def test_video_slots_draw_their_keyframes_with_split_budgets():
    from vimrag_jax.rollout.render import memory_frames

    record = make_record()
    record["item_id"] = np.where(record["item_valid"], np.arange(N * K).reshape(N, K) + 10, -1)
    record["item_modality"] = np.where(record["item_valid"], 0, -1)
    record["item_modality"][1, 1] = record["item_modality"][3, 0] = 1  # two videos
    # Segments: 0 search node 1, 1 memorize node 1, 2 search node 3 (its prompt shows node 1's
    # memory: video 14 at frames 2 and 5, the last one repeated), 3 memorize node 3, 4 answer.
    s, v = 5, 4
    record["segment_node"] = np.array([1, 1, 3, 3, 4], np.int32)
    record["segment_valid"] = np.ones(s, bool)
    record["segment_visuals"] = np.zeros((s, v, 4), np.int32)
    record["segment_visual_valid"] = np.zeros((s, v), bool)
    record["segment_visuals"][2, :3] = [[10, 0, 64, 64], [14, 2, 64, 64], [14, 5, 64, 64]]
    record["segment_visual_valid"][2, :3] = True
    record["segment_visuals"][2, 3] = [14, 5, 64, 64]
    record["segment_visual_valid"][2, 3] = True
    assert memory_frames(record) == {(1, 1): (2, 5)}  # video 19 (node 3) shown by no later prompt
    layout = graph_layout(record, native_sizes={(1, 1): (90, 160), (3, 0): (90, 160)})
    video = next(t for t in layout.node(1).thumbs if t.slot == 1)
    assert video.frames == (2, 5)
    assert (video.height, video.width) == tuple(
        int(x) for x in smart_resize(90, 160, video.pixels // 2)
    )
    unseen = next(t for t in layout.node(3).thumbs if t.slot == 0)
    assert unseen.frames == (0,)
    assert (unseen.height, unseen.width) == tuple(
        int(x) for x in smart_resize(90, 160, unseen.pixels)
    )
    with pytest.raises(ValueError, match="item_modality"):
        graph_layout({**record, "item_modality": np.zeros((N, K + 1))})
