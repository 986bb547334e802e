"""The generate stage: train the TIGER generator with Ray Train + DeepSpeed.

Driver: reads the sequences and the semantic IDs, builds every-prefix training examples (a Ray
Dataset, sharded over the workers) and a fixed sample of validation users, and runs the training
loop on Ray Train workers through cost_dist.distributed.

Worker loop (one DeepSpeed engine per worker, data-parallel):
- AdamW, lr 1e-3 class, weight decay 0.01, linear warmup then cosine decay to 0 over the planned
  steps (cfg.generator.schedule; "inverse_sqrt" and "constant" are there too). Why: the papers'
  TIGER reproductions train with a 1e-3-class LR and warmup; with a fixed epoch budget, cosine
  reaches a small LR at the end, which steadies the best-on-validation checkpoint, and with early
  stopping the warmup protects the first epochs of a small model from divergence.
- Global batch cfg.generator.batch_size (512), split evenly over the workers.
- After every `eval_every` epochs: validation Recall@10 / NDCG@10 by constrained beam search on the
  validation sample, each worker on its slice, summed over workers. When NDCG@10 improves, rank 0
  writes RUN/generate/best.pt. Early stopping after `patience` evaluations without improvement.
- Every epoch ends with a Ray Train checkpoint (engine + optimizer + LR schedule + RNG + loop state),
  so a rerun with the same run directory resumes from the last epoch; rank 0 also writes
  RUN/generate/last.pt (model weights) and RUN/generate/history.json.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa

from cost_dist.config import Config, GeneratorConfig
from cost_dist.errors import CheckpointError, DataError
from cost_dist.generator.data import eval_examples, group_by_length, history_lengths, training_examples
from cost_dist.generator.vocab import ItemCatalog, Vocabulary
from cost_dist.training import EarlyStopping, cpu_state_dict

log = logging.getLogger(__name__)

BEST = "generate/best.pt"
LAST = "generate/last.pt"
HISTORY = "generate/history.json"
POPULARITY = "generate/popularity.parquet"
TRAIN_NAME = "ray_train"


def load_splits(cfg: Config, run) -> dict[str, pa.Table]:
    from cost_dist.data.splits import leave_one_out

    sequences = run.read_parquet("prepare/sequences.parquet")
    return leave_one_out(sequences, cfg.data.max_len)


def load_catalog_checked(run) -> ItemCatalog:
    """codes.parquet + meta.json, checked against the prepared catalog (items.parquet) when present."""
    catalog = ItemCatalog.from_run(run)
    if run.exists("prepare/items.parquet"):
        items = set(run.read_parquet("prepare/items.parquet", columns=["item_id"]).column("item_id").to_pylist())
        coded = set(catalog.item_ids)
        if items != coded:
            missing, extra = items - coded, coded - items
            raise DataError(f"{run.uri('assign/codes.parquet')} disagrees with {run.uri('prepare/items.parquet')}: "
                            f"{len(missing)} catalog item(s) without a semantic ID (e.g. {sorted(missing)[:3]}), "
                            f"{len(extra)} coded item(s) not in the catalog (e.g. {sorted(extra)[:3]})")
    return catalog


def popularity_table(train: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    counts = pc.value_counts(pc.list_flatten(train.column("item_ids")))
    t = pa.table({"item_id": counts.field("values").cast(pa.string()), "count": counts.field("counts").cast(pa.int64())})
    return t.sort_by([("count", "descending"), ("item_id", "ascending")])


def run_generate_stage(cfg: Config, run) -> dict[str, Any]:
    import ray

    from cost_dist.distributed import run_training

    gcfg = cfg.generator
    _check_config(gcfg, cfg)
    splits = load_splits(cfg, run)
    catalog = load_catalog_checked(run)
    vocab = Vocabulary(catalog.num_levels, catalog.codebook_size, catalog.num_suffix, gcfg.num_user_tokens, cfg.data.max_len)
    examples = training_examples(vocab, catalog, splits["train"])
    valid = eval_examples(vocab, catalog, splits["valid"], "validation")
    if gcfg.valid_max_users and len(valid) > gcfg.valid_max_users:
        pick = np.random.default_rng(cfg.seed).choice(len(valid), gcfg.valid_max_users, replace=False)
        valid = valid[np.sort(pick)]
    run.write_parquet(POPULARITY, popularity_table(splits["train"]))
    workers = cfg.resources.generator
    global_batch = max(gcfg.batch_size, workers.num_workers)
    steps_per_epoch = math.ceil(len(examples) / global_batch)
    log.info("generator: %d training examples (every prefix), %d validation users, vocab %d, %d steps/epoch",
             len(examples), len(valid), vocab.size, steps_per_epoch)

    loop_config = {
        "generator": _as_dict(gcfg),
        "vocab": vocab.to_dict(),
        "semantic_ids": catalog.semantic_ids,
        "valid": valid,
        "run_uri": run.uri(),
        "seed": cfg.seed,
        "micro_batch_size": max(1, global_batch // workers.num_workers),
        "total_steps": steps_per_epoch * gcfg.epochs,
        "num_examples": len(examples),
    }
    dataset = ray.data.from_numpy(examples)
    t0 = time.time()
    run_training(generator_train_loop, loop_config, workers, run.uri("generate"), TRAIN_NAME, datasets={"train": dataset})
    wall = time.time() - t0
    if not run.exists(BEST):
        raise CheckpointError(f"training finished without writing {run.uri(BEST)}")
    state = run.read_json(HISTORY)
    return {"generator": {
        "history": state["history"],
        "best_epoch": state["best_epoch"],
        "best_valid": state["best_valid"],
        "stopped_early": state["stopped_early"],
        "num_train_examples": int(len(examples)),
        "num_valid_users": int(len(valid)),
        "num_params": state.get("num_params"),
        "vocab_size": vocab.size,
        "train_wall_s": round(wall, 2),
        "recipe": {"optimizer": "AdamW", "lr": gcfg.lr, "weight_decay": gcfg.weight_decay, "schedule": gcfg.schedule,
                   "warmup_steps": gcfg.warmup_steps, "global_batch": global_batch, "epochs": gcfg.epochs,
                   "patience": gcfg.patience, "label_smoothing": gcfg.label_smoothing, "workers": workers.num_workers},
    }}


def _check_config(gcfg: GeneratorConfig, cfg: Config) -> None:
    from cost_dist.config import ConfigError

    if gcfg.valid_beam_size < 10:
        raise ConfigError(f"generator.valid_beam_size must be >= 10 (validation ranks top 10), got {gcfg.valid_beam_size}")
    if gcfg.epochs < 1 or gcfg.batch_size < 1:
        raise ConfigError("generator.epochs and generator.batch_size must be >= 1")
    if gcfg.schedule not in ("cosine", "inverse_sqrt", "constant"):
        raise ConfigError(f"generator.schedule must be cosine, inverse_sqrt or constant, got {gcfg.schedule!r}")


def _as_dict(gcfg: GeneratorConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(gcfg)


def generator_train_loop(config: dict) -> None:
    """Ray Train worker loop (see the module docstring)."""
    import torch

    from cost_dist import distributed as D
    from cost_dist.config import _build
    from cost_dist.generator.constraints import PrefixIndex
    from cost_dist.generator.data import examples_to_tensors
    from cost_dist.generator.model import TigerModel
    from cost_dist.rundir import RunDir

    gcfg = _build(GeneratorConfig, config["generator"], "generator.")
    vocab = Vocabulary.from_dict(config["vocab"])
    rank, world = D.world_rank(), D.world_size()
    torch.manual_seed(config["seed"])
    model = TigerModel(vocab, gcfg)
    num_params = sum(p.numel() for p in model.parameters())
    engine = D.build_engine(model, gcfg.deepspeed, lr=gcfg.lr, weight_decay=gcfg.weight_decay,
                            micro_batch_size=config["micro_batch_size"], total_steps=config["total_steps"],
                            warmup_steps=gcfg.warmup_steps, schedule=gcfg.schedule)
    device = D.worker_device()
    run = RunDir(config["run_uri"])
    token_table = torch.from_numpy(vocab.item_tokens(config["semantic_ids"])).to(device)
    index = PrefixIndex(config["semantic_ids"], [s for _, s in vocab.position_ranges]).to(device)
    valid = config["valid"][rank::world]
    # Shortest histories first: each beam-search chunk is trimmed to its longest history.
    valid = valid[np.argsort(history_lengths(valid), kind="stable")]
    valid = torch.from_numpy(np.ascontiguousarray(valid)).to(device)

    state = D.load_latest_checkpoint(engine) or {}
    start_epoch = int(state["epoch"]) + 1 if "epoch" in state else 0
    stopping = EarlyStopping.restore(gcfg.patience, state)
    if start_epoch:
        log.info("rank %d: resuming at epoch %d (best NDCG@10 %.4f at epoch %d)", rank, start_epoch, stopping.best,
                 stopping.best_epoch)

    for epoch in range(start_epoch, gcfg.epochs):
        if stopping.stopped_early:
            break
        engine.train()
        total, count = 0.0, 0
        seed = config["seed"] * 1000 + epoch
        batches = D.dataset_shard_batches("train", config["micro_batch_size"], dtype=torch.int64, column="data",
                                          shuffle_buffer=min(config["num_examples"], 50_000), seed=seed)
        for packed in group_by_length(batches, gcfg.length_grouping, seed):
            input_ids, targets = examples_to_tensors(packed, token_table, vocab.max_len)
            loss = engine(input_ids, targets, gcfg.label_smoothing)
            engine.backward(loss)
            engine.step()
            total += float(loss.item()) * len(packed)
            count += len(packed)
        sums = D.all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64, device=device))
        train_loss = float(sums[0] / max(sums[1], 1.0))
        lr = float(engine.get_lr()[0]) if hasattr(engine, "get_lr") else gcfg.lr
        entry = {"epoch": epoch, "train_loss": round(train_loss, 5), "lr": lr}
        if (epoch + 1) % max(gcfg.eval_every, 1) == 0 or epoch == gcfg.epochs - 1:
            metrics = validate(engine.module, index, valid, token_table, vocab, gcfg.valid_beam_size, device)
            entry.update({"valid_recall@10": round(metrics["recall@10"], 5), "valid_ndcg@10": round(metrics["ndcg@10"], 5)})
            if stopping.update(metrics["ndcg@10"], metrics, epoch) and rank == 0:
                run.write_torch(BEST, {"config": config["generator"], "vocab": vocab.to_dict(), "epoch": epoch,
                                       "valid": metrics, "state_dict": cpu_state_dict(engine.module)})
        stopping.history.append(entry)
        log.info("rank %d epoch %d: %s", rank, epoch, entry)
        if rank == 0:
            run.write_torch(LAST, {"config": config["generator"], "vocab": vocab.to_dict(), "epoch": epoch,
                                   "state_dict": cpu_state_dict(engine.module)})
            run.write_json(HISTORY, {**stopping.state(), "num_params": num_params})
        D.save_checkpoint(engine, epoch, {k: v for k, v in entry.items() if k != "epoch"}, extra=stopping.state())
    if rank == 0 and not run.exists(HISTORY):
        run.write_json(HISTORY, {**stopping.state(), "num_params": num_params})


def validate(model, index, valid, token_table, vocab: Vocabulary, beam_size: int, device, batch_users: int = 128) -> dict[str, float]:
    """Recall@10 / NDCG@10 by constrained beam search on this worker's validation rows, summed over workers."""
    import torch

    from cost_dist import distributed as D
    from cost_dist.generator.data import examples_to_tensors
    from cost_dist.generator.search import beam_search

    was_training = model.training
    model.eval()
    hits = ndcg = 0.0
    for lo in range(0, len(valid), batch_users):
        packed = valid[lo:lo + batch_users]
        input_ids, _ = examples_to_tensors(packed, token_table, vocab.max_len)
        rows, _ = beam_search(model, index, input_ids, k=10, beam_size=beam_size)
        match = rows == packed[:, 1:2].long()
        found = match.any(1)
        rank = match.float().argmax(1) + 1
        hits += float(found.sum())
        ndcg += float((found.float() / torch.log2(rank.float() + 1)).sum())
    if was_training:
        model.train()
    sums = D.all_reduce_sum(torch.tensor([hits, ndcg, float(len(valid))], dtype=torch.float64, device=device))
    n = max(float(sums[2]), 1.0)
    return {"recall@10": float(sums[0]) / n, "ndcg@10": float(sums[1]) / n}
