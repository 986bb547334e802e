"""`serve deploy serve/config.yaml` against a real `ray start --head` (own ports), then `serve status` and a query.

The head runs in its own session (process group) with RAY_AUTH_MODE=disabled (Ray 2.60 turns on
token auth for `ray start` otherwise). It is stopped by killing that process group and any process
that still names its GCS port -- never `ray stop`, which would stop every cluster on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import REPO, pids_naming
from cost_dist.cluster import free_ports

BIN = Path(sys.executable).parent


@pytest.fixture(params=["python-proxy", "haproxy"])
def ray_head(request, tmp_path):
    """A separate Ray head on free ports, started from the repo root so import_path resolves.

    Parametrized by HTTP ingress: Serve's Python proxy (what a bare `ray start --head` gets) and its HAProxy ingress
    (RAY_SERVE_ENABLE_HA_PROXY=1, what the cluster files set), with HAProxy's stats and metrics
    ports moved off their fixed defaults (8404, 9101) so that it cannot meet another Serve instance
    on this machine, and its config / socket / state files in a folder of the test's own.
    """
    gcs, dash, client, node_mgr, obj_mgr, agent, agent_grpc, metrics, rt_env, http, stats, hap_metrics = free_ports(12)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # As the README starts a head for `serve deploy`: no token auth (private ports), Serve's
    # throughput-optimized mode.
    env.update({"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "0"})
    hap = None
    if request.param == "haproxy":
        hap = Path(tempfile.mkdtemp(prefix="hap-"))  # short: the admin socket path must fit sun_path
        env.update({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
                    "RAY_SERVE_HAPROXY_METRICS_PORT": str(hap_metrics),
                    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(hap / "haproxy.cfg"),
                    "RAY_SERVE_HAPROXY_SOCKET_PATH": str(hap / "admin.sock"),
                    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(hap / "metrics.sock"),
                    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(hap),
                    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(hap / "server-state")})
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt_env}", "--num-cpus=2", "--disable-usage-stats"]
    log = open(tmp_path / "ray_head.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ray start exited with {proc.returncode}: {(tmp_path / 'ray_head.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{dashboard}/api/version", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() - t0 > 120:
                raise AssertionError("the Ray head's dashboard did not come up in 120 s")
            time.sleep(1)
        yield {"dashboard": dashboard, "http_port": http, "env": env, "ingress": request.param, "haproxy_dir": hap}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        # Processes of this head that left the group (raylet children, GCS) still name its GCS port
        # (as `--gcs-address=127.0.0.1:PORT` or a bare address; the one token matches both).
        # HAProxy runs detached from the head's process group; its command line names its config file.
        haproxy = pids_naming(f"{hap}/") if hap else []
        for pid in [*pids_naming(f"127.0.0.1:{gcs}"), *haproxy]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        if hap:
            shutil.rmtree(hap, ignore_errors=True)


def test_serve_deploy_config_then_status_and_query(ray_head, tiny_run, tmp_path):
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    app = config["applications"][0]
    assert app["import_path"] == "serve.app:build_app" and app["route_prefix"] == "/"
    names = {d["name"] for d in app["deployments"]}
    assert {"Ingress", "Recommender", "Tokenizer", "AddedItemsLog"} <= names
    for d in app["deployments"]:
        if d["name"] != "AddedItemsLog":
            assert {"autoscaling_config", "max_ongoing_requests", "ray_actor_options"} <= set(d)
    # Point the shipped config at the tiny run and this head's free HTTP port; nothing else changes.
    app["args"]["run"] = tiny_run.uri()
    config["http_options"]["port"] = ray_head["http_port"]
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))

    env = ray_head["env"]
    deploy = subprocess.run([str(BIN / "serve"), "deploy", str(path), "--address", ray_head["dashboard"]], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=180)
    assert deploy.returncode == 0, f"serve deploy failed:\n{deploy.stdout[-2000:]}\n{deploy.stderr[-4000:]}"

    def status() -> str:
        return subprocess.run([str(BIN / "serve"), "status", "--address", ray_head["dashboard"]], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60).stdout

    t0 = time.time()
    while True:
        out = status()
        parsed = yaml.safe_load(out) or {}
        app_status = (parsed.get("applications") or {}).get("cost-dist", {})
        if app_status.get("status") == "RUNNING":
            break
        assert app_status.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), out
        assert time.time() - t0 < 240, f"app not RUNNING after 240 s:\n{out}"
        time.sleep(2)
    deployments = app_status["deployments"]
    assert all(d["status"] == "HEALTHY" for d in deployments.values()), out

    if ray_head["ingress"] == "haproxy":  # HAProxy, with this test's config file, is what listens on the port
        # (its files go to <dir>/<node id>/, so the command line names the test's dir)
        assert pids_naming(f"{ray_head['haproxy_dir']}/"), "no HAProxy process with this head's config"
    base = f"http://127.0.0.1:{ray_head['http_port']}"
    health = requests.get(f"{base}/healthz", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    seqs = tiny_run.read_parquet("prepare/sequences.parquet").to_pylist()
    r = requests.post(f"{base}/recommend", json={"user_id": seqs[0]["user_id"], "history": seqs[0]["item_ids"][:-1], "k": 5},
                      timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == 5
    assert requests.get(f"{base}/version", timeout=30).json()["run"] == tiny_run.uri()
