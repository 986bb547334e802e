"""Shared fixtures: one real local Ray cluster per test session, and one tiny finished run."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "tiny.yaml"


def pids_naming(token: str) -> list[int]:
    """Pids (other than this process) whose command line contains `token`: how tests find the
    processes of a Ray head they started that left its process group."""
    me = os.getpid()
    return [proc.pid for proc in psutil.process_iter(["cmdline"])
            if proc.pid != me and token in " ".join(proc.info["cmdline"] or ())]


def haproxy_binds() -> dict[int, list[str]]:
    """The `bind` addresses in the config of every running HAProxy (Serve's ingress), by PID."""
    out: dict[int, list[str]] = {}
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if not (argv and argv[0].endswith("haproxy") and "-f" in argv[:-1]):
            continue
        try:
            config = Path(argv[argv.index("-f") + 1]).read_text()
        except OSError:  # a config file already removed with its test's tmp dir
            continue
        out[proc.pid] = [line.split()[1] for line in config.splitlines() if line.strip().startswith("bind ")]
    return out


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster shared by the tests of this session (4 logical CPUs on 2 cores).

    init_ray(address="local") starts a private cluster (a bare ray.init() would join whatever cluster
    the last `ray start` on this machine recorded) and tells its workers its GCS address.
    """
    import ray

    from cost_dist.distributed import init_ray

    init_ray(num_cpus=4, address="local")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_config():
    from cost_dist.config import Config

    return Config.load(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_run(ray_session, tiny_config, tmp_path_factory):
    """A full pipeline run on the tiny synthetic config, shared by evaluation, Serve and report tests."""
    from cost_dist.pipeline import run_pipeline
    from cost_dist.report import write_report
    from cost_dist.rundir import RunDir

    run = RunDir(str(tmp_path_factory.mktemp("tiny_run")))
    run_pipeline(tiny_config, run)
    write_report(run)
    return run
