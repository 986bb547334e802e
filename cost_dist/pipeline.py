"""Stages chained over a run directory, each skipped when already complete for the same config.

Every stage is a function `run(cfg: Config, run: RunDir) -> dict` that reads its inputs from the run
directory, writes its outputs under RUN/<stage>/, resumes from its own checkpoints when it was
interrupted, and returns a metrics update that is deep-merged into RUN/metrics.json. This module
owns the order, the fingerprints and the completion markers; the stages own their work.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from cost_dist.config import Config
from cost_dist.rundir import RunDir, fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"
    # Config sections (dotted) that change this stage's output; upstream fingerprints are added.
    config_keys: tuple[str, ...]
    needs_ray: bool = True

    def load(self) -> Callable[[Config, RunDir], dict[str, Any]]:
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)


STAGES: tuple[Stage, ...] = (
    Stage("prepare", "cost_dist.data.prepare:run_prepare_stage", ("data", "seed"), needs_ray=False),
    Stage("embed", "cost_dist.embed:run_embed_stage", ("embed",)),
    Stage("tokenize", "cost_dist.tokenizer.train:run_tokenize_stage", ("tokenizer", "seed")),
    Stage("assign", "cost_dist.tokenizer.assign:run_assign_stage", ()),
    Stage("generate", "cost_dist.generator.train:run_generate_stage", ("generator", "data.max_len", "seed")),
    Stage("evaluate", "cost_dist.evaluate:run_evaluate_stage", ("evaluate",)),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage_fingerprints(cfg: Config) -> dict[str, str]:
    """Fingerprint of each stage = hash(its config sections, the previous stage's fingerprint)."""
    out: dict[str, str] = {}
    previous = ""
    for stage in STAGES:
        out[stage.name] = fingerprint(stage.name, cfg.section_hash(*stage.config_keys) if stage.config_keys else "", previous)
        previous = out[stage.name]
    return out


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def run_stage(cfg: Config, run: RunDir, name: str, force: bool = False) -> dict[str, Any] | None:
    """Run one stage unless it is already complete for this config. Returns its metrics, or None if skipped."""
    stage = get_stage(name)
    fp = stage_fingerprints(cfg)[name]
    if not force and run.is_complete(name, fp):
        log.info("stage %s: complete for this config, skipped", name)
        return None
    if run.exists(name, "_COMPLETE"):
        log.info("stage %s: config or inputs changed, rerunning", name)
        run.invalidate(name)
    if stage.needs_ray:
        from cost_dist.distributed import init_ray

        init_ray()
    log.info("stage %s: started", name)
    t0 = time.time()
    metrics = stage.load()(cfg, run) or {}
    wall = time.time() - t0
    run.update_metrics({**metrics, "timings": {name: round(wall, 2)}})
    run.mark_complete(name, fp, wall_s=wall)
    log.info("stage %s: done in %.1f s", name, wall)
    return metrics


def run_pipeline(cfg: Config, run: RunDir, stages: tuple[str, ...] = STAGE_NAMES, force: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the stages in order, skipping those complete for this config; returns metrics.json."""
    from cost_dist.versions import versions

    run.update_metrics({"config": cfg.to_dict(), "versions": versions(), "run": run.uri()})
    run.write_text("config.yaml", cfg.to_yaml())
    ran: list[str] = []
    for name in STAGE_NAMES:
        if name not in stages:
            continue
        if run_stage(cfg, run, name, force=name in force) is not None:
            ran.append(name)
    run.update_metrics({"last_run": {"stages_run": ran, "stages_skipped": [s for s in stages if s not in ran]}})
    return run.read_metrics()
