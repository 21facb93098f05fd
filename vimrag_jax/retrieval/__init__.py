"""Retrieval over a multimodal corpus: on-disk store, embedders and an exact top-k index."""
