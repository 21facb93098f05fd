"""Policy models: Qwen3 in Flax NNX with Hugging Face checkpoint import.

``from_pretrained(path)`` reads a local Hugging Face checkpoint directory
(config.json + safetensors). Qwen3-VL is not ported yet and is refused clearly.
"""

from vimrag_jax.models.hf import from_pretrained

__all__ = ["from_pretrained"]
