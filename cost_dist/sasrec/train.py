"""Train the SASRec baseline with Ray Train + DeepSpeed on the same leave-one-out splits as the generator.

Driver (`train_sasrec`): reads RUN/prepare/{items,sequences}.parquet, builds the training windows
(cost_dist.sasrec.data) and the validation users, and runs `sasrec_train_loop` on
`cfg.resources.sasrec` Ray Train workers through cost_dist.distributed (the same glue as the
tokenizer and the generator).

Worker loop (one DeepSpeed engine per worker, data-parallel):
- AdamW at a constant LR (the reference recipe: lr 1e-3, no schedule), global batch
  cfg.sasrec.batch_size split over the workers.
- The windows are small integer arrays, handed to every worker in the loop config; each epoch all
  workers draw the same permutation (seeded by seed and epoch) and take their slice of every global
  batch, so every worker runs the same number of steps and a rerun is reproducible. (A Ray Dataset
  would stream them; at ~10^5 windows of 20 ints its per-epoch start-up costs more than the epoch.)
- After every `eval_every` epochs: validation NDCG@10 / Recall@10 over the whole catalog (each
  worker scores its slice of the validation users, sums are all-reduced). When NDCG@10 improves,
  rank 0 writes RUN/sasrec/best.pt; training stops after `patience` validations without improvement.
- Every epoch ends with a Ray Train checkpoint (engine, optimizer, RNG, loop state), so a rerun with
  the same run directory resumes; rank 0 also writes RUN/sasrec/history.json.

Validation honours `evaluate.exclude_seen` like the test evaluation, so the checkpoint is chosen by
the same rule it is scored with.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from cost_dist.config import Config, ConfigError, SASRecConfig
from cost_dist.errors import CheckpointError, DataError
from cost_dist.rundir import fingerprint
from cost_dist.sasrec.data import ItemIndex, eval_arrays, training_windows
from cost_dist.training import EarlyStopping, cpu_state_dict

log = logging.getLogger(__name__)

STAGE = "sasrec"
BEST = "sasrec/best.pt"
HISTORY = "sasrec/history.json"
RESULTS = "sasrec/results.json"
TRAIN_NAME = "ray_train"


def check_config(scfg: SASRecConfig, max_len: int) -> None:
    if scfg.hidden < 1 or scfg.num_heads < 1 or scfg.hidden % scfg.num_heads:
        raise ConfigError(f"sasrec.hidden ({scfg.hidden}) must be a positive multiple of sasrec.num_heads ({scfg.num_heads})")
    if scfg.num_blocks < 1 or scfg.inner_size < 1:
        raise ConfigError("sasrec.num_blocks and sasrec.inner_size must be >= 1")
    if not 0.0 <= scfg.dropout < 1.0:
        raise ConfigError(f"sasrec.dropout must be in [0, 1), got {scfg.dropout}")
    if scfg.epochs < 1 or scfg.batch_size < 1 or scfg.patience < 1 or scfg.eval_every < 1:
        raise ConfigError("sasrec.epochs, sasrec.batch_size, sasrec.patience and sasrec.eval_every must be >= 1")
    if scfg.lr <= 0:
        raise ConfigError(f"sasrec.lr must be > 0, got {scfg.lr}")
    if not 0 <= scfg.window_stride <= max_len:
        raise ConfigError(f"sasrec.window_stride must be in 0..data.max_len ({max_len}), got {scfg.window_stride}")


def load_item_index(run) -> ItemIndex:
    rel = "prepare/items.parquet"
    if not run.exists(rel):
        raise DataError(f"missing {run.uri(rel)}: run the prepare stage first")
    table = run.read_parquet(rel, columns=["item_id"])
    return ItemIndex(table.column("item_id").to_pylist())


def load_splits(cfg: Config, run):
    from cost_dist.data.splits import leave_one_out

    rel = "prepare/sequences.parquet"
    if not run.exists(rel):
        raise DataError(f"missing {run.uri(rel)}: run the prepare stage first")
    return leave_one_out(run.read_parquet(rel), cfg.data.max_len)


def sasrec_fingerprint(cfg: Config, run) -> str:
    """What the trained model depends on: its config, the history length, the seed, the prepared data."""
    prepare = run.stage_fingerprint("prepare") if run.exists("prepare") else None
    return fingerprint("sasrec", cfg.section_hash("sasrec", "data.max_len", "seed", "evaluate.exclude_seen"),
                       cfg.resources.sasrec.num_workers, prepare)


def train_sasrec(cfg: Config, run) -> str:
    """Train SASRec on RUN's prepared data; returns the URI of the best-on-validation checkpoint.

    A rerun with the same run directory resumes from the last epoch's Ray Train checkpoint.
    """
    from cost_dist.distributed import run_training

    scfg = cfg.sasrec
    max_len = cfg.data.max_len
    check_config(scfg, max_len)
    index = load_item_index(run)
    splits = load_splits(cfg, run)
    stride = scfg.window_stride or max(1, max_len // 2)
    inputs, targets = training_windows(splits["train"], index, max_len, stride)
    valid_hist, valid_target = eval_arrays(splits["valid"], index, max_len, "validation")
    if scfg.valid_max_users and len(valid_target) > scfg.valid_max_users:
        pick = np.sort(np.random.default_rng(cfg.seed).choice(len(valid_target), scfg.valid_max_users, replace=False))
        valid_hist, valid_target = valid_hist[pick], valid_target[pick]
    workers = cfg.resources.sasrec
    global_batch = max(scfg.batch_size, workers.num_workers)
    log.info("sasrec: %d items, %d training windows (%d targets), %d validation users, global batch %d",
             len(index), len(inputs), int((targets > 0).sum()), len(valid_target), global_batch)
    loop_config = {
        "sasrec": dataclasses.asdict(scfg),
        "num_items": len(index),
        "max_len": max_len,
        "item_ids": index.item_ids,
        "inputs": inputs,
        "targets": targets,
        "valid_history": valid_hist,
        "valid_target": valid_target,
        "exclude_seen": bool(cfg.evaluate.exclude_seen),
        "global_batch": global_batch,
        "run_uri": run.uri(),
        "seed": cfg.seed,
    }
    t0 = time.time()
    run_training(sasrec_train_loop, loop_config, workers, run.uri(STAGE), TRAIN_NAME)
    log.info("sasrec: trained in %.1f s", time.time() - t0)
    if not run.exists(BEST):
        raise CheckpointError(f"SASRec training finished without writing {run.uri(BEST)}")
    return run.uri(BEST)


def run_sasrec_stage(cfg: Config, run) -> dict[str, Any]:
    """Stage contract: train (resuming if interrupted), then score valid/test; metrics under `sasrec`.

    Writes RUN/sasrec/best.pt, history.json and results.json ({"valid": {...}, "test": {...}} in the
    evaluate stage's metric names).
    """
    from cost_dist.sasrec.inference import evaluate_sasrec

    t0 = time.time()
    train_sasrec(cfg, run)
    train_wall = time.time() - t0
    results = evaluate_sasrec(cfg, run)
    run.write_json(RESULTS, results)
    state = run.read_json(HISTORY)
    return {"sasrec": {
        "history": state["history"],
        "best_epoch": state["best_epoch"],
        "best_valid": state["best_valid"],
        "stopped_early": state["stopped_early"],
        "num_params": state.get("num_params"),
        "num_train_windows": state.get("num_train_windows"),
        "train_wall_s": round(train_wall, 2),
        "results": results,
        "recipe": {"hidden": cfg.sasrec.hidden, "num_blocks": cfg.sasrec.num_blocks, "num_heads": cfg.sasrec.num_heads,
                   "dropout": cfg.sasrec.dropout, "lr": cfg.sasrec.lr, "batch_size": cfg.sasrec.batch_size,
                   "patience": cfg.sasrec.patience, "max_len": cfg.data.max_len, "loss": "full-softmax CE",
                   "workers": cfg.resources.sasrec.num_workers},
    }}


def ensure_sasrec(cfg: Config, run) -> dict[str, Any] | None:
    """Train + score SASRec unless RUN/sasrec is complete for this config; its metrics, or None if skipped.

    For callers outside the pipeline's stage list (the evaluate stage, benchmarks): the stage keeps
    its own completion marker with `sasrec_fingerprint`.
    """
    fp = sasrec_fingerprint(cfg, run)
    if run.is_complete(STAGE, fp):
        log.info("sasrec: complete for this config, skipped")
        return None
    if run.exists(STAGE):
        started = run.read_json(f"{STAGE}/_STARTED").get("fingerprint") if run.exists(STAGE, "_STARTED") else None
        if started != fp or run.stage_fingerprint(STAGE) is not None:
            run.delete(STAGE)  # another config's checkpoints must never be resumed
    run.write_json(f"{STAGE}/_STARTED", {"fingerprint": fp, "started_at": time.time()})
    t0 = time.time()
    metrics = run_sasrec_stage(cfg, run)
    run.update_metrics(metrics)
    run.mark_complete(STAGE, fp, wall_s=round(time.time() - t0, 2))
    return metrics


# --------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------


def sasrec_train_loop(config: dict) -> None:
    """Ray Train worker loop (see the module docstring)."""
    import torch

    from cost_dist import distributed as D
    from cost_dist.config import _build
    from cost_dist.rundir import RunDir
    from cost_dist.sasrec.model import SASRec

    scfg = _build(SASRecConfig, config["sasrec"], "sasrec.")
    rank, world = D.world_rank(), D.world_size()
    torch.manual_seed(config["seed"])
    model = SASRec(config["num_items"], config["max_len"], scfg.hidden, scfg.num_blocks, scfg.num_heads,
                   scfg.inner_size, scfg.dropout)
    num_params = sum(p.numel() for p in model.parameters())
    global_batch = int(config["global_batch"])
    micro = max(1, global_batch // world)
    engine = D.build_engine(model, scfg.deepspeed, lr=scfg.lr, weight_decay=scfg.weight_decay, micro_batch_size=micro)
    device = D.worker_device()
    run = RunDir(config["run_uri"])
    inputs = torch.from_numpy(config["inputs"])
    targets = torch.from_numpy(config["targets"])
    valid_hist = torch.from_numpy(config["valid_history"][rank::world]).to(device)
    valid_target = torch.from_numpy(config["valid_target"][rank::world]).to(device)
    n = len(inputs)
    # Every worker needs a non-empty slice of every global batch: a last batch smaller than the
    # worker count is dropped (at most world - 1 windows an epoch, a different set every epoch).
    num_batches = n // global_batch + (1 if n % global_batch >= world else 0)

    state = D.load_latest_checkpoint(engine) or {}
    start_epoch = int(state["epoch"]) + 1 if "epoch" in state else 0
    stopping = EarlyStopping.restore(scfg.patience, state)
    if start_epoch:
        log.info("rank %d: resuming SASRec at epoch %d (best NDCG@10 %.4f at epoch %d)", rank, start_epoch,
                 stopping.best, stopping.best_epoch)

    for epoch in range(start_epoch, scfg.epochs):
        if stopping.stopped_early:
            break
        t0 = time.time()
        engine.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config["seed"] * 100_003 + epoch))
        total, count = 0.0, 0
        for b in range(num_batches):
            mine = order[b * global_batch:(b + 1) * global_batch][rank::world]
            x, y = inputs[mine].to(device), targets[mine].to(device)
            loss = _loss(engine, x, y)
            engine.backward(loss)
            engine.step()
            positions = int((y > 0).sum())
            total += float(loss.item()) * positions
            count += positions
        sums = D.all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64, device=device))
        entry: dict[str, Any] = {"epoch": epoch, "train_loss": round(float(sums[0] / max(sums[1], 1.0)), 5),
                                 "epoch_s": round(time.time() - t0, 2)}
        if (epoch + 1) % scfg.eval_every == 0 or epoch == scfg.epochs - 1:
            metrics = validate(engine.module, valid_hist, valid_target, config["exclude_seen"], device)
            entry.update({"valid_recall@10": round(metrics["recall@10"], 5), "valid_ndcg@10": round(metrics["ndcg@10"], 5)})
            if stopping.update(metrics["ndcg@10"], metrics, epoch) and rank == 0:
                run.write_torch(BEST, {"config": config["sasrec"], "num_items": config["num_items"],
                                       "max_len": config["max_len"], "item_ids": config["item_ids"],
                                       "epoch": epoch, "valid": metrics, "state_dict": cpu_state_dict(engine.module)})
        stopping.history.append(entry)
        log.info("rank %d sasrec epoch %d: %s", rank, epoch, entry)
        if rank == 0:
            run.write_json(HISTORY, {**stopping.state(), "num_params": num_params, "num_train_windows": n})
        D.save_checkpoint(engine, epoch, {k: v for k, v in entry.items() if k != "epoch"}, extra=stopping.state())
    if rank == 0 and not run.exists(HISTORY):
        run.write_json(HISTORY, {**stopping.state(), "num_params": num_params, "num_train_windows": n})


def _loss(engine, x, y):
    """Full-softmax CE through the engine's forward (so DeepSpeed sees the call), at every target position."""
    import torch.nn.functional as F

    hidden = engine(x)
    logits = engine.module.item_logits(hidden)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1) - 1, ignore_index=-1)


def validate(model, histories, targets, exclude_seen: bool, device, batch_users: int = 512) -> dict[str, float]:
    """Recall@10 / NDCG@10 over the whole catalog on this worker's validation rows, summed over workers."""
    import torch

    from cost_dist import distributed as D
    from cost_dist.sasrec.inference import target_ranks

    was_training = model.training
    model.eval()
    hits = ndcg = 0.0
    for lo in range(0, len(targets), batch_users):
        h, t = histories[lo:lo + batch_users], targets[lo:lo + batch_users]
        ranks = target_ranks(model.last_scores(h), h, t, exclude_seen)
        hit = ranks <= 10
        hits += float(hit.sum())
        ndcg += float((hit.double() / torch.log2(ranks.double() + 1)).sum())
    if was_training:
        model.train()
    sums = D.all_reduce_sum(torch.tensor([hits, ndcg, float(len(targets))], dtype=torch.float64, device=device))
    count = max(float(sums[2]), 1.0)
    return {"recall@10": float(sums[0]) / count, "ndcg@10": float(sums[1]) / count}
