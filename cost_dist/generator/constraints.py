"""The prefix trie of valid semantic IDs, as one sorted key array per depth (no Python per token).

IDs have a fixed length L, so the trie is L layers. Prefixes of length t+1 are numbered 0.. in
lexicographic order; the layer for depth t stores, sorted, `key = parent_prefix_id * size_t + code`
for every prefix of length t+1 (size_t = that position's number of tokens). A prefix's id is its
index in that array. For a whole batch of beams with parent ids P[N], the candidates
`P[:, None] * size_t + arange(size_t)` are looked up with one `torch.searchsorted`: a candidate is
valid when the key is found, and the found index is the child's prefix id. Memory is
O(L * n_items) int64 and a lookup is O(N * size_t * log n): cost barely grows with the catalog.
At depth L the prefix id is a "leaf id" (one per item); `leaf_to_row` maps it to the catalog row.
"""

from __future__ import annotations

import numpy as np
import torch


class PrefixIndex:
    def __init__(self, semantic_ids: np.ndarray, position_sizes: list[int]):
        codes = np.asarray(semantic_ids, dtype=np.int64)
        n, L = codes.shape
        if L != len(position_sizes):
            raise ValueError(f"semantic IDs have {L} positions, vocabulary has {len(position_sizes)}")
        self.position_sizes = list(position_sizes)
        order = np.lexsort(codes.T[::-1])  # lexicographic by position 0, then 1, ...
        sorted_codes = codes[order]
        parent = np.zeros(n, dtype=np.int64)
        keys = []
        for t in range(L):
            key = parent * position_sizes[t] + sorted_codes[:, t]
            uniq, inverse = np.unique(key, return_inverse=True)
            keys.append(torch.from_numpy(uniq))
            parent = inverse.astype(np.int64)
        if len(keys[-1]) != n:
            raise ValueError("semantic IDs are not unique")
        self.keys = keys
        self.leaf_to_row = torch.from_numpy(order.astype(np.int64))
        row_to_leaf = np.empty(n, dtype=np.int64)
        row_to_leaf[order] = np.arange(n)
        self.row_to_leaf = torch.from_numpy(row_to_leaf)
        self.num_items = n

    @property
    def id_length(self) -> int:
        return len(self.position_sizes)

    def nbytes(self) -> int:
        return sum(k.numel() * 8 for k in self.keys) + 2 * self.num_items * 8

    def to(self, device) -> "PrefixIndex":
        self.keys = [k.to(device) for k in self.keys]
        self.leaf_to_row = self.leaf_to_row.to(device)
        self.row_to_leaf = self.row_to_leaf.to(device)
        return self

    def children(self, depth: int, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For parent prefix ids [N] (-1 = dead beam): child ids [N, size] and validity [N, size]."""
        size = self.position_sizes[depth]
        keys = self.keys[depth]
        cand = parents.clamp_min(0)[:, None] * size + torch.arange(size, device=parents.device)[None, :]
        idx = torch.searchsorted(keys, cand).clamp_max(len(keys) - 1)
        valid = (keys[idx] == cand) & (parents >= 0)[:, None]
        return idx, valid
