"""`cost-dist serve RUN` as a process of its own: stopping it leaves nothing holding its port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, haproxy_binds

BIN = Path(sys.executable).parent


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_while_deploying_shuts_serve_down(tiny_run):
    """A SIGTERM (`kill`, `timeout`, a supervisor) that arrives while the app is still deploying runs
    serve.shutdown: no HAProxy is left behind holding the port, and the port can be served again."""
    from cost_dist.cluster import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    proc = subprocess.Popen([str(BIN / "cost-dist"), "serve", tiny_run.uri(), "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The ingress listens once serve.start has run; the app is deployed after that.
        deadline = time.time() + 240
        while not _listening(port):
            assert proc.poll() is None, f"cost-dist serve exited early: {proc.stdout.read()[-3000:]}"
            assert time.time() < deadline, "the ingress never listened"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "cost-dist: serving" not in out, "the app finished deploying before the signal: nothing was tested"
    # 143 (128 + SIGTERM) is cost-dist's handler, whose `finally` runs serve.shutdown; Ray's own
    # handler, which used to get the signal during deploy, exits with 15 and shuts nothing down.
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, out[-3000:])
    deadline = time.time() + 30  # HAProxy drains for a moment after serve.shutdown returns
    while (left := [pid for pid, binds in haproxy_binds().items() if f"127.0.0.1:{port}" in binds]) \
            and time.time() < deadline:
        time.sleep(0.5)
    for pid in left:  # don't leak it into the rest of the session, then fail
        os.kill(pid, signal.SIGKILL)
    assert not left, f"HAProxy {left} still binds 127.0.0.1:{port} after cost-dist serve was stopped"
    assert not _listening(port), out[-3000:]


def test_local_cluster_gives_serve_proxies_time_to_start(ray_session):
    """Workers of a local cluster started by init_ray (the Serve controller among them) see a proxy
    ready-check timeout of 60 s instead of Ray's 5 s, which a loaded machine overruns."""
    import ray

    from cost_dist.distributed import LOCAL_PROXY_READY_TIMEOUT_S, PROXY_READY_TIMEOUT_VAR

    @ray.remote(num_cpus=0)
    def worker_env(name):
        return os.environ.get(name)

    assert ray.get(worker_env.remote(PROXY_READY_TIMEOUT_VAR)) == LOCAL_PROXY_READY_TIMEOUT_S
    assert PROXY_READY_TIMEOUT_VAR not in os.environ  # set only while ray.init started the cluster
