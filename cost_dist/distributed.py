"""Ray Train / DeepSpeed glue: the one thin place that knows about Ray clusters and engines.

Models (cost_dist.tokenizer.model, cost_dist.generator.model) are plain torch modules and their
training loops are plain functions; this module starts or joins the Ray cluster, builds DeepSpeed
engines with the repo's DeepSpeed config, gathers tensors across workers with gradients, and saves /
restores checkpoints through ray.train.report.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


# Environment every Ray worker needs: the bundled embedding model loads offline, and tokenizers must
# not fork thread pools inside Ray's worker processes.
WORKER_ENV_VARS = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Join the cluster this process was submitted to, or start a private local one.

    - Inside `ray job submit` the job runner sets RAY_ADDRESS and RAY_JOB_CONFIG_JSON_ENV_VAR; plain
      `ray.init()` joins that cluster and inherits the job's runtime_env (working_dir, env_vars).
      Ray refuses to merge a driver runtime_env that repeats a key of the job's, so only the worker
      variables the job did not set are added.
    - With `address` or RAY_ADDRESS set (e.g. `RAY_ADDRESS=auto`), join that cluster.
    - Otherwise start a new local cluster (`address="local"`): a bare `ray.init()` would join whatever
      cluster the last `ray start` on this machine recorded in /tmp/ray/ray_current_cluster.
    """
    import json

    import ray

    if ray.is_initialized():
        return
    for key, value in WORKER_ENV_VARS.items():
        os.environ.setdefault(key, value)
    env_vars = {k: os.environ.get(k, v) for k, v in WORKER_ENV_VARS.items()}
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config:
        job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
        extra = {k: v for k, v in env_vars.items() if k not in job_env}
        log.info("joining the Ray cluster of this job at %s", os.environ.get("RAY_ADDRESS", "auto"))
        ray.init(runtime_env={"env_vars": extra} if extra else None, log_to_driver=True)
    elif address or os.environ.get("RAY_ADDRESS"):
        target = address or os.environ["RAY_ADDRESS"]
        log.info("joining Ray cluster at %s", target)
        ray.init(address=target, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    else:
        log.info("starting a local Ray cluster (num_cpus=%s)", num_cpus or "all")
        ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env_vars}, log_to_driver=True)

