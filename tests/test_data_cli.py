"""`cost-dist data prepare/stats` run as the user runs them (subprocess), and the prepare stage in a run directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cost_dist.config import Config
from cost_dist.pipeline import run_stage, stage_fingerprints
from cost_dist.rundir import RunDir


def cost_dist(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("cost-dist") or str(Path(sys.executable).parent / "cost-dist")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def write_generic(tmp_path: Path) -> tuple[Path, Path]:
    inter = tmp_path / "inter.csv"
    inter.write_text("uid,iid,ts\n" + "".join(f"u{u},i{i},{10 * i}\n" for u in range(3) for i in range(4)))
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"iid": f"i{i}", "name": f"Thing {i}", "brand": "Acme &amp; Co"}) for i in range(4)))
    return inter, items


def test_prepare_generic_with_column_mapping_then_stats(tmp_path):
    inter, items = write_generic(tmp_path)
    out = tmp_path / "prepared"
    res = cost_dist("data", "prepare", "--dataset", "generic", "--interactions", str(inter), "--items", str(items),
                    "--user-col", "uid", "--item-col", "iid", "--time-col", "ts", "--text-fields", "name,brand",
                    "--template", "{name} by {brand}", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert {p.name for p in out.iterdir()} == {"items.parquet", "interactions.parquet", "sequences.parquet", "stats.json"}
    items_t = pq.read_table(out / "items.parquet")
    assert items_t.column("text").to_pylist()[0] == "Thing 0 by Acme & Co"
    assert pq.read_table(out / "interactions.parquet").schema == pa.schema(
        [("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())])
    res = cost_dist("data", "stats", str(out))
    assert res.returncode == 0, res.stderr
    assert "users" in res.stdout and "interactions" in res.stdout and " 12" in res.stdout
    res = cost_dist("data", "stats", str(out), "--json")
    assert json.loads(res.stdout)["num_items"] == 4


def test_prepare_synthetic_flags(tmp_path):
    out = tmp_path / "synth"
    res = cost_dist("data", "prepare", "--dataset", "synthetic", "--num-items", "120", "--num-users", "50",
                    "--num-topics", "4", "--seed", "7", "--out", str(out))
    assert res.returncode == 0, res.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_items"] == 120 and stats["num_users"] == 50


@pytest.mark.parametrize("args, message", [
    (["--dataset", "ml-100k"], "needs --path"),
    (["--dataset", "ml-100k", "--path", "/nonexistent/folder"], "dataset folder not found: /nonexistent/folder"),
    (["--dataset", "generic", "--interactions", "{inter}", "--items", "{items}"], "missing column(s) 'user_id'"),
    (["--dataset", "generic", "--interactions", "{inter}", "--items", "{items}", "--user-col", "uid", "--item-col", "iid",
      "--time-col", "ts", "--text-fields", "title"], "missing column(s) 'title'"),
    (["--dataset", "synthetic", "--set", "data.synthetic.nope=1"], "unknown config key 'data.synthetic.nope'"),
])
def test_bad_input_exits_nonzero_with_one_line(tmp_path, args, message):
    inter, items = write_generic(tmp_path)
    args = [a.format(inter=inter, items=items) for a in args]
    res = cost_dist("data", "prepare", *args, "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert message in lines[0]
    assert not (tmp_path / "out" / "items.parquet").exists()


def test_debug_shows_the_traceback(tmp_path):
    res = cost_dist("--debug", "data", "prepare", "--dataset", "ml-100k", "--path", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_stats_of_a_missing_dir_is_one_line(tmp_path):
    res = cost_dist("data", "stats", str(tmp_path))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "no stats.json" in res.stderr


def test_help_explains_every_dataset():
    res = cost_dist("data", "prepare", "--help")
    assert res.returncode == 0
    for word in ("ml-100k", "ml-latest-small", "amazon-2014", "amazon-lcrec", "mind", "generic", "synthetic",
                 "--user-col", "--on-bad-rows", "--kcore", "leave-one-out", "sequences.parquet"):
        assert word.lower() in res.stdout.lower(), word


def test_prepare_stage_resume_and_invalidation(tmp_path):
    """The pipeline skips a complete prepare with the same config, reruns it when the data config changes."""
    cfg = Config.from_dict({"data": {"synthetic": {"num_items": 100, "num_users": 60, "num_topics": 4}}})
    run = RunDir(str(tmp_path / "run"))
    metrics = run_stage(cfg, run, "prepare")
    assert metrics["data"]["num_items"] == 100
    assert run.is_complete("prepare", stage_fingerprints(cfg)["prepare"])
    assert run.read_json("metrics.json")["data"]["num_users"] == 60
    first = run.read_bytes("prepare/items.parquet")
    assert run_stage(cfg, run, "prepare") is None  # resumed: already complete

    # A change outside the data section keeps prepare complete...
    other = Config.from_dict({**cfg.to_dict(), "embed": {**cfg.to_dict()["embed"], "batch_size": 8}})
    assert stage_fingerprints(other)["prepare"] == stage_fingerprints(cfg)["prepare"]
    assert run_stage(other, run, "prepare") is None
    # ...a change of the data config or the seed reruns it.
    changed = Config.from_dict({**cfg.to_dict(), "seed": 1})
    assert not run.is_complete("prepare", stage_fingerprints(changed)["prepare"])
    assert run_stage(changed, run, "prepare") is not None
    assert run.read_bytes("prepare/items.parquet") != first
    bigger = Config.from_dict({"data": {"synthetic": {"num_items": 150, "num_users": 60, "num_topics": 4}}})
    assert run_stage(bigger, run, "prepare")["data"]["num_items"] == 150
    assert pq.read_metadata(run.path("prepare/items.parquet")).num_rows == 150
