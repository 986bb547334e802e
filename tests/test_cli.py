"""The command line and the job entrypoints as users call them: real subprocesses, exit codes, messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_CONFIG

BIN = Path(sys.executable).parent


def run_cmd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_stage_command():
    proc = run_cmd(str(BIN / "cost-dist"), "--help")
    assert proc.returncode == 0
    for command in ("run", "prepare", "embed", "tokenize", "assign", "train-generator", "evaluate", "report", "serve"):
        assert command in proc.stdout
    proc = run_cmd(sys.executable, "jobs/full_pipeline.py", "--help")
    assert proc.returncode == 0 and "--config" in proc.stdout and "--run" in proc.stdout and "--set" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--config", "no/such.yaml"], "config file not found: no/such.yaml"),
    (["--config", str(TINY_CONFIG), "--set", "tokenizer.nope=1"], "unknown config key 'tokenizer.nope'"),
    (["--config", str(TINY_CONFIG), "--set", "generator.epochs=many"], "generator.epochs"),
    (["--config", str(TINY_CONFIG), "--stages", "prepare,embedd"], "unknown stage 'embedd'"),
])
def test_job_input_errors_exit_2_with_one_line(tmp_path, args, message):
    proc = run_cmd(sys.executable, "jobs/full_pipeline.py", *args, "--run", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("jobs/full_pipeline.py: error: ") and message in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_stage_needs_its_upstream(tmp_path):
    proc = run_cmd(str(BIN / "cost-dist"), "evaluate", "--config", str(TINY_CONFIG), "--run", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "stage evaluate needs prepare, embed, tokenize, assign, generate complete" in proc.stderr


def test_report_of_a_missing_run(tmp_path):
    proc = run_cmd(str(BIN / "cost-dist"), "report", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "no metrics.json" in proc.stderr


def test_prepare_job_skips_when_complete_and_reruns_on_a_changed_config(tmp_path):
    """jobs/prepare.py (no Ray needed) over one run directory, three times."""
    run = tmp_path / "run"
    base = [sys.executable, "jobs/prepare.py", "--config", str(TINY_CONFIG), "--run", str(run)]
    first = run_cmd(*base)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stage 1/6 prepare: done" in first.stderr
    assert "data: items 300" in first.stdout  # the summary table
    marker = json.loads((run / "prepare" / "_COMPLETE").read_text())

    second = run_cmd(*base)
    assert second.returncode == 0
    assert "prepare: already complete for this config" in second.stdout
    assert json.loads((run / "prepare" / "_COMPLETE").read_text()) == marker

    third = run_cmd(*base, "--set", "data.synthetic.num_items=200")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "config or inputs changed, clearing" in third.stderr
    changed = json.loads((run / "prepare" / "_COMPLETE").read_text())
    assert changed["fingerprint"] != marker["fingerprint"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["data"]["synthetic"]["num_items"] == 200
