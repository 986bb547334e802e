"""The run directory: every stage's artefacts under one URI (local path, s3://, gs://), through pyarrow.fs.

Layout: RUN/<stage>/... plus RUN/metrics.json and RUN/report.md. Every write goes to a temporary
name first and is then moved into place, so a crash never leaves a partial file under the final
name. A stage is complete when RUN/<stage>/_COMPLETE exists and holds the stage's fingerprint (a
hash of its config section and its inputs' fingerprints): a rerun with the same fingerprint skips
the stage, a changed config reruns from the first stage whose fingerprint changed.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cost_dist.errors import CostDistError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"


class RunDirError(CostDistError):
    """A missing or unreadable file in the run directory."""


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path) for a local path or any URI pyarrow.fs understands."""
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
        return pafs.LocalFileSystem(), uri
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


class RunDir:
    """A run's storage root. Paths given to its methods are relative to the root."""

    def __init__(self, uri: str):
        self.fs, self.root = resolve_filesystem(str(uri))
        self._scheme_prefix = "" if isinstance(self.fs, pafs.LocalFileSystem) else str(uri).split("://", 1)[0] + "://"
        self.fs.create_dir(self.root, recursive=True)

    def __repr__(self) -> str:
        return f"RunDir({self.uri()!r})"

    # ---- paths ----------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        """Filesystem path (no scheme) of a file in the run, for use with self.fs."""
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """Full URI of a file in the run, for Ray Data / Ray Train storage_path."""
        return self._scheme_prefix + self.path(*parts)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> str:
        p = self.path(*parts)
        self.fs.create_dir(p, recursive=True)
        return p

    def delete(self, *parts: str) -> None:
        p = self.path(*parts)
        info = self.fs.get_file_info(p)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(p)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(p)

    # ---- atomic writes --------------------------------------------------------------------------

    def _tmp_for(self, final: str) -> str:
        head, _, tail = final.rpartition("/")
        return f"{head}/.tmp-{uuid.uuid4().hex[:8]}-{tail}"

    def _commit(self, tmp: str, final: str) -> None:
        if self.fs.get_file_info(final).type == pafs.FileType.Directory:
            self.fs.delete_dir(final)
        self.fs.move(tmp, final)

    def write_bytes(self, rel: str, data: bytes) -> str:
        final = self.path(rel)
        self.fs.create_dir(final.rpartition("/")[0], recursive=True)
        tmp = self._tmp_for(final)
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self._commit(tmp, final)
        return final

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode("utf-8"))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_text(rel, json.dumps(obj, indent=2, sort_keys=False, default=_json_default))

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read_text(rel))
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{self.uri(rel)} is not valid JSON: {exc}") from None

    def write_parquet(self, rel: str, table: pa.Table, **kwargs: Any) -> str:
        final = self.path(rel)
        self.fs.create_dir(final.rpartition("/")[0], recursive=True)
        tmp = self._tmp_for(final)
        pq.write_table(table, tmp, filesystem=self.fs, **kwargs)
        self._commit(tmp, final)
        return final

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        p = self.path(rel)
        if not self.exists(rel):
            raise RunDirError(f"missing {self.uri(rel)}: run the stage that writes it first")
        return pq.read_table(p, filesystem=self.fs, columns=columns)

    def write_torch(self, rel: str, obj: Any) -> str:
        import torch

        buf = io.BytesIO()
        torch.save(obj, buf)
        return self.write_bytes(rel, buf.getvalue())

    def read_torch(self, rel: str) -> Any:
        import torch

        if not self.exists(rel):
            raise RunDirError(f"missing checkpoint {self.uri(rel)}")
        try:
            return torch.load(io.BytesIO(self.read_bytes(rel)), map_location="cpu", weights_only=False)
        except Exception as exc:  # torch raises many types for a damaged file
            raise RunDirError(f"checkpoint {self.uri(rel)} is corrupt or unreadable: {exc}") from None

    # ---- stage completion -----------------------------------------------------------------------

    def is_complete(self, stage: str, fingerprint: str | None = None) -> bool:
        if not self.exists(stage, COMPLETE_MARKER):
            return False
        if fingerprint is None:
            return True
        try:
            marker = self.read_json(f"{stage}/{COMPLETE_MARKER}")
        except RunDirError:
            return False
        return marker.get("fingerprint") == fingerprint

    def stage_fingerprint(self, stage: str) -> str | None:
        if not self.exists(stage, COMPLETE_MARKER):
            return None
        try:
            return self.read_json(f"{stage}/{COMPLETE_MARKER}").get("fingerprint")
        except RunDirError:
            return None

    def mark_complete(self, stage: str, fingerprint: str, **extra: Any) -> None:
        self.write_json(f"{stage}/{COMPLETE_MARKER}", {"fingerprint": fingerprint, "completed_at": time.time(), **extra})

    def invalidate(self, stage: str) -> None:
        """Forget that a stage completed (its outputs stay until the stage rewrites them)."""
        self.delete(stage, COMPLETE_MARKER)

    # ---- metrics.json ---------------------------------------------------------------------------

    def read_metrics(self) -> dict[str, Any]:
        if not self.exists("metrics.json"):
            return {}
        return self.read_json("metrics.json")

    def update_metrics(self, update: dict[str, Any]) -> dict[str, Any]:
        """Deep-merge `update` into metrics.json (written atomically) and return the result."""
        metrics = deep_merge(self.read_metrics(), update)
        self.write_json("metrics.json", metrics)
        return metrics


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable parts (config sections, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    return str(obj)
