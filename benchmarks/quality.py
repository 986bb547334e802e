"""Quality benchmark: every tokenizer variant and the baselines, leave-one-out, full catalog, several seeds.

    python benchmarks/quality.py \\
        --datasets ml-100k=../shared/data/movielens-100k,amazon-lcrec=../shared/data/amazon-scientific-lcrec,ml-latest-small=../shared/data/movielens-latest-small \\
        --methods random,rqvae,cost,rqvae+cost,rqkmeans,rqkmeans-bal,pop,dense,sasrec --seeds 0,1,2 --out benchmarks/out/quality

    python benchmarks/quality.py --smoke --out /tmp/quality-smoke    # tiny synthetic data, CI

A dataset is `LOADER=PATH` (LOADER: a `data.dataset` name such as ml-100k, ml-latest-small,
amazon-lcrec; PATH: its folder, read in place, never copied). Its config is
jobs/configs/quality-<LOADER>.yaml when that file exists (the validation-chosen settings), else the
defaults; `--set key=value` overrides apply to every run.

Methods:
- random, rqkmeans, rqkmeans-bal (equal-size clusters per level), rqvae (L_re), cost (L_co),
  rqvae+cost (L_re + L_co): the full generative pipeline
  (cost_dist.pipeline.run_pipeline) with that tokenizer, one run directory per seed; the method's
  metrics are the evaluate stage's `cost-dist` entry (best-on-validation generator checkpoint).
- pop, dense: cost_dist.baselines on the dataset's prepared data and embeddings (deterministic: one
  run, std 0).
- sasrec: cost_dist.sasrec trained per seed on the same splits.
Everything is scored by cost_dist.metrics with the config's `evaluate` settings (ks, exclude_seen).

prepare and embed run once per dataset (OUT/runs/<dataset>/base) and are shared: each method/seed run
directory gets hard links to them, marked complete for its own config (the prepared data and the
embeddings of a real dataset do not depend on the seed or the method; the synthetic dataset draws its
data from the seed, so it gets one base per seed). Rerunning the command skips every finished stage.

Writes OUT/results.json (per dataset, method and seed: valid/test metrics, wall time, errors),
OUT/results.md (mean ± std over seeds of the test metrics, sample std) and OUT/recall_at_k.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

log = logging.getLogger("benchmarks.quality")

GENERATIVE = {
    "random": ["tokenizer.method=random"],
    "rqkmeans": ["tokenizer.method=rqkmeans"],
    "rqkmeans-bal": ["tokenizer.method=rqkmeans", "tokenizer.kmeans_balanced=true"],
    "rqvae": ["tokenizer.method=rqvae", "tokenizer.loss=re"],
    "cost": ["tokenizer.method=rqvae", "tokenizer.loss=co"],
    "rqvae+cost": ["tokenizer.method=rqvae", "tokenizer.loss=re+co"],
}
BASELINES = ("pop", "dense", "sasrec")
METHODS = (*GENERATIVE, *BASELINES)
LABELS = {"random": "random IDs", "rqkmeans": "RQ-KMeans", "rqkmeans-bal": "RQ-KMeans (balanced)",
          "rqvae": "RQ-VAE (L_re)", "cost": "CoST (L_co)", "rqvae+cost": "L_re + L_co",
          "pop": "Pop", "dense": "dense (faiss)", "sasrec": "SASRec"}
SHARED_STAGES = ("prepare", "embed")
# Suffix of the metrics with the user's whole past masked (RecBole's full-sort protocol, the
# reference numbers' setting, and the evaluate stage's default, evaluate.mask_whole_past); without
# it, exclude_seen masks the last max_len items. The baselines scored here (pop, dense, sasrec) have
# both; the generative methods have the one their evaluate stage used.
FULLMASK = "_fullmask"

# The smoke run: a small synthetic catalog and short training, so CI runs the whole script quickly.
SMOKE_OVERRIDES = [
    "data.dataset=synthetic", "data.synthetic.num_items=120", "data.synthetic.num_users=150",
    "data.synthetic.num_topics=6", "data.synthetic.min_seq_len=5", "data.synthetic.max_seq_len=12",
    "data.max_len=10", "embed.batch_size=64",
    "tokenizer.num_levels=2", "tokenizer.codebook_size=8", "tokenizer.batch_size=64", "tokenizer.epochs=2",
    "tokenizer.kmeans_init_iters=10",
    "generator.num_encoder_layers=1", "generator.num_decoder_layers=1", "generator.d_model=32",
    "generator.num_heads=2", "generator.d_kv=16", "generator.d_ff=64", "generator.num_user_tokens=0",
    "generator.batch_size=128", "generator.epochs=1", "generator.warmup_steps=2", "generator.valid_max_users=50",
    "evaluate.batch_size=128", "evaluate.baselines=[]",
    "sasrec.hidden=32", "sasrec.inner_size=64", "sasrec.batch_size=256", "sasrec.epochs=3", "sasrec.patience=2",
    "resources.embed.min_actors=1", "resources.embed.max_actors=1", "resources.evaluate.parallelism=1",
]
SMOKE_METHODS = ("random", "pop", "dense", "sasrec")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="", help="comma-separated LOADER=PATH (e.g. ml-100k=../shared/data/movielens-100k)")
    p.add_argument("--methods", default=None, help=f"comma-separated, from: {', '.join(METHODS)} (default: all)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --smoke: 0)")
    p.add_argument("--out", required=True, help="output folder (run directories, results.json/md, plot)")
    p.add_argument("--config-dir", default=str(REPO / "jobs" / "configs"),
                   help="where quality-<LOADER>.yaml configs are looked up")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (repeatable)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster, if one is started")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic dataset, 1 seed, a few methods (CI)")
    p.add_argument("--collect-only", action="store_true",
                   help="train nothing: score what the run directories hold now (SASRec's best checkpoint so far, "
                        "marked partial if its training has not finished)")
    p.add_argument("--previous", default=None, metavar="RESULTS_JSON",
                   help="with --collect-only: an earlier results.json whose finished runs fill in the runs this "
                        "--out folder has no results for (run folders made on another machine), marked in the table")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing run instead of recording it")
    args = p.parse_args(argv)
    from cost_dist.errors import CostDistError

    if args.smoke:
        args.datasets = args.datasets or "synthetic=-"
        args.methods = args.methods or ",".join(SMOKE_METHODS)
        args.seeds = args.seeds or "0"
    if not args.datasets:
        raise CostDistError("--datasets is required (LOADER=PATH,...), or --smoke")
    args.methods = [m.strip() for m in (args.methods or ",".join(METHODS)).split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise CostDistError(f"--methods: unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    try:
        args.seeds = [int(s) for s in (args.seeds or "0,1,2").split(",") if s.strip()]
    except ValueError:
        raise CostDistError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    datasets = []
    for spec in args.datasets.split(","):
        if not spec.strip():
            continue
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise CostDistError(f"--datasets entry {spec!r} must look like LOADER=PATH")
        name, path = name.strip(), path.strip()
        if name != "synthetic" and not Path(path).exists():
            raise CostDistError(f"--datasets {name}: folder {path} does not exist")
        datasets.append((name, path))
    args.datasets = datasets
    if args.previous:
        if not args.collect_only:
            raise CostDistError("--previous only fills in runs for --collect-only")
        try:
            args.previous_results = json.loads(Path(args.previous).read_text())
        except (OSError, ValueError) as exc:
            raise CostDistError(f"--previous {args.previous}: not a readable results.json ({exc})") from None
    else:
        args.previous_results = None
    return args


# --------------------------------------------------------------------------------------------------
# Configs and run directories
# --------------------------------------------------------------------------------------------------


def dataset_config(args: argparse.Namespace, name: str, path: str, seed: int, method_overrides: list[str]):
    from cost_dist.config import Config

    overrides: list[str] = []
    config_file = Path(args.config_dir) / f"quality-{name}.yaml"
    if args.smoke:
        overrides += SMOKE_OVERRIDES
        config_file = None
    elif not config_file.exists():
        log.warning("%s not found: %s runs with the default config", config_file, name)
        config_file = None
    if name != "synthetic":
        overrides += [f"data.dataset={name}", f"data.path={os.path.abspath(path)}"]
    overrides += [f"name=quality-{name}", f"seed={seed}", *method_overrides, *args.overrides]
    # Recorded relative to the repository when inside it, so committed results name no machine's paths.
    shown = None
    if config_file:
        resolved = config_file.resolve()
        shown = str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(config_file)
    return Config.load(config_file, overrides), shown


def base_seed(cfg, seed: int) -> int:
    """The seed the shared prepare/embed run is made with. The synthetic dataset is drawn from the
    seed; a real dataset is the same for every seed, so its one base is always made with seed 0:
    prepare's fingerprint includes the seed, and a base made with each run's own seed would be
    cleared and re-embedded at every change of seed (and under a concurrent run of another seed)."""
    return seed if cfg.data.dataset == "synthetic" else 0


def base_run_name(cfg, seed: int) -> str:
    return f"base-seed{seed}" if cfg.data.dataset == "synthetic" else "base"


def shared_stages(methods: list[str]) -> tuple[str, ...]:
    """prepare, and embed only when a method reads the embeddings (pop and sasrec do not)."""
    needs_embed = any(m in GENERATIVE or m == "dense" for m in methods)
    return SHARED_STAGES if needs_embed else SHARED_STAGES[:1]


def prepare_base(cfg, run, num_cpus: int | None, methods: list[str]) -> None:
    from cost_dist.pipeline import run_pipeline

    run_pipeline(cfg, run, stages=shared_stages(methods), num_cpus=num_cpus)


def link_shared_stages(base, run, cfg) -> None:
    """Hard-link base's prepare/embed outputs into `run`, marked complete for `run`'s config."""
    from cost_dist.pipeline import stage_fingerprints

    fps = stage_fingerprints(cfg)
    for stage in SHARED_STAGES:
        if not base.is_complete(stage):  # not needed by the methods of this benchmark
            continue
        if run.is_complete(stage, fps[stage]):
            continue
        if run.exists(stage):
            run.delete(stage)
        src, dst = Path(base.path(stage)), Path(run.path(stage))
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(src, dst, copy_function=os.link)
        except OSError:  # another filesystem: copy instead
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
        run.mark_complete(stage, fps[stage], shared_from=base.uri(stage))
    base_metrics = base.read_metrics()
    run.update_metrics({k: base_metrics[k] for k in ("data", "embed") if k in base_metrics})


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------


def run_generative(cfg, run, num_cpus: int | None) -> dict[str, Any]:
    from cost_dist.evaluate import METHOD
    from cost_dist.pipeline import run_pipeline

    metrics = run_pipeline(cfg, run, num_cpus=num_cpus)
    ev = metrics["evaluate"]
    # The evaluate stage masks one protocol: the whole past (mask_whole_past) or the history window.
    suffix = FULLMASK if cfg.evaluate.exclude_seen and cfg.evaluate.mask_whole_past else ""
    return {f"valid{suffix}": ev["valid"][METHOD], f"test{suffix}": ev["test"][METHOD],
            "best_epoch": metrics.get("generator", {}).get("best_epoch"),
            "tokenizer": {k: v for k, v in (metrics.get("tokenizer", {}).get("diagnostics") or {}).items()
                          if isinstance(v, (int, float, str))}}


def run_static_baselines(cfg, base, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Pop and dense on the base run, scored like the evaluate stage (same users, ks, exclude_seen)."""
    from cost_dist.baselines import DenseRanker, PopularityRanker
    from cost_dist.metrics import ranking_metrics
    from cost_dist.data.splits import run_whole_past, sample_users
    from cost_dist.sasrec.train import load_splits

    ks = sorted(set(int(k) for k in cfg.evaluate.ks))
    splits = load_splits(cfg, base)
    rankers: dict[str, Any] = {}
    if "pop" in methods:
        rankers["pop"] = lambda h: PopularityRanker(splits["train"]).rank(h, ks[-1], cfg.evaluate.exclude_seen)
    if "dense" in methods:
        dense = DenseRanker(base.read_parquet("embed/embeddings.parquet"), base.uri("embed/embeddings.parquet"))
        rankers["dense"] = lambda h: dense.rank(h, ks[-1], cfg.data.max_len, cfg.evaluate.exclude_seen)
    past = run_whole_past(base)
    out: dict[str, dict[str, Any]] = {}
    for method, rank in rankers.items():
        t0 = time.time()
        out[method] = {}
        for split in ("valid", "test"):
            table = sample_users(splits[split], cfg.evaluate.max_users, cfg.seed)
            targets = table.column("target").to_pylist()
            out[method][split] = ranking_metrics(rank(table.column("history").to_pylist()), targets, ks)
            # The whole past as the history: Pop ignores the history except for masking, and dense
            # queries with its last max_len items, so only the masked set changes.
            whole = sample_users(past[split], cfg.evaluate.max_users, cfg.seed).column("history").to_pylist()
            out[method][f"{split}{FULLMASK}"] = ranking_metrics(rank(whole), targets, ks)
        out[method]["wall_s"] = round(time.time() - t0, 2)
    return out


