"""Stages chained over a run directory, each skipped when already complete for the same config.

Every stage is a function `run(cfg: Config, run: RunDir) -> dict` that reads its inputs from the run
directory, writes its outputs under RUN/<stage>/, resumes from its own checkpoints when it was
interrupted, and returns a metrics update that is merged into RUN/metrics.json. This module owns
the order, the fingerprints and the completion markers; the stages own their work.

Markers, per stage directory:
- `_STARTED` holds the fingerprint the stage is (or was) running with. A rerun with the same
  fingerprint leaves the directory alone so the stage resumes from its own checkpoints; a rerun with
  another fingerprint (config or upstream changed since the interruption) empties the directory
  first, so no checkpoint of another config is ever resumed.
- `_COMPLETE` holds the fingerprint of the finished stage; a rerun with the same fingerprint skips it.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow.fs as pafs

from cost_dist.config import Config
from cost_dist.errors import CostDistError
from cost_dist.rundir import RunDir, deep_merge, fingerprint, resolve_filesystem

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
    # The InfoNCE negatives are the global batch (workers x per-worker batch), so the worker count
    # changes the tokenizer; the generator's batch is global, so its worker count does not.
    Stage("tokenize", "cost_dist.tokenizer.train:run_tokenize_stage",
          ("tokenizer", "seed", "resources.tokenizer.num_workers")),
    Stage("assign", "cost_dist.tokenizer.assign:run_assign_stage", ()),
    Stage("generate", "cost_dist.generator.train:run_generate_stage", ("generator", "data.max_len", "seed")),
    Stage("evaluate", "cost_dist.evaluate:run_evaluate_stage", ("evaluate", "sasrec")),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


STARTED_MARKER = "_STARTED"


def input_files_fingerprint(cfg: Config) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of every raw input file the data section names, so edited data reruns prepare.

    Synthetic data has no files. A folder (data.path) contributes every file below it.
    """
    out: list[tuple[str, int, int]] = []
    for uri in (cfg.data.path, cfg.data.interactions, cfg.data.items):
        if not uri:
            continue
        try:
            fs, path = resolve_filesystem(uri)
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            else:
                infos = [info]
        except (OSError, ValueError) as exc:  # unreadable location: prepare reports it properly
            log.debug("cannot stat %s for the fingerprint: %s", uri, exc)
            out.append((uri, -1, -1))
            continue
        for f in sorted(infos, key=lambda i: i.path):
            if f.type == pafs.FileType.File:
                out.append((f.path, int(f.size or 0), int(f.mtime_ns or 0)))
            elif f.type == pafs.FileType.NotFound:
                out.append((f.path, -1, -1))
    return out


