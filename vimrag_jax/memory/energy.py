"""Graph-modulated visual memory encoding: item energy and the global pixel budget.

VimRAG shows each remembered image at a resolution set by how much the graph
relies on it (SPEC §2). For visual item ``k`` of node ``i`` in a graph of ``n``
valid nodes:

    p̂(i,k)   = priority(i,k) / 5
    E(i,k)   = p̂(i,k) · (1 + deg⁺(i)) · exp(−λ · ((n − 1) − i))
    Ω(i,k)   = E(i,k) + γ · Σ_{j ∈ children(i)} Ω̄(j)

where ``Ω̄(j)`` is the mean of Ω over node j's valid items (0 for a node with no
items). The global top-K items (ties to the lower row-major index) share
``S_total`` pixels in proportion to Ω; the rest get none. During training
rollouts the paper instead gives every kept item ``S_total / (#kept items)``.

Everything above is pure JAX over padded ``[N, K]`` arrays (jit/vmap-able). The
final image sizes (``smart_resize``) are computed on the host in float64 so they
match the Qwen-VL image processor exactly; they only feed image preprocessing.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from vimrag_jax.memory.graph import MemoryGraph, Modality, valid_adjacency

#: Pixels per merged Qwen3-VL visual token: 16 px patches, 2×2 spatial merge.
PIXELS_PER_TOKEN = 32 * 32
#: The paper's budget: 5 images × 256 tokens × 32×32 pixels per token.
TOTAL_PIXELS = 5 * 256 * PIXELS_PER_TOKEN

BudgetMode = Literal["energy", "averaged"]


def memory_energy(
    adjacency: jax.Array,
    node_valid: jax.Array,
    priority: jax.Array,
    item_valid: jax.Array,
    *,
    lam: float = 0.1,
    gamma: float = 0.3,
) -> jax.Array:
    """float32[N, K]: the reinforced energy Ω of every memory item (0 where invalid).

    The reinforcement recursion is a linear system over the DAG. With ``m`` the
    vector of per-node mean energies Ω̄, ``Ē`` the per-node mean intrinsic energy
    and ``D = diag(node has items)``, it reads ``m = Ē + γ·D·A·m``. Edges only go
    from lower to higher index, so ``I − γ·D·A`` is unit upper-triangular and one
    triangular solve gives the exact answer in O(N²), with no loop over nodes.
    """
    adjacency = valid_adjacency(adjacency, node_valid).astype(jnp.float32)  # [N, N]
    item_valid = item_valid & node_valid[..., :, None]
    n_nodes = adjacency.shape[-1]

    n = jnp.sum(node_valid, axis=-1, keepdims=True).astype(jnp.float32)  # [1]
    age = (n - 1.0) - jnp.arange(n_nodes, dtype=jnp.float32)  # [N], steps since creation
    children = jnp.sum(adjacency, axis=-1)  # [N], deg⁺
    intrinsic = (
        (priority.astype(jnp.float32) / 5.0)
        * ((1.0 + children) * jnp.exp(-lam * age))[..., None]
        * item_valid
    )  # [N, K]

    count = jnp.sum(item_valid, axis=-1).astype(jnp.float32)  # [N]
    mean_intrinsic = jnp.sum(intrinsic, axis=-1) / jnp.maximum(count, 1.0)
    # Feedback reaches a node's mean only if the node has items to average over.
    coupling = gamma * (count > 0).astype(jnp.float32)[..., None] * adjacency
    system = jnp.eye(n_nodes, dtype=jnp.float32) - coupling
    node_mean = jax.scipy.linalg.solve_triangular(
        system, mean_intrinsic[..., None], lower=False, unit_diagonal=True
    )[..., 0]  # [N], Ω̄
    feedback = jnp.einsum("...ij,...j->...i", adjacency, node_mean)  # Σ_children Ω̄
    return jnp.where(item_valid, intrinsic + gamma * feedback[..., None], 0.0)


def top_k_items(omega: jax.Array, item_valid: jax.Array, *, top_k: int = 5) -> jax.Array:
    """bool[N, K]: the ``top_k`` valid items of highest Ω, ties to the lower flat index."""
    shape = omega.shape[-2:]
    size = shape[0] * shape[1]
    flat_valid = item_valid.reshape(*item_valid.shape[:-2], size)
    scores = jnp.where(flat_valid, omega.reshape(flat_valid.shape), -jnp.inf)
    # lax.top_k orders equal values by lower index, which is the tie rule we want.
    _, index = jax.lax.top_k(scores, min(top_k, size))
    chosen = jnp.any(index[..., :, None] == jnp.arange(size), axis=-2)
    return (chosen & flat_valid).reshape(item_valid.shape)


def allocate_pixels(
    omega: jax.Array,
    item_valid: jax.Array,
    *,
    total_pixels: int = TOTAL_PIXELS,
    top_k: int = 5,
) -> jax.Array:
    """int32[N, K]: ``floor(S_total · Ω / Σ_top-K Ω)`` for the top-K items, 0 elsewhere.

    The share is formed as ``Ω / Σ`` before scaling so that the exact cases stay
    exact in float32 (one item gets all of ``S_total``, equal items equal shares).
    """
    chosen = top_k_items(omega, item_valid, top_k=top_k)
    weight = jnp.where(chosen, omega, 0.0).astype(jnp.float32)
    total = jnp.sum(weight, axis=(-2, -1), keepdims=True)
    share = weight / jnp.where(total > 0, total, 1.0)
    pixels = jnp.floor(jnp.float32(total_pixels) * share)
    return jnp.clip(pixels, 0, total_pixels).astype(jnp.int32)


def averaged_pixels(item_valid: jax.Array, *, total_pixels: int = TOTAL_PIXELS) -> jax.Array:
    """int32[N, K]: the training-time budget, ``floor(S_total / #kept items)`` each."""
    count = jnp.sum(item_valid, axis=(-2, -1), keepdims=True).astype(jnp.int32)
    return jnp.where(item_valid, total_pixels // jnp.maximum(count, 1), 0).astype(jnp.int32)


def split_video_budget(
    pixels: jax.Array, modality: jax.Array, num_keyframes: jax.Array
) -> jax.Array:
    """int32[N, K]: pixels per shown frame; a video splits its budget over its keyframes."""
    is_video = modality == Modality.VIDEO
    per_frame = pixels // jnp.maximum(num_keyframes, 1)
    return jnp.where(is_video, jnp.where(num_keyframes > 0, per_frame, 0), pixels)


def pixels_to_tokens(pixels: jax.Array) -> jax.Array:
    """Merged visual tokens a pixel budget buys (32×32 pixels each)."""
    return pixels // PIXELS_PER_TOKEN


def frame_pixel_budget(
    graph: MemoryGraph,
    *,
    mode: BudgetMode = "energy",
    lam: float = 0.1,
    gamma: float = 0.3,
    total_pixels: int = TOTAL_PIXELS,
    top_k: int = 5,
) -> jax.Array:
    """int32[N, K]: the ``max_pixels`` for each frame of every memory item of a graph.

    ``mode="energy"`` is the graph-modulated allocation (evaluation default);
    ``mode="averaged"`` is the paper's training-rollout budget. Images have one
    frame; a video's frames share its item budget evenly.
    """
    bank = graph.bank
    if mode == "energy":
        omega = memory_energy(
            graph.adjacency, graph.node_valid, bank.priority, bank.valid, lam=lam, gamma=gamma
        )
        pixels = allocate_pixels(omega, bank.valid, total_pixels=total_pixels, top_k=top_k)
    elif mode == "averaged":
        pixels = averaged_pixels(bank.valid, total_pixels=total_pixels)
    else:
        raise ValueError(f"budget mode must be 'energy' or 'averaged', got {mode!r}")
    return split_video_budget(pixels, bank.modality, bank.num_keyframes)


def smart_resize(
    height: np.ndarray | int,
    width: np.ndarray | int,
    max_pixels: np.ndarray | int,
    *,
    factor: int = 32,
    min_pixels: int = PIXELS_PER_TOKEN,
) -> tuple[np.ndarray, np.ndarray]:
    """Target (height, width) for each image under its pixel budget (host, NumPy).

    The same rule as the Qwen-VL image processor: both sides multiples of
    ``factor`` (32 px: one merged token), aspect ratio kept as closely as that
    allows, area within ``[min_pixels, max_pixels]``; never below one token. An
    item with a budget of 0 is not shown and gets (0, 0). Vectorized over arrays of
    any shape; float64 arithmetic, so results equal the processor's exactly.
    """
    h = np.asarray(height, np.float64)
    w = np.asarray(width, np.float64)
    budget = np.asarray(max_pixels, np.float64)
    h, w, budget = np.broadcast_arrays(h, w, budget)
    shown = budget > 0
    if np.any(shown & ((h <= 0) | (w <= 0))):
        raise ValueError("smart_resize: image sides must be positive")
    safe_h, safe_w = np.where(shown, h, 1.0), np.where(shown, w, 1.0)
    aspect = np.maximum(safe_h, safe_w) / np.minimum(safe_h, safe_w)
    if np.any(shown & (aspect > 200)):
        raise ValueError(f"smart_resize: aspect ratio must be at most 200, got {aspect.max():g}")

    out_h = np.round(safe_h / factor) * factor
    out_w = np.round(safe_w / factor) * factor
    too_big = out_h * out_w > budget
    too_small = ~too_big & (out_h * out_w < min_pixels)
    with np.errstate(divide="ignore", invalid="ignore"):
        shrink = np.sqrt(safe_h * safe_w / budget)
        grow = np.sqrt(min_pixels / (safe_h * safe_w))
    out_h = np.where(
        too_big, np.maximum(factor, np.floor(safe_h / shrink / factor) * factor), out_h
    )
    out_w = np.where(
        too_big, np.maximum(factor, np.floor(safe_w / shrink / factor) * factor), out_w
    )
    out_h = np.where(too_small, np.ceil(safe_h * grow / factor) * factor, out_h)
    out_w = np.where(too_small, np.ceil(safe_w * grow / factor) * factor, out_w)
    zero = np.zeros_like(out_h)
    return (
        np.where(shown, out_h, zero).astype(np.int64),
        np.where(shown, out_w, zero).astype(np.int64),
    )


def resized_tokens(height: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Visual tokens of images already resized by ``smart_resize``."""
    return (np.asarray(height) * np.asarray(width)) // PIXELS_PER_TOKEN


__all__ = [
    "PIXELS_PER_TOKEN",
    "TOTAL_PIXELS",
    "allocate_pixels",
    "averaged_pixels",
    "frame_pixel_budget",
    "memory_energy",
    "pixels_to_tokens",
    "resized_tokens",
    "smart_resize",
    "split_video_budget",
    "top_k_items",
]
