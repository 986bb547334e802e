"""The run directory: atomic writes, completion markers, metrics merging, and invalidation by fingerprint."""

from __future__ import annotations

import pyarrow as pa
import pytest

from cost_dist.config import Config
from cost_dist.pipeline import STAGE_NAMES, stage_fingerprints
from cost_dist.rundir import RunDir, RunDirError, deep_merge, fingerprint


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.write_json("a/b.json", {"x": 1})
    run.write_text("a/c.txt", "hello")
    run.write_parquet("a/t.parquet", pa.table({"v": [1, 2]}))
    assert run.read_json("a/b.json") == {"x": 1} and run.read_text("a/c.txt") == "hello"
    assert run.read_parquet("a/t.parquet").column("v").to_pylist() == [1, 2]
    run.write_json("a/b.json", {"x": 2})  # overwrite in place
    assert run.read_json("a/b.json") == {"x": 2}
    assert sorted(p.name for p in (tmp_path / "run" / "a").iterdir()) == ["b.json", "c.txt", "t.parquet"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    run = RunDir(str(tmp_path))
    run.write_parquet("t.parquet", pa.table({"v": [1]}))

    class Unwritable:  # not a table: pyarrow fails mid-write
        schema = None

    with pytest.raises(Exception):
        run.write_parquet("t.parquet", Unwritable())  # type: ignore[arg-type]
    assert run.read_parquet("t.parquet").column("v").to_pylist() == [1]


def test_missing_and_corrupt_files_are_clear_errors(tmp_path):
    run = RunDir(str(tmp_path))
    with pytest.raises(RunDirError, match="missing .*nothing.parquet"):
        run.read_parquet("nothing.parquet")
    run.write_text("bad.json", "{not json")
    with pytest.raises(RunDirError, match="bad.json is not valid JSON"):
        run.read_json("bad.json")
    run.write_bytes("model.pt", b"garbage")
    with pytest.raises(RunDirError, match="corrupt or unreadable"):
        run.read_torch("model.pt")


def test_completion_markers(tmp_path):
    run = RunDir(str(tmp_path))
    assert not run.is_complete("embed")
    run.mark_complete("embed", "fp1", wall_s=1.5)
    assert run.is_complete("embed") and run.is_complete("embed", "fp1") and not run.is_complete("embed", "fp2")
    assert run.stage_fingerprint("embed") == "fp1"
    run.invalidate("embed")
    assert not run.is_complete("embed") and run.stage_fingerprint("embed") is None


def test_metrics_deep_merge(tmp_path):
    run = RunDir(str(tmp_path))
    run.update_metrics({"evaluate": {"test": {"pop": {"recall@10": 0.1}}}, "timings": {"prepare": 1}})
    m = run.update_metrics({"evaluate": {"test": {"dense": {"recall@10": 0.2}}}, "timings": {"embed": 2}})
    assert m["evaluate"]["test"] == {"pop": {"recall@10": 0.1}, "dense": {"recall@10": 0.2}}
    assert run.read_metrics()["timings"] == {"prepare": 1, "embed": 2}
    assert deep_merge({"a": {"b": 1}}, {"a": 2}) == {"a": 2}


def test_fingerprints_invalidate_from_the_first_changed_stage():
    base = Config.load()
    fp = stage_fingerprints(base)
    assert list(fp) == list(STAGE_NAMES) and len(set(fp.values())) == len(fp)
    assert stage_fingerprints(Config.load()) == fp  # stable
    assert fingerprint("a", 1) == fingerprint("a", 1) != fingerprint("a", 2)

    def changed(*overrides: str) -> list[str]:
        new = stage_fingerprints(Config.load(None, overrides))
        return [s for s in STAGE_NAMES if new[s] != fp[s]]

    assert changed("data.synthetic.num_items=500") == list(STAGE_NAMES)  # data changes everything downstream
    assert changed("tokenizer.codebook_size=32") == list(STAGE_NAMES[STAGE_NAMES.index("tokenize"):])
    assert changed("evaluate.beam_size=50") == ["evaluate"]
    assert changed("serve.port=9000") == []


def test_resume_with_a_marker_and_rerun_after_a_config_change(tmp_path):
    run = RunDir(str(tmp_path))
    cfg = Config.load()
    fps = stage_fingerprints(cfg)
    run.mark_complete("prepare", fps["prepare"])
    assert run.is_complete("prepare", stage_fingerprints(Config.load())["prepare"])
    new = stage_fingerprints(Config.load(None, ["data.kcore=5"]))
    assert not run.is_complete("prepare", new["prepare"])