def static_inputs_ready(base, method: str, data: dict[str, Any]) -> bool:
    """Whether the base run holds what a static baseline is scored on: the prepared splits, and for
    dense the item embeddings too."""
    return bool(data) and (method != "dense" or base.exists("embed/embeddings.parquet"))


class NotRunYet(RuntimeError):
    """--collect-only found no results for a run: reported as not run, not as failed."""


def run_sasrec(cfg, run, num_cpus: int | None, collect_only: bool = False) -> dict[str, Any]:
    from cost_dist.distributed import init_ray
    from cost_dist.sasrec import ensure_sasrec, evaluate_sasrec

    if collect_only:
        return collect_sasrec(cfg, run)
    init_ray(num_cpus=num_cpus)
    ensure_sasrec(cfg, run)
    metrics = run.read_metrics()["sasrec"]
    window = evaluate_sasrec(cfg, run, mask_full_history=False)
    whole = evaluate_sasrec(cfg, run, mask_full_history=True)
    return {"valid": window["valid"], "test": window["test"],
            f"valid{FULLMASK}": whole["valid"], f"test{FULLMASK}": whole["test"],
            "best_epoch": metrics["best_epoch"], "epochs_run": len(metrics["history"]),
            "train_wall_s": metrics["train_wall_s"]}


