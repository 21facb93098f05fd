"""Energy, top-K allocation and resize targets against loop references (SPEC §2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import memory_reference as ref
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import N_ITEMS, N_NODES, padded_dags
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_resize

from vimrag_jax.memory import energy
from vimrag_jax.memory import graph as G

energy_jit = jax.jit(energy.memory_energy, static_argnames=("lam", "gamma"))
allocate_jit = jax.jit(energy.allocate_pixels, static_argnames=("total_pixels", "top_k"))
energy_vmap = jax.jit(jax.vmap(energy.memory_energy))
allocate_vmap = jax.jit(jax.vmap(energy.allocate_pixels))


@given(padded_dags())
def test_energy_matches_loop_reference(dag):
    adjacency, node_valid, priority, item_valid = dag
    got = np.asarray(energy_jit(adjacency, node_valid, priority, item_valid))
    want = ref.memory_energy(adjacency, node_valid, priority, item_valid)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    assert np.all(got[~(item_valid & node_valid[:, None])] == 0)


@given(padded_dags(), st.sampled_from([0.0, 0.05, 0.5]), st.sampled_from([0.0, 0.3, 0.9]))
def test_energy_hyperparameters(dag, lam, gamma):
    adjacency, node_valid, priority, item_valid = dag
    got = np.asarray(energy_jit(adjacency, node_valid, priority, item_valid, lam=lam, gamma=gamma))
    want = ref.memory_energy(adjacency, node_valid, priority, item_valid, lam=lam, gamma=gamma)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


# Omega drawn from a few small values, so ties between items are common.
tied_omegas = st.lists(
    st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.7]),
    min_size=N_NODES * N_ITEMS,
    max_size=N_NODES * N_ITEMS,
).map(lambda v: np.array(v, np.float32).reshape(N_NODES, N_ITEMS))
masks = st.lists(st.booleans(), min_size=N_NODES * N_ITEMS, max_size=N_NODES * N_ITEMS).map(
    lambda v: np.array(v, bool).reshape(N_NODES, N_ITEMS)
)


@given(tied_omegas, masks)
def test_allocation_matches_reference_with_ties(omega, item_valid):
    got = np.asarray(allocate_jit(omega, item_valid))
    want = ref.allocate_pixels(omega, item_valid)
    np.testing.assert_array_equal(got > 0, ref.top_k_items(omega, item_valid))
    assert np.max(np.abs(got - want)) <= 1  # float32 vs float64 floor at a boundary
    assert got.sum() <= energy.TOTAL_PIXELS


@given(padded_dags())
def test_energy_then_allocation(dag):
    adjacency, node_valid, priority, item_valid = dag
    omega = energy_jit(adjacency, node_valid, priority, item_valid)
    got = np.asarray(allocate_jit(omega, item_valid & node_valid[:, None]))
    want = ref.allocate_pixels(np.asarray(omega), item_valid & node_valid[:, None])
    assert np.max(np.abs(got - want)) <= 1
    assert got.sum() <= energy.TOTAL_PIXELS
    assert (got > 0).sum() == min(5, int((item_valid & node_valid[:, None]).sum()))


def test_vmap_matches_per_graph():
    rng = np.random.default_rng(0)
    dags = [ref.random_graph(rng, N_NODES, N_ITEMS) for _ in range(16)]
    adjacency, node_valid, priority, item_valid = (np.stack(x) for x in zip(*dags, strict=True))
    omega = energy_vmap(adjacency, node_valid, priority, item_valid)
    pixels = allocate_vmap(omega, item_valid & node_valid[..., None])
    for b in range(16):
        want = ref.memory_energy(adjacency[b], node_valid[b], priority[b], item_valid[b])
        np.testing.assert_allclose(omega[b], want, rtol=2e-6, atol=1e-7)
        single = allocate_jit(omega[b], item_valid[b] & node_valid[b][:, None])
        np.testing.assert_array_equal(pixels[b], single)


def test_hand_checked_chain():
    # root -> 1 -> 2, items: node1 priority 5, node2 priority 5; n = 3.
    adjacency = np.zeros((4, 4), bool)
    adjacency[0, 1] = adjacency[1, 2] = True
    node_valid = np.array([1, 1, 1, 0], bool)
    priority = np.array([[1], [5], [5], [1]], np.float32)
    item_valid = np.array([[0], [1], [1], [0]], bool)
    omega = np.asarray(energy.memory_energy(adjacency, node_valid, priority, item_valid))
    e2 = 1.0  # p̂ = 1, no children, age 0
    e1 = 1.0 * 2 * np.exp(-0.1)  # one child, age 1
    np.testing.assert_allclose(omega[:, 0], [0, e1 + 0.3 * e2, e2, 0], rtol=1e-6)
    pixels = np.asarray(energy.allocate_pixels(omega, item_valid))
    total = omega[1, 0] + omega[2, 0]
    assert pixels[1, 0] == np.floor(energy.TOTAL_PIXELS * omega[1, 0] / total)
    assert pixels[3, 0] == pixels[0, 0] == 0


def test_feedback_skips_memoryless_child():
    # 0 -> 1 -> 2 -> 3; node 2 holds no items, so node 3's energy never reaches node 1.
    adjacency = np.zeros((4, 4), bool)
    adjacency[0, 1] = adjacency[1, 2] = adjacency[2, 3] = True
    node_valid = np.ones(4, bool)
    priority = np.full((4, 1), 5.0, np.float32)
    item_valid = np.array([[0], [1], [0], [1]], bool)
    omega = np.asarray(energy.memory_energy(adjacency, node_valid, priority, item_valid))
    np.testing.assert_allclose(omega[1, 0], 2 * np.exp(-0.2), rtol=1e-6)


def test_edge_cases():
    empty = G.empty_graph(6, 3)
    bank = empty.bank
    omega = energy.memory_energy(empty.adjacency, empty.node_valid, bank.priority, bank.valid)
    assert not np.any(np.asarray(omega))
    assert not np.any(np.asarray(energy.allocate_pixels(omega, bank.valid)))
    assert not np.any(np.asarray(energy.averaged_pixels(bank.valid)))
    # One item takes the whole budget exactly; K larger than the number of items.
    valid = np.zeros((6, 3), bool)
    valid[2, 1] = True
    pixels = energy.allocate_pixels(jnp.full((6, 3), 0.37), valid, top_k=50)
    assert int(pixels[2, 1]) == energy.TOTAL_PIXELS and int(pixels.sum()) == energy.TOTAL_PIXELS
    # Equal energies split evenly; the tie for the last top-K place goes to the lower index.
    valid = np.zeros((6, 3), bool)
    valid[1, :] = valid[2, :] = True
    pixels = np.asarray(energy.allocate_pixels(jnp.ones((6, 3)), valid, top_k=5))
    assert pixels[1].tolist() == [262144] * 3 and pixels[2].tolist() == [262144, 262144, 0]


def test_averaged_budget_and_video_split():
    valid = np.zeros((4, 3), bool)
    valid[1, :2] = valid[3, 0] = True
    pixels = np.asarray(energy.averaged_pixels(valid))
    assert pixels[valid].tolist() == [energy.TOTAL_PIXELS // 3] * 3 and pixels[~valid].sum() == 0
    modality = np.zeros((4, 3), np.int32)
    modality[1, 1] = G.Modality.VIDEO
    frames = np.zeros((4, 3), np.int32)
    frames[1, 1] = 3
    split = np.asarray(energy.split_video_budget(jnp.asarray(pixels), modality, frames))
    assert split[1, 1] == pixels[1, 1] // 3 and split[1, 0] == pixels[1, 0]
    assert int(energy.pixels_to_tokens(jnp.asarray(262144))) == 256


def test_frame_pixel_budget_on_graph():
    g = G.empty_graph(6, 2, max_keyframes=2)
    g, node = G.add_search_node(g, jnp.arange(6) == 0, jnp.array([3]))
    items = G.VisualBank(
        valid=jnp.array([True, True]),
        priority=jnp.array([5.0, 2.0]),
        saliency=jnp.array([True, True]),
        modality=jnp.array([G.Modality.IMAGE, G.Modality.VIDEO]),
        item_id=jnp.array([10, 11]),
        timestamps=jnp.array([[0.0, 0.0], [1.0, 2.0]]),
        keyframe_valid=jnp.array([[False, False], [True, True]]),
    )
    g = G.check(G.memorize(g, node, items, jnp.array([7, 8])))
    energy_budget = np.asarray(energy.frame_pixel_budget(g, mode="energy"))
    omega = energy.memory_energy(g.adjacency, g.node_valid, g.bank.priority, g.bank.valid)
    item_budget = np.asarray(energy.allocate_pixels(omega, g.bank.valid))
    assert energy_budget[1, 0] == item_budget[1, 0]
    assert energy_budget[1, 1] == item_budget[1, 1] // 2
    averaged = np.asarray(energy.frame_pixel_budget(g, mode="averaged"))
    assert averaged[1].tolist() == [energy.TOTAL_PIXELS // 2, energy.TOTAL_PIXELS // 4]
    with pytest.raises(ValueError, match="budget mode"):
        energy.frame_pixel_budget(g, mode="uniform")


@given(st.integers(1, 4000), st.integers(1, 4000), st.integers(1, energy.TOTAL_PIXELS))
def test_smart_resize_matches_processor(height, width, budget):
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ValueError, match="aspect"):
            energy.smart_resize(height, width, budget)
        return
    h, w = energy.smart_resize(height, width, budget)
    assert (int(h), int(w)) == hf_resize(height, width, 32, energy.PIXELS_PER_TOKEN, budget)
    assert h % 32 == 0 and w % 32 == 0 and h * w >= energy.PIXELS_PER_TOKEN


def test_smart_resize_vectorized_and_hidden_items():
    h, w = energy.smart_resize(
        np.array([[480, 64]]), np.array([[640, 64]]), np.array([[262144, 0]])
    )
    assert h.shape == (1, 2) and (h[0, 1], w[0, 1]) == (0, 0)
    assert (h[0, 0], w[0, 0]) == hf_resize(480, 640, 32, 1024, 262144)
    assert energy.resized_tokens(h, w)[0, 0] == h[0, 0] * w[0, 0] // 1024
