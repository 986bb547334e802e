"""The pipeline as users run it: a real `ray start --head` and the real `ray job submit` CLI.

One head node (free ports, its own temp dir and process group) serves both tests; it is torn down by
killing that process group only (`ray stop` would kill every Ray cluster on the machine).

1. The tiny job runs every stage, its artefacts fit the data contracts, the report exists; a
   resubmission skips every stage.
2. A second run (upstream stages copied from the first) is stopped during generator training and
   resubmitted: completed stages are not rerun, generate resumes from its checkpoint, and the final
   metrics equal the uninterrupted run's (same seed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from conftest import REPO, TINY_CONFIG, pids_naming
from cost_dist.cluster import free_ports

pytestmark = pytest.mark.slow

STAGES = ("prepare", "embed", "tokenize", "assign", "generate", "evaluate")
UPSTREAM_OF_GENERATE = ("prepare", "embed", "tokenize", "assign")
BIN = Path(sys.executable).parent
RUNTIME_ENV = json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}})  # the README's form; init_ray must not clash
# Seconds one job may take; a tiny job takes ~2-3 min on an idle 2-core machine. Raise it on a
# loaded machine (COST_DIST_JOB_TIMEOUT=3000).
JOB_TIMEOUT = float(os.environ.get("COST_DIST_JOB_TIMEOUT", "900"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60's `ray start` otherwise requires a token for the CLI
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["DS_ACCELERATOR"] = "cpu"
    return env


@pytest.fixture(scope="module", autouse=True)
def _job_sdk_env():
    """The in-process job SDK client (status polls, logs) gets the CLI's environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        yield


