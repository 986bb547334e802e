"""Cluster glue outside the pipeline: a local autoscaling cluster, manifest checks and generation.

These live here because they are about running cost-dist on a real cluster rather than about
the pipeline itself:

- `LocalAutoscalingCluster`: Ray's fake multi-node autoscaling cluster
  (`ray.cluster_utils.AutoscalingCluster`) made safe for a machine other Ray clusters share. Ray's
  own `start()`/`shutdown()` run `ray stop --force`, which kills every Ray cluster of the machine,
  and its config generation reads `fake_multi_node/example.yaml`, which the 2.60 wheel lacks. This
  subclass builds the config itself, starts the head on free ports in a session of its own, and on
  shutdown kills that session's processes only (the autoscaler starts the fake worker nodes from
  the head's monitor process, so they and all their workers belong to the same session).
- `autoscale_demo`: starts such a cluster with a head that has no CPU for work (as in
  cluster/ray-cluster.yaml) and a CPU worker type with min 0, runs a small pipeline stage on it, and
  records the node count over time: the autoscaler adds a worker for the stage and removes it after
  the idle timeout. `python -m cost_dist.cluster autoscale-demo` prints the timeline as JSON;
  tests/test_zz_autoscaling.py runs it in a subprocess.
- Manifest checks: `validate_launcher_config` (Ray's own cluster-config schema and checks, as `ray
  up` runs them) and `validate_kuberay_manifest` (the vendored KubeRay CRD schemas).
- Generated manifest fields: the RayService's `serveConfigV2` comes from serve/config.yaml (plus
  cluster/kuberay/serve-overrides.yaml), and the RayJob's / RayService's cluster specs from
  cluster/kuberay/raycluster.yaml (`python -m cost_dist.cluster render-kuberay`), so they cannot
  drift; `kuberay_drift` is the check the tests run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from ray.cluster_utils import AutoscalingCluster

from cost_dist.errors import CostDistError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serve" / "config.yaml"
RAYSERVICE_OVERRIDES = REPO / "cluster" / "kuberay" / "serve-overrides.yaml"

HEAD_NODE_TYPE = "ray.head.default"


class ClusterError(CostDistError):
    """A cluster helper that could not start, or manifests that disagree with their sources."""


# --------------------------------------------------------------------------------------------------
# Local autoscaling cluster
# --------------------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports nothing listens on right now (the OS picks them). Each socket stays
    bound until all are picked: ports picked one at a time, each released before the next, may repeat."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    return free_ports(1)[0]


def _fake_multinode_base_config() -> dict[str, Any]:
    """What ray/autoscaler/_private/fake_multi_node/example.yaml holds upstream (absent from the 2.60 wheel)."""
    return {
        "cluster_name": "fake_multinode",
        "max_workers": 8,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {},
        "head_node_type": HEAD_NODE_TYPE,
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


class LocalAutoscalingCluster(AutoscalingCluster):
    """A fake multi-node autoscaling Ray cluster on this machine that leaves other clusters alone.

    `head_resources` are the head's logical resources (`CPU: 0` = the head runs no work);
    `worker_node_types` are autoscaler node types (`resources`, `min_workers`, `max_workers`,
    `node_config: {}`). Worker nodes are real raylets started by the autoscaler's fake node provider.
    """

    def __init__(self, head_resources: dict[str, Any], worker_node_types: dict[str, Any],
                 idle_timeout_minutes: float = 0.2, object_store_memory: int = 200_000_000,
                 upscaling_speed: float = 1.0, env: dict[str, str] | None = None):
        self.gcs_port = free_port()
        self.object_store_memory = object_store_memory
        self.env = dict(env or {})
        self.address: str | None = None
        self._session: int | None = None
        self._config_file: str | None = None
        self._previous_current_cluster: str | None = None
        self._config_args = (dict(head_resources), copy.deepcopy(worker_node_types),
                             {"idle_timeout_minutes": idle_timeout_minutes, "upscaling_speed": upscaling_speed})
        super().__init__(head_resources=dict(head_resources), worker_node_types=copy.deepcopy(worker_node_types),
                         idle_timeout_minutes=idle_timeout_minutes, upscaling_speed=upscaling_speed)

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        import ray._private.services

        config = _fake_multinode_base_config()
        for name, node_type in worker_node_types.items():
            node_type.setdefault("node_config", {})
            node_type.setdefault("resources", {}).setdefault("object_store_memory", self.object_store_memory)
        config["available_node_types"] = dict(worker_node_types)
        config["available_node_types"][HEAD_NODE_TYPE] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
        # Fake worker nodes join this GCS; upstream they join port 6379, which another cluster may own.
        ip = ray._private.services.get_node_ip_address()
        config["provider"]["gcs_address"] = f"{ip}:{self.gcs_port}"
        config["max_workers"] = max(config["max_workers"], sum(t.get("max_workers", 0) for t in worker_node_types.values()))
        config.update(config_kwargs)
        return config

    @property
    def session(self) -> int | None:
        """The session id of the head's processes (None when stopped)."""
        return self._session

    @property
    def config(self) -> dict[str, Any]:
        return copy.deepcopy(self._config)

    def start(self, _system_config=None, override_env=None, attempts: int = 3) -> str:
        """Start the head (with the autoscaler) on free ports in a session of its own; returns the GCS address.

        `ray start` gives the raylet a fixed 30 s to register, which a heavily loaded machine can
        miss: a failed start is cleaned up and retried on fresh ports.
        """
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(_system_config, override_env)
            except ClusterError as exc:
                if attempt == attempts:
                    raise
                log.warning("autoscaling head did not start (attempt %d of %d), retrying on new ports: %s",
                            attempt, attempts, str(exc).splitlines()[-1])
                head, workers, kwargs = self._config_args
                self.gcs_port = free_port()
                self._config = self._generate_config(dict(head), copy.deepcopy(workers), **kwargs)
        raise AssertionError("unreachable")

    def _start_once(self, _system_config=None, override_env=None) -> str:
        import ray._private.services
        from ray._private.utils import get_ray_address_file

        address_file = get_ray_address_file(None)
        if os.path.exists(address_file):
            self._previous_current_cluster = Path(address_file).read_text()
        fd, self._config_file = tempfile.mkstemp(prefix="cost-dist-autoscaler-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self._config, f)
        head = dict(self._head_resources)
        dashboard, client, agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(8)
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
            f"--autoscaling-config={self._config_file}",
            f"--port={self.gcs_port}",
            f"--num-cpus={head.pop('CPU', 0)}",
            f"--num-gpus={head.pop('GPU', 0)}",
            f"--object-store-memory={head.pop('object_store_memory', self.object_store_memory)}",
            "--include-dashboard=false",
            f"--dashboard-port={dashboard}",  # checked even without the dashboard; 8265 may be taken
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            "--disable-usage-stats",
        ]
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        if _system_config is not None:
            cmd.append(f"--system-config={json.dumps(_system_config, separators=(',', ':'))}")
        env = os.environ.copy()
        env.pop("RAY_ADDRESS", None)
        env.update({
            # The fake provider refuses to run without RAY_FAKE_CLUSTER; a 1 s autoscaler loop keeps
            # scale-up and scale-down prompt.
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            # A local test cluster: no token, so drivers and CLIs connect without ~/.ray/auth_token.
            "RAY_AUTH_MODE": "disabled",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        })
        env.update(self.env)
        env.update(override_env or {})
        log.info("starting autoscaling head: %s", " ".join(cmd))
        # A new session: the head, its autoscaler, every fake worker node it launches and their worker
        # processes share one session id that shutdown() can kill without touching anything else.
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self._session = proc.pid
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            self.shutdown()
            raise ClusterError("`ray start --head` of the autoscaling cluster did not return in 180 s") from None
        if proc.returncode != 0:
            self.shutdown()
            raise ClusterError(f"`ray start --head` of the autoscaling cluster failed (exit {proc.returncode}):\n{out[-3000:]}")
        ray._private.services.find_gcs_addresses.cache_clear()
        self.address = f"{ray._private.services.get_node_ip_address()}:{self.gcs_port}"
        log.info("autoscaling cluster up at %s (session %s)", self.address, self._session)
        return self.address

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop the head, the autoscaler and the worker nodes it started: this cluster's processes only."""
        from ray._private.utils import get_ray_address_file

        sid, self._session = self._session, None
        if sid is not None:
            log.info("stopping the autoscaling cluster: %d processes of session %d", len(_session_pids(sid)), sid)
            _kill_session(sid, grace_s)
        if self._config_file and os.path.exists(self._config_file):
            os.unlink(self._config_file)
        # `ray start` recorded this cluster as the machine's "current" one; put the previous entry back
        # if nobody started another cluster since, so `ray.init("auto")` elsewhere does not find a dead one.
        address_file = get_ray_address_file(None)
        with contextlib.suppress(OSError):
            if self.address and Path(address_file).read_text().strip() == self.address:
                if self._previous_current_cluster is not None:
                    Path(address_file).write_text(self._previous_current_cluster)
                else:
                    os.unlink(address_file)

    def __enter__(self) -> "LocalAutoscalingCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def stop_session(sid: int, grace_s: float = 5.0) -> None:
    """Stop every process of a session a LocalAutoscalingCluster started (e.g. after its owner died)."""
    if sid in (0, 1, os.getsid(0)):
        raise ClusterError(f"refusing to stop session {sid}: it is not a cluster's own session")
    _kill_session(sid, grace_s)


