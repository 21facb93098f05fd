"""Generation: the KV-cache sampler and per-token log-probabilities shared with the learner."""

from vimrag_jax.sampling.logprobs import (
    VISUAL_KEYS,
    chunked_token_logprobs,
    picked_logprobs,
    sequence_logprobs,
    token_logprobs,
    visual_sequence_logprobs,
)
from vimrag_jax.sampling.sampler import Completion, Sampler, sample_tokens

__all__ = [
    "VISUAL_KEYS",
    "Completion",
    "Sampler",
    "chunked_token_logprobs",
    "picked_logprobs",
    "sample_tokens",
    "sequence_logprobs",
    "token_logprobs",
    "visual_sequence_logprobs",
]
