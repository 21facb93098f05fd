"""vimrag_jax: VimRAG (Multimodal Memory Graph + GGPO) training in JAX.

The paper's three ideas each live in a module named after them:

- ``vimrag_jax.memory.graph``  — the Multimodal Memory Graph as padded arrays.
- ``vimrag_jax.memory.energy`` — graph-modulated visual memory encoding (energy, pixel budget).
- ``vimrag_jax.rl.ggpo``       — Graph-Guided Policy Optimization masks.
"""

__version__ = "0.1.0"