def _kill_session(sid: int, grace_s: float) -> None:
    """SIGTERM every process of session `sid`, then SIGKILL what is left after `grace_s`.

    By session, not by process group: the raylet moves each worker process into a process group of
    its own, but the workers keep the session of the `ray start` that created their raylet.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _session_pids(sid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.time() + (grace_s if sig == signal.SIGTERM else 2.0)
        while time.time() < deadline and _session_pids(sid):
            time.sleep(0.2)


def _session_pids(sid: int) -> list[int]:
    import psutil

    me = os.getpid()
    pids = []
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid != me and os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
    return pids


# --------------------------------------------------------------------------------------------------
# Autoscaling demo: a pipeline stage on a head without capacity
# --------------------------------------------------------------------------------------------------


class NodeTimeline:
    """Samples the cluster's alive nodes once a second (from the driver) until stopped."""

    def __init__(self, t0: float, interval_s: float = 1.0):
        self.t0 = t0
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self.marks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="node-timeline", daemon=True)

    def start(self) -> "NodeTimeline":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def mark(self, name: str) -> None:
        self.marks[name] = round(time.time() - self.t0, 2)

    def sample(self) -> dict[str, Any]:
        import ray

        alive = [n for n in ray.nodes() if n.get("Alive")]
        workers = [n for n in alive if not _is_head(n)]
        gpu_workers = [n for n in workers if n.get("Resources", {}).get("GPU", 0) > 0]
        point = {"t": round(time.time() - self.t0, 2), "nodes": len(alive), "workers": len(workers),
                 "cpu_workers": len(workers) - len(gpu_workers), "gpu_workers": len(gpu_workers)}
        self.samples.append(point)
        return point

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as exc:  # a GCS hiccup while nodes come and go: keep sampling
                log.debug("node sample failed: %s", exc)
            self._stop.wait(self.interval_s)

    def changes(self) -> list[dict[str, Any]]:
        """The samples where the node count changed (plus the first and last)."""
        out: list[dict[str, Any]] = []
        for i, s in enumerate(self.samples):
            if i == 0 or i == len(self.samples) - 1 or any(
                    s[k] != self.samples[i - 1][k] for k in ("nodes", "cpu_workers", "gpu_workers")):
                out.append(s)
        return out

    def wait_for(self, predicate, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.samples and predicate(self.samples[-1]):
                return self.samples[-1]
            time.sleep(0.5)
        return None


def _is_head(node: dict[str, Any]) -> bool:
    return any(k.startswith("node:__internal_head__") for k in node.get("Resources", {}))


def demo_config(num_items: int = 120, num_users: int = 60):
    """A tiny pipeline config whose embed actors ask for CPU that only an autoscaled worker has."""
    from cost_dist.config import Config

    return Config.from_dict({
        "name": "autoscale-demo",
        "data": {"dataset": "synthetic", "synthetic": {"num_items": num_items, "num_users": num_users, "num_topics": 4,
                                                        "min_seq_len": 5, "max_seq_len": 8}},
        "embed": {"batch_size": 32},
        "resources": {"embed": {"min_actors": 1, "max_actors": 1, "num_cpus": 1, "num_gpus": 0}},
    })


def _run_embed_stage(cfg, run_uri: str) -> dict[str, Any]:
    """The real pipeline: prepare (no Ray) then embed (Ray Data actors sized by cfg.resources.embed)."""
    from cost_dist.pipeline import run_stage
    from cost_dist.rundir import RunDir

    run = RunDir(run_uri)
    run_stage(cfg, run, "prepare")
    metrics = run_stage(cfg, run, "embed") or {}
    return {"stage": "embed", "rows": run.read_parquet("embed/embeddings.parquet").num_rows, "metrics": metrics}


def _run_ray_data_stage(cfg, run_uri: str) -> dict[str, Any]:
    """A plain Ray Data map_batches job sized by cfg.resources.embed (checks the cluster helper alone)."""
    import ray

    res = cfg.resources.embed

    class Square:
        def __call__(self, batch):
            batch["y"] = batch["id"] * batch["id"]
            return batch

    ds = ray.data.range(2000, override_num_blocks=8).map_batches(
        Square, batch_size=250, num_cpus=res.num_cpus, num_gpus=res.num_gpus or None,
        compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors))
    total = int(sum(int(b["y"].sum()) for b in ds.iter_batches(batch_size=500)))
    return {"stage": "ray-data", "rows": 2000, "checksum": total, "expected": sum(i * i for i in range(2000))}


