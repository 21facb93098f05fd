"""Environments: the synthetic multimodal multi-hop corpus, scripted policies and rewards."""
