"""Baselines ranked through the same evaluation code as the generator: popularity and dense retrieval.

- Pop: items by their number of training interactions (the training split only, so validation and
  test targets never leak into the counts); ties broken by item id.
- Dense: the user's query is the mean of the (unit-norm) text embeddings of the items in the
  history the generator sees (the last max_len items), normalised; the nearest items by inner
  product come from a faiss IndexFlatIP over the whole catalog (exact search).

Both honour `exclude_seen` like the generator: with it, items of the user's history are skipped and
the ranking is filled from further down the list.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cost_dist.errors import DataError

log = logging.getLogger(__name__)


class PopularityRanker:
    def __init__(self, train: pa.Table):
        counts = pc.value_counts(pc.list_flatten(train.column("item_ids")))
        items = counts.field("values").to_pylist()
        n = counts.field("counts").to_numpy()
        order = sorted(range(len(items)), key=lambda i: (-int(n[i]), items[i]))
        self.ranking = [items[i] for i in order]
        self.counts = {items[i]: int(n[i]) for i in order}

    def rank(self, histories: Sequence[Sequence[str]], k: int, exclude_seen: bool = False) -> list[list[str]]:
        if not exclude_seen:
            top = self.ranking[:k]
            return [top for _ in histories]
        out = []
        for history in histories:
            seen = set(history)
            picked = []
            for item in self.ranking:
                if item not in seen:
                    picked.append(item)
                    if len(picked) == k:
                        break
            out.append(picked)
        return out


class DenseRanker:
    def __init__(self, embeddings: pa.Table, source: str = "embeddings.parquet"):
        import faiss

        for col in ("item_id", "embedding"):
            if col not in embeddings.column_names:
                raise DataError(f"{source}: missing column {col!r}")
        self.item_ids = embeddings.column("item_id").to_pylist()
        emb = embeddings.column("embedding").combine_chunks()
        dim = len(emb[0]) if len(emb) else 0
        if dim == 0:
            raise DataError(f"{source}: no embeddings")
        values = pc.list_flatten(emb).to_numpy(zero_copy_only=False).astype(np.float32)
        if len(values) != len(self.item_ids) * dim:
            raise DataError(f"{source}: embeddings have different lengths")
        vectors = values.reshape(len(self.item_ids), dim)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        self.vectors = vectors
        self.row_of = {item: i for i, item in enumerate(self.item_ids)}
        self.index = faiss.IndexFlatIP(dim)
        self.index.add(vectors)

    def queries(self, histories: Sequence[Sequence[str]], max_len: int) -> np.ndarray:
        q = np.zeros((len(histories), self.vectors.shape[1]), dtype=np.float32)
        for i, history in enumerate(histories):
            rows = [self.row_of[h] for h in history[-max_len:] if h in self.row_of]
            if rows:
                q[i] = self.vectors[rows].mean(axis=0)
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return q

    def rank(self, histories: Sequence[Sequence[str]], k: int, max_len: int, exclude_seen: bool = False,
             batch: int = 4096) -> list[list[str]]:
        out: list[list[str]] = []
        for lo in range(0, len(histories), batch):
            part = histories[lo:lo + batch]
            extra = max((len(set(h)) for h in part), default=0) if exclude_seen else 0
            depth = min(k + extra, len(self.item_ids))
            _, idx = self.index.search(self.queries(part, max_len), depth)
            for history, row in zip(part, idx):
                seen = set(history) if exclude_seen else ()
                items = [self.item_ids[i] for i in row if i >= 0 and self.item_ids[i] not in seen]
                out.append(items[:k])
        return out