def autoscale_demo(stage: str = "embed", idle_timeout_minutes: float = 0.2, worker_cpus: int = 2,
                   scale_down_timeout_s: float = 150.0, run_uri: str | None = None,
                   state_file: str | None = None, stop_on_sigterm: bool = False) -> dict[str, Any]:
    """Run a small stage on a head with `CPU: 0` and one autoscaling CPU worker type (min 0, max 1).

    Returns the node timeline and the moments the worker came, the stage finished and the worker went.
    `state_file` receives the cluster's session id and address as soon as the head is up, so that a
    caller can clean up even if this process is killed; `stop_on_sigterm` turns SIGTERM into a
    clean shutdown (ray.init installs a handler that would otherwise exit without one).
    One worker type with max 1 keeps the node counts deterministic: Ray Data's own cluster
    autoscaler asks for more capacity when the stage runs slowly (a loaded machine), and with a
    second type available (a fake GPU type was tried) the autoscaler launched that one as well.
    """
    import ray

    worker_types = {
        "cpu_worker": {"resources": {"CPU": worker_cpus}, "min_workers": 0, "max_workers": 1, "node_config": {}},
    }
    cluster = LocalAutoscalingCluster(head_resources={"CPU": 0}, worker_node_types=worker_types,
                                      idle_timeout_minutes=idle_timeout_minutes)
    cfg = demo_config()
    result: dict[str, Any] = {"stage": stage, "idle_timeout_minutes": idle_timeout_minutes,
                              "head_resources": {"CPU": 0},
                              "worker_types": {name: {**t["resources"], "min_workers": 0, "max_workers": 1}
                                               for name, t in worker_types.items()},
                              "stage_resources": {"embed": dict(vars(cfg.resources.embed))}}
    tmp = tempfile.TemporaryDirectory(prefix="cost-dist-autoscale-")
    saved_env = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    t0 = time.time()
    timeline = NodeTimeline(t0)
    try:
        address = cluster.start()
        result["cluster_start_s"] = round(time.time() - t0, 2)
        result["session"] = cluster.session
        if state_file:
            Path(state_file).write_text(json.dumps({"session": cluster.session, "address": address}))
        # The stages' init_ray() joins this cluster (already initialised here; kept for subprocesses).
        os.environ["RAY_ADDRESS"] = address
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=address, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
        if stop_on_sigterm:
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        timeline.start()
        first = timeline.wait_for(lambda s: True, 10) or {}
        result["workers_before_stage"] = first.get("workers")
        timeline.mark("stage_start")
        runner = _run_embed_stage if stage == "embed" else _run_ray_data_stage
        result["stage_result"] = runner(cfg, run_uri or tmp.name)
        timeline.mark("stage_done")
        result["workers_at_stage_end"] = timeline.sample()["workers"]
        gone = timeline.wait_for(lambda s: s["workers"] == 0, scale_down_timeout_s)
        if gone is not None:
            timeline.mark("workers_removed")
    finally:
        timeline.stop()
        with contextlib.suppress(Exception):
            ray.shutdown()
        cluster.shutdown()
        tmp.cleanup()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    samples = timeline.samples
    added = next((s["t"] for s in samples if s["workers"] > 0), None)
    result.update({
        "timeline": timeline.changes(),
        "num_samples": len(samples),
        "max_workers_seen": max((s["workers"] for s in samples), default=0),
        "max_cpu_workers_seen": max((s["cpu_workers"] for s in samples), default=0),
        "max_gpu_workers_seen": max((s["gpu_workers"] for s in samples), default=0),
        "worker_added_s": added,
        "stage_start_s": timeline.marks.get("stage_start"),
        "stage_done_s": timeline.marks.get("stage_done"),
        "workers_removed_s": timeline.marks.get("workers_removed"),
        "final_workers": samples[-1]["workers"] if samples else None,
        "total_s": round(time.time() - t0, 2),
    })
    return result


