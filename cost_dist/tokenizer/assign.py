"""The `assign` stage: every item's unique semantic ID, plus tokenizer diagnostics.

Ray Data runs the trained tokenizer over RUN/embed/embeddings.parquet (an actor pool, one tokenizer
per actor) to get M codes per item. Items sharing all M codes get a collision suffix 0, 1, ... in
item_id order (deterministic, as TIGER does), so the (M+1)-token IDs are unique; S = largest suffix +
1 is recorded in RUN/assign/meta.json and is the generator's suffix vocabulary. With
tokenizer.max_suffix > 0 a catalog needing more suffix values is an error (raise codebook_size).

Diagnostics (metrics.json "tokenizer.diagnostics", RUN/plots/code_usage.png): per-level code usage
and perplexity, the share of items colliding before the suffix, reconstruction cosine, and
neighbourhood preservation: the share of an item's 10 nearest neighbours in embedding space (faiss,
cosine) that share its first 1 and first 2 codes (over a sample of up to 20,000 query items). When
RUN/prepare/items.parquet has the synthetic catalog's `topic`, also NMI and purity of the level-1
codes against the topics.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from cost_dist.errors import CostDistError, DataError
from cost_dist.tokenizer.embeddings import EMBEDDINGS_FILE, read_embeddings

log = logging.getLogger(__name__)

CODES_FILE = "assign/codes.parquet"
META_FILE = "assign/meta.json"
PLOT_FILE = "plots/code_usage.png"
NEIGHBOURS_K = 10
NEIGHBOUR_QUERIES = 20_000


def assign_suffixes(codes: np.ndarray, item_ids: list[str]) -> np.ndarray:
    """Collision suffix per item: 0, 1, ... within each group of equal codes, in item_id order."""
    n = len(item_ids)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    id_rank = np.empty(n, dtype=np.int64)
    id_rank[np.argsort(np.asarray(item_ids, dtype=object).astype(str), kind="stable")] = np.arange(n)
    keys = [id_rank] + [codes[:, level] for level in reversed(range(codes.shape[1]))]
    order = np.lexsort(keys)
    sorted_codes = codes[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = np.any(sorted_codes[1:] != sorted_codes[:-1], axis=1)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    suffix_sorted = np.arange(n) - group_start
    suffix = np.empty(n, dtype=np.int64)
    suffix[order] = suffix_sorted
    return suffix


def semantic_id_table(item_ids: list[str], codes: np.ndarray, suffix: np.ndarray) -> pa.Table:
    """codes.parquet: item_id: string, semantic_id: fixed_size_list<int32>[M+1]."""
    ids = np.concatenate([codes, suffix[:, None]], axis=1).astype(np.int32)
    flat = pa.array(ids.reshape(-1), type=pa.int32())
    return pa.table({"item_id": pa.array(item_ids, type=pa.string()),
                     "semantic_id": pa.FixedSizeListArray.from_arrays(flat, ids.shape[1])})


class _CodesPredictor:
    """Ray Data actor: tokenizer codes and reconstruction cosine for a batch of embeddings."""

    def __init__(self, payload: dict, device: str | None = None):
        import torch

        from cost_dist.tokenizer.inference import SemanticTokenizer

        torch.set_num_threads(1)
        self.tokenizer = SemanticTokenizer(payload, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        col = batch["embedding"]
        x = np.stack(col).astype(np.float32) if col.dtype == object else np.asarray(col, dtype=np.float32)
        codes = self.tokenizer.codes(x)
        recon = self.tokenizer.reconstruct(x)
        if recon is None:
            cos = np.full(len(x), np.nan, dtype=np.float64)
        else:
            num = (x * recon).sum(1)
            cos = num / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(recon, axis=1), 1e-12)
        return {"item_id": np.asarray(batch["item_id"]).astype(str), "codes": codes, "recon_cos": cos}


def infer_codes(run, payload: dict, resources, batch_size: int = 1024) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Ray Data inference over RUN/embed/embeddings.parquet -> ({item_id: codes}, {item_id: recon_cos})."""
    import ray
    import ray.data

    from cost_dist import distributed as D

    if not ray.is_initialized():
        D.init_ray()
    use_gpu = bool(getattr(resources, "use_gpu", False))
    max_actors = max(1, int(getattr(resources, "num_workers", 1)))
    ds = ray.data.read_parquet(run.uri(EMBEDDINGS_FILE), columns=["item_id", "embedding"])
    out = ds.map_batches(
        _CodesPredictor,
        fn_constructor_kwargs={"payload": payload, "device": "cuda" if use_gpu else None},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
        num_cpus=1 if not use_gpu else 0,
        num_gpus=1 if use_gpu else 0,
    )
    ids: list[str] = []
    codes: list[np.ndarray] = []
    cos: list[np.ndarray] = []
    for batch in out.iter_batches(batch_format="numpy", batch_size=None):
        ids.extend(str(v) for v in batch["item_id"])
        col = batch["codes"]
        codes.append(np.stack(col) if col.dtype == object else np.asarray(col))
        cos.append(np.asarray(batch["recon_cos"], dtype=np.float64))
    if not ids:
        raise DataError(f"{run.uri(EMBEDDINGS_FILE)}: no rows to tokenize")
    return dict(zip(ids, np.concatenate(codes))), dict(zip(ids, np.concatenate(cos)))


