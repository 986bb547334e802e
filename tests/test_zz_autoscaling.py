"""Autoscaling for real on one machine: a pipeline stage makes Ray's autoscaler add a worker node,
completes on it, and the idle node is removed after the idle timeout.

`python -m cost_dist.cluster autoscale-demo` runs in a subprocess of its own: a head with `CPU: 0`
(like cluster/ray-cluster.yaml's) and one autoscaling worker type (`CPU: 2`, min 0, max 1) on free
ports, the real prepare + embed stages of a tiny synthetic catalog (the embed actors ask for 1 CPU,
which only a worker has), and a 1 s sample of the cluster's nodes. The cluster lives in its own
session, which the demo kills at the end; this test checks that nothing of it is left. The session
cluster of tests/conftest.py is never touched. Named zz so that it runs last. About 1-2 minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_MIN = 0.2  # 12 s
DEMO_TIMEOUT_S = 600


def _session_processes(sid: int) -> list[str]:
    alive = []
    for proc in psutil.process_iter(["pid", "name", "status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(f"{proc.pid} {proc.info['name']}")
        except (psutil.Error, OSError):
            continue
    return alive


def _run_demo(tmp: Path) -> tuple[int | None, Path, str]:
    """One autoscale-demo subprocess; returns (exit code, its JSON output path, its log)."""
    from cost_dist.cluster import stop_session

    out, state, log_path = tmp / "demo.json", tmp / "state.json", tmp / "demo.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # ray.init in this pytest process (the session cluster) leaves its driver settings in
    # os.environ, RAY_AUTH_MODE=token among them; inherited, that mode makes the demo's head and its
    # driver disagree and Ray Data's pending embed actor is cancelled. The demo is its own cluster.
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_CLIENT_MODE"):
        env.pop(key, None)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cost_dist.cluster", "autoscale-demo", "--stage", "embed",
             "--idle-timeout-minutes", str(IDLE_TIMEOUT_MIN), "--out", str(out), "--state", str(state)],
            cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=DEMO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the demo stops its cluster on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        finally:
            # Whatever happened to the demo, nothing of its cluster may outlive the test.
            if state.exists():
                stop_session(json.loads(state.read_text())["session"])
    return proc.returncode, out, log_path.read_text()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    t0 = time.time()
    code, out, log = _run_demo(tmp_path_factory.mktemp("autoscale"))
    if code != 0 or not out.exists():
        pytest.fail(f"autoscale demo failed (exit {code}) after {time.time() - t0:.0f} s:\n{log[-5000:]}")
    result = json.loads(out.read_text())
    result["wall_s"] = round(time.time() - t0, 1)
    print("\nautoscale demo:", json.dumps({k: result[k] for k in (
        "timeline", "worker_added_s", "stage_start_s", "stage_done_s", "workers_removed_s", "total_s", "wall_s")}))
    return result


def test_stage_needing_worker_resources_scales_up_then_down(demo):
    # No worker before the stage: the head alone cannot run the embed actors (it has no CPU).
    assert demo["head_resources"] == {"CPU": 0}
    assert demo["workers_before_stage"] == 0
    assert demo["timeline"][0]["workers"] == 0
    # The autoscaler added exactly one worker (max_workers 1) while the stage waited for it ...
    assert demo["max_workers_seen"] == 1 and demo["max_cpu_workers_seen"] == 1
    assert demo["worker_added_s"] is not None
    assert demo["stage_start_s"] <= demo["worker_added_s"] <= demo["stage_done_s"]
    # ... the stage completed on it with real output ...
    stage = demo["stage_result"]
    assert stage["stage"] == "embed" and stage["rows"] == 120
    embed = stage["metrics"]["embed"]
    assert embed["items"] == 120 and embed["dim"] == 384 and embed["actors"]["used"] == 1
    # ... and the idle worker went away after the idle timeout, not before.
    assert demo["workers_removed_s"] is not None, demo["timeline"]
    assert demo["final_workers"] == 0
    assert demo["workers_removed_s"] - demo["stage_done_s"] >= 0.5 * IDLE_TIMEOUT_MIN * 60
    counts = [s["workers"] for s in demo["timeline"]]
    assert counts[0] == 0 and 1 in counts and counts[-1] == 0


def test_demo_cluster_left_no_process_behind(demo):
    sid = demo["session"]
    assert isinstance(sid, int) and sid > 1 and sid != os.getsid(0)
    deadline = time.time() + 15
    while _session_processes(sid) and time.time() < deadline:
        time.sleep(0.5)
    assert _session_processes(sid) == []
