"""The `tokenize` stage: train the CoST quantizer with Ray Train + DeepSpeed (or fit a baseline).

Driver: `run_tokenize_stage(cfg, run)` reads RUN/embed/embeddings.parquet, checks it, and for method
"rqvae" runs `quantizer_train_loop` on `cfg.resources.tokenizer` Ray Train workers over a Ray Dataset
of the embeddings (each worker iterates its shard); "rqkmeans" fits residual k-means with faiss in the
driver; "random" needs nothing but the seed. RUN/tokenize/model.pt then holds
{"method", "config", "input_dim", "seed", "state_dict"} (the quantizer's weights, or {"centroids"}).

Worker loop, per epoch: the first batch of a fresh run initialises the codebooks by k-means on the
*global* first batch (gathered; rank 0 fits, then broadcasts, so every rank starts identical); each
step computes the configured loss with InfoNCE negatives gathered from all workers; at the end of
the epoch code usage is summed over workers, codes unused for `dead_code_window` epochs are re-seeded
from random residuals of the last global batch (same choice on every rank), and the epoch is
checkpointed through ray.train.report. A restarted worker group (FailureConfig) or a rerun of the
stage with the same config resumes from the last checkpoint; the Ray Train run name carries a hash of
the tokenizer config, seed, worker count and the embeddings' fingerprint, so a changed config never
resumes a stale run.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import random
import time
from typing import Any

import numpy as np

from cost_dist.errors import CostDistError, DataError
from cost_dist.training import cpu_state_dict

log = logging.getLogger(__name__)

METHODS = ("rqvae", "rqkmeans", "random")
MODEL_FILE = "tokenize/model.pt"
RAY_TRAIN_DIR = "tokenize/ray_train"


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def check_tokenizer_config(tcfg, num_items: int, num_workers: int = 1) -> None:
    from cost_dist.tokenizer.losses import LOSS_KINDS

    if tcfg.method not in METHODS:
        raise CostDistError(f"tokenizer.method must be one of {', '.join(METHODS)}, got {tcfg.method!r}")
    if tcfg.loss not in LOSS_KINDS:
        raise CostDistError(f"tokenizer.loss must be one of {', '.join(LOSS_KINDS)}, got {tcfg.loss!r}")
    if tcfg.num_levels < 1 or tcfg.codebook_size < 2:
        raise CostDistError("tokenizer.num_levels must be >= 1 and tokenizer.codebook_size >= 2")
    if num_items < tcfg.codebook_size:
        raise DataError(f"embeddings: {num_items} items is fewer than tokenizer.codebook_size={tcfg.codebook_size}; "
                        "use a smaller codebook or more items")
    if tcfg.method == "rqvae":
        first_batch = min(num_items // max(num_workers, 1), tcfg.batch_size) * max(num_workers, 1)
        if first_batch < tcfg.codebook_size:
            raise CostDistError(f"the first global batch ({first_batch} rows = tokenizer.batch_size x workers) is smaller "
                                f"than tokenizer.codebook_size={tcfg.codebook_size}: k-means init needs at least K rows")
        if tcfg.epochs < 1:
            raise CostDistError("tokenizer.epochs must be >= 1")


# --------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def kmeans_init_distributed(model, x_local, tcfg, seed: int) -> None:
    """Initialise the codebooks by k-means on the global batch (rank 0 fits, every rank receives)."""
    import torch

    from cost_dist import distributed as D

    x_all = D.all_gather_no_grad(x_local.float())
    with torch.no_grad():
        z = model.encoder(x_all.to(next(model.parameters()).dtype)).float().cpu().numpy()
    if D.world_rank() == 0:
        model.quantizer.kmeans_init(z, tcfg.kmeans_init_iters, seed)
    D.broadcast_(model.quantizer.codebooks.data, src=0)


def _set_param(param, value) -> None:
    """Set a parameter everywhere DeepSpeed keeps it (module copy and ZeRO's fp32 master partition)."""
    import torch
    from deepspeed.utils import safe_set_full_fp32_param

    with torch.no_grad():
        param.data.copy_(value.to(param.dtype))
    safe_set_full_fp32_param(param, value.float())


def reseed_dead_codes(engine, counts, dead_age, last_residuals, tcfg, seed: int, epoch: int) -> int:
    """Re-seed codes unused for `dead_code_window` epochs with random residuals of the last global batch.

    counts: [M, K] usage this epoch summed over workers; dead_age: [books, K] epochs unused so far
    (updated in place); last_residuals: [M, rows, D] residuals of the last global batch. The random
    choice uses a generator seeded by (seed, epoch, book), so every rank picks the same rows.
    """
    import torch

    quantizer = engine.module.quantizer
    usage = counts.sum(0, keepdim=True) if quantizer.shared else counts
    dead_age[usage > 0] = 0
    dead_age[usage == 0] += 1
    dead = dead_age >= max(1, int(tcfg.dead_code_window))
    if not bool(dead.any()):
        return 0
    books = quantizer.codebooks.detach().float().clone()
    total = 0
    for b in range(books.shape[0]):
        idx = torch.nonzero(dead[b]).flatten()
        if idx.numel() == 0:
            continue
        source = last_residuals[b].float().to(books.device)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) * 101 + b)
        rows = torch.randint(0, source.shape[0], (idx.numel(),), generator=gen)
        books[b, idx] = source[rows.to(source.device)]
        dead_age[b, idx] = 0
        total += int(idx.numel())
    _set_param(quantizer.codebooks, books)
    return total


