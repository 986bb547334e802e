"""Tokenizer diagnostics: code usage, perplexity, collisions, reconstruction, neighbourhood preservation."""

from __future__ import annotations

import numpy as np


def code_usage(codes: np.ndarray, codebook_size: int) -> list[dict]:
    """Per level: share of the K codes used, perplexity exp(H) of the code distribution, and counts."""
    out = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size).astype(np.float64)
        p = counts / max(counts.sum(), 1.0)
        nz = p[p > 0]
        out.append({
            "level": level + 1,
            "used": int((counts > 0).sum()),
            "usage": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
            "counts": counts.astype(np.int64).tolist(),
        })
    return out


def collision_share(codes: np.ndarray) -> float:
    """Share of items whose M-code tuple is shared with at least one other item (before the suffix)."""
    if len(codes) == 0:
        return 0.0
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.reshape(-1)] > 1).mean())


def reconstruction_cosine(x: np.ndarray, x_hat: np.ndarray) -> float:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x_hat = x_hat / np.maximum(np.linalg.norm(x_hat, axis=1, keepdims=True), 1e-12)
    return float((x * x_hat).sum(axis=1).mean())


def nearest_neighbours(embeddings: np.ndarray, k: int = 10, queries: np.ndarray | None = None) -> np.ndarray:
    """Indices [q, k] of the k nearest neighbours by cosine (faiss flat inner product), self excluded.

    `queries` (row indices) limits the search to a sample of items; None = every item.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    queries = np.arange(x.shape[0]) if queries is None else np.asarray(queries, dtype=np.int64)
    k_eff = min(k, x.shape[0] - 1)
    _, idx = index.search(x[queries], k_eff + 1)
    out = np.empty((len(queries), k_eff), dtype=np.int64)
    for row, i in enumerate(queries):
        found = [j for j in idx[row] if j != i and j >= 0]
        out[row] = found[:k_eff]
    return out


def neighbourhood_preservation(codes: np.ndarray, neighbours: np.ndarray, queries: np.ndarray | None = None,
                               prefix_lengths=(1, 2)) -> dict[str, float]:
    """Share of an item's nearest neighbours (embedding space) that share its first 1 / 2 codes."""
    queries = np.arange(len(codes)) if queries is None else np.asarray(queries)
    out = {}
    for p in prefix_lengths:
        if p > codes.shape[1]:
            continue
        same = np.all(codes[neighbours][:, :, :p] == codes[queries][:, None, :p], axis=-1)
        out[f"prefix{p}"] = float(same.mean())
    return out


def normalized_mutual_information(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """NMI (arithmetic-mean normalisation, as scikit-learn's default) of two labelings."""
    a = np.unique(np.asarray(labels_a), return_inverse=True)[1].reshape(-1)
    b = np.unique(np.asarray(labels_b), return_inverse=True)[1].reshape(-1)
    n = len(a)
    if n == 0:
        return 0.0
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    pxy = joint / n
    px, py = pxy.sum(1), pxy.sum(0)
    nz = pxy > 0
    mi = float((pxy[nz] * np.log(pxy[nz] / (px[:, None] * py[None, :])[nz])).sum())
    hx = float(-(px[px > 0] * np.log(px[px > 0])).sum())
    hy = float(-(py[py > 0] * np.log(py[py > 0])).sum())
    denom = (hx + hy) / 2
    return mi / denom if denom > 0 else 0.0


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Share of items whose cluster's majority label is their own label."""
    clusters = np.unique(np.asarray(clusters), return_inverse=True)[1].reshape(-1)
    labels = np.unique(np.asarray(labels), return_inverse=True)[1].reshape(-1)
    joint = np.zeros((clusters.max() + 1, labels.max() + 1))
    np.add.at(joint, (clusters, labels), 1)
    return float(joint.max(axis=1).sum() / len(clusters))


def plot_code_usage(usage: list[dict], title: str):
    """A matplotlib figure: one bar chart of code counts per level (sorted, most used first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(usage), figsize=(4 * len(usage), 3), squeeze=False)
    for ax, level in zip(axes[0], usage):
        counts = sorted(level["counts"], reverse=True)
        ax.bar(range(len(counts)), counts, width=1.0)
        ax.set_title(f"level {level['level']}: {level['used']}/{len(counts)} used, ppl {level['perplexity']:.1f}")
        ax.set_xlabel("code (by count)")
        ax.set_ylabel("items")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