# --------------------------------------------------------------------------------------------------
# Manifest validation: Ray's cluster-config schema, KubeRay's CRD schemas
# --------------------------------------------------------------------------------------------------

KUBERAY_DIR = REPO / "cluster" / "kuberay"
KUBERAY_SCHEMAS = KUBERAY_DIR / "schemas"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")


def validate_launcher_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check a cluster launcher config the way `ray up` does; returns it with Ray's defaults filled in.

    The raw file is validated against ray/autoscaler/ray-schema.json (the top level rejects unknown
    keys), then `prepare_config` merges the provider's defaults and `validate_config` runs Ray's own
    checks on the result, as `ray up` does before it creates any node.
    """
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(config, schema)
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ClusterError(f"cluster launcher config: {where}: {exc.message}") from None
    except (ValueError, RuntimeError) as exc:
        raise ClusterError(f"cluster launcher config: {exc}") from None
    return prepared


def kuberay_schema(kind: str, strict: bool = True) -> dict[str, Any]:
    """The vendored openAPIV3Schema of a KubeRay CRD (see cluster/kuberay/schemas/SOURCE.json).

    strict=True rejects fields the schema does not define, as `kubectl apply --validate=strict`
    does (the API server would otherwise prune them silently): every object schema with
    `properties` and no `additionalProperties` / `x-kubernetes-preserve-unknown-fields` is closed.
    """
    if kind not in KUBERAY_KINDS:
        raise ClusterError(f"no vendored schema for kind {kind!r} (have {', '.join(KUBERAY_KINDS)})")
    path = KUBERAY_SCHEMAS / f"{kind.lower()}.schema.json"
    schema = json.loads(_load_text(path))
    return _close_objects(schema) if strict else schema


def _close_objects(node: Any) -> Any:
    if isinstance(node, list):
        return [_close_objects(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _close_objects(v) for k, v in node.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def validate_kuberay_manifest(doc: dict[str, Any], strict: bool = True) -> list[str]:
    """Errors of one KubeRay manifest against its CRD schema ([] = valid). CEL rules are not evaluated."""
    import jsonschema

    if not isinstance(doc, dict):
        return [f"manifest must be a mapping, got {type(doc).__name__}"]
    kind = doc.get("kind")
    errors = []
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion: expected ray.io/v1, got {doc.get('apiVersion')!r}")
    if kind not in KUBERAY_KINDS:
        return errors + [f"kind: expected one of {', '.join(KUBERAY_KINDS)}, got {kind!r}"]
    if not (doc.get("metadata") or {}).get("name"):
        errors.append("metadata.name: missing")
    validator = jsonschema.Draft7Validator(kuberay_schema(kind, strict=strict))
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        errors.append(f"{kind} {where}: {err.message}")
    return errors


# --------------------------------------------------------------------------------------------------
# Generated parts of the KubeRay manifests: serveConfigV2 from serve/config.yaml, cluster specs
# --------------------------------------------------------------------------------------------------


def _load_yaml(path: Path, what: str) -> Any:
    if not path.exists():
        raise ClusterError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ClusterError(f"{what} {path} is not valid YAML: {exc}") from None


def _load_text(path: Path) -> str:
    if not path.exists():
        raise ClusterError(f"file not found: {path}")
    return path.read_text()


def _merge(base: Any, update: Any) -> Any:
    """Mappings merge key by key; lists of named mappings (deployments) merge by `name`."""
    if isinstance(base, dict) and isinstance(update, dict):
        out = dict(base)
        for k, v in update.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(update, list) and all(isinstance(x, dict) and "name" in x for x in base + update)):
        out = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        for item in update:
            if item["name"] in index:
                out[index[item["name"]]] = _merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(update)


def serve_config_for_cluster(serve_config: Path = SERVE_CONFIG, overrides: Path = RAYSERVICE_OVERRIDES) -> dict[str, Any]:
    """serve/config.yaml with cluster/kuberay/serve-overrides.yaml applied: the RayService's serveConfigV2.

    The overrides hold only what must differ on the cluster (the run on shared storage, the proxy's
    host); every application, deployment and autoscaling setting comes from serve/config.yaml.
    """
    base = _load_yaml(serve_config, "Serve config")
    if not isinstance(base, dict) or not isinstance(base.get("applications"), list):
        raise ClusterError(f"Serve config {serve_config} has no `applications` list")
    patch = (_load_yaml(overrides, "RayService overrides") if overrides.exists() else None) or {}
    out = {k: copy.deepcopy(v) for k, v in base.items() if k != "applications"}
    for k, v in (patch.get("top_level") or {}).items():
        out[k] = copy.deepcopy(v)
    apps = copy.deepcopy(base["applications"])
    by_name = {a.get("name"): a for a in apps}
    for name, app_patch in (patch.get("applications") or {}).items():
        if name not in by_name:
            raise ClusterError(f"{overrides}: application {name!r} is not in {serve_config} "
                               f"(applications: {', '.join(map(str, by_name))})")
        app = by_name[name]
        for key in (app_patch or {}).get("remove") or []:
            _remove_dotted(app, key)
        merged = _merge(app, (app_patch or {}).get("set") or {})
        app.clear()
        app.update(merged)
    out["applications"] = apps
    return out


def _remove_dotted(d: dict[str, Any], dotted: str) -> None:
    parts = dotted.split(".")
    node: Any = d
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    if isinstance(node, dict):
        node.pop(parts[-1], None)
        if len(parts) > 1 and not node:  # drop a section the removal left empty
            _remove_dotted(d, ".".join(parts[:-1]))


def render_serve_config_v2(serve_config: Path = SERVE_CONFIG, overrides: Path = RAYSERVICE_OVERRIDES) -> str:
    """The RayService's serveConfigV2 (a YAML string, as KubeRay expects it)."""
    return yaml.safe_dump(serve_config_for_cluster(serve_config, overrides), sort_keys=False)


