"""benchmarks/serve_load.py end to end on the tiny run, in its own process and Ray cluster (real Serve, real HTTP).

Pins the interface other checks read: `--run DIR --json PATH` writes rows with batching,
concurrency, qps, p50_ms, p99_ms and errors for both modes at every level.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_serve_load_writes_both_modes_interleaved(tiny_run, tmp_path):
    from cost_dist.cluster import free_port

    port = free_port()
    out = tmp_path / "serve_load.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--run", tiny_run.uri(), "--json", str(out),
         "--port", str(port), "--concurrency", "1,4", "--requests", "6", "--rounds", "2", "--warmup", "2",
         "--num-cpus", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["batching"], r["concurrency"]): r for r in result["rows"]}
    assert set(rows) == {(b, c) for b in (True, False) for c in (1, 4)}
    for row in rows.values():
        assert {"qps", "p50_ms", "p99_ms", "errors"} <= set(row)
        assert row["errors"] == 0 and row["qps"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
        assert row["requests"] == 12 and row["rounds"] == 2  # every round drove every mode
    assert all(rows[(False, c)]["mean_batch_size"] == 1.0 for c in (1, 4))
    meta = result["meta"]
    assert meta["interleaved"] and len(meta["serve_ceiling"]) == 2
    assert meta["batching_speedup_at_4"] > 0
    assert "batching speed-up at concurrency 4" in proc.stdout
