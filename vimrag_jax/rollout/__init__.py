"""Rollout side: the worker process and the trajectory records it writes for the learner."""
