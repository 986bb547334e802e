"""Baseline tokenizers behind the same interface as the trained quantizer (`codes(embeddings)`).

- Residual k-means (RQ-KMeans): level l runs faiss k-means on the residuals left by levels < l, in
  the embedding space itself (no encoder); reconstruction = sum of the picked centroids. With
  `balanced`, each level's centroids are then refitted as the means of equal-size clusters (the
  balanced k-means of OneRec's RQ-Kmeans). Why: deeper residuals are nearly isotropic, the mean of a
  big cluster has a small norm, and a near-zero centroid is the nearest one for most points, so plain
  k-means feeds itself into a collapsed level (ml-100k, K=64: level-3 perplexity 2.9, 57% of the items
  in collision groups). Codes are still the nearest centroid, at fit time and for new items alike.
- Random IDs: each code is read from a keyed BLAKE2b hash of the embedding's float32 bytes and the
  seed, so the same vector always gets the same codes (also for new items at serving time), items
  with different vectors get independent uniform codes, and no state is needed beyond the seed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from cost_dist.tokenizer.model import code_distances, kmeans_centroids, nearest_code


class ResidualKMeans:
    """RQ-KMeans: M levels of K faiss centroids in the embedding space."""

    def __init__(self, centroids: np.ndarray):
        self.centroids = np.asarray(centroids, dtype=np.float32)  # [M, K, d]

    @classmethod
    def fit(cls, embeddings: np.ndarray, num_levels: int, codebook_size: int, iters: int, seed: int,
            balanced: bool = False) -> "ResidualKMeans":
        residual = np.array(embeddings, dtype=np.float32)  # writable: torch warns on read-only (Arrow) buffers
        books = []
        for level in range(num_levels):
            centroids = kmeans_centroids(residual, codebook_size, iters, seed + level)
            if balanced:
                centroids = balanced_centroids(residual, centroids, iters, seed + level)
            books.append(centroids)
            idx = nearest_code(torch.from_numpy(residual), torch.from_numpy(centroids)).numpy()
            residual = residual - centroids[idx]
        return cls(np.stack(books))

    @property
    def num_levels(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def codebook_size(self) -> int:
        return int(self.centroids.shape[1])

    def codes(self, embeddings: np.ndarray) -> np.ndarray:
        residual = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
        out = []
        for level in range(self.num_levels):
            book = torch.from_numpy(self.centroids[level])
            idx = nearest_code(residual, book)
            out.append(idx)
            residual = residual - book[idx]
        return torch.stack(out, dim=-1).numpy().astype(np.int64)

    def reconstruct(self, embeddings: np.ndarray) -> np.ndarray:
        codes = self.codes(embeddings)
        return sum(self.centroids[level][codes[:, level]] for level in range(self.num_levels))


# Balanced refits use at most this many points per centroid (faiss k-means' own default sample size):
# the assignment holds an [n, K] distance matrix.
BALANCED_POINTS_PER_CENTROID = 256


def balanced_assign(dist: np.ndarray, capacity: int) -> np.ndarray:
    """Cluster of every row of `dist` [n, K] with at most `capacity` rows per cluster (n <= K * capacity).

    Rounds of proposals: each unassigned row proposes its nearest cluster that is not full, and each
    cluster keeps its closest proposers up to its free capacity. A greedy approximation of the
    min-cost balanced assignment; every round places at least one row.
    """
    n, k = dist.shape
    if n > k * capacity:
        raise ValueError(f"{n} points do not fit in {k} clusters of {capacity}")
    assign = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    while (free := np.flatnonzero(assign < 0)).size:
        d = np.where(load[None, :] >= capacity, np.inf, dist[free])
        choice = d.argmin(axis=1)
        order = np.lexsort((d[np.arange(free.size), choice], choice))  # by cluster, then distance
        choice, rows = choice[order], free[order]
        rank = np.arange(rows.size) - np.searchsorted(choice, choice, side="left")
        keep = rank < capacity - load[choice]
        assign[rows[keep]] = choice[keep]
        load += np.bincount(choice[keep], minlength=k)
    return assign


def balanced_centroids(points: np.ndarray, init: np.ndarray, iters: int, seed: int) -> np.ndarray:
    """Lloyd iterations from `init` [K, d] with equal-size clusters (ceil(n / K) points at most)."""
    k = init.shape[0]
    if points.shape[0] > BALANCED_POINTS_PER_CENTROID * k:
        rng = np.random.default_rng(seed)
        points = points[np.sort(rng.choice(points.shape[0], BALANCED_POINTS_PER_CENTROID * k, replace=False))]
    points = np.array(points, dtype=np.float32)  # a writable copy: torch warns on read-only (Arrow) buffers
    capacity = -(-points.shape[0] // k)
    x = torch.from_numpy(points)
    centroids = init.astype(np.float32)
    assign = None
    for _ in range(max(1, int(iters))):
        new = balanced_assign(code_distances(x, torch.from_numpy(centroids)).numpy(), capacity)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, points)
        counts = np.bincount(assign, minlength=k)[:, None]
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids).astype(np.float32)
    return centroids


def random_codes(embeddings: np.ndarray, num_levels: int, codebook_size: int, seed: int) -> np.ndarray:
    """Codes [n, M] from a keyed hash of each float32 row (see the module docstring)."""
    rows = np.ascontiguousarray(embeddings, dtype=np.float32)
    key = int(seed).to_bytes(8, "little", signed=True)
    out = np.empty((rows.shape[0], num_levels), dtype=np.int64)
    for i in range(rows.shape[0]):
        digest = hashlib.blake2b(rows[i].tobytes(), digest_size=8 * num_levels, key=key).digest()
        words = np.frombuffer(digest, dtype="<u8")
        out[i] = (words % np.uint64(codebook_size)).astype(np.int64)
    return out