def raycluster_spec(manifest: Path = KUBERAY_DIR / "raycluster.yaml") -> dict[str, Any]:
    doc = _load_yaml(manifest, "RayCluster manifest")
    if not isinstance(doc, dict) or doc.get("kind") != "RayCluster" or not isinstance(doc.get("spec"), dict):
        raise ClusterError(f"{manifest} is not a RayCluster manifest with a spec")
    return doc["spec"]


def _replace_block(text: str, key: str, body: str, literal: bool, where: Path) -> str:
    """Replace the value of the one `key:` line (and the lines indented under it) by `body`.

    Text-level, so the comments and layout of the rest of the manifest stay as written.
    """
    lines = text.splitlines(keepends=True)
    hits = [i for i, ln in enumerate(lines) if ln.lstrip().startswith(f"{key}:") and not ln.lstrip().startswith("#")]
    if len(hits) != 1:
        raise ClusterError(f"{where}: expected one `{key}:` field, found {len(hits)}")
    i = hits[0]
    indent = len(lines[i]) - len(lines[i].lstrip())
    end = i + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    while end > i + 1 and not lines[end - 1].strip():  # blank lines after the block stay
        end -= 1
    pad = " " * (indent + 2)
    head = " " * indent + f"{key}: |\n" if literal else " " * indent + f"{key}:\n"
    block = [head] + [(pad + ln if ln.strip() else "\n") for ln in body.splitlines(keepends=True)]
    if not block[-1].endswith("\n"):
        block[-1] += "\n"
    return "".join(lines[:i] + block + lines[end:])


