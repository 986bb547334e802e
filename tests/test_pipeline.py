"""The pipeline's bookkeeping: fingerprints, completion markers, resume vs clear, metrics merging, and
reruns over a finished tiny run (real stages, real Ray)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import REPO, TINY_CONFIG
from cost_dist.config import Config
from cost_dist.errors import CostDistError
from cost_dist.pipeline import (STAGE_NAMES, _prepare_stage_dir, merge_stage_metrics, run_pipeline, run_stage,
                                stage_fingerprints)
from cost_dist.rundir import RunDir


def _changed(a: dict, b: dict) -> list[str]:
    return [s for s in STAGE_NAMES if a[s] != b[s]]


def test_a_change_reruns_from_the_first_affected_stage():
    base = stage_fingerprints(Config.load(TINY_CONFIG))
    fp = lambda *o: stage_fingerprints(Config.load(TINY_CONFIG, o))  # noqa: E731
    assert _changed(base, fp("evaluate.ks=5,10")) == ["evaluate"]
    assert _changed(base, fp("generator.epochs=7")) == ["generate", "evaluate"]
    assert _changed(base, fp("tokenizer.codebook_size=8")) == ["tokenize", "assign", "generate", "evaluate"]
    assert _changed(base, fp("embed.batch_size=7")) == list(STAGE_NAMES[1:])
    assert _changed(base, fp("data.synthetic.num_items=250")) == list(STAGE_NAMES)
    assert _changed(base, fp("seed=1")) == list(STAGE_NAMES)
    # The InfoNCE negatives span all workers: the tokenizer's worker count changes its result ...
    assert _changed(base, fp("resources.tokenizer.num_workers=2")) == ["tokenize", "assign", "generate", "evaluate"]
    # ... while where things run, the run's name and serving settings do not.
    for override in ("resources.generator.num_workers=2", "resources.embed.max_actors=4", "name=other",
                     "serve.port=9000", "resources.evaluate.parallelism=3"):
        assert _changed(base, fp(override)) == [], override


def test_prepare_fingerprint_follows_the_input_files(tmp_path):
    inter, items = tmp_path / "interactions.csv", tmp_path / "items.jsonl"
    inter.write_text("user_id,item_id,timestamp\nu1,i1,1\n")
    items.write_text('{"item_id": "i1", "title": "a"}\n')
    cfg = Config.load(REPO / "jobs/configs/generic-example.yaml", [f"data.interactions={inter}", f"data.items={items}"])
    before = stage_fingerprints(cfg)
    assert stage_fingerprints(cfg) == before
    inter.write_text("user_id,item_id,timestamp\nu1,i1,1\nu1,i1,2\n")
    assert _changed(before, stage_fingerprints(cfg)) == list(STAGE_NAMES)


def test_stage_dir_is_kept_for_a_resume_and_cleared_for_another_config(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.write_bytes("generate/ray_train/checkpoint_1/state.pt", b"x")
    _prepare_stage_dir(run, "generate", "fp-a", force=False)  # first start: nothing to clear
    assert run.exists("generate/ray_train/checkpoint_1/state.pt")
    _prepare_stage_dir(run, "generate", "fp-a", force=False)  # interrupted, same config: resume
    assert run.exists("generate/ray_train/checkpoint_1/state.pt")
    _prepare_stage_dir(run, "generate", "fp-b", force=False)  # interrupted, config changed: start over
    assert not run.exists("generate/ray_train")
    assert run.read_json("generate/_STARTED")["fingerprint"] == "fp-b"

    run.write_bytes("generate/best.pt", b"x")
    run.mark_complete("generate", "fp-b")
    _prepare_stage_dir(run, "generate", "fp-c", force=False)  # complete for another config: start over
    assert not run.exists("generate/best.pt") and not run.exists("generate/_COMPLETE")
    run.write_bytes("generate/best.pt", b"x")
    _prepare_stage_dir(run, "generate", "fp-c", force=True)  # forced
    assert not run.exists("generate/best.pt")


def test_stage_metrics_replace_their_own_entries_only():
    metrics = {"tokenizer": {"train": {"history": [1, 2, 3]}}, "evaluate": {"test": {"pop": {}, "old": {}}},
               "timings": {"prepare": 1.0}}
    merged = merge_stage_metrics(metrics, {"tokenizer": {"diagnostics": {"usage": [1]}}})
    assert merged["tokenizer"] == {"train": {"history": [1, 2, 3]}, "diagnostics": {"usage": [1]}}
    merged = merge_stage_metrics(merged, {"evaluate": {"test": {"pop": {"recall@5": 0.1}}}})
    assert merged["evaluate"]["test"] == {"pop": {"recall@5": 0.1}}  # the dropped method is gone
    assert merged["timings"] == {"prepare": 1.0}


def test_a_stage_refuses_to_run_without_its_upstream(tmp_path):
    with pytest.raises(CostDistError, match="stage tokenize needs prepare, embed complete"):
        run_stage(Config.load(TINY_CONFIG), RunDir(str(tmp_path / "run")), "tokenize")
    with pytest.raises(CostDistError, match="unknown stage 'nope'"):
        run_pipeline(Config.load(TINY_CONFIG), RunDir(str(tmp_path / "run")), stages=("nope",))


def test_generic_example_config_prepares_csv_and_jsonl(tmp_path):
    """The generic shape (interactions CSV + items JSONL) runs through jobs/configs/generic-example.yaml."""
    users = [f"u{u}" for u in range(6)]
    rows = ["user_id,item_id,timestamp"]
    for n, user in enumerate(users):
        for t in range(4):
            rows.append(f"{user},i{(n + t) % 8},{1000 + 10 * t}")
    (tmp_path / "interactions.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "items.jsonl").write_text("".join(
        json.dumps({"item_id": f"i{i}", "title": f"Widget {i} &amp; co", "category": "tools", "description": "d"}) + "\n"
        for i in range(8)))
    cfg = Config.load(REPO / "jobs/configs/generic-example.yaml",
                      [f"data.interactions={tmp_path / 'interactions.csv'}", f"data.items={tmp_path / 'items.jsonl'}"])
    run = RunDir(str(tmp_path / "run"))
    metrics = run_stage(cfg, run, "prepare")
    assert metrics["data"]["num_users"] == 6
    items = run.read_parquet("prepare/items.parquet").to_pylist()
    text = {r["item_id"]: r["text"] for r in items}
    assert text["i3"] == "Item category: tools. Title: Widget 3 & co. Description: d."
    assert run_stage(cfg, run, "prepare") is None  # complete: skipped


def test_rerun_over_a_finished_run(tiny_run, tiny_config, tmp_path):
    """Same config: nothing reruns. A changed evaluate section: only evaluate reruns, with no stale keys."""
    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run_dir)
    run = RunDir(str(run_dir))
    markers = {s: os.stat(run.path(s, "_COMPLETE")).st_mtime_ns for s in STAGE_NAMES}

    metrics = run_pipeline(tiny_config, run)
    assert metrics["last_run"]["stages_run"] == [] and metrics["last_run"]["stages_skipped"] == list(STAGE_NAMES)
    assert {s: os.stat(run.path(s, "_COMPLETE")).st_mtime_ns for s in STAGE_NAMES} == markers

    cfg = Config.load(TINY_CONFIG, ["evaluate.ks=5,10"])
    metrics = run_pipeline(cfg, run)
    assert metrics["last_run"]["stages_run"] == ["evaluate"]
    assert {s: os.stat(run.path(s, "_COMPLETE")).st_mtime_ns for s in STAGE_NAMES[:-1]} == \
        {s: markers[s] for s in STAGE_NAMES[:-1]}
    keys = set(metrics["evaluate"]["test"]["cost-dist"])
    assert {"recall@5", "recall@10", "ndcg@5", "ndcg@10"} <= keys
    assert not any(k.endswith(("@20", "@40")) for k in keys), keys
    assert metrics["config"]["evaluate"]["ks"] == [5, 10]


def test_early_stopping_counts_bad_evaluations_and_restores():
    from cost_dist.training import EarlyStopping

    stopping = EarlyStopping(patience=2)
    assert stopping.update(0.1, {"ndcg@10": 0.1}, 0)
    assert not stopping.update(0.05, {"ndcg@10": 0.05}, 1) and not stopping.stopped_early
    restored = EarlyStopping.restore(2, stopping.state())  # as a resumed worker gets it from the checkpoint
    assert (restored.best, restored.best_epoch, restored.bad_evals) == (0.1, 0, 1)
    assert not restored.update(0.1, {"ndcg@10": 0.1}, 2) and restored.stopped_early  # a tie is no improvement
    assert EarlyStopping.restore(3, None) == EarlyStopping(patience=3)


def test_evaluate_masks_the_whole_past(tiny_run, tiny_config):
    """exclude_seen on the evaluation actors masks `seen` (the user's whole past), not only the window read."""
    import pyarrow as pa

    from cost_dist.data.splits import whole_past
    from cost_dist.evaluate import _align_by_user, generator_rankings
    from cost_dist.generator.train import load_splits

    cfg = Config.load(TINY_CONFIG, ["evaluate.exclude_seen=true", "data.max_len=3"])
    test = load_splits(cfg, tiny_run)["test"].slice(0, 20)
    past = _align_by_user(whole_past(tiny_run.read_parquet("prepare/sequences.parquet"))["test"],
                          test.column("user_id"), "test")
    window = pa.array([h[-3:] for h in test.column("history").to_pylist()], type=pa.list_(pa.string()))
    table = pa.table({"user_id": test.column("user_id"), "history": window, "seen": past.column("history"),
                      "target": test.column("target")})
    ranked = generator_rankings(tiny_run, {"test": table}, cfg, 10)["test"]
    longer = 0
    for user, seen in zip(table.column("user_id").to_pylist(), table.column("seen").to_pylist()):
        assert len(ranked[user]) == 10 and not set(ranked[user]) & set(seen), user
        longer += len(set(seen)) > 3
    assert longer > 10  # the whole past is more than the 3-item window for most of these users
