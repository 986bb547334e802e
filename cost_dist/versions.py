"""Versions of the packages a run depends on, recorded in metrics.json."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

PACKAGES = (
    "cost-dist", "ray", "torch", "deepspeed", "sentence-transformers", "transformers",
    "pyarrow", "numpy", "faiss-cpu", "faiss-gpu-cu12", "fastapi",
)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        import torch

        out["cuda"] = torch.version.cuda or "none"
    except Exception:  # pragma: no cover - torch missing is reported by the import itself
        pass
    return out
