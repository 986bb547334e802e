"""Ranking metrics for leave-one-out evaluation (one held-out target per user).

Recall@K is the hit rate: 1 when the target is among the first K distinct items of the ranking.
NDCG@K = 1 / log2(rank + 1) for a hit at 1-based rank `rank <= K`, else 0 (the ideal DCG of a single
relevant item is 1). A user whose target is missing from the ranking (or None) counts 0 and stays
in the denominator; K larger than the ranking (or the catalog) just means fewer positions to hit.
Repeated items in a ranking count at their first position only.

Ties in scored rankings (`ranks_from_scores`) are resolved in expectation over a uniformly random
order of the tied items: the target tied with t others at ranks r..r+t gets the mean of the metric
over those ranks, so ties never favour a method.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def _rank(ranked: Sequence, target) -> int | None:
    """1-based position of target among the distinct items of ranked, or None."""
    if target is None:
        return None
    seen = set()
    for item in ranked:
        if item in seen:
            continue
        seen.add(item)
        if item == target:
            return len(seen)
    return None


def recall_at_k(ranked: Sequence, target, k: int) -> float:
    r = _rank(ranked, target)
    return 1.0 if r is not None and r <= k else 0.0


def ndcg_at_k(ranked: Sequence, target, k: int) -> float:
    r = _rank(ranked, target)
    return 1.0 / math.log2(r + 1) if r is not None and r <= k else 0.0


def ranking_metrics(ranked: Sequence[Sequence], targets: Sequence, ks: Iterable[int]) -> dict[str, float]:
    """Mean Recall@K and NDCG@K over users: {"recall@5": ..., "ndcg@5": ..., ...}."""
    ks = list(ks)
    if len(ranked) != len(targets):
        raise ValueError(f"{len(ranked)} rankings for {len(targets)} targets")
    ranks = [_rank(r, t) for r, t in zip(ranked, targets)]
    return metrics_from_ranks(ranks, ks)


def metrics_from_ranks(ranks: Sequence[int | None], ks: Iterable[int]) -> dict[str, float]:
    n = max(len(ranks), 1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = sum(1.0 for r in ranks if r is not None and r <= k) / n
        out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 1) for r in ranks if r is not None and r <= k) / n
    return out


def ranks_from_scores(scores: np.ndarray, targets: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
    """Metrics of full-catalog score matrices [U, n] (higher is better), target column per user (-1 = missing).

    Ties are averaged over every order of the tied items (see the module docstring).
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    ks = list(ks)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    for u in range(scores.shape[0]):
        t = targets[u]
        if t < 0:
            continue
        s = scores[u, t]
        better = int((scores[u] > s).sum())
        tied = int((scores[u] == s).sum())  # includes the target
        positions = np.arange(better + 1, better + tied + 1)
        for k in ks:
            inside = positions[positions <= k]
            sums[f"recall@{k}"] += len(inside) / tied
            sums[f"ndcg@{k}"] += float((1.0 / np.log2(inside + 1)).sum()) / tied
    n = max(scores.shape[0], 1)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = sums[f"recall@{k}"] / n
        out[f"ndcg@{k}"] = sums[f"ndcg@{k}"] / n
    return out