def quantizer_train_loop(config: dict) -> None:
    """Ray Train worker loop for the RQ-VAE / CoST quantizer (see the module docstring)."""
    import ray.train
    import torch

    from cost_dist import distributed as D
    from cost_dist.tokenizer.losses import quantizer_loss
    from cost_dist.tokenizer.model import RQVAE

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tcfg = config["tokenizer"]
    seed = int(config["seed"])
    rank, world = D.world_rank(), D.world_size()
    device = D.worker_device()
    _seed_everything(seed)
    model = RQVAE.from_config(tcfg, config["input_dim"]).to(device)
    batch_size = int(tcfg.batch_size)
    rows_per_worker = int(config["num_rows"]) // world
    steps_per_epoch = max(1, math.ceil(rows_per_worker / batch_size))

    def epoch_batches(epoch: int):
        return D.dataset_shard_batches("train", batch_size, dtype=torch.float32, shuffle_buffer=max(batch_size * 4, 256),
                                       seed=seed * 10_007 + epoch, column="embedding")

    resuming = ray.train.get_checkpoint() is not None
    first_epoch_iter = None
    if not resuming:
        first_epoch_iter = iter(epoch_batches(0))
        first = next(first_epoch_iter)
        kmeans_init_distributed(model, first.to(device), tcfg, seed)
        first_epoch_iter = itertools.chain([first], first_epoch_iter)

    engine = D.build_engine(model, tcfg.deepspeed, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                            micro_batch_size=batch_size, total_steps=steps_per_epoch * tcfg.epochs, schedule="constant")
    dtype = D.engine_dtype(engine)
    n_books = 1 if tcfg.shared_codebook else tcfg.num_levels
    extra = D.load_latest_checkpoint(engine)
    if extra is None:
        start, history, dead_age = 0, [], torch.zeros(n_books, tcfg.codebook_size, dtype=torch.long)
    else:
        start, history, dead_age = int(extra["epoch"]) + 1, list(extra["history"]), extra["dead_age"].clone()
        first_epoch_iter = None
    stop_after = config.get("stop_after_epoch")
    fail_marker = config.get("fail_once_marker")
    gather = D.all_gather_with_grad_and_offset

    for epoch in range(start, tcfg.epochs):
        if fail_marker and epoch == int(config.get("fail_at_epoch", 1)) and not os.path.exists(fail_marker):
            if rank == 0:
                open(fail_marker, "w").close()
                raise RuntimeError(f"injected worker failure at epoch {epoch} (test of FailureConfig)")
        t0 = time.time()
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # rows, loss, loss_rq, loss_re|co, recon_cos
        sum_co = torch.zeros(1, dtype=torch.float64, device=device)
        counts = torch.zeros(tcfg.num_levels, tcfg.codebook_size, dtype=torch.long, device=device)
        batches = first_epoch_iter if (epoch == 0 and first_epoch_iter is not None) else epoch_batches(epoch)
        last_residuals = None
        steps = 0
        engine.train()
        for x in batches:
            x = x.to(device=device, dtype=dtype)
            out = engine(x)
            parts = quantizer_loss(x, out, tcfg.loss, tcfg.alpha, tcfg.tau, gather=gather)
            engine.backward(parts["loss"])
            engine.step()
            n = x.shape[0]
            with torch.no_grad():
                cos = torch.nn.functional.cosine_similarity(out["x_hat"].float(), x.float(), dim=-1).sum()
                sums += torch.tensor([n, float(parts["loss"]) * n, float(parts["loss_rq"]) * n,
                                      float(parts.get("loss_re", torch.zeros(()))) * n, float(cos)],
                                     dtype=torch.float64, device=device)
                sum_co += float(parts.get("loss_co", torch.zeros(()))) * n
                for level in range(tcfg.num_levels):
                    counts[level] += torch.bincount(out["codes"][:, level], minlength=tcfg.codebook_size)
                last_residuals = out["residuals"].detach()
            steps += 1
        totals = D.all_reduce_sum(torch.cat([sums, sum_co]))
        counts = D.all_reduce_sum(counts).cpu()
        rows = max(float(totals[0]), 1.0)
        # Residuals of the last global batch (identical on every rank) for dead-code re-seeding.
        reseeded = 0
        if tcfg.reseed_dead_codes and last_residuals is not None:
            gathered = torch.stack([D.all_gather_no_grad(r) for r in last_residuals]).cpu()
            if tcfg.shared_codebook:
                gathered = gathered[:1]
            reseeded = reseed_dead_codes(engine, counts, dead_age, gathered, tcfg, seed, epoch)
        wall = time.time() - t0
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(totals[1]) / rows,
            "loss_rq": float(totals[2]) / rows,
            "recon_cos": float(totals[4]) / rows,
            "codes_used": [int((counts[level] > 0).sum()) for level in range(tcfg.num_levels)],
            "dead_codes_reseeded": reseeded,
            "steps": steps,
            "samples": int(rows),
            "wall_s": round(wall, 3),
            "samples_per_s": rows / max(wall, 1e-9),
        }
        if "re" in tcfg.loss.split("+"):
            entry["loss_re"] = float(totals[3]) / rows
        if "co" in tcfg.loss.split("+"):
            entry["loss_co"] = float(totals[5]) / rows
        history.append(entry)
        if rank == 0:
            log.info("tokenizer epoch %d/%d: loss %.5f rq %.5f%s recon_cos %.4f codes used %s, reseeded %d, %.0f samples/s",
                     epoch + 1, tcfg.epochs, entry["loss"], entry["loss_rq"],
                     "".join(f" {k[5:]} {entry[k]:.5f}" for k in ("loss_re", "loss_co") if k in entry),
                     entry["recon_cos"], entry["codes_used"], reseeded, entry["samples_per_s"])
        metrics = {k: v for k, v in entry.items() if not isinstance(v, list)}
        last_before_stop = stop_after is not None and epoch + 1 >= int(stop_after)
        if (epoch + 1) % max(1, tcfg.checkpoint_every) == 0 or epoch + 1 == tcfg.epochs or last_before_stop:
            state = cpu_state_dict(engine.module)
            D.save_checkpoint(engine, epoch, metrics, extra={"history": history, "dead_age": dead_age.clone(),
                                                             "model_state": state if rank == 0 else None})
        else:
            D.report(dict(metrics, epoch=int(epoch)))
        if last_before_stop:
            break