@pytest.fixture(scope="module")
def ray_head():
    """A real head node on free ports; yields the dashboard (job submission) address."""
    temp_dir = tempfile.mkdtemp(prefix="rcd-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = dict(zip(("gcs", "dashboard", "client", "agent", "metrics"), free_ports(5)))
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=4", "--disable-usage-stats",
        f"--port={ports['gcs']}", f"--dashboard-port={ports['dashboard']}", "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={ports['client']}", f"--dashboard-agent-listen-port={ports['agent']}",
        f"--metrics-export-port={ports['metrics']}",
        # Its own temp dir: `ray start` records its address there, not in /tmp/ray where a bare
        # ray.init() of another process on this machine would find and join it.
        f"--temp-dir={temp_dir}",
    ]
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        deadline = time.time() + 120
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with {head.returncode}: {Path(temp_dir, 'head.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the Ray head did not answer on its dashboard port within 120 s")
            time.sleep(1)
        # The dashboard answers before the node's job agent registers ("No available agent to submit
        # job"): wait until a trivial job runs.
        while True:
            probe = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--",
                                    "python", "-c", "print('head ready')"],
                                   env=_env(), capture_output=True, text=True, timeout=180)
            if probe.returncode == 0 and "head ready" in probe.stdout:
                break
            if head.poll() is not None or time.time() > deadline + 120:
                raise RuntimeError(f"the Ray head does not run jobs:\n{(probe.stdout + probe.stderr)[-3000:]}\n"
                                   f"head log:\n{Path(temp_dir, 'head.log').read_text()[-3000:]}")
            time.sleep(2)  # "No available agent to submit job" until the node's agent registers
        yield address
    finally:
        _stop_head(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Kill our head's process group, then any of its processes that left the group (by their pids)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(timeout=15)
            break
        except subprocess.TimeoutExpired:
            continue
    deadline = time.time() + 15
    while (left := pids_naming(temp_dir)) and time.time() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _job_args(run_dir: Path) -> list[str]:
    return ["python", "jobs/full_pipeline.py", "--config", str(TINY_CONFIG.relative_to(REPO)), "--run", str(run_dir)]


def submit(address: str, run_dir: Path, wait: bool = True, submission_id: str | None = None,
           timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    """`ray job submit` as users type it. With `wait`, the result is the finished job's: the CLI's
    log tail can end while the job still runs (it exits 0 unless the job FAILED; seen once in a clean-clone CI run,
    with the job still in its evaluate stage), so this waits for a terminal status through the job
    SDK and returns the job's whole log, with returncode 0 only for SUCCEEDED."""
    submission_id = submission_id or f"job-{os.getpid()}-{time.time_ns()}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env-json", RUNTIME_ENV, "--submission-id", submission_id]
    if not wait:
        cmd.append("--no-wait")
    cmd += ["--", *_job_args(run_dir)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if not wait:
        return proc
    status = wait_for_job(address, submission_id, timeout=max(60.0, timeout - (time.time() - t0)))
    if status is None:
        return proc
    logs = JobSubmissionClient(address).get_job_logs(submission_id)
    return subprocess.CompletedProcess(proc.args, 0 if status == "SUCCEEDED" else 1,
                                       logs + f"\njob {submission_id}: {status}\n", proc.stdout + proc.stderr)


def wait_for_job(address: str, submission_id: str, timeout: float = JOB_TIMEOUT) -> str | None:
    """The job's terminal status; None if the cluster does not know the job."""
    client = JobSubmissionClient(address)
    deadline = time.time() + timeout
    while True:
        try:
            status = client.get_job_status(submission_id)
        except RuntimeError as exc:
            if "404" in str(exc):  # the CLI failed before the job was created
                return None
            status = exc  # a dashboard busy on a loaded machine: ask again
        if isinstance(status, JobStatus) and status.is_terminal():
            return str(status.value)
        assert time.time() < deadline, f"job {submission_id} still {status} after {timeout:.0f} s"
        time.sleep(1)


def job_status(address: str, submission_id: str) -> JobStatus:
    """The job's status through Ray's job SDK (one `ray job status` CLI call costs seconds of imports)."""
    return JobSubmissionClient(address).get_job_status(submission_id)


def marker_mtimes(run_dir: Path, stages=STAGES) -> dict[str, int]:
    return {s: (run_dir / s / "_COMPLETE").stat().st_mtime_ns for s in stages}


def _assert_ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"ray job submit failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def check_artefacts(run_dir: Path) -> dict:
    """The data contracts of docs/INTERFACES.md and the report, on a finished run."""
    items = pq.read_table(run_dir / "prepare" / "items.parquet")
    assert items.schema.field("item_id").type == pa.string()
    assert items.schema.field("text").type == pa.string()
    assert items.num_rows > 0 and len(set(items.column("item_id").to_pylist())) == items.num_rows

    inter = pq.read_table(run_dir / "prepare" / "interactions.parquet")
    assert [inter.schema.field(c).type for c in ("user_id", "item_id", "timestamp")] == [pa.string(), pa.string(), pa.int64()]
    keys = list(zip(inter.column("user_id").to_pylist(), inter.column("timestamp").to_pylist()))
    assert keys == sorted(keys), "interactions must be sorted by user, then time"
    assert set(inter.column("item_id").to_pylist()) <= set(items.column("item_id").to_pylist())

    seqs = pq.read_table(run_dir / "prepare" / "sequences.parquet")
    assert seqs.schema.field("user_id").type == pa.string()
    assert pa.types.is_list(seqs.schema.field("item_ids").type) or pa.types.is_large_list(seqs.schema.field("item_ids").type)
    assert sum(len(s) for s in seqs.column("item_ids").to_pylist()) == inter.num_rows

    emb = pq.read_table(run_dir / "embed" / "embeddings.parquet")
    etype = emb.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(etype) and etype.value_type == pa.float32()
    assert sorted(emb.column("item_id").to_pylist()) == sorted(items.column("item_id").to_pylist())

    meta = json.loads((run_dir / "assign" / "meta.json").read_text())
    codes = pq.read_table(run_dir / "assign" / "codes.parquet")
    ctype = codes.schema.field("semantic_id").type
    assert pa.types.is_fixed_size_list(ctype) and ctype.value_type == pa.int32()
    assert ctype.list_size == meta["num_levels"] + 1
    ids = [tuple(x) for x in codes.column("semantic_id").to_pylist()]
    assert len(set(ids)) == len(ids) == items.num_rows, "semantic IDs must be unique per item"
    assert max(i[-1] for i in ids) + 1 == meta["num_suffix"]
    assert all(0 <= c < meta["codebook_size"] for i in ids for c in i[:-1])

    assert (run_dir / "tokenize" / "model.pt").is_file()
    assert (run_dir / "generate" / "best.pt").is_file()
    for stage in STAGES:
        assert (run_dir / stage / "_COMPLETE").is_file(), f"{stage} has no completion marker"

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["name"] == "tiny"
    assert {"python", "ray", "torch", "deepspeed"} <= set(metrics["versions"])
    assert set(STAGES) <= set(metrics["timings"])
    assert metrics["tokenizer"]["train"]["history"] and metrics["generator"]["history"]
    test = metrics["evaluate"]["test"]
    for method in ("cost-dist", "pop", "dense"):
        for k in (5, 10, 20, 40):
            assert 0.0 <= test[method][f"recall@{k}"] <= 1.0 and 0.0 <= test[method][f"ndcg@{k}"] <= 1.0

    report = (run_dir / "report.md").read_text()
    assert "| cost-dist |" in report
    images = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    for name in ("report_tokenizer_loss.png", "report_generator_loss.png", "report_code_usage.png", "report_test_at_k.png"):
        assert f"plots/{name}" in images, f"report.md does not show {name}"
    for rel in images:
        png = (run_dir / rel).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n", f"{rel} is not a PNG"
    return metrics


@pytest.fixture(scope="module")
def finished_job(ray_head, tmp_path_factory):
    """The tiny pipeline run from scratch as a Ray job; (run dir, job output)."""
    run_dir = tmp_path_factory.mktemp("job") / "run"
    t0 = time.time()
    out = _assert_ok(submit(ray_head, run_dir))
    print(f"full job: {time.time() - t0:.1f} s")
    return run_dir, out


def test_job_runs_every_stage_then_resubmit_skips(ray_head, finished_job):
    run_dir, out = finished_job
    for i, stage in enumerate(STAGES, 1):
        assert f"stage {i}/6 {stage}: started" in out and f"stage {i}/6 {stage}: done" in out, out[-4000:]
    assert "test (leave-one-out" in out and "cost-dist" in out  # the summary table at the end
    metrics = check_artefacts(run_dir)
    assert metrics["last_run"]["stages_run"] == list(STAGES)
    before = marker_mtimes(run_dir)

    out2 = _assert_ok(submit(ray_head, run_dir))
    for i, stage in enumerate(STAGES, 1):
        assert f"stage {i}/6 {stage}: complete for this config, skipped" in out2
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["last_run"]["stages_run"] == [] and again["last_run"]["stages_skipped"] == list(STAGES)
    assert marker_mtimes(run_dir) == before
    assert again["evaluate"] == metrics["evaluate"]


def _generate_checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in (run_dir / "generate").rglob("checkpoint_*") if p.is_dir()] if (run_dir / "generate").exists() else []


def copy_upstream(reference_dir: Path, run_dir: Path) -> None:
    """Upstream stages (and their metrics) as the first job left them, so only generate and evaluate run."""
    reference = json.loads((reference_dir / "metrics.json").read_text())
    run_dir.mkdir()
    for stage in UPSTREAM_OF_GENERATE:
        shutil.copytree(reference_dir / stage, run_dir / stage)
    upstream_metrics = {k: v for k, v in reference.items() if k not in ("generator", "evaluate", "last_run")}
    upstream_metrics["timings"] = {s: reference["timings"][s] for s in UPSTREAM_OF_GENERATE}
    (run_dir / "metrics.json").write_text(json.dumps(upstream_metrics))


def test_interrupted_job_resumes_to_the_same_metrics(ray_head, finished_job, tmp_path):
    reference_dir, _ = finished_job
    reference = json.loads((reference_dir / "metrics.json").read_text())
    run_dir = tmp_path / "run"
    copy_upstream(reference_dir, run_dir)
    upstream = marker_mtimes(run_dir, UPSTREAM_OF_GENERATE)

    submission_id = f"interrupt-{os.getpid()}-{int(time.time())}"
    _assert_ok(submit(ray_head, run_dir, wait=False, submission_id=submission_id))
    deadline = time.time() + JOB_TIMEOUT
    last_status_check = 0.0
    while not _generate_checkpoints(run_dir):
        if time.time() - last_status_check > 10:
            status = job_status(ray_head, submission_id)
            assert not status.is_terminal(), f"job ended ({status.value}) before a generator checkpoint"
            last_status_check = time.time()
        assert time.time() < deadline, f"no generator checkpoint within {JOB_TIMEOUT} s"
        time.sleep(0.5)
    stop = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", ray_head, submission_id],
                          env=_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert job_status(ray_head, submission_id) == JobStatus.STOPPED
    assert not (run_dir / "generate" / "_COMPLETE").exists(), "generate finished before it could be interrupted"
    assert (run_dir / "generate" / "_STARTED").exists()
    assert not (run_dir / "evaluate").exists()

    out = _assert_ok(submit(ray_head, run_dir))
    assert "stage generate: resuming an interrupted run" in out
    for i, stage in enumerate(UPSTREAM_OF_GENERATE, 1):
        assert f"stage {i}/6 {stage}: complete for this config, skipped" in out
    assert marker_mtimes(run_dir, UPSTREAM_OF_GENERATE) == upstream
    metrics = check_artefacts(run_dir)
    assert metrics["last_run"]["stages_run"] == ["generate", "evaluate"]
    assert len(metrics["generator"]["history"]) == len(reference["generator"]["history"])
    for method in ("cost-dist", "pop", "dense"):
        for key, value in reference["evaluate"]["test"][method].items():
            assert metrics["evaluate"]["test"][method][key] == pytest.approx(value, abs=1e-6), (method, key)


def test_two_concurrent_jobs_with_different_runs_do_not_interfere(ray_head, finished_job, tmp_path):
    """Two jobs on one cluster at once, each over its own run directory (upstream stages copied from
    the first job): both succeed, each writes only its own run, and both reach the first job's metrics."""
    reference_dir, _ = finished_job
    reference = json.loads((reference_dir / "metrics.json").read_text())
    runs = {name: tmp_path / name for name in ("run-a", "run-b")}
    for run_dir in runs.values():
        copy_upstream(reference_dir, run_dir)
    reference_markers = marker_mtimes(reference_dir)

    ids = {name: f"{name}-{os.getpid()}-{int(time.time())}" for name in runs}
    for name, run_dir in runs.items():
        _assert_ok(submit(ray_head, run_dir, wait=False, submission_id=ids[name]))
    # Both jobs share one deadline: the second wait gets only what the first left.
    deadline = time.time() + 2 * JOB_TIMEOUT
    statuses = {name: wait_for_job(ray_head, job_id, timeout=deadline - time.time()) for name, job_id in ids.items()}
    assert set(statuses.values()) == {"SUCCEEDED"}, statuses

    for name, run_dir in runs.items():
        metrics = check_artefacts(run_dir)
        assert metrics["last_run"]["stages_run"] == ["generate", "evaluate"], name
        # Ray Train's storage for each job is inside its own run directory, under its own name.
        assert [p.name for p in (run_dir / "generate").iterdir() if p.name == "ray_train"] == ["ray_train"]
        for method in ("cost-dist", "pop", "dense"):
            for key, value in reference["evaluate"]["test"][method].items():
                assert metrics["evaluate"]["test"][method][key] == pytest.approx(value, abs=1e-6), (name, method, key)
    assert marker_mtimes(reference_dir) == reference_markers  # the first job's run is untouched
