"""Policy models: Qwen3 and Qwen3-VL in Flax NNX with Hugging Face checkpoint import/export.

``from_pretrained(path)`` reads a local Hugging Face checkpoint directory (config.json +
safetensors) of ``Qwen3ForCausalLM`` or ``Qwen3VLForConditionalGeneration``, optionally straight
into sharded arrays (``mesh=``); ``save_pretrained`` writes one back; ``init_model`` builds a
randomly initialised preset (``presets.py``).
"""

from vimrag_jax.models.hf import from_pretrained, save_pretrained
from vimrag_jax.models.presets import init_model, preset_config

__all__ = ["from_pretrained", "init_model", "preset_config", "save_pretrained"]
