"""The evaluate stage: leave-one-out, full catalog, Recall/NDCG@K of the generator and the baselines.

The generator's rankings come from a distributed batch job: the validation and test users are a Ray
Dataset, mapped by a pool of actors (cfg.resources.evaluate: parallelism, num_cpus, num_gpus) that
each load the checkpoint best on validation (RUN/generate/best.pt) and run batched constrained beam
search; the driver merges the rankings and computes the metrics with cost_dist.metrics, the same
code that scores Pop and dense retrieval (cost_dist.baselines).

With `evaluate.exact_check`, the driver also scores every item's full ID exactly (teacher forced)
for a sample of test users and compares Recall@10 of the exhaustive ranking with beam search's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from cost_dist.config import Config, ConfigError
from cost_dist.data.splits import run_whole_past, sample_users
from cost_dist.errors import DataError
from cost_dist.metrics import ranking_metrics, ranks_from_scores

log = logging.getLogger(__name__)

METHOD = "cost-dist"


class BeamSearchActor:
    """Ray Data actor: loads the best checkpoint once, ranks a batch of users per call."""

    def __init__(self, run_uri: str, k: int, beam_size: int, exclude_seen: bool, batch_size: int, threads: int):
        import torch

        from cost_dist.generator.inference import Recommender
        from cost_dist.rundir import RunDir

        torch.set_num_threads(max(1, threads))
        self.rec = Recommender.load(RunDir(run_uri), batch_size=batch_size)
        self.k, self.beam_size, self.exclude_seen = k, beam_size, exclude_seen

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        histories = [list(h) for h in batch["history"]]
        users = [str(u) for u in batch["user_id"]]
        seen = [list(s) for s in batch["seen"]] if "seen" in batch else None
        recs = self.rec.recommend(histories, users, k=self.k, beam_size=self.beam_size, exclude_seen=self.exclude_seen,
                                  seen=seen)
        # An Arrow list<string> column: a numpy object array of k-item rows is 2-D, which Ray Data
        # cannot convert to Arrow and falls back to pickling (with a warning per batch).
        return pa.table({"user_id": pa.array(users, type=pa.string()),
                         "split": pa.array(batch["split"], type=pa.string()),
                         "ranked": pa.array([[i for i, _ in r] for r in recs], type=pa.list_(pa.string()))})


def generator_rankings(run, tables: dict[str, pa.Table], cfg: Config, k: int) -> dict[str, dict[str, list[str]]]:
    """split -> user_id -> top-k items by beam search, computed on one Ray Data actor pool for all splits."""
    import ray

    ecfg, res = cfg.evaluate, cfg.resources.evaluate
    parts = [pa.table({"user_id": t.column("user_id"), "history": t.column("history"), "seen": t.column("seen"),
                       "split": pa.array([name] * len(t), type=pa.string())}) for name, t in tables.items()]
    # One block per beam-search batch, so every actor of the pool gets work (one table would be one block).
    users = pa.concat_tables(parts)
    step = max(1, ecfg.batch_size)
    ds = ray.data.from_arrow([users.slice(lo, step) for lo in range(0, max(len(users), 1), step)])
    ranked = ds.map_batches(
        BeamSearchActor,
        fn_constructor_args=(run.uri(), k, ecfg.beam_size, ecfg.exclude_seen, ecfg.batch_size, max(1, int(res.num_cpus))),
        batch_size=ecfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=max(1, res.parallelism)),
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus or None,
        batch_format="numpy",
    )
    out: dict[str, dict[str, list[str]]] = {name: {} for name in tables}
    for row in ranked.iter_rows():
        out[str(row["split"])][str(row["user_id"])] = [str(i) for i in row["ranked"]]
    return out


def _check(cfg: Config) -> list[int]:
    ecfg = cfg.evaluate
    ks = sorted(set(int(k) for k in ecfg.ks))
    if not ks or ks[0] < 1:
        raise ConfigError(f"evaluate.ks must be positive integers, got {ecfg.ks}")
    if ecfg.beam_size < ks[-1]:
        raise ConfigError(f"evaluate.beam_size ({ecfg.beam_size}) must be >= the largest K ({ks[-1]})")
    unknown = set(ecfg.baselines) - {"pop", "dense"}
    if unknown:
        raise ConfigError(f"evaluate.baselines: unknown baseline(s) {sorted(unknown)} (pop, dense)")
    return ks


def run_evaluate_stage(cfg: Config, run) -> dict[str, Any]:
    from cost_dist.baselines import DenseRanker, PopularityRanker
    from cost_dist.generator.train import load_catalog_checked, load_splits

    ecfg = cfg.evaluate
    ks = _check(cfg)
    k = ks[-1]
    splits = load_splits(cfg, run)
    catalog = load_catalog_checked(run)
    if not run.exists("generate/best.pt"):
        raise DataError(f"missing {run.uri('generate/best.pt')}: run train-generator first")
    pop = PopularityRanker(splits["train"]) if "pop" in ecfg.baselines else None
    dense = None
    if "dense" in ecfg.baselines:
        dense = DenseRanker(run.read_parquet("embed/embeddings.parquet"), run.uri("embed/embeddings.parquet"))

    sasrec = None
    if cfg.sasrec.enabled:  # the SASRec baseline, trained on the same splits (skipped when already trained)
        from cost_dist.sasrec import SASRecRanker, ensure_sasrec

        ensure_sasrec(cfg, run)
        sasrec = SASRecRanker.load(run)

    results: dict[str, Any] = {"valid": {}, "test": {}}
    # "seen": what exclude_seen masks per user, for every method alike: the user's whole past
    # (evaluate.mask_whole_past) or the history window the models read.
    past = run_whole_past(run) if ecfg.exclude_seen and ecfg.mask_whole_past else None
    tables = {}
    for name in ("valid", "test"):
        table = sample_users(splits[name], ecfg.max_users, cfg.seed)
        seen = table.column("history")
        if past is not None:
            seen = _align_by_user(past[name], table.column("user_id"), name).column("history")
        tables[name] = table.append_column("seen", seen)
    t0 = time.time()
    rankings = generator_rankings(run, tables, cfg, k)
    timings = {"beam_search_s": round(time.time() - t0, 2)}
    for name, table in tables.items():
        users = table.column("user_id").to_pylist()
        histories = table.column("history").to_pylist()
        seen = table.column("seen").to_pylist()
        targets = table.column("target").to_pylist()
        ranked_by_user = rankings[name]
        missing = [u for u in users if u not in ranked_by_user]
        if missing:
            raise DataError(f"beam search returned no ranking for {len(missing)} {name} user(s), e.g. {missing[:3]}")
        results[name][METHOD] = ranking_metrics([ranked_by_user[u] for u in users], targets, ks)
        # Pop reads the history only to mask it, and dense queries with the last max_len items of
        # what it is given (the same window as `history`), so both take `seen` directly.
        if pop is not None:
            results[name]["pop"] = ranking_metrics(pop.rank(seen, k, ecfg.exclude_seen), targets, ks)
        if dense is not None:
            results[name]["dense"] = ranking_metrics(dense.rank(seen, k, cfg.data.max_len, ecfg.exclude_seen), targets, ks)
        if sasrec is not None:
            results[name]["sasrec"] = ranking_metrics(sasrec.rank(histories, k, ecfg.exclude_seen, seen=seen), targets, ks)
        log.info("evaluate %s (%d users): %s", name, len(users),
                 {m: round(v.get("recall@10", 0.0), 4) for m, v in results[name].items()})
        if name == "test" and ecfg.exact_check:
            results["exact_check"] = exact_check(cfg, run, catalog, users, histories, seen, targets, ranked_by_user)

    results["num_users"] = {n: len(t) for n, t in tables.items()}
    results["timings"] = timings
    results["settings"] = {"ks": ks, "beam_size": ecfg.beam_size, "exclude_seen": ecfg.exclude_seen,
                           "masked": ("whole past" if ecfg.mask_whole_past else f"last {cfg.data.max_len} items")
                           if ecfg.exclude_seen else "nothing",
                           "catalog_size": len(catalog), "checkpoint": "generate/best.pt"}
    run.write_json("evaluate/results.json", results)
    _plot(run, results)
    return {"evaluate": results}


def _align_by_user(table: pa.Table, users: pa.ChunkedArray, split: str) -> pa.Table:
    """Rows of `table` in the order of `users` (both from the same sequences, so every user is there)."""
    import pyarrow.compute as pc

    idx = pc.index_in(users, value_set=table.column("user_id").combine_chunks())
    if idx.null_count:
        raise DataError(f"prepare/sequences.parquet lacks {idx.null_count} {split} user(s) of the splits: rerun prepare")
    return table.take(idx)


def exact_check(cfg: Config, run, catalog, users, histories, seen, targets, ranked_by_user) -> dict[str, Any]:
    """Exhaustive teacher-forced scoring of the whole catalog vs beam search, on a sample of test users."""
    from cost_dist.generator.inference import Recommender

    ecfg = cfg.evaluate
    if len(catalog) > ecfg.exact_check_max_items:
        return {"skipped": f"catalog of {len(catalog)} items > evaluate.exact_check_max_items ({ecfg.exact_check_max_items})"}
    n = min(len(users), ecfg.exact_check_max_users)
    rec = Recommender.load(run)
    scores = np.concatenate([rec.score_all(histories[lo:min(lo + 32, n)], users[lo:min(lo + 32, n)]) for lo in range(0, n, 32)], axis=0)
    if ecfg.exclude_seen:
        for i, h in enumerate(seen[:n]):
            scores[i, catalog.rows(h)] = -np.inf
    target_rows = np.array([catalog.row_of.get(t, -1) for t in targets[:n]])
    exact = ranks_from_scores(scores, target_rows, [10])
    beam = ranking_metrics([ranked_by_user[u] for u in users[:n]], targets[:n], [10])
    return {"users": n, "exact_recall@10": exact["recall@10"], "beam_recall@10": beam["recall@10"],
            "abs_diff_recall@10": abs(exact["recall@10"] - beam["recall@10"]),
            "exact_ndcg@10": exact["ndcg@10"], "beam_ndcg@10": beam["ndcg@10"]}


def _plot(run, results: dict[str, Any]) -> None:
    try:
        from cost_dist.report import plot_ranking
    except ImportError:  # the report module is optional for this stage
        return
    try:
        png = plot_ranking({"evaluate": results}, "test")
    except Exception as exc:  # a plot must never fail the stage
        log.warning("recall_at_k.png not drawn: %s", exc)
        return
    if png:
        run.write_bytes("plots/recall_at_k.png", png)