def stage_fingerprints(cfg: Config) -> dict[str, str]:
    """Fingerprint of each stage = hash(its config sections, the previous stage's fingerprint).

    The chain makes a change rerun the first affected stage and everything after it. prepare also
    hashes its raw input files (size, mtime).
    """
    out: dict[str, str] = {}
    previous = ""
    for stage in STAGES:
        parts: list[Any] = [stage.name, cfg.section_hash(*stage.config_keys) if stage.config_keys else "", previous]
        if stage.name == "prepare":
            parts.append(input_files_fingerprint(cfg))
        out[stage.name] = fingerprint(*parts)
        previous = out[stage.name]
    return out


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise CostDistError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def merge_stage_metrics(metrics: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge a stage's metrics: second-level entries are replaced, not merged.

    A rerun stage must not leave entries of its previous run behind (a baseline dropped from the
    config, a longer loss history), while stages sharing a top-level key (tokenize writes
    tokenizer.train, assign tokenizer.diagnostics) must not erase each other.
    """
    out = dict(metrics)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _prepare_stage_dir(run: RunDir, name: str, fp: str, force: bool) -> None:
    """Keep the stage directory for a resume with the same fingerprint, else empty it."""
    started = None
    if run.exists(name, STARTED_MARKER):
        try:
            started = run.read_json(f"{name}/{STARTED_MARKER}").get("fingerprint")
        except CostDistError:
            started = None
    complete_fp = run.stage_fingerprint(name)
    if run.exists(name) and (force or complete_fp is not None or (started is not None and started != fp)):
        why = "forced" if force else "config or inputs changed"
        log.info("stage %s: %s, clearing %s", name, why, run.uri(name))
        run.delete(name)
    elif started == fp:
        log.info("stage %s: resuming an interrupted run from its checkpoints in %s", name, run.uri(name))
    run.write_json(f"{name}/{STARTED_MARKER}", {"fingerprint": fp, "started_at": time.time()})


def run_stage(cfg: Config, run: RunDir, name: str, force: bool = False, num_cpus: int | None = None) -> dict[str, Any] | None:
    """Run one stage unless it is already complete for this config. Returns its metrics, or None if skipped."""
    stage = get_stage(name)
    index = STAGE_NAMES.index(name) + 1
    fingerprints = stage_fingerprints(cfg)
    fp = fingerprints[name]
    if not force and run.is_complete(name, fp):
        log.info("stage %d/%d %s: complete for this config, skipped", index, len(STAGES), name)
        return None
    missing = [s for s in STAGE_NAMES[: index - 1] if not run.is_complete(s, fingerprints[s])]
    if missing:
        raise CostDistError(
            f"stage {name} needs {', '.join(missing)} complete for this config in {run.uri()}: run them first "
            f"(or the whole pipeline)")
    _prepare_stage_dir(run, name, fp, force)
    if stage.needs_ray:
        from cost_dist.distributed import init_ray

        init_ray(num_cpus=num_cpus)
    log.info("stage %d/%d %s: started", index, len(STAGES), name)
    t0 = time.time()
    try:
        metrics = stage.load()(cfg, run) or {}
    except BaseException:
        log.error("stage %d/%d %s: failed after %.1f s", index, len(STAGES), name, time.time() - t0)
        raise
    wall = time.time() - t0
    merged = merge_stage_metrics(run.read_metrics(), metrics)
    run.write_json("metrics.json", deep_merge(merged, {"timings": {name: round(wall, 2)}}))
    run.mark_complete(name, fp, wall_s=round(wall, 2))
    log.info("stage %d/%d %s: done in %.1f s", index, len(STAGES), name, wall)
    return metrics


def run_pipeline(cfg: Config, run: RunDir, stages: tuple[str, ...] = STAGE_NAMES, force: tuple[str, ...] = (),
                 num_cpus: int | None = None) -> dict[str, Any]:
    """Run the stages in order, skipping those complete for this config; returns metrics.json."""
    from cost_dist.versions import versions

    for name in (*stages, *force):
        get_stage(name)
    t0 = time.time()
    run.update_metrics({"config": cfg.to_dict(), "versions": versions(), "run": run.uri()})
    run.write_text("config.yaml", cfg.to_yaml())
    log.info("pipeline %s: stages %s over %s", cfg.name, " -> ".join(s for s in STAGE_NAMES if s in stages), run.uri())
    ran: list[str] = []
    for name in STAGE_NAMES:
        if name not in stages:
            continue
        if run_stage(cfg, run, name, force=name in force, num_cpus=num_cpus) is not None:
            ran.append(name)
    skipped = [s for s in STAGE_NAMES if s in stages and s not in ran]
    wall = round(time.time() - t0, 2)
    metrics = run.read_metrics()
    # The same keys are replaced on every run, so metrics.json describes the latest one.
    metrics["last_run"] = {"stages_run": ran, "stages_skipped": skipped, "wall_s": wall, "finished_at": time.time()}
    run.write_json("metrics.json", metrics)
    log.info("pipeline %s: done in %.1f s (ran %s; skipped %s)", cfg.name, wall, ", ".join(ran) or "none",
             ", ".join(skipped) or "none")
    return metrics
