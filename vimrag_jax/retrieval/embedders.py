"""Embedders that turn queries and corpus items into vectors for inner-product retrieval.

An ``Embedder`` maps query strings and corpus items to L2-normalised float32 rows of one width.
The default ``HashingEmbedder`` needs no weights: it hashes word 1–3-grams and character n-grams
into a fixed number of signed buckets, so it is deterministic across processes and machines, and
it embeds an image or a video through its caption. ``HFEmbedder`` is the learned one: a
Qwen3-architecture embedding model (e.g. Qwen3-Embedding) from a local Hugging Face checkpoint
directory, run by our JAX model. The multimodal one, ``retrieval.vl_embedder.Qwen3VLEmbedder``
(text, pictures and video frames in one space), lives in its own module and is rebuilt from its
spec here like the others. ``spec`` is what a corpus store records to tell whether its
embeddings are still current.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from vimrag_jax.retrieval.store_format import CorpusItem

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


POOLINGS = ("last", "mean")


def _file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


class HFEmbedder:
    """A Qwen3-architecture embedding model from a local Hugging Face checkpoint, run in JAX.

    The model is ``vimrag_jax.models.from_pretrained(path)`` and the tokenizer
    ``AutoTokenizer.from_pretrained(path, local_files_only=True)``. A text is tokenized, cut to
    ``max_length`` tokens, and ends with the eos token (appended when the tokenizer does not add
    it, as Qwen3-Embedding expects); the vector is the final-norm hidden state of that last
    token (``pooling="last"``) or the mean over the text's tokens (``"mean"``), L2-normalised.

    Batches are left-padded to a length bucket (powers of two up to ``max_length``) and to
    ``batch_size`` rows, so one compiled function serves each bucket. Positions count real tokens
    only, so a text's vector does not depend on the batch it is in (transformers' default call
    numbers left padding too, which shifts the rotary positions of padded rows). Images and
    videos are embedded through their caption.

    ``spec()`` names the checkpoint (resolved path and sha256 of config.json and of the tokenizer
    files), so a corpus store built with another model is refused. Weights are not hashed (they
    can be gigabytes): replacing them in place under an unchanged config is not detected.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        pooling: str = "last",
        max_length: int = 512,
        batch_size: int = 16,
        dtype: str = "float32",
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"HFEmbedder: pooling must be one of {POOLINGS}, got {pooling!r}")
        if max_length < 2:
            raise ValueError(f"HFEmbedder: max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"HFEmbedder: batch_size must be >= 1, got {batch_size}")
        self.path = Path(path).resolve()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"HFEmbedder: no config.json in {str(self.path)!r}")
        import jax
        from flax import nnx
        from transformers import AutoTokenizer

        from vimrag_jax.models import from_pretrained

        self.pooling, self.max_length, self.batch_size = pooling, int(max_length), int(batch_size)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"HFEmbedder: the tokenizer in {str(self.path)!r} has no eos token")
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad is None else pad
        model = from_pretrained(self.path, dtype=dtype)
        if not hasattr(model, "hidden_states"):
            raise ValueError(f"HFEmbedder: {str(self.path)!r} is not a Qwen3 text checkpoint")
        self.dim = int(model.config.hidden_size)
        graphdef, self._state = nnx.split(model)
        mean = pooling == "mean"

        def embed(state, input_ids, attention_mask):
            import jax.numpy as jnp

            from vimrag_jax.models.qwen3 import default_positions

            net = nnx.merge(graphdef, state)
            hidden_bld = net.hidden_states(
                input_ids,
                attention_mask=attention_mask,
                positions=default_positions(attention_mask),
            ).astype(jnp.float32)
            if mean:
                weights_bl = attention_mask.astype(jnp.float32)
                pooled_bd = jnp.einsum("bld,bl->bd", hidden_bld, weights_bl)
                pooled_bd /= jnp.maximum(weights_bl.sum(-1, keepdims=True), 1.0)
            else:  # left padding: the last column is every row's last real token
                pooled_bd = hidden_bld[:, -1]
            norm_b1 = jnp.linalg.norm(pooled_bd, axis=-1, keepdims=True)
            return pooled_bd / jnp.maximum(norm_b1, 1e-12)

        self._embed = jax.jit(embed)
        self.buckets = tuple(
            sorted(
                {min(2**e, self.max_length) for e in range(4, math.ceil(math.log2(max_length)) + 1)}
            )
        ) or (self.max_length,)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> HFEmbedder:
        """The embedder a ``spec()`` describes; ValueError when the checkpoint has changed."""
        embedder = cls(spec["path"], pooling=spec["pooling"], max_length=int(spec["max_length"]))
        if embedder.spec() != spec:
            raise ValueError(
                f"the checkpoint at {spec['path']!r} changed since the spec was recorded: "
                f"{embedder.spec()} != {spec}"
            )
        return embedder

    def spec(self) -> dict[str, Any]:
        """Checkpoint identity and the settings that change the vectors (not ``batch_size``)."""
        tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
        return {
            "kind": "hf",
            "path": str(self.path),
            "config_sha256": _file_sha256(self.path / "config.json"),
            "tokenizer_sha256": {
                name: digest
                for name in tokenizer_files
                if (digest := _file_sha256(self.path / name)) is not None
            },
            "pooling": self.pooling,
            "max_length": self.max_length,
            "dim": self.dim,
        }

    def token_ids(self, text: str) -> list[int]:
        """The ids a text is embedded from: at most ``max_length``, the last one eos."""
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return ids[: self.max_length - 1] + [self.eos_id]

    def _bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32[n, dim]: one L2-normalised row per text (an empty text is its eos token)."""
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings, got a single string")
        encoded = [self.token_ids(text) for text in texts]
        out = np.zeros((len(encoded), self.dim), np.float32)
        # Similar lengths share a batch, so padding stays small; the order is restored below.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = self._bucket(max(len(encoded[i]) for i in rows))
            ids = np.full((self.batch_size, width), self.pad_id, np.int32)
            mask = np.zeros((self.batch_size, width), np.int32)
            for r, i in enumerate(rows):
                ids[r, width - len(encoded[i]) :] = encoded[i]
                mask[r, width - len(encoded[i]) :] = 1
            vectors = np.asarray(self._embed(self._state, ids, mask))
            out[rows] = vectors[: len(rows)]
        return out

    def embed_items(self, items: Sequence[CorpusItem]) -> np.ndarray:
        """float32[n, dim]: passages by their text, images and videos by their caption."""
        return self.embed_texts([item.text for item in items])


def embedder_from_spec(spec: dict[str, Any]) -> Embedder:
    """Rebuilds an embedder from its ``spec()``: hashing ones from the settings, Hugging Face ones
    (``hf`` text, ``qwen3_vl`` multimodal) from the checkpoint path they name (refused when the
    checkpoint there has changed)."""
    if spec.get("kind") == "hf":
        return HFEmbedder.from_spec(spec)
    if spec.get("kind") == "qwen3_vl":
        # Imported here: the multimodal embedder pulls in the Qwen3-VL model and its pixels.
        from vimrag_jax.retrieval.vl_embedder import Qwen3VLEmbedder

        return Qwen3VLEmbedder.from_spec(spec)
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


__all__ = ["Embedder", "HFEmbedder", "HashingEmbedder", "embedder_from_spec"]
