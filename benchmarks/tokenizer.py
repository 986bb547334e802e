"""Tokenizer benchmark: training throughput with 1 and 2 Ray Train workers, and the quality of
L_re (RQ-VAE) vs L_co (CoST) vs L_re + L_co (plus RQ-KMeans and random IDs) on real item text.

    python benchmarks/tokenizer.py --datasets ml-100k,amazon-scientific --epochs 20 \
        --runs-dir runs/bench-tokenizer --out runs/bench-tokenizer/tokenizer.json

For each dataset: the prepare and embed stages run once (jobs/configs/<dataset>.yaml, data under
../shared/data; cached in --runs-dir), then every variant trains in its own run directory (a fresh
Ray Train run) and the assign stage computes its diagnostics. Prints a table per dataset and writes
everything as JSON. The paper's claim to check: L_co preserves neighbourhoods (share of the 10
nearest neighbours sharing the first 1 / 2 codes) better than L_re.

Throughput = training samples per second, averaged over the epochs after the first (which includes
the k-means init), at the configured per-worker batch: with 2 workers the global batch (and the
InfoNCE denominator) doubles. On a shared 2-core machine the two workers compete for the same cores;
the load average is recorded next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA_DIRS = {"ml-100k": "movielens-100k", "amazon-scientific": "amazon-scientific-lcrec"}
log = logging.getLogger("benchmarks.tokenizer")


def base_config(dataset: str, data_root: Path, epochs: int, overrides: list[str]):
    from cost_dist.config import Config

    return Config.load(REPO / "jobs" / "configs" / f"{dataset}.yaml",
                       [f"data.path={data_root / DATA_DIRS[dataset]}", f"tokenizer.epochs={epochs}", *overrides])


def prepared_run(cfg, root: Path):
    """prepare + embed once per dataset (skipped when complete for this config)."""
    from cost_dist.pipeline import run_stage
    from cost_dist.rundir import RunDir

    run = RunDir(str(root / "base"))
    for stage in ("prepare", "embed"):
        run_stage(cfg, run, stage)
    return run


def variant(cfg, base, root: Path, label: str, overrides: dict) -> dict:
    """Train (tokenize) + assign one variant in a fresh run directory; its metrics."""
    import dataclasses

    from cost_dist.pipeline import run_stage
    from cost_dist.rundir import RunDir

    vcfg = dataclasses.replace(cfg)
    vcfg.tokenizer = dataclasses.replace(cfg.tokenizer, **{k: v for k, v in overrides.items() if k != "num_workers"})
    vcfg.resources = dataclasses.replace(cfg.resources)
    vcfg.resources.tokenizer = dataclasses.replace(cfg.resources.tokenizer,
                                                   num_workers=overrides.get("num_workers", cfg.resources.tokenizer.num_workers))
    vdir = root / "variants" / label
    if vdir.exists():
        shutil.rmtree(vdir)  # a fresh Ray Train run, never a resumed one
    run = RunDir(str(vdir))
    for stage in ("prepare", "embed"):
        shutil.copytree(base.path(stage), run.path(stage))
    t0 = time.time()
    run_stage(vcfg, run, "tokenize", force=True)
    run_stage(vcfg, run, "assign", force=True)
    m = run.read_metrics()
    m["bench_wall_s"] = time.time() - t0
    return m


def row(label: str, m: dict) -> dict:
    train = m["tokenizer"]["train"]
    diag = m["tokenizer"]["diagnostics"]
    out = {
        "variant": label,
        "workers": train.get("num_workers"),
        "samples_per_s": train.get("samples_per_s"),
        "np@1": diag["neighbourhood_preservation"].get("prefix1"),
        "np@2": diag["neighbourhood_preservation"].get("prefix2"),
        "collision_share": diag["collision_share"],
        "num_suffix": diag["num_suffix"],
        "recon_cos": diag.get("recon_cos"),
        "ppl": [round(lv["perplexity"], 1) for lv in diag["levels"]],
        "used": [lv["used"] for lv in diag["levels"]],
        "final_loss": (train.get("final") or {}).get("loss"),
        "train_wall_s": train.get("wall_s"),
    }
    return out


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def print_table(dataset: str, rows: list[dict]) -> None:
    cols = ["variant", "workers", "samples_per_s", "np@1", "np@2", "collision_share", "num_suffix", "recon_cos", "ppl", "used",
            "train_wall_s"]
    print(f"\n## {dataset}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="ml-100k", help="comma-separated: ml-100k, amazon-scientific")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--losses", default="re,co,re+co")
    p.add_argument("--workers", default="1,2", help="worker counts for the throughput rows (loss co)")
    p.add_argument("--baselines", default="rqkmeans,random")
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "bench-tokenizer"))
    p.add_argument("--out", default=None, help="JSON output (default RUNS_DIR/tokenizer.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"])
        else:
            ray.init(address="local", num_cpus=args.num_cpus,
                     runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    runs_dir = Path(args.runs_dir)
    results: dict = {"epochs": args.epochs, "load_avg_start": os.getloadavg(), "datasets": {}}
    for dataset in [d for d in args.datasets.split(",") if d]:
        cfg = base_config(dataset, Path(args.data_root), args.epochs, args.overrides)
        root = runs_dir / dataset
        base = prepared_run(cfg, root)
        rows = []
        workers = [int(w) for w in args.workers.split(",") if w]
        default_workers = cfg.resources.tokenizer.num_workers
        for loss in [x for x in args.losses.split(",") if x]:
            label = f"rqvae L_{loss}"
            m = variant(cfg, base, root, f"{loss}-w{default_workers}", {"method": "rqvae", "loss": loss})
            rows.append(row(label, m))
        for w in workers:
            if w == default_workers:
                continue  # the L_co row above already measured it
            m = variant(cfg, base, root, f"co-w{w}", {"method": "rqvae", "loss": "co", "num_workers": w})
            rows.append(row(f"rqvae L_co ({w} worker{'s' if w > 1 else ''})", m))
        for method in [x for x in args.baselines.split(",") if x]:
            m = variant(cfg, base, root, method, {"method": method})
            rows.append(row(method, m))
        results["datasets"][dataset] = {"num_items": rows[0] and base.read_metrics().get("data", {}).get("num_items"),
                                        "rows": rows, "load_avg_end": os.getloadavg()}
        print_table(dataset, rows)
    out = Path(args.out) if args.out else runs_dir / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
