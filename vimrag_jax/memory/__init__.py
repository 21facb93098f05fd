"""The Multimodal Memory Graph and its graph-modulated visual memory budget."""
