"""Why do the generator's test figures fall further below its validation figures than SASRec's?

A diagnostic for one finished quality-benchmark run pair (a generative method's run directory and a
SASRec run directory over the same prepared data): both models rank the validation and test users
(whole past masked, as the benchmark scores them), and the hits are broken down four ways.

1. By how often the target occurs in the training sequences (cold 0, 1-4, 5-19, 20+). Test targets
   are the users' latest items, so they are rarer in training than validation targets; the table
   shows each bucket's share of users per split and each model's Recall/NDCG@10 per bucket, plus
   test re-weighted to validation's bucket mix (what test would score with validation's targets'
   popularity, everything else equal).
2. Recency: test targets ranked from the validation history (the test history minus its last item,
   the validation target). The drop against the real test history is how much a model uses the
   most recent item, the one no training example has in its context.
3. Where in the semantic ID the generator misses (validation, per bucket): the share of users whose
   top 10 holds an item sharing the target's first 1, 2, ... codes, for both models' top 10s.
4. A popularity penalty at ranking time, score - alpha * log(1 + training count), for both models
   (the generator re-ranks its beam's candidates; SASRec re-ranks the whole catalog): does dividing
   out the popularity prior recover the rare targets?

    python benchmarks/split_gap.py --generator-run benchmarks/out/diag-amazon/runs/amazon-lcrec/rqkmeans-bal-seed0 \
        --sasrec-run benchmarks/out/diag-amazon/runs/amazon-lcrec/sasrec-seed0 --out benchmarks/out/diag-amazon/split_gap.json

Prints a markdown table and writes JSON. Not part of CI (it needs trained runs on real data).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_dist.data.splits import leave_one_out, whole_past  # noqa: E402
from cost_dist.metrics import ndcg_at_k, recall_at_k  # noqa: E402
from cost_dist.rundir import RunDir  # noqa: E402

BUCKETS = ((0, 0, "cold (0)"), (1, 4, "1-4"), (5, 19, "5-19"), (20, 10**12, "20+"))
K = 10
ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0)


def bucket_of(count: int) -> str:
    return next(name for lo, hi, name in BUCKETS if lo <= count <= hi)


def per_user(ranked: list[list[str]], targets: list[str]) -> tuple[np.ndarray, np.ndarray]:
    rec = np.array([recall_at_k(r, t, K) for r, t in zip(ranked, targets)])
    ndcg = np.array([ndcg_at_k(r, t, K) for r, t in zip(ranked, targets)])
    return rec, ndcg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generator-run", required=True)
    p.add_argument("--sasrec-run", required=True)
    p.add_argument("--beam-size", type=int, default=100, help="beam width and candidates kept (>= 10)")
    p.add_argument("--out", required=True, help="JSON output path")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    import torch

    from cost_dist.generator.inference import Recommender
    from cost_dist.sasrec import SASRecRanker

    torch.set_num_threads(2)
    grun, srun = RunDir(args.generator_run), RunDir(args.sasrec_run)
    rec = Recommender.load(grun, batch_size=256)
    sas = SASRecRanker.load(srun)
    max_len = rec.vocab.max_len
    sequences = grun.read_parquet("prepare/sequences.parquet")
    splits, past = leave_one_out(sequences, max_len), whole_past(sequences)
    counts = collections.Counter(i for s in splits["train"].column("item_ids").to_pylist() for i in s)

    users = splits["test"].column("user_id").to_pylist()
    inputs = {  # name -> (history, seen, target)
        "valid": (splits["valid"].column("history").to_pylist(), past["valid"].column("history").to_pylist(),
                  splits["valid"].column("target").to_pylist()),
        "test": (splits["test"].column("history").to_pylist(), past["test"].column("history").to_pylist(),
                 splits["test"].column("target").to_pylist()),
    }
    # Test targets from the validation history (drop the test history's last item), same mask.
    inputs["test, history without its last item"] = (inputs["valid"][0], inputs["test"][1], inputs["test"][2])

    logpop = {i: float(np.log1p(counts[i])) for i in rec.catalog.item_ids}
    scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    top10: dict[str, dict[str, list[list[str]]]] = {}
    penalty: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for name, (hist, seen, target) in inputs.items():
        logging.info("ranking %s (%d users)", name, len(hist))
        beams = rec.recommend(hist, users, k=args.beam_size, beam_size=args.beam_size, exclude_seen=True, seen=seen)
        # Raw logits: the softmax's per-user constant leaves the ranking unchanged, penalty or not.
        # The whole past masked, not only the last max_len items the model reads.
        sas_scores = torch.from_numpy(sas.scores(hist, exclude_seen=True, seen=seen))
        sas_logpop = torch.tensor([logpop.get(i, 0.0) for i in sas.index.item_ids])
        for alpha in ALPHAS:
            gen = [[i for i, _ in sorted(b, key=lambda x: -(x[1] - alpha * logpop[x[0]]))][:K] for b in beams]
            top = torch.topk(sas_scores - alpha * sas_logpop, K, dim=1).indices.tolist()
            ranked = {"generator": gen, "sasrec": [[sas.index.item_ids[j] for j in row] for row in top]}
            hits = {m: per_user(r, target) for m, r in ranked.items()}
            if alpha == 0.0:
                top10[name], scores[name] = ranked, hits
            penalty.setdefault(name, {})[str(alpha)] = {
                m: {"recall@10": float(a.mean()), "ndcg@10": float(b.mean())} for m, (a, b) in hits.items()}

    bucket = {name: np.array([bucket_of(counts[t]) for t in target]) for name, (_, _, target) in inputs.items()}
    out: dict = {"generator_run": args.generator_run, "sasrec_run": args.sasrec_run, "k": K,
                 "beam_size": args.beam_size, "users": len(users), "overall": {}, "buckets": {}}
    for name in inputs:
        out["overall"][name] = {m: {"recall@10": float(r.mean()), "ndcg@10": float(n.mean())}
                                for m, (r, n) in scores[name].items()}
    for name in ("valid", "test"):
        rows = {}
        for _, _, b in BUCKETS:
            mask = bucket[name] == b
            rows[b] = {"share": float(mask.mean()),
                       **{f"{m} recall@10": float(r[mask].mean()) if mask.any() else 0.0 for m, (r, _) in scores[name].items()},
                       **{f"{m} ndcg@10": float(n[mask].mean()) if mask.any() else 0.0 for m, (_, n) in scores[name].items()}}
        out["buckets"][name] = rows
    sid = {i: tuple(r) for i, r in zip(rec.catalog.item_ids, rec.catalog.semantic_ids.tolist())}
    levels = len(next(iter(sid.values())))
    target = inputs["valid"][2]
    out["prefix_hits_valid"] = {}
    for _, _, b in BUCKETS:
        sel = np.flatnonzero(bucket["valid"] == b)
        if not len(sel):
            continue
        out["prefix_hits_valid"][b] = {
            m: [float(np.mean([any(sid[i][:n] == sid[target[u]][:n] for i in top10["valid"][m][u]) for u in sel]))
                for n in range(1, levels + 1)] for m in ("generator", "sasrec")}
    out["popularity_penalty"] = penalty
    # Test re-weighted to validation's bucket shares.
    out["test_reweighted_to_valid_mix"] = {
        metric: {m: float(sum(out["buckets"]["valid"][b]["share"] * out["buckets"]["test"][b][f"{m} {metric}"]
                              for _, _, b in BUCKETS)) for m in ("generator", "sasrec")}
        for metric in ("recall@10", "ndcg@10")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))

    print("| input | generator R@10 | generator N@10 | SASRec R@10 | SASRec N@10 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, v in out["overall"].items():
        print(f"| {name} | {v['generator']['recall@10']:.4f} | {v['generator']['ndcg@10']:.4f} "
              f"| {v['sasrec']['recall@10']:.4f} | {v['sasrec']['ndcg@10']:.4f} |")
    rw = out["test_reweighted_to_valid_mix"]
    print(f"| test, re-weighted to validation's target-count mix | {rw['recall@10']['generator']:.4f} | "
          f"{rw['ndcg@10']['generator']:.4f} | {rw['recall@10']['sasrec']:.4f} | {rw['ndcg@10']['sasrec']:.4f} |")
    print()
    print("| split | target's count in training | share of users | generator R@10 | SASRec R@10 | generator N@10 | SASRec N@10 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, rows in out["buckets"].items():
        for b, v in rows.items():
            print(f"| {name} | {b} | {v['share']:.3f} | {v['generator recall@10']:.4f} | {v['sasrec recall@10']:.4f} "
                  f"| {v['generator ndcg@10']:.4f} | {v['sasrec ndcg@10']:.4f} |")
    print()
    print(f"| validation bucket | model | top 10 shares the target's first 1..{levels} codes |")
    print("| --- | --- | --- |")
    for b, v in out["prefix_hits_valid"].items():
        for m, hits in v.items():
            print(f"| {b} | {m} | {' / '.join(f'{h:.3f}' for h in hits)} |")
    print()
    print("| alpha | valid generator R@10 / N@10 | valid SASRec R@10 / N@10 | test generator R@10 / N@10 | test SASRec R@10 / N@10 |")
    print("| ---: | --- | --- | --- | --- |")
    for a in map(str, ALPHAS):
        cells = [f"{penalty[s][a][m]['recall@10']:.4f} / {penalty[s][a][m]['ndcg@10']:.4f}"
                 for s in ("valid", "test") for m in ("generator", "sasrec")]
        print(f"| {a} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