def topic_agreement(run, item_ids: list[str], codes: np.ndarray) -> dict[str, float] | None:
    """NMI / purity of the level-1 codes against the synthetic catalog's latent topics, if present."""
    from cost_dist.tokenizer.diagnostics import normalized_mutual_information, purity

    if not run.exists("prepare/items.parquet"):
        return None
    items = run.read_parquet("prepare/items.parquet")
    if "topic" not in items.column_names:
        return None
    topic_of = dict(zip(items.column("item_id").to_pylist(), items.column("topic").to_pylist()))
    keep = [i for i, item in enumerate(item_ids) if topic_of.get(item) is not None]
    if not keep:
        return None
    topics = np.asarray([topic_of[item_ids[i]] for i in keep])
    level1 = codes[keep, 0]
    return {"level1_nmi": normalized_mutual_information(level1, topics), "level1_purity": purity(level1, topics),
            "num_topics": int(len(np.unique(topics)))}


def tokenizer_diagnostics(embeddings: np.ndarray, codes: np.ndarray, codebook_size: int,
                          recon_cos: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """Code usage/perplexity per level, collision share, reconstruction cosine, neighbourhood preservation."""
    from cost_dist.tokenizer import diagnostics as diag

    n = len(codes)
    rng = np.random.default_rng(seed)
    queries = np.arange(n) if n <= NEIGHBOUR_QUERIES else np.sort(rng.choice(n, NEIGHBOUR_QUERIES, replace=False))
    neighbours = diag.nearest_neighbours(embeddings, NEIGHBOURS_K, queries)
    usage = diag.code_usage(codes, codebook_size)
    out: dict[str, Any] = {
        "num_items": int(n),
        "levels": [{k: v for k, v in level.items() if k != "counts"} for level in usage],
        "collision_share": diag.collision_share(codes),
        "unique_prefixes": int(len(np.unique(codes, axis=0))),
        "neighbourhood_preservation": diag.neighbourhood_preservation(codes, neighbours, queries),
        "neighbourhood_k": NEIGHBOURS_K,
    }
    if recon_cos is not None and np.isfinite(recon_cos).any():
        out["recon_cos"] = float(np.nanmean(recon_cos))
    else:
        out["recon_cos"] = None
    out["_usage"] = usage  # with counts, for the plot (removed before metrics)
    return out


def run_assign_stage(cfg, run) -> dict:
    """Stage `assign`: -> RUN/assign/codes.parquet, RUN/assign/meta.json, RUN/plots/code_usage.png."""
    from cost_dist.tokenizer.diagnostics import plot_code_usage
    from cost_dist.tokenizer.embeddings import check_dim
    from cost_dist.tokenizer.inference import MODEL_FILE, SemanticTokenizer

    t0 = time.time()
    tokenizer = SemanticTokenizer.load(run)  # checks the checkpoint before any Ray work
    payload = run.read_torch(MODEL_FILE)
    item_ids, emb = read_embeddings(run)
    check_dim(emb, tokenizer.input_dim, run.uri(EMBEDDINGS_FILE))
    codes_by_id, cos_by_id = infer_codes(run, payload, cfg.resources.tokenizer)
    missing = [i for i in item_ids if i not in codes_by_id]
    if missing:
        raise CostDistError(f"assign: Ray Data inference returned no codes for {len(missing)} item(s), e.g. {missing[0]!r}")
    codes = np.stack([codes_by_id[i] for i in item_ids]).astype(np.int64)
    recon_cos = np.asarray([cos_by_id[i] for i in item_ids], dtype=np.float64)
    suffix = assign_suffixes(codes, item_ids)
    num_suffix = int(suffix.max()) + 1 if len(suffix) else 1
    max_suffix = int(cfg.tokenizer.max_suffix)
    if max_suffix > 0 and num_suffix > max_suffix:
        raise DataError(f"assign: {num_suffix} items share one code prefix but tokenizer.max_suffix={max_suffix}; "
                        "raise tokenizer.codebook_size / num_levels or max_suffix")
    table = semantic_id_table(item_ids, codes, suffix)
    run.write_parquet(CODES_FILE, table)
    meta = {"num_levels": int(codes.shape[1]), "codebook_size": int(tokenizer.codebook_size), "num_suffix": num_suffix,
            "method": tokenizer.method, "num_items": len(item_ids)}
    run.write_json(META_FILE, meta)

    diagnostics = tokenizer_diagnostics(emb, codes, tokenizer.codebook_size, recon_cos, seed=cfg.seed)
    usage = diagnostics.pop("_usage")
    topics = topic_agreement(run, item_ids, codes)
    if topics is not None:
        diagnostics["topics"] = topics
    diagnostics["method"] = tokenizer.method
    diagnostics["loss"] = cfg.tokenizer.loss if tokenizer.method == "rqvae" else None
    diagnostics["num_suffix"] = num_suffix
    fig = plot_code_usage(usage, f"code usage ({tokenizer.method}, {len(item_ids)} items)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    run.write_bytes(PLOT_FILE, buf.getvalue())
    wall = time.time() - t0
    log.info("assign: %d items, %d unique prefixes, collision share %.3f, num_suffix %d, NP@1 %.3f NP@2 %.3f",
             len(item_ids), diagnostics["unique_prefixes"], diagnostics["collision_share"], num_suffix,
             diagnostics["neighbourhood_preservation"].get("prefix1", float("nan")),
             diagnostics["neighbourhood_preservation"].get("prefix2", float("nan")))
    return {"tokenizer": {"diagnostics": diagnostics},
            "assign": {"num_items": len(item_ids), "num_levels": meta["num_levels"], "codebook_size": meta["codebook_size"],
                       "num_suffix": num_suffix, "max_suffix_used": num_suffix - 1, "wall_s": round(wall, 2)}}
