"""Baseline tokenizers behind the same interface as the trained quantizer (`codes(embeddings)`).

- Residual k-means (RQ-KMeans): level l runs faiss k-means on the residuals left by levels < l, in
  the embedding space itself (no encoder); reconstruction = sum of the picked centroids.
- Random IDs: each code is read from a keyed BLAKE2b hash of the embedding's float32 bytes and the
  seed, so the same vector always gets the same codes (also for new items at serving time), items
  with different vectors get independent uniform codes, and no state is needed beyond the seed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from cost_dist.tokenizer.model import kmeans_centroids, nearest_code


class ResidualKMeans:
    """RQ-KMeans: M levels of K faiss centroids in the embedding space."""

    def __init__(self, centroids: np.ndarray):
        self.centroids = np.asarray(centroids, dtype=np.float32)  # [M, K, d]

    @classmethod
    def fit(cls, embeddings: np.ndarray, num_levels: int, codebook_size: int, iters: int, seed: int) -> "ResidualKMeans":
        residual = np.asarray(embeddings, dtype=np.float32)
        books = []
        for level in range(num_levels):
            centroids = kmeans_centroids(residual, codebook_size, iters, seed + level)
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