def gradient_probe_loop(config: dict) -> None:
    """One step of the training computation on a fixed global batch; rank 0 saves loss and gradients.

    Worker r takes rows [r*B, (r+1)*B) of `config["global_batch"]`, so any worker count sees the same
    global batch in the same order: this is how the equivalence test pins the cross-worker negatives
    (and the gradient averaging) with real DeepSpeed engines. Writes config["out_path"] (local path).
    """
    import torch
    from deepspeed.utils import safe_get_full_grad

    import ray.train

    from cost_dist import distributed as D
    from cost_dist.tokenizer.losses import quantizer_loss
    from cost_dist.tokenizer.model import RQVAE

    tcfg = config["tokenizer"]
    seed = int(config["seed"])
    rank, world = D.world_rank(), D.world_size()
    device = D.worker_device()
    global_batch = torch.as_tensor(np.asarray(config["global_batch"], dtype=np.float32))
    if global_batch.shape[0] % world:
        raise CostDistError(f"global batch of {global_batch.shape[0]} rows does not split over {world} workers")
    b = global_batch.shape[0] // world
    x = global_batch[rank * b:(rank + 1) * b].to(device)
    _seed_everything(seed)
    model = RQVAE.from_config(tcfg, global_batch.shape[1]).to(device)
    kmeans_init_distributed(model, x, tcfg, seed)
    engine = D.build_engine(model, tcfg.deepspeed, lr=tcfg.lr, weight_decay=tcfg.weight_decay, micro_batch_size=b)
    x = x.to(D.engine_dtype(engine))
    out = engine(x)
    parts = quantizer_loss(x, out, tcfg.loss, tcfg.alpha, tcfg.tau, gather=D.all_gather_with_grad_and_offset)
    engine.backward(parts["loss"])
    grads = {}
    for name, param in engine.module.named_parameters():
        g = safe_get_full_grad(param)
        grads[name] = None if g is None else g.detach().float().cpu().clone()
    losses = {k: D.all_reduce_mean(float(v)) for k, v in parts.items()}
    codes = D.all_gather_no_grad(out["codes"]).cpu()
    if rank == 0:
        torch.save({"world_size": world, "losses": losses, "grads": grads, "codes": codes,
                    "codebooks": engine.module.quantizer.codebooks.detach().float().cpu()}, config["out_path"])
    ray.train.report({"loss": losses["loss"]})


