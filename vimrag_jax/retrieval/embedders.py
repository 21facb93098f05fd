"""Embedders that turn queries and corpus items into vectors for inner-product retrieval.

An ``Embedder`` maps query strings and corpus items to L2-normalised float32 rows of one width.
The default ``HashingEmbedder`` needs no weights: it hashes word 1–3-grams and character n-grams
into a fixed number of signed buckets, so it is deterministic across processes and machines, and
it embeds an image or a video through its caption. A learned embedder (for example the final
hidden states of the policy model, loaded from a local checkpoint directory) plugs in by
implementing the same three members; ``spec`` is what a corpus store records to tell whether its
embeddings are still current.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from vimrag_jax.retrieval.corpus import CorpusItem

_WORD = re.compile(r"[a-z0-9]+")


@runtime_checkable
class Embedder(Protocol):
    """What retrieval needs from an embedding model."""

    dim: int

    def spec(self) -> dict[str, Any]:
        """JSON-able description; two embedders with equal specs give equal vectors."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32[n, dim]: one L2-normalised row per text (all zeros for a text with no words)."""
        ...

    def embed_items(self, items: Sequence[CorpusItem]) -> np.ndarray:
        """float32[n, dim]: one L2-normalised row per corpus item."""
        ...


class HashingEmbedder:
    """Signed feature hashing of word 1..``max_word_ngram``-grams and character n-grams.

    Word n-grams keep word order (``"vorn was mentored"`` differs from ``"mentored by vorn"``),
    which a bag of words cannot; character n-grams of each word (``#word#`` padded) let
    inflections such as *work* / *works* match. Each feature adds ``±weight`` to the bucket
    ``crc32(feature) mod dim``, the sign taken from a second hash so collisions cancel on average
    instead of piling up. Visual items are embedded through their caption.
    """

    def __init__(
        self,
        dim: int = 256,
        *,
        max_word_ngram: int = 3,
        char_ngrams: tuple[int, ...] = (3, 4),
        char_weight: float = 0.35,
    ):
        if dim < 1:
            raise ValueError(f"HashingEmbedder: dim must be positive, got {dim}")
        if max_word_ngram < 1:
            raise ValueError(f"HashingEmbedder: max_word_ngram must be >= 1, got {max_word_ngram}")
        if any(n < 1 for n in char_ngrams):
            raise ValueError(f"HashingEmbedder: char n-gram sizes must be >= 1, got {char_ngrams}")
        self.dim = dim
        self.max_word_ngram = max_word_ngram
        self.char_ngrams = tuple(char_ngrams)
        self.char_weight = float(char_weight)

    def spec(self) -> dict[str, Any]:
        """The settings that determine the vectors (recorded by corpus stores)."""
        return {
            "kind": "hashing",
            "dim": self.dim,
            "max_word_ngram": self.max_word_ngram,
            "char_ngrams": list(self.char_ngrams),
            "char_weight": self.char_weight,
        }

    def _features(self, text: str) -> list[tuple[str, float]]:
        words = _WORD.findall(text.lower())
        features = []
        for n in range(1, self.max_word_ngram + 1):
            for start in range(len(words) - n + 1):
                features.append(("w:" + " ".join(words[start : start + n]), 1.0))
        for word in words:
            padded = f"#{word}#"
            for n in self.char_ngrams:
                for start in range(len(padded) - n + 1):
                    features.append(("c:" + padded[start : start + n], self.char_weight))
        return features

    def _embed_one(self, text: str) -> np.ndarray:
        vector = np.zeros(self.dim, np.float64)
        for feature, weight in self._features(text):
            data = feature.encode()
            bucket = zlib.crc32(data) % self.dim
            sign = 1.0 if zlib.adler32(data) & 1 else -1.0
            vector[bucket] += sign * weight
        norm = np.linalg.norm(vector)
        return (vector / norm if norm > 0 else vector).astype(np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32[n, dim]: one L2-normalised row per text (zeros for a text with no words)."""
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings, got a single string")
        rows = [self._embed_one(text) for text in texts]
        return np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)

    def embed_items(self, items: Sequence[CorpusItem]) -> np.ndarray:
        """float32[n, dim]: passages by their text, images and videos by their caption."""
        return self.embed_texts([item.text for item in items])


def embedder_from_spec(spec: dict[str, Any]) -> Embedder:
    """Rebuilds a weight-free embedder from its ``spec()``; learned embedders must be passed in."""
    if spec.get("kind") != "hashing":
        raise ValueError(
            f"cannot rebuild embedder of kind {spec.get('kind')!r} from its spec alone; "
            "pass the embedder explicitly"
        )
    return HashingEmbedder(
        int(spec["dim"]),
        max_word_ngram=int(spec["max_word_ngram"]),
        char_ngrams=tuple(int(n) for n in spec["char_ngrams"]),
        char_weight=float(spec["char_weight"]),
    )


__all__ = ["Embedder", "HashingEmbedder", "embedder_from_spec"]