def collect_sasrec(cfg, run) -> dict[str, Any]:
    """--collect-only: score the best-on-validation checkpoint a (possibly still running) training has
    written so far, marked partial when training has not finished."""
    from cost_dist.sasrec import evaluate_sasrec
    from cost_dist.sasrec.train import BEST, HISTORY, STAGE

    if not run.exists(BEST):
        raise NotRunYet(f"no {run.uri(BEST)} yet")
    history = run.read_json(HISTORY) if run.exists(HISTORY) else {"history": []}
    window = evaluate_sasrec(cfg, run, mask_full_history=False)
    whole = evaluate_sasrec(cfg, run, mask_full_history=True)
    return {"valid": window["valid"], "test": window["test"], f"valid{FULLMASK}": whole["valid"],
            f"test{FULLMASK}": whole["test"], "best_epoch": window["best_epoch"],
            "epochs_run": len(history["history"]), "stopped_early": history.get("stopped_early"),
            "partial": not run.is_complete(STAGE), "history": history["history"]}


def previous_entry(previous: dict[str, Any] | None, dataset: str) -> dict[str, Any]:
    """A dataset's entry in an earlier results.json (--previous); empty without one."""
    return (previous or {}).get("datasets", {}).get(dataset, {})


def previous_run(previous: dict[str, Any] | None, dataset: str, method: str, seed: int) -> dict[str, Any] | None:
    """A finished run of an earlier results.json (--previous), marked as taken from it; None if it has none."""
    run = previous_entry(previous, dataset).get("runs", {}).get(method, {}).get(str(seed))
    if not run or not any(key.startswith("test") for key in run):
        return None
    return {**run, "from_previous": True}


