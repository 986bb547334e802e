"""Vendor the openAPIV3Schema of KubeRay's CRDs into this folder, for offline manifest validation.

Usage (from a checkout of github.com/ray-project/kuberay at the tag you target):

    python cluster/kuberay/schemas/vendor_crds.py KUBERAY_CHECKOUT/helm-chart/kuberay-operator/crds \
        --version v1.7.0 --commit $(git -C KUBERAY_CHECKOUT rev-parse v1.7.0)

For each of RayCluster, RayJob and RayService it keeps the `openAPIV3Schema` of the served `v1`
version and drops the `description` texts (two thirds of the bytes; validation does not read them),
then writes `<kind>.schema.json` and SOURCE.json (version, commit, file hashes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import yaml

KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
HERE = Path(__file__).resolve().parent


def strip_descriptions(node):
    if isinstance(node, dict):
        # "description" is a schema annotation here, except where it names a property of the resource.
        return {k: strip_descriptions(v) for k, v in node.items()
                if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def extract(crd_file: Path, kind: str, api_version: str = "v1") -> dict:
    crd = yaml.safe_load(crd_file.read_text())
    if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["names"]["kind"] != kind:
        raise SystemExit(f"{crd_file} is not the CRD of {kind}")
    for version in crd["spec"]["versions"]:
        if version["name"] == api_version and version.get("served"):
            return strip_descriptions(version["schema"]["openAPIV3Schema"])
    raise SystemExit(f"{crd_file}: no served version {api_version}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd_dir", type=Path, help="helm-chart/kuberay-operator/crds of a kuberay checkout")
    parser.add_argument("--version", required=True, help="the KubeRay release, e.g. v1.7.0")
    parser.add_argument("--commit", required=True, help="the kuberay commit the files come from")
    args = parser.parse_args()
    source = {"repository": "https://github.com/ray-project/kuberay", "version": args.version, "commit": args.commit,
              "api_version": "ray.io/v1", "files": {}}
    for kind, name in KINDS.items():
        path = args.crd_dir / name
        schema = extract(path, kind)
        out = HERE / f"{kind.lower()}.schema.json"
        out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        source["files"][out.name] = {"from": f"helm-chart/kuberay-operator/crds/{name}",
                                     "sha256_of_crd": hashlib.sha256(path.read_bytes()).hexdigest()}
        print(f"{kind}: {out} ({out.stat().st_size} bytes)")
    (HERE / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")


if __name__ == "__main__":
    main()
