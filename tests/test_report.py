"""The report: summary table and report.md with PNG plots, from metrics.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO
from cost_dist.report import format_summary, history_series, write_report
from cost_dist.rundir import RunDir

BIN = Path(sys.executable).parent
PNG = b"\x89PNG\r\n\x1a\n"

METRICS = {
    "run": "/runs/x",
    "config": {"name": "x", "seed": 3},
    "timings": {"prepare": 1.25, "embed": 30.0, "tokenize": 40.0},
    "last_run": {"stages_run": ["tokenize"], "stages_skipped": ["prepare", "embed"], "wall_s": 41.0},
    "data": {"num_items": 1000, "num_users": 1500, "num_interactions": 20000},
    "tokenizer": {
        "train": {"history": [{"epoch": 1, "loss": 2.0, "infonce_loss": 1.5}, {"epoch": 2, "loss": 1.0, "infonce_loss": 0.9}]},
        "diagnostics": {"codes_used": [32, 30, 28], "perplexity": [20.0, 18.5, 16.0], "collision_rate": 0.05},
    },
    "generator": {"history": {"epoch": [1, 2, 3], "train_loss": [3.0, 2.5, 2.2], "valid_ndcg@10": [0.1, 0.2, 0.25]}},
    "evaluate": {"test": {
        "pop": {"recall@5": 0.01, "recall@10": 0.02, "ndcg@5": 0.005, "ndcg@10": 0.01, "num_users": 1500},
        "cost-dist": {"recall@5": 0.2, "recall@10": 0.3, "ndcg@5": 0.15, "ndcg@10": 0.18},
    }},
}


def test_summary_table_orders_stages_methods_and_metrics():
    text = format_summary(METRICS)
    lines = text.splitlines()
    assert lines[0] == "cost-dist run /runs/x (config x, seed 3)"
    assert any(line.split() == ["tokenize", "ran", "40.0"] for line in lines)
    assert any(line.split()[:2] == ["prepare", "skipped"] for line in lines)
    assert "data: items 1,000, users 1,500, interactions 20,000" in text
    header = next(line for line in lines if line.startswith("method"))
    assert header.split() == ["method", "recall@5", "recall@10", "ndcg@5", "ndcg@10"]
    rows = [line.split() for line in lines[1:] if line.startswith(("cost-dist ", "pop "))]
    assert rows == [["cost-dist", "0.2000", "0.3000", "0.1500", "0.1800"], ["pop", "0.0100", "0.0200", "0.0050", "0.0100"]]


def test_summary_of_an_unfinished_run():
    text = format_summary({"timings": {"prepare": 2.0}})
    assert "no evaluation metrics yet" in text


def test_history_shapes():
    assert history_series([3.0, 2.0]) == ([1, 2], {"loss": [3.0, 2.0]})
    x, series = history_series([{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0, "extra": 5}])
    assert x == [1.0, 2.0] and series["loss"] == [2.0, 1.0] and series["extra"][1] == 5.0
    x, series = history_series({"epoch": [1, 2], "train_loss": [1.0, 0.5]})
    assert x == [1.0, 2.0] and series == {"train_loss": [1.0, 0.5]}
    assert history_series(None) == ([], {})


def test_write_report_with_plots(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.write_json("metrics.json", METRICS)
    run.write_bytes("plots/code_usage.png", PNG + b"stage plot")  # a stage's own plot is embedded, not redrawn
    write_report(run)
    report = (tmp_path / "run" / "report.md").read_text()
    assert report.startswith("# cost-dist report: x")
    assert "| cost-dist | 0.2000 | 0.3000 | 0.1500 | 0.1800 |" in report
    assert "| collision_rate | 0.0500 |" in report
    for name in ("report_tokenizer_loss.png", "report_generator_loss.png", "report_code_usage.png",
                 "report_test_at_k.png", "code_usage.png"):
        assert f"(plots/{name})" in report, name
        assert (tmp_path / "run" / "plots" / name).read_bytes().startswith(PNG)
    assert (tmp_path / "run" / "plots" / "code_usage.png").read_bytes() == PNG + b"stage plot"
    assert "## Resolved config" in report


def test_report_of_the_tiny_run(tiny_run):
    """The report of a real run: every plot present, and `cost-dist report RUN` prints the table."""
    report = Path(tiny_run.path("report.md")).read_text()
    for name in ("report_tokenizer_loss.png", "report_generator_loss.png", "report_code_usage.png", "report_test_at_k.png"):
        assert f"(plots/{name})" in report, name
        assert Path(tiny_run.path("plots", name)).read_bytes().startswith(PNG)
    proc = subprocess.run([str(BIN / "cost-dist"), "report", tiny_run.uri()], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for method in ("cost-dist", "pop", "dense"):
        assert any(line.startswith(method + " ") for line in proc.stdout.splitlines()[1:]), proc.stdout
    assert "recall@10" in proc.stdout and "ndcg@10" in proc.stdout