def run_gradient_probe(tcfg, global_batch: np.ndarray, num_workers: int, storage_uri: str, name: str,
                       out_path: str, seed: int = 0) -> dict:
    """Run gradient_probe_loop on `num_workers` Ray Train workers; returns what rank 0 saved."""
    import torch

    from cost_dist import distributed as D
    from cost_dist.config import TrainWorkers

    D.run_training(gradient_probe_loop, {"tokenizer": tcfg, "seed": seed, "global_batch": np.asarray(global_batch),
                                         "out_path": out_path},
                   TrainWorkers(num_workers=num_workers), storage_uri, name, max_failures=0)
    return torch.load(out_path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------


def ray_train_name(cfg, run, input_dim: int) -> str:
    """Run name that changes with anything that makes an old checkpoint unusable."""
    from cost_dist.rundir import fingerprint

    return "quantizer-" + fingerprint(dataclasses.asdict(cfg.tokenizer), cfg.seed, input_dim,
                                      cfg.resources.tokenizer.num_workers, run.stage_fingerprint("embed"))[:12]


def train_quantizer(cfg, run, embeddings: np.ndarray, stop_after_epoch: int | None = None,
                    fail_at_epoch: int | None = None, fail_marker: str | None = None) -> dict:
    """Train the quantizer on Ray Train workers; returns {"state_dict", "history", "wall_s", ...}.

    With stop_after_epoch the run stops after that epoch's checkpoint (as if interrupted); rerunning
    resumes. fail_at_epoch/fail_marker inject one worker failure (tests of FailureConfig restarts).
    """
    import ray
    import ray.data
    import torch
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    from cost_dist import distributed as D

    tcfg = cfg.tokenizer
    workers = cfg.resources.tokenizer
    if not ray.is_initialized():
        D.init_ray()
    dataset = ray.data.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).rename_columns({"data": "embedding"})
    name = ray_train_name(cfg, run, embeddings.shape[1])
    loop_config: dict[str, Any] = {"tokenizer": tcfg, "seed": cfg.seed, "input_dim": int(embeddings.shape[1]),
                                   "num_rows": int(embeddings.shape[0]), "stop_after_epoch": stop_after_epoch}
    if fail_marker:
        loop_config.update({"fail_once_marker": fail_marker, "fail_at_epoch": int(fail_at_epoch or 1)})
    t0 = time.time()
    result = D.run_training(quantizer_train_loop, loop_config, workers, run.uri(RAY_TRAIN_DIR), name,
                            max_failures=1, datasets={"train": dataset},
                            dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)))
    wall = time.time() - t0
    ckpt = result.checkpoint
    if ckpt is None:
        raise CostDistError(f"tokenizer training under {run.uri(RAY_TRAIN_DIR)}/{name} reported no checkpoint")
    with ckpt.as_directory() as d:
        extra = torch.load(os.path.join(d, D.EXTRA_STATE_FILE), map_location="cpu", weights_only=False)
    return {"state_dict": extra["model_state"], "history": extra["history"], "wall_s": wall, "name": name,
            "epochs_done": int(extra["epoch"]) + 1}