GENERATED_MANIFESTS = ("rayjob.yaml", "rayservice.yaml")


def render_kuberay_manifest(path: Path, raycluster: Path = KUBERAY_DIR / "raycluster.yaml",
                            serve_config: Path = SERVE_CONFIG, overrides: Path = RAYSERVICE_OVERRIDES) -> str:
    """A KubeRay manifest with its generated fields filled in from their sources.

    rayClusterSpec (RayJob) and rayClusterConfig (RayService) <- raycluster.yaml's spec;
    serveConfigV2 (RayService) <- serve/config.yaml + serve-overrides.yaml.
    """
    text = _load_text(path)
    doc = yaml.safe_load(text) or {}
    spec_text = yaml.safe_dump(raycluster_spec(raycluster), sort_keys=False)
    kind = doc.get("kind")
    if kind == "RayJob":
        text = _replace_block(text, "rayClusterSpec", spec_text, False, path)
    elif kind == "RayService":
        text = _replace_block(text, "serveConfigV2", render_serve_config_v2(serve_config, overrides), True, path)
        text = _replace_block(text, "rayClusterConfig", spec_text, False, path)
    else:
        raise ClusterError(f"{path}: nothing is generated in a {kind!r} manifest")
    return text


def kuberay_drift(kuberay_dir: Path = KUBERAY_DIR) -> list[str]:
    """Generated manifests whose committed text differs from what render_kuberay_manifest gives ([] = in sync)."""
    source = kuberay_dir / "raycluster.yaml"
    return [name for name in GENERATED_MANIFESTS
            if render_kuberay_manifest(kuberay_dir / name, raycluster=source) != _load_text(kuberay_dir / name)]


