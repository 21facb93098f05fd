"""Input pipeline: grain over the rollout shards, from trajectory records to learner batches."""