def run_tokenize_stage(cfg, run) -> dict:
    """Stage `tokenize`: RUN/embed/embeddings.parquet -> RUN/tokenize/model.pt (+ ray_train/ checkpoints)."""
    from cost_dist.tokenizer.baselines import ResidualKMeans
    from cost_dist.tokenizer.embeddings import read_embeddings

    tcfg = cfg.tokenizer
    item_ids, emb = read_embeddings(run)
    check_tokenizer_config(tcfg, len(item_ids), cfg.resources.tokenizer.num_workers)
    payload: dict[str, Any] = {"method": tcfg.method, "config": dataclasses.asdict(tcfg), "input_dim": int(emb.shape[1]),
                               "seed": int(cfg.seed)}
    train: dict[str, Any] = {"method": tcfg.method, "num_items": len(item_ids), "input_dim": int(emb.shape[1])}
    t0 = time.time()
    if tcfg.method == "rqvae":
        out = train_quantizer(cfg, run, emb)
        if out["epochs_done"] < tcfg.epochs:
            raise CostDistError(f"tokenizer training stopped after epoch {out['epochs_done']} of {tcfg.epochs}; rerun to resume")
        payload["state_dict"] = out["state_dict"]
        history = out["history"]
        workers = cfg.resources.tokenizer.num_workers
        # Throughput without the first epoch (k-means init and warm-up) when there is more than one.
        steady = history[1:] or history
        train.update({
            "loss": tcfg.loss,
            "num_workers": workers,
            "global_batch_size": tcfg.batch_size * workers,
            "epochs": len(history),
            "ray_train_run": f"{run.uri(RAY_TRAIN_DIR)}/{out['name']}",
            "ray_train_wall_s": round(out["wall_s"], 2),
            "samples_per_s": float(np.mean([h["samples_per_s"] for h in steady])),
            "final": {k: v for k, v in history[-1].items() if k.startswith("loss") or k == "recon_cos"},
            "history": history,
        })
    elif tcfg.method == "rqkmeans":
        model = ResidualKMeans.fit(emb, tcfg.num_levels, tcfg.codebook_size, tcfg.kmeans_init_iters, cfg.seed,
                                   balanced=tcfg.kmeans_balanced)
        import torch

        payload["state_dict"] = {"centroids": torch.from_numpy(model.centroids)}
        train.update({"kmeans_iters": tcfg.kmeans_init_iters, "kmeans_balanced": tcfg.kmeans_balanced, "history": []})
    else:
        payload["state_dict"] = {}
        train.update({"history": []})
    train["wall_s"] = round(time.time() - t0, 2)
    run.write_torch(MODEL_FILE, payload)
    log.info("tokenizer (%s) written to %s", tcfg.method, run.uri(MODEL_FILE))
    return {"tokenizer": {"train": train}}
