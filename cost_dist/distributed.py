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


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster this process was submitted to (RAY_ADDRESS / `ray job submit`), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        log.info("starting a local Ray cluster")
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, log_to_driver=True)