def collect_generative(run) -> dict[str, Any]:
    from cost_dist.evaluate import METHOD

    ev = run.read_metrics().get("evaluate")
    if not ev:
        raise NotRunYet(f"{run.uri()} has no evaluate results (run without --collect-only)")
    suffix = FULLMASK if ev.get("settings", {}).get("masked") == "whole past" else ""
    return {f"valid{suffix}": ev["valid"][METHOD], f"test{suffix}": ev["test"][METHOD]}


# --------------------------------------------------------------------------------------------------
# Aggregation and outputs
# --------------------------------------------------------------------------------------------------


def metric_names(ks: list[int]) -> list[str]:
    return [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]


def aggregate(per_seed: dict[str, Any], names: list[str], split: str = "test") -> dict[str, Any]:
    """mean and sample std (ddof=1; 0 for one seed) of each metric of `split` over the seeds that finished."""
    done = [r for r in per_seed.values() if isinstance(r, dict) and split in r]
    out: dict[str, Any] = {"seeds": len(done), "failed": len([r for r in per_seed.values() if "error" in r]),
                           "not_run": len([r for r in per_seed.values() if "not_run" in r])}
    for name in names:
        values = [float(r[split][name]) for r in done if name in r[split]]
        if not values:
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        out[name] = {"mean": mean, "std": std}
    return out


