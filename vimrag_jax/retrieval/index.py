"""Exact inner-product top-k over corpus embeddings, on one device or sharded over a mesh axis.

Scores are ``queries @ corpus.T`` (float32, highest matmul precision) and the k best rows per query
come from ``jax.lax.top_k``. Equal scores are ordered by the lower corpus row first, in both the
single-device and the sharded path, so every path returns exactly the same rows.

The sharded path splits corpus rows over one mesh axis. Each shard takes its local top-k, the
candidates of all shards (k per shard, in shard order) are gathered and a second ``top_k`` merges
them. Shard order equals row order and each shard lists equal scores by lower row first, so the
merge keeps the lower-row-first rule. Rows added to make the corpus divisible by the shard count
score ``-inf`` and can never be chosen, because ``k`` never exceeds the number of real rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

#: Corpus size from which ``TopKIndex`` shards rows over all local devices when given no mesh.
SHARD_MIN_ROWS = 65536


class RetrievalError(ValueError):
    """A retrieval request or corpus store that cannot be served (the message names the problem)."""


def _scores(queries_qd: jax.Array, corpus_nd: jax.Array, valid_n: jax.Array) -> jax.Array:
    scores_qn = jnp.einsum(
        "qd,nd->qn", queries_qd, corpus_nd, precision=jax.lax.Precision.HIGHEST
    ).astype(jnp.float32)
    return jnp.where(valid_n[None, :], scores_qn, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("k",))
def exact_top_k(
    queries_qd: jax.Array, corpus_nd: jax.Array, valid_n: jax.Array, *, k: int
) -> tuple[jax.Array, jax.Array]:
    """(scores float32[q, k], rows int32[q, k]) of the best valid corpus rows for each query."""
    scores, rows = jax.lax.top_k(_scores(queries_qd, corpus_nd, valid_n), k)
    return scores, rows.astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _sharded_fn(mesh: Mesh, axis: str, k: int):
    def local(queries_qd, corpus_nd, valid_n):
        local_k = min(k, corpus_nd.shape[0])
        scores, rows = jax.lax.top_k(_scores(queries_qd, corpus_nd, valid_n), local_k)
        offset = jax.lax.axis_index(axis) * corpus_nd.shape[0]
        return scores, rows.astype(jnp.int32) + offset.astype(jnp.int32)

    gather = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(axis, None), P(axis)),
        out_specs=(P(None, axis), P(None, axis)),
    )

    def merged(queries_qd, corpus_nd, valid_n):
        cand_scores, cand_rows = gather(queries_qd, corpus_nd, valid_n)  # [q, shards·local_k]
        scores, position = jax.lax.top_k(cand_scores, k)
        return scores, jnp.take_along_axis(cand_rows, position, axis=1)

    return jax.jit(merged)


def sharded_top_k(
    queries_qd: jax.Array,
    corpus_nd: jax.Array,
    valid_n: jax.Array,
    *,
    k: int,
    mesh: Mesh,
    axis: str,
) -> tuple[jax.Array, jax.Array]:
    """``exact_top_k`` with corpus rows split over ``mesh`` axis ``axis`` (rows divisible by it)."""
    shards = mesh.shape[axis]
    if corpus_nd.shape[0] % shards:
        raise RetrievalError(
            f"sharded_top_k: {corpus_nd.shape[0]} corpus rows do not split over {shards} shards "
            f"of mesh axis {axis!r}; pad the rows (TopKIndex does this)"
        )
    return _sharded_fn(mesh, axis, k)(queries_qd, corpus_nd, valid_n)


def _bucket(n: int) -> int:
    """Query batches are padded to a power of two (at least 8) so few shapes get compiled."""
    return max(8, 1 << (n - 1).bit_length())


class TopKIndex:
    """Exact top-k search over a fixed float32[n, d] embedding matrix kept on device.

    With a ``mesh`` the rows are split over its axis ``axis``; with none, a corpus of at least
    ``shard_min_rows`` rows is split over all local devices (a 1-D mesh named ``axis``), a smaller
    one stays on the default device.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        *,
        mesh: Mesh | None = None,
        axis: str = "corpus",
        shard_min_rows: int = SHARD_MIN_ROWS,
    ):
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2:
            raise RetrievalError(
                f"embeddings must be a [rows, dim] matrix, got shape {embeddings.shape}"
            )
        if embeddings.shape[0] == 0:
            raise RetrievalError("cannot index an empty corpus (0 embedding rows)")
        self.num_rows, self.dim = embeddings.shape
        if mesh is None and self.num_rows >= shard_min_rows and jax.device_count() > 1:
            mesh = Mesh(np.array(jax.devices()), (axis,))
        self.mesh, self.axis = mesh, axis
        shards = 1 if mesh is None else mesh.shape[axis]
        padded = -(-self.num_rows // shards) * shards
        corpus = np.zeros((padded, self.dim), np.float32)
        corpus[: self.num_rows] = embeddings
        valid = np.arange(padded) < self.num_rows
        if mesh is None:
            self._corpus, self._valid = jnp.asarray(corpus), jnp.asarray(valid)
        else:
            self._corpus = jax.device_put(corpus, NamedSharding(mesh, P(axis, None)))
            self._valid = jax.device_put(valid, NamedSharding(mesh, P(axis)))

    @property
    def sharded(self) -> bool:
        """Whether the rows are split over a mesh axis."""
        return self.mesh is not None

    def search(self, queries: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """(rows int32[q, k], scores float32[q, k]) for float32[q, d] query vectors.

        Rows are ordered best first; equal scores list the lower row first.
        """
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise RetrievalError(
                f"queries must be float32[q, {self.dim}], got shape {queries.shape}"
            )
        if queries.shape[0] == 0:
            raise RetrievalError("no queries given (0 query rows)")
        if not 1 <= k <= self.num_rows:
            raise RetrievalError(f"k={k} must be between 1 and the corpus size {self.num_rows}")
        count = queries.shape[0]
        batch = np.zeros((_bucket(count), self.dim), np.float32)
        batch[:count] = queries
        if self.mesh is None:
            scores, rows = exact_top_k(batch, self._corpus, self._valid, k=k)
        else:
            scores, rows = sharded_top_k(
                batch, self._corpus, self._valid, k=k, mesh=self.mesh, axis=self.axis
            )
        return np.asarray(rows)[:count], np.asarray(scores)[:count]


__all__ = [
    "SHARD_MIN_ROWS",
    "RetrievalError",
    "TopKIndex",
    "exact_top_k",
    "sharded_top_k",
]
