"""cluster/: the launcher YAML against Ray's own schema, the KubeRay manifests against the CRD schemas,
generated manifest fields in sync with their sources, and node types that fit what each stage asks for."""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from cost_dist.cluster import (
    GENERATED_MANIFESTS,
    KUBERAY_DIR,
    KUBERAY_SCHEMAS,
    ClusterError,
    kuberay_drift,
    render_kuberay_manifest,
    serve_config_for_cluster,
    serve_config_v2_diff,
    validate_kuberay_manifest,
    validate_launcher_config,
)
from cost_dist.config import Config

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "cluster" / "ray-cluster.yaml"
SERVE_CONFIG = REPO / "serve" / "config.yaml"
MANIFESTS = ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml")


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _stage_requests(cfg: Config) -> dict[str, dict[str, float]]:
    """The per-actor / per-worker / per-replica resource bundle each stage of a config asks for."""
    r = cfg.resources
    out = {"embed": {"CPU": r.embed.num_cpus, "GPU": r.embed.num_gpus}}
    for name, tw in (("tokenizer", r.tokenizer), ("generator", r.generator)):
        out[name] = {"CPU": tw.cpus_per_worker, "GPU": tw.gpus_per_worker if tw.use_gpu else 0.0, **tw.resources}
    out["evaluate"] = {"CPU": r.evaluate.num_cpus, "GPU": r.evaluate.num_gpus}
    out["serve.recommender"] = {"CPU": r.serve.recommender_num_cpus, "GPU": r.serve.recommender_num_gpus}
    return out


def _fits(request: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0) >= v for k, v in request.items() if v > 0)


# --------------------------------------------------------------------------------------------------
# Ray cluster launcher
# --------------------------------------------------------------------------------------------------


def test_launcher_config_passes_rays_own_validation():
    prepared = validate_launcher_config(_yaml(LAUNCHER))
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must run no work, so stages make the autoscaler add workers"
    workers = {n: t for n, t in types.items() if n != prepared["head_node_type"]}
    assert set(workers) == {"cpu_worker", "gpu_worker"}
    assert all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in workers.values())
    assert workers["gpu_worker"]["resources"].get("GPU", 0) >= 1 and "GPU" not in workers["cpu_worker"]["resources"]
    assert prepared["provider"]["type"] == "aws"
    # Every node installs this package (GPU workers: the CUDA builds).
    assert any("pip install" in c and "cost-dist[cpu]" in c for c in prepared["setup_commands"])
    assert any("cost-dist[gpu]" in c for c in workers["gpu_worker"]["worker_setup_commands"])
    assert "~/cost-dist" in prepared["file_mounts"]
    assert all("RAY_AUTH_MODE=token" in c for c in prepared["head_start_ray_commands"][1:] + prepared["worker_start_ray_commands"][1:])


@pytest.mark.parametrize("mutate, names", [
    (lambda c: c.update(idle_timeout_minute=5), "idle_timeout_minute"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers="zero"), "min_workers"),
    (lambda c: c["available_node_types"]["cpu_worker"]["resources"].update(CPU=-1), "CPU"),
    (lambda c: c.update(head_node_type="no_such_type"), "head_node_type"),
    (lambda c: c.update(max_workers=0, available_node_types={
        **c["available_node_types"], "cpu_worker": {**c["available_node_types"]["cpu_worker"], "min_workers": 2}}), "max_workers"),
])
def test_launcher_validation_rejects_broken_configs(mutate, names):
    config = _yaml(LAUNCHER)
    mutate(config)
    with pytest.raises(ClusterError, match=names):
        validate_launcher_config(config)


# --------------------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------------------


def test_vendored_crd_schemas_name_their_source():
    source = json.loads((KUBERAY_SCHEMAS / "SOURCE.json").read_text())
    assert source["repository"] == "https://github.com/ray-project/kuberay"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", source["version"]) and re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    for name in source["files"]:
        schema = json.loads((KUBERAY_SCHEMAS / name).read_text())
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"])


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifests_validate_against_crd_schemas(name):
    doc = _yaml(KUBERAY_DIR / name)
    assert validate_kuberay_manifest(doc) == []


