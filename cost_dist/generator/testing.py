"""Synthetic semantic IDs and embeddings, for the generator's tests and the beam-search benchmark.

`random_semantic_ids` makes unique M+1-token IDs for any catalog size (the benchmark's 10^6 items).
`write_topic_assign` writes RUN/assign/codes.parquet + meta.json for a prepared synthetic run where
level 0 is the item's latent topic (what a good tokenizer recovers from the text) and the other
levels are random, so the generator tests do not depend on the tokenizer stage.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def random_semantic_ids(n: int, num_levels: int, codebook_size: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """[n, M+1] unique IDs (random codes + collision suffix) and the suffix vocabulary size S."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, codebook_size, size=(n, num_levels), dtype=np.int64)
    return with_suffix(codes)


def with_suffix(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Append TIGER's collision suffix (0, 1, ... among items sharing all M codes)."""
    n = len(codes)
    order = np.lexsort(codes.T[::-1])
    sorted_codes = codes[order]
    new_group = np.r_[True, (sorted_codes[1:] != sorted_codes[:-1]).any(axis=1)]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    suffix = np.empty(n, dtype=np.int64)
    suffix[order] = np.arange(n) - group_start
    return np.concatenate([codes, suffix[:, None]], axis=1), int(suffix.max()) + 1


def write_topic_assign(run, codebook_size: int = 16, num_levels: int = 3, seed: int = 0) -> None:
    items = run.read_parquet("prepare/items.parquet", columns=["item_id", "topic"])
    topic = np.asarray(items.column("topic").to_numpy(), dtype=np.int64)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, codebook_size, size=(len(topic), num_levels), dtype=np.int64)
    codes[:, 0] = topic % codebook_size
    ids, num_suffix = with_suffix(codes)
    sid = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1).astype(np.int32)), num_levels + 1)
    run.write_parquet("assign/codes.parquet", pa.table({"item_id": items.column("item_id"), "semantic_id": sid}))
    run.write_json("assign/meta.json", {"num_levels": num_levels, "codebook_size": codebook_size, "num_suffix": num_suffix})


def write_topic_embeddings(run, dim: int = 32, noise: float = 0.5, seed: int = 0) -> None:
    """RUN/embed/embeddings.parquet: topic centroid + noise, unit norm (a stand-in for text embeddings)."""
    items = run.read_parquet("prepare/items.parquet", columns=["item_id", "topic"])
    topic = np.asarray(items.column("topic").to_numpy(), dtype=np.int64)
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(int(topic.max()) + 1, dim))
    emb = centroids[topic] + noise * rng.normal(size=(len(topic), dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)
    run.write_parquet("embed/embeddings.parquet", pa.table({"item_id": items.column("item_id"), "embedding": col}))