def serve_config_v2_diff(manifest: Path = KUBERAY_DIR / "rayservice.yaml", serve_config: Path = SERVE_CONFIG,
                         overrides: Path = RAYSERVICE_OVERRIDES) -> list[str]:
    """Field-level differences between the RayService's serveConfigV2 and serve/config.yaml (+ overrides)."""
    doc = _load_yaml(manifest, "RayService manifest")
    try:
        actual = yaml.safe_load(doc["spec"]["serveConfigV2"])
    except (KeyError, TypeError):
        raise ClusterError(f"{manifest} has no spec.serveConfigV2") from None
    return _diff(serve_config_for_cluster(serve_config, overrides), actual, "serveConfigV2")


def _diff(expected: Any, actual: Any, where: str) -> list[str]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for k in sorted(set(expected) | set(actual), key=str):
            if k not in actual:
                out.append(f"{where}.{k}: missing (expected {expected[k]!r})")
            elif k not in expected:
                out.append(f"{where}.{k}: unexpected (manifest has {actual[k]!r})")
            else:
                out += _diff(expected[k], actual[k], f"{where}.{k}")
        return out
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in _diff(e, a, f"{where}[{i}]")]
    return [] if expected == actual else [f"{where}: expected {expected!r}, manifest has {actual!r}"]


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cost_dist.cluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("autoscale-demo", help="run a small stage on a local autoscaling cluster; print the node timeline as JSON")
    p.add_argument("--stage", choices=["embed", "ray-data"], default="embed",
                   help="embed: the pipeline's prepare+embed stages; ray-data: a plain Ray Data job with the same resources")
    p.add_argument("--idle-timeout-minutes", type=float, default=0.2)
    p.add_argument("--worker-cpus", type=int, default=2)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--state", help="write {session, address} of the cluster here as soon as it is up")
    p = sub.add_parser("render-kuberay", help="regenerate the generated fields of cluster/kuberay/rayjob.yaml and rayservice.yaml")
    p.add_argument("--check", action="store_true", help="only report manifests that are out of date (exit 1 if any)")
    p = sub.add_parser("serve-config", help="print serve/config.yaml as the cluster runs it (serve-overrides.yaml applied): "
                                            "the RayService's serveConfigV2, or a file for `serve deploy`")
    p.add_argument("--run", help="the run to serve on the cluster (replaces args.run of every application)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "autoscale-demo":
            # A SIGTERM (a test's timeout) still runs the finally blocks that stop the cluster.
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
            result = autoscale_demo(stage=args.stage, idle_timeout_minutes=args.idle_timeout_minutes,
                                    worker_cpus=args.worker_cpus, state_file=args.state, stop_on_sigterm=True)
            text = json.dumps(result, indent=2)
            if args.out:
                Path(args.out).write_text(text)
            print(text)
            return 0
        if args.command == "serve-config":
            config = serve_config_for_cluster()
            for app in config["applications"]:
                if args.run:
                    app.setdefault("args", {})["run"] = args.run
            print(yaml.safe_dump(config, sort_keys=False), end="")
            return 0
        if args.check:
            stale = kuberay_drift(KUBERAY_DIR)
            for name in stale:
                print(f"{KUBERAY_DIR / name} is out of date: run python -m cost_dist.cluster render-kuberay")
            return 1 if stale else 0
        for name in GENERATED_MANIFESTS:
            path = KUBERAY_DIR / name
            path.write_text(render_kuberay_manifest(path, raycluster=KUBERAY_DIR / "raycluster.yaml"))
            print(f"wrote {path}")
        return 0
    except CostDistError as exc:
        print(f"cost_dist.cluster: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