def test_kuberay_validation_catches_typos_types_and_enums():
    doc = _yaml(KUBERAY_DIR / "raycluster.yaml")
    broken = copy.deepcopy(doc)
    broken["spec"]["workerGroupSpecs"][1]["maxReplica"] = 4  # typo of maxReplicas
    broken["spec"]["workerGroupSpecs"][0]["minReplicas"] = "0"  # string, not integer
    broken["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"  # not in the enum
    broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    errors = "\n".join(validate_kuberay_manifest(broken))
    for needle in ("maxReplica", "workerGroupSpecs.0.minReplicas", "upscalingMode", "imagePullPolicy"):
        assert needle in errors, errors
    job = _yaml(KUBERAY_DIR / "rayjob.yaml")
    job["kind"] = "RayJobs"
    assert any("kind" in e for e in validate_kuberay_manifest(job))
    svc = _yaml(KUBERAY_DIR / "rayservice.yaml")
    del svc["spec"]["rayClusterConfig"]
    assert any("rayClusterConfig" in e for e in validate_kuberay_manifest(svc))


def test_kuberay_cluster_autoscales_cpu_and_gpu_groups_from_zero():
    spec = _yaml(KUBERAY_DIR / "raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert g["minReplicas"] == 0 and g["replicas"] == 0 and g["maxReplicas"] > 0
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1
    assert groups["gpu"]["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    assert groups["cpu"]["template"]["spec"]["containers"][0]["image"].endswith("-cpu")


def test_generated_manifest_fields_are_in_sync_with_their_sources():
    assert kuberay_drift() == [], "run: python -m cost_dist.cluster render-kuberay"
    assert serve_config_v2_diff() == []
    cluster_spec = _yaml(KUBERAY_DIR / "raycluster.yaml")["spec"]
    assert _yaml(KUBERAY_DIR / "rayjob.yaml")["spec"]["rayClusterSpec"] == cluster_spec
    assert _yaml(KUBERAY_DIR / "rayservice.yaml")["spec"]["rayClusterConfig"] == cluster_spec


def test_serve_config_v2_agrees_with_serve_config_yaml():
    """The applications section equals serve/config.yaml's, except the overrides the cluster needs."""
    from ray.serve.schema import ServeDeploySchema

    local = _yaml(SERVE_CONFIG)
    v2 = yaml.safe_load(_yaml(KUBERAY_DIR / "rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(v2)  # a config Serve itself accepts
    assert len(v2["applications"]) == len(local["applications"])
    for mine, theirs in zip(v2["applications"], local["applications"]):
        assert {k: v for k, v in mine.items() if k != "args"} == {k: v for k, v in theirs.items() if k != "args"}
        assert {k: v for k, v in mine["args"].items() if k != "run"} == {k: v for k, v in theirs["args"].items() if k != "run"}
        assert mine["args"]["run"].startswith(("s3://", "gs://", "/")), "the cluster serves a run on shared storage"
    assert v2["http_options"]["host"] == "0.0.0.0"
    # The RayService serves the run the RayJob writes.
    entrypoint = _yaml(KUBERAY_DIR / "rayjob.yaml")["spec"]["entrypoint"]
    assert f"--run {v2['applications'][0]['args']['run']}" in entrypoint


def test_render_follows_a_changed_serve_config(tmp_path):
    serve_config = _yaml(SERVE_CONFIG)
    recommender = next(d for d in serve_config["applications"][0]["deployments"] if d["name"] == "Recommender")
    recommender["autoscaling_config"]["max_replicas"] = 17
    changed = tmp_path / "config.yaml"
    changed.write_text(yaml.safe_dump(serve_config))
    manifest = KUBERAY_DIR / "rayservice.yaml"
    diff = serve_config_v2_diff(manifest, serve_config=changed)
    assert len(diff) == 1 and "max_replicas" in diff[0] and "17" in diff[0]
    rendered = tmp_path / "rayservice.yaml"
    rendered.write_text(render_kuberay_manifest(manifest, serve_config=changed))
    assert serve_config_v2_diff(rendered, serve_config=changed) == []
    assert validate_kuberay_manifest(_yaml(rendered)) == []
    # Comments and hand-written fields outside the generated blocks survive rendering.
    assert rendered.read_text().split("spec:")[0] == manifest.read_text().split("spec:")[0]


def test_overrides_merge_deployments_by_name_and_reject_unknown_apps(tmp_path):
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({"applications": {"cost-dist": {"set": {"deployments": [
        {"name": "Recommender", "ray_actor_options": {"num_gpus": 1}}]}}}}))
    cfg = serve_config_for_cluster(SERVE_CONFIG, overrides)
    deps = {d["name"]: d for d in cfg["applications"][0]["deployments"]}
    local = {d["name"]: d for d in _yaml(SERVE_CONFIG)["applications"][0]["deployments"]}
    assert set(deps) == set(local)
    assert deps["Recommender"]["ray_actor_options"]["num_gpus"] == 1
    assert deps["Recommender"]["ray_actor_options"]["num_cpus"] == local["Recommender"]["ray_actor_options"]["num_cpus"]
    overrides.write_text(yaml.safe_dump({"applications": {"no-such-app": {"set": {}}}}))
    with pytest.raises(ClusterError, match="no-such-app"):
        serve_config_for_cluster(SERVE_CONFIG, overrides)


def test_render_check_cli_flags_a_stale_manifest(tmp_path, monkeypatch):
    import cost_dist.cluster as cluster

    copy_dir = tmp_path / "kuberay"
    shutil.copytree(KUBERAY_DIR, copy_dir)
    stale = copy_dir / "rayjob.yaml"
    stale.write_text(stale.read_text().replace("maxReplicas: 8", "maxReplicas: 3"))
    monkeypatch.setattr(cluster, "KUBERAY_DIR", copy_dir)
    # The copy's raycluster.yaml is the source: the hand-edited rayClusterSpec is flagged.
    assert cluster.kuberay_drift(copy_dir) == ["rayjob.yaml"]
    assert cluster.main(["render-kuberay", "--check"]) == 1
    assert cluster.main(["render-kuberay"]) == 0
    assert cluster.main(["render-kuberay", "--check"]) == 0
    assert "maxReplicas: 3" not in stale.read_text()


# --------------------------------------------------------------------------------------------------
# Resources: the configs ask for what the node types have
# --------------------------------------------------------------------------------------------------


def test_gpu_cluster_config_asks_for_gpus_and_fits_the_gpu_node_types():
    gpu_cfg = Config.load(REPO / "jobs" / "configs" / "gpu-cluster.yaml")
    demo_cfg = Config.load(REPO / "jobs" / "configs" / "demo.yaml")
    gpu_requests, demo_requests = _stage_requests(gpu_cfg), _stage_requests(demo_cfg)
    for stage in ("embed", "tokenizer", "generator", "evaluate", "serve.recommender"):
        assert gpu_requests[stage]["GPU"] >= 1, f"gpu-cluster.yaml: {stage} should ask for a GPU"
        assert demo_requests[stage]["GPU"] == 0, f"demo.yaml: {stage} should be CPU only"

    launcher = validate_launcher_config(_yaml(LAUNCHER))["available_node_types"]
    spec = _yaml(KUBERAY_DIR / "raycluster.yaml")["spec"]
    pods = {}
    for g in spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        pods[g["groupName"]] = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
    for stage, request in gpu_requests.items():
        assert _fits(request, launcher["gpu_worker"]["resources"]), f"launcher gpu_worker cannot host {stage} {request}"
        assert _fits(request, pods["gpu"]), f"KubeRay gpu group cannot host {stage} {request}"
        assert not _fits(request, launcher["cpu_worker"]["resources"]) and not _fits(request, pods["cpu"])
    for stage, request in demo_requests.items():
        assert _fits(request, launcher["cpu_worker"]["resources"]) and _fits(request, pods["cpu"]), stage
        assert not _fits(request, launcher["ray.head.default"]["resources"]), f"the head must not host {stage}"
    # Train workers: the whole group must fit in the GPU worker type's max_workers.
    for tw in (gpu_cfg.resources.tokenizer, gpu_cfg.resources.generator):
        per_node = int(launcher["gpu_worker"]["resources"]["GPU"] // tw.gpus_per_worker)
        assert tw.num_workers <= per_node * launcher["gpu_worker"]["max_workers"]


# --------------------------------------------------------------------------------------------------
# Docker image
# --------------------------------------------------------------------------------------------------


def test_dockerfile_matches_the_tested_stack_and_the_manifests():
    import ray

    text = (REPO / "cluster" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    assert args["RAY_VERSION"] == ray.__version__
    assert args["PYTHON_TAG"] == f"py{sys.version_info.major}{sys.version_info.minor}"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{VARIANT\}$", text, flags=re.M)
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, flags=re.M):
        for part in src.split():
            assert (REPO / part).exists(), f"Dockerfile copies {part}, which is not in the repository"
    # The launcher's images are the same Ray/Python pair.
    launcher = _yaml(LAUNCHER)
    assert launcher["docker"]["image"] == f"rayproject/ray:{ray.__version__}-{args['PYTHON_TAG']}-cpu"
    assert launcher["available_node_types"]["gpu_worker"]["docker"]["worker_image"].endswith("-gpu")
    # KubeRay runs the image this Dockerfile builds, under the documented placeholder name.
    for name in MANIFESTS:
        text_m = (KUBERAY_DIR / name).read_text()
        assert "your-registry.example.com/cost-dist:0.1.0-cpu" in text_m
        assert f'rayVersion: {ray.__version__}' in text_m or f'rayVersion: "{ray.__version__}"' in text_m


def test_generated_manifests_list_is_complete():
    assert set(GENERATED_MANIFESTS) == {"rayjob.yaml", "rayservice.yaml"}
