"""Generation: the KV-cache sampler and per-token log-probabilities shared with the learner."""