def summarize(entry: dict[str, Any], methods: list[str], names: list[str]) -> None:
    entry["summary"] = {m: aggregate(entry["runs"][m], names) for m in methods}
    entry["summary_fullmask"] = {m: aggregate(entry["runs"][m], names, f"test{FULLMASK}") for m in methods}
    entry["summary_fullmask"] = {m: a for m, a in entry["summary_fullmask"].items() if a["seeds"]}


def markdown(results: dict[str, Any]) -> str:
    names = results["metric_names"]
    short = [n.replace("recall@", "R@").replace("ndcg@", "N@") for n in names]
    lines = ["# Quality benchmark (test split, leave-one-out, full catalog)", "",
             f"Command: `{results['command']}`", "",
             f"Mean ± sample std over seeds; `n` = seeds that finished. exclude_seen per dataset below. "
             f"Machine: {results['machine']}.", ""]
    for dataset, entry in results["datasets"].items():
        lines += [f"## {dataset}", "",
                  f"Path: `{entry['path']}`; config: `{entry['config_file'] or 'defaults'}`; "
                  f"exclude_seen: {entry['exclude_seen']}; users: {entry.get('num_users', '?')}; "
                  f"items: {entry.get('num_items', '?')}", "",
                  ]
        tables = [("History masked: the user's whole past (the reference numbers' protocol)", entry.get("summary_fullmask") or {}),
                  ("History masked: the last max_len items only" if entry["exclude_seen"]
                   else "No masking (evaluate.exclude_seen false)", entry["summary"])]
        for title, summary in tables:
            if not summary:
                continue
            lines += [f"{title}:", "", "| method | n | " + " | ".join(short) + " |",
                      "| --- | ---: | " + " | ".join(["---:"] * len(short)) + " |"]
            for method, agg in summary.items():
                if not agg["seeds"] and not agg["failed"]:
                    continue  # measured under the other protocol only
                cells = []
                for name in names:
                    v = agg.get(name)
                    cells.append("–" if v is None else (f"{v['mean']:.4f} ± {v['std']:.4f}" if agg["seeds"] > 1 else f"{v['mean']:.4f}"))
                n = f"{agg['seeds']}" + (f" ({agg['failed']} failed)" if agg["failed"] else "")
                n += f" ({agg['not_run']} not run)" if agg.get("not_run") else ""
                partial = [r for r in entry["runs"][method].values() if r.get("partial")]
                if partial:
                    n += " (partial: stopped at epoch " + ", ".join(str(r["epochs_run"]) for r in partial) + ")"
                lines.append(f"| {LABELS.get(method, method)} | {n} | " + " | ".join(cells) + " |")
            lines.append("")
        errors = [(m, s, r["error"]) for m, per in entry["runs"].items() for s, r in per.items() if "error" in r]
        if errors:
            lines += ["", "Failed runs:"] + [f"- {m} seed {s}: {e}" for m, s, e in errors]
        earlier = [(m, s) for m, per in entry["runs"].items() for s, r in per.items() if r.get("from_previous")]
        if earlier:
            lines += ["", f"Taken from the earlier results file `{results.get('previous')}` (no results for the current "
                      "config and data in this --out: no run folder, or one made before either changed): "
                      + ", ".join(f"{LABELS.get(m, m)} seed {s}" for m, s in earlier)]
        not_run = [(m, s) for m, per in entry["runs"].items() for s, r in per.items() if "not_run" in r]
        if not_run:
            lines += ["", "Not run yet (`--collect-only` found no results): "
                      + ", ".join(f"{LABELS.get(m, m)} seed {s}" for m, s in not_run)]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any]) -> bytes | None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results["datasets"])
    if not datasets:
        return None
    ks = results["ks"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.0), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        entry = results["datasets"][dataset]
        # The whole-past protocol where a method has it (the reference numbers' one), else the window.
        summary = {**entry["summary"], **(entry.get("summary_fullmask") or {})}
        for method, agg in summary.items():
            if not agg["seeds"]:
                continue
            means = [agg.get(f"recall@{k}", {}).get("mean", math.nan) for k in ks]
            stds = [agg.get(f"recall@{k}", {}).get("std", 0.0) for k in ks]
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=LABELS.get(method, method))
        ax.set_xticks(ks)
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K (test)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(out_dir: Path, results: dict[str, Any]) -> None:
    from cost_dist.rundir import RunDir

    out = RunDir(str(out_dir))  # temp + rename: a reader never sees half a results file
    out.write_json("results.json", results)
    out.write_text("results.md", markdown(results))
    png = plot(results)
    if png:
        out.write_bytes("recall_at_k.png", png)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from cost_dist.rundir import RunDir

    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"command": command, "methods": args.methods, "seeds": args.seeds,
                               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
                               "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "datasets": {}}
    if args.previous:
        results["previous"] = args.previous
    generative = [m for m in args.methods if m in GENERATIVE]
    for name, path in args.datasets:
        cfg0, config_file = dataset_config(args, name, path, args.seeds[0], [])
        ks = sorted(set(int(k) for k in cfg0.evaluate.ks))
        results["ks"], results["metric_names"] = ks, metric_names(ks)
        entry: dict[str, Any] = {"path": path, "config_file": config_file, "exclude_seen": cfg0.evaluate.exclude_seen,
                                 "runs": {m: {} for m in args.methods}, "summary": {}}
        results["datasets"][name] = entry
        root = RunDir(str(out_dir / "runs" / name))
        for seed in args.seeds:
            cfg_seed, _ = dataset_config(args, name, path, seed, [])
            base = RunDir(root.uri(base_run_name(cfg_seed, seed)))
            t0 = time.time()
            try:
                if not args.collect_only:
                    shared_seed = base_seed(cfg_seed, seed)
                    cfg_base = cfg_seed if shared_seed == seed else dataset_config(args, name, path, shared_seed, [])[0]
                    prepare_base(cfg_base, base, args.num_cpus, args.methods)
            except Exception as exc:  # noqa: BLE001 - recorded, the other datasets still run
                if args.fail_fast:
                    raise
                log.error("%s: prepare/embed failed: %s", name, exc)
                for m in args.methods:
                    entry["runs"][m][str(seed)] = {"error": f"prepare/embed: {type(exc).__name__}: {exc}"}
                continue
            data = base.read_metrics().get("data", {})
            earlier_entry = previous_entry(args.previous_results, name)
            entry["num_users"] = data.get("num_users", data.get("users", earlier_entry.get("num_users")))
            entry["num_items"] = data.get("num_items", data.get("items", earlier_entry.get("num_items")))
            log.info("%s seed %d: shared prepare/embed ready in %.1f s", name, seed, time.time() - t0)
            static = [m for m in ("pop", "dense") if m in args.methods]
            if static and (seed == args.seeds[0] or cfg_seed.data.dataset == "synthetic"):
                earlier = {m: previous_run(args.previous_results, name, m, seed) for m in static}
                # A collect scores here what this --out holds the inputs for and takes the rest from
                # --previous: a SASRec-only run prepares the data but never embeds it, so dense cannot be.
                here = [m for m in static if not (args.collect_only and earlier[m])
                        or static_inputs_ready(base, m, data)]
                computed = {m: earlier[m] for m in static if m not in here}
                if here:
                    computed.update(_guard(args, entry, here, seed, lambda: run_static_baselines(cfg_seed, base, here)))
                for method, res in computed.items():
                    entry["runs"][method][str(seed)] = res
            for method in generative + (["sasrec"] if "sasrec" in args.methods else []):
                # SASRec is its own method here, trained once per seed: not again inside each generative run.
                method_overrides = [*GENERATIVE[method], "sasrec.enabled=false"] if method in GENERATIVE else []
                cfg, _ = dataset_config(args, name, path, seed, method_overrides)
                run = RunDir(root.uri(f"{method}-seed{seed}"))
                t0 = time.time()
                log.info("%s: %s seed %d -> %s", name, method, seed, run.uri())
                try:
                    if args.collect_only:
                        res = collect_sasrec(cfg, run) if method == "sasrec" else collect_generative(run)
                    else:
                        link_shared_stages(base, run, cfg)
                        res = run_sasrec(cfg, run, args.num_cpus) if method == "sasrec" else run_generative(cfg, run, args.num_cpus)
                    res["wall_s"] = round(time.time() - t0, 2)
                except NotRunYet as exc:
                    res = previous_run(args.previous_results, name, method, seed)
                    if res is None:
                        log.warning("%s %s seed %d: %s", name, method, seed, exc)
                        res = {"not_run": str(exc)}
                except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
                    if args.fail_fast:
                        raise
                    log.error("%s %s seed %d failed: %s\n%s", name, method, seed, exc, traceback.format_exc())
                    res = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
                entry["runs"][method][str(seed)] = res
                summarize(entry, args.methods, results["metric_names"])
                write_outputs(out_dir, results)  # partial results survive an interrupted benchmark
        summarize(entry, args.methods, results["metric_names"])
        write_outputs(out_dir, results)
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_outputs(out_dir, results)
    return results


def _guard(args, entry, methods, seed, fn) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        if args.fail_fast:
            raise
        log.error("baselines %s failed: %s", methods, exc)
        return {m: {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]} for m in methods}


def main(argv: list[str] | None = None) -> int:
    from cost_dist.errors import CostDistError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in argv)
    try:
        args = parse_args(argv)
        results = run_benchmark(args, command)
    except CostDistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(results))
    print(f"\nwrote {Path(args.out).resolve() / 'results.md'}")
    failed = sum(agg["failed"] for e in results["datasets"].values() for agg in e["summary"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
