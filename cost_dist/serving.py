"""Ray Serve application: one FastAPI ingress composed with a Tokenizer and a batched Recommender.

Deployment graph (one application, built by `build_app(args)`; `serve/app.py` re-exports it):

    Ingress (FastAPI: validation, routing, /docs)
      |-- Tokenizer     item text -> sentence-transformers embedding -> CoST encoder -> codes;
      |                 catalog look-ups (item fields, semantic IDs)
      |-- Recommender   the generator's batched, trie-constrained beam search under @serve.batch
      `-- AddedItemsLog the ordered log of items added through POST /items (exactly one replica)

Items added at serving time: POST /items tokenizes the items, appends them to AddedItemsLog (which
checks that the ids are new and persists the log to RUN/serve/added_items.json unless told not to),
and asks one Recommender replica to apply them. Every Recommender replica applies the log in log
order before each batch it computes (one cheap call: "anything after position n?"), so every
replica -- including ones started later by the autoscaler or after a crash -- holds the same
catalog and assigns the same collision suffixes, and an item is recommendable by every replica as
soon as POST /items has answered. No redeploy, no retraining. An added item's M codes come from
the trained tokenizer, but its collision suffix is a token the generator learnt for other items, so
beam search alone ranks it poorly; TIGER's cold-start rule (see Recommender._with_cold_start) lets
it into a top-k next to the best-ranked item sharing its code prefix, marked "source": "cold_start".
An item whose codes have no collision suffix left in the generator's vocabulary is refused (422).

Bad input never reaches the models: the pydantic models and limits below answer 4xx JSON errors of
the form {"error": message, "field": dotted.field.name} (unknown routes too).
"""

import asyncio
import logging
import math
import os
import threading
from collections import Counter
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cost_dist.config import Config, ConfigError
from cost_dist.errors import CheckpointError, CostDistError
from cost_dist.rundir import RunDir

# No `from __future__ import annotations` here: Serve's ingress rebuilds the FastAPI routes in the
# replica, where string annotations of the request models would stay unresolved forward references.

log = logging.getLogger(__name__)

APP_NAME = "cost-dist"
RUN_ENV = "COST_DIST_RUN"
# Stages whose artefacts the app loads; each must be complete in the run directory.
REQUIRED_STAGES = ("prepare", "tokenize", "assign", "generate")
ADDED_ITEMS_FILE = "serve/added_items.json"


# --------------------------------------------------------------------------------------------------
# Builder arguments and run loading
# --------------------------------------------------------------------------------------------------


class AppArgs(BaseModel):
    """What `build_app` accepts (the `args:` of serve/config.yaml). Unset fields come from the run's config."""

    model_config = ConfigDict(extra="forbid")

    run: str | None = None  # run directory (path or URI); default: $COST_DIST_RUN
    max_batch_size: int | None = Field(default=None, ge=1)
    batch_wait_timeout_s: float | None = Field(default=None, ge=0)
    beam_size: int | None = Field(default=None, ge=1)
    max_k: int | None = Field(default=None, ge=1)
    device: str | None = None  # "cpu" / "cuda"; default: cuda when the recommender gets a GPU
    # Where items added through POST /items are persisted: a RunDir-style path/URI of a JSON file, or
    # "none" to keep them in memory only (lost when the AddedItemsLog replica restarts).
    added_items: str | None = None
    cold_start_fraction: float | None = Field(default=None, ge=0, le=1)
    # A fixed replica count for Ingress, Tokenizer and Recommender instead of autoscaling (benchmarks).
    replicas: int | None = Field(default=None, ge=1)


def load_run_config(run: RunDir) -> Config:
    """The config the run was made with: RUN/config.yaml, else metrics.json["config"]."""
    if run.exists("config.yaml"):
        import yaml

        try:
            return Config.from_dict(yaml.safe_load(run.read_text("config.yaml")) or {})
        except yaml.YAMLError as exc:
            raise ConfigError(f"{run.uri('config.yaml')} is not valid YAML: {exc}") from None
    config = run.read_metrics().get("config")
    if config is None:
        raise CheckpointError(f"{run.uri()} has neither config.yaml nor metrics.json['config']: is it a run directory?")
    return Config.from_dict(config)


def check_servable(run: RunDir) -> None:
    """Fail fast (in the driver, not in crash-looping replicas) when a stage the app needs is missing."""
    missing = [s for s in REQUIRED_STAGES if not run.is_complete(s)]
    if missing:
        raise CheckpointError(
            f"run {run.uri()} cannot be served: stage(s) {', '.join(missing)} not complete "
            f"(no {missing[0]}/_COMPLETE); run `cost-dist run --run {run.uri()}` first")


def resolve_run_uri(run: str | None) -> str:
    uri = run or os.environ.get(RUN_ENV)
    if not uri:
        raise ConfigError(f"no run directory: pass args.run to the app builder or set ${RUN_ENV}")
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def text_template(run: RunDir, cfg: Config, item_columns: list[str]) -> str:
    """The template the prepare stage rendered item text with (recorded in prepare/stats.json)."""
    if run.exists("prepare/stats.json"):
        recorded = run.read_json("prepare/stats.json").get("text_template")
        if recorded:
            return recorded
    from cost_dist.data.prepare import template_for

    return template_for(cfg.data, [c for c in item_columns if c not in ("item_id", "text")])


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _torch_device(requested: str | None, num_gpus: float) -> str | None:
    if requested:
        return requested
    return "cuda" if num_gpus > 0 else None


# --------------------------------------------------------------------------------------------------
# HTTP API: request models, errors, limits
# --------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A 4xx answer: status, a message naming the problem, and the offending field."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str | None = Field(default=None, max_length=256)
    history: list[str] = Field(default_factory=list, description="item ids, oldest first")
    k: StrictInt = Field(default=10, description="number of items to return (1..max_k)")
    exclude_seen: StrictBool = False


class RecommendedItem(BaseModel):
    item_id: str
    score: float = Field(description="beam log-probability (popularity count for the fallback)")
    semantic_id: list[int]
    source: str = Field(description="generator, cold_start (an added item, TIGER's rule) or popularity")


class RecommendResponse(BaseModel):
    """What POST /recommend answers (documents /docs; the handler returns it already serialised)."""

    user_id: str | None
    k: int
    items: list[RecommendedItem]
    unknown_items: list[str] = Field(description="history ids not in the catalog, ignored for ranking")
    fallback: str | None = Field(description="'popularity' when no history item is known, else null")
    batch_size: int = Field(description="size of the Recommender batch this request was computed in")


class ItemIn(BaseModel):
    """An item: optional id, and its text fields (those the run's text template uses, e.g. title)."""

    model_config = ConfigDict(extra="allow")

    item_id: str | None = Field(default=None, min_length=1, max_length=256)
    text: str | None = Field(default=None, description="ready-made item text; else rendered from the fields")


class ItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemIn]


MAX_FIELD_CHARS = 10_000


def _error(status: int, message: str, field: str | None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "field": field})


def _loc_to_field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


api = FastAPI(
    title="cost-dist recommender",
    version="0.1.0",
    description="Generative retrieval: items have semantic IDs; a seq2seq model generates the next item's ID "
    "with beam search constrained to real items.",
)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return _error(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", "body")
    field = _loc_to_field(tuple(first.get("loc", ())))
    message = f"{field}: {first.get('msg')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return JSONResponse(
        status_code=422,
        content={"error": message, "field": field,
                 "problems": [{"field": _loc_to_field(tuple(e.get("loc", ()))), "message": e.get("msg")} for e in errors]},
    )


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return _error(404, f"no such route: {request.method} {request.url.path} (see /docs)", "path")
    if exc.status_code == 405:
        return _error(405, f"method {request.method} not allowed on {request.url.path}", "method")
    return _error(exc.status_code, str(exc.detail), None)


@api.exception_handler(RayActorError)
@api.exception_handler(ActorUnavailableError)
@api.exception_handler(BackPressureError)
async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A replica that died mid-request (Serve replaces it) or a full queue: 503, the client may retry."""
    log.warning("%s %s: a deployment was unavailable: %s", request.method, request.url.path, type(exc).__name__)
    return JSONResponse(status_code=503, headers={"Retry-After": "1"},
                        content={"error": f"service temporarily unavailable ({type(exc).__name__}); retry", "field": None})


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.field)


# Set by the Ingress constructor (same process as the ASGI app).
_LIMITS = {"max_request_bytes": 1 << 20}


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over the limit (413 naming it) before anything parses them.

    A declared Content-Length is checked up front; a chunked body is buffered up to the limit and
    replayed to the app, so no handler ever sees more than the limit.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = _LIMITS["max_request_bytes"]
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _error(400, "Content-Length header is not a number", "Content-Length")(scope, receive, send)
            if int(length) > limit:
                return await _error(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes",
                                    "body")(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _error(413, f"request body is over the limit of {limit} bytes", "body")(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


api.add_middleware(BodySizeLimit)


def _check_items(items: list[ItemIn], fields: list[str], max_items: int, need_id: bool) -> list[dict[str, Any]]:
    """Validated items as plain dicts: ids present (when needed) and unique, text fields strings, some text."""
    if not items:
        raise ApiError(422, "items: must hold at least one item", "items")
    if len(items) > max_items:
        raise ApiError(413, f"items: {len(items)} items is over the limit of {max_items} per request", "items")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        data = item.model_dump()
        if need_id and not data.get("item_id"):
            raise ApiError(422, f"items.{i}.item_id: required to add an item to the catalog", f"items.{i}.item_id")
        if data.get("item_id") is not None:
            if data["item_id"] in seen:
                raise ApiError(422, f"items.{i}.item_id: {data['item_id']!r} appears twice in the request", f"items.{i}.item_id")
            seen.add(data["item_id"])
        for key, value in data.items():
            if key == "item_id" or value is None:
                continue
            if not isinstance(value, str):
                raise ApiError(422, f"items.{i}.{key}: must be a string, got {type(value).__name__}", f"items.{i}.{key}")
            if len(value) > MAX_FIELD_CHARS:
                raise ApiError(413, f"items.{i}.{key}: over the limit of {MAX_FIELD_CHARS} characters", f"items.{i}.{key}")
        if not (data.get("text") or "").strip() and not any((data.get(f) or "").strip() for f in fields):
            raise ApiError(422, f"items.{i}: needs text or at least one of the text fields {', '.join(fields)}", f"items.{i}")
        out.append(data)
    return out


# --------------------------------------------------------------------------------------------------
# Deployments
# --------------------------------------------------------------------------------------------------


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class AddedItemsLog:
    """The ordered log of items added at serving time; one replica, so appends are serialised.

    Entries: {"seq", "item_id", "fields", "text", "codes"}. Persisted (whole file, written through
    RunDir: temp + rename) after every append, and reloaded when the replica starts.
    """

    def __init__(self, run_uri: str, store: str | None, base_ids_path: str):
        self.run = RunDir(run_uri)
        self.store = None if store == "none" else (store or self.run.uri(ADDED_ITEMS_FILE))
        import pyarrow.parquet as pq

        self.base_ids = set(pq.read_table(base_ids_path, columns=["item_id"]).column("item_id").to_pylist())
        self.entries: list[dict[str, Any]] = []
        if self.store is not None:
            store_run, rel = self._store_location()
            if store_run.exists(rel):
                self.entries = store_run.read_json(rel)["items"]
        self.index = {e["item_id"]: e for e in self.entries}
        log.info("AddedItemsLog: %d added item(s) loaded from %s", len(self.entries), self.store)

    def _store_location(self) -> tuple[RunDir, str]:
        head, _, tail = self.store.rstrip("/").rpartition("/")
        return RunDir(head or "."), tail

    def append(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Append new items; ids already in the catalog are refused (nothing appended)."""
        taken = [it["item_id"] for it in items if it["item_id"] in self.base_ids or it["item_id"] in self.index]
        if taken:
            return {"conflicts": taken}
        start = len(self.entries)
        for offset, it in enumerate(items):
            entry = {"seq": start + offset, **it}
            self.entries.append(entry)
            self.index[entry["item_id"]] = entry
        if self.store is not None:
            store_run, rel = self._store_location()
            store_run.write_json(rel, {"items": self.entries})
        return {"conflicts": [], "start": start, "end": len(self.entries)}

    def since(self, position: int) -> list[dict[str, Any]]:
        return self.entries[position:] if position < len(self.entries) else []

    def get(self, item_id: str) -> dict[str, Any] | None:
        return self.index.get(item_id)

    def size(self) -> int:
        return len(self.entries)


@serve.deployment
class Tokenizer:
    """Item text -> embedding (sentence-transformers) -> CoST encoder -> codes; base catalog look-ups."""

    def __init__(self, run_uri: str, device: str | None):
        import numpy as np

        from cost_dist.data.text import template_fields
        from cost_dist.embed import load_embedding_model
        from cost_dist.tokenizer.inference import SemanticTokenizer

        self.run = RunDir(run_uri)
        self.cfg = load_run_config(self.run)
        items = self.run.read_parquet("prepare/items.parquet")
        self.template = text_template(self.run, self.cfg, items.column_names)
        self.fields = list(dict.fromkeys(template_fields(self.template)))
        self.model = load_embedding_model(self.cfg.embed, device=device)
        self.tokenizer = SemanticTokenizer.load(self.run)
        codes = self.run.read_parquet("assign/codes.parquet")
        self.items = {row["item_id"]: row for row in items.to_pylist()}
        self.semantic_ids = dict(zip(codes.column("item_id").to_pylist(),
                                     (tuple(int(c) for c in sid) for sid in codes.column("semantic_id").to_pylist())))
        self._np = np
        log.info("Tokenizer ready: %d items, template %r", len(self.items), self.template)

    def info(self) -> dict[str, Any]:
        return {"fields": self.fields, "template": self.template, "num_levels": int(self.tokenizer.num_levels),
                "codebook_size": int(self.tokenizer.codebook_size), "num_items": len(self.items)}

    def tokenize(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from cost_dist.data.text import render_text
        from cost_dist.embed import encode_texts

        texts = [it.get("text") or render_text(it, self.template, self.cfg.data.unescape_html) for it in items]
        embeddings = encode_texts(self.model, texts, self.cfg.embed)
        codes = self.tokenizer.codes(self._np.asarray(embeddings, dtype="float32"))
        return [{"item_id": it.get("item_id"), "text": text, "codes": [int(c) for c in row]}
                for it, text, row in zip(items, texts, codes)]

    def lookup(self, item_id: str) -> dict[str, Any] | None:
        row = self.items.get(item_id)
        if row is None:
            return None
        sid = self.semantic_ids.get(item_id)
        fields = {k: v for k, v in row.items() if k not in ("item_id", "text") and isinstance(v, (str, int, float))}
        return {"item_id": item_id, "text": row.get("text"), "fields": fields,
                "semantic_id": list(sid) if sid is not None else None, "added": False}


@serve.deployment
class Recommender:
    """The generator's batched constrained beam search. One batch = one call of Recommender.recommend."""

    def __init__(self, run_uri: str, added_log, max_batch_size: int, batch_wait_timeout_s: float,
                 beam_size: int, cold_start_fraction: float, device: str | None):
        from cost_dist.generator.inference import Recommender as Model

        self.run = RunDir(run_uri)
        self.model = Model.load(self.run, device=device, default_beam_size=beam_size)
        self.added_log = added_log
        self.applied = 0  # log position up to which added items are applied
        self.refused: dict[str, str] = {}  # added items the model could not take, with the reason
        # Added (cold-start) items by their M-code prefix, in log order.
        self.cold_by_prefix: dict[tuple[int, ...], list[str]] = {}
        self.cold_start_fraction = cold_start_fraction
        self.num_levels = self.model.vocab.num_levels
        self.beam_size = beam_size
        self._lock = threading.Lock()  # model state: catalog extension (worker thread) vs. beam search (event loop)
        self.recommend.set_max_batch_size(max_batch_size)
        self.recommend.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: Counter[int] = Counter()
        self.requests = 0
        log.info("Recommender ready (max batch %d, wait %.3f s, beam %d)", max_batch_size, batch_wait_timeout_s, beam_size)

    async def _sync(self) -> None:
        """Apply the items appended to the log since the last sync, in log order."""
        entries = await self.added_log.since.remote(self.applied)
        if entries:
            await asyncio.to_thread(self._apply, entries)

    def _apply(self, entries: list[dict[str, Any]]) -> None:
        import numpy as np

        with self._lock:
            # Another coroutine may have applied some of them meanwhile.
            entries = [e for e in entries if e["seq"] >= self.applied]
            if not entries:
                return
            try:
                self.model.add_items([e["item_id"] for e in entries],
                                     np.asarray([e["codes"] for e in entries], dtype=np.int64))
            except CostDistError:
                # One entry cannot be added (e.g. no collision suffix left for its codes). Every replica
                # holds the same catalog and applies the same log, so each reaches the same verdict:
                # apply one by one and remember the refused ones, rather than wedging the log.
                for e in entries:
                    try:
                        self.model.add_items([e["item_id"]], np.asarray([e["codes"]], dtype=np.int64))
                    except CostDistError as exc:
                        self.refused[e["item_id"]] = str(exc)
                        log.warning("Recommender: added item %r refused: %s", e["item_id"], exc)
            for e in entries:
                if e["item_id"] not in self.refused:
                    self.cold_by_prefix.setdefault(tuple(e["codes"]), []).append(e["item_id"])
            self.applied = entries[-1]["seq"] + 1
        log.info("Recommender: applied added items up to log position %d", self.applied)

    def _with_cold_start(self, ranked: list[tuple[str, float]], k: int, skip: set[str]) -> list[tuple[str, float, str]]:
        """TIGER's cold-start rule on a generated ranking -> (item, score, source), at most k entries.

        The generator never trained on the suffix of an item added at serving time, so beam search
        ranks it by a suffix token that meant another item in training: it rarely surfaces however
        well its codes fit. As in TIGER, an added item whose M-code prefix the generator ranks high is
        recommended with that prefix: it enters right after the best-ranked item sharing the prefix,
        with that item's score, and at most ceil(cold_start_fraction * k) such items enter a top-k.
        """
        budget = math.ceil(self.cold_start_fraction * k) if self.cold_by_prefix else 0
        out: list[tuple[str, float, str]] = []
        placed: set[str] = set()
        for item_id, score in ranked:
            if item_id in placed:
                continue
            out.append((item_id, score, "generator"))
            placed.add(item_id)
            if budget <= 0:
                continue
            prefix = self.model.semantic_id(item_id)[: self.num_levels]
            for cold in self.cold_by_prefix.get(tuple(prefix), ()):
                if budget > 0 and cold not in placed and cold not in skip:
                    out.append((cold, score, "cold_start"))
                    placed.add(cold)
                    budget -= 1
        return out[:k]

    def _recommend_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self._lock:
            model = self.model
            results: list[dict[str, Any] | None] = [None] * len(requests)
            model_groups: dict[tuple[int, bool], list[int]] = {}
            for i, req in enumerate(requests):
                known = [h for h in req["history"] if model.has_item(h)]
                unknown = [h for h in req["history"] if not model.has_item(h)]
                results[i] = {"unknown_items": list(dict.fromkeys(unknown)), "known": known}
                if not known:
                    exclude = set(req["history"]) if req["exclude_seen"] else set()
                    ranked = model.popular(req["k"], exclude)
                    results[i]["ranked"] = [(str(a), float(b)) for a, b in ranked]
                    results[i]["fallback"] = "popularity"
                else:
                    beam = max(self.beam_size, req["k"])
                    model_groups.setdefault((beam, req["exclude_seen"]), []).append(i)
            for (beam, exclude_seen), idx in model_groups.items():
                k_max = max(requests[i]["k"] for i in idx)
                ranked = model.recommend([results[i]["known"] for i in idx], [requests[i]["user_id"] for i in idx],
                                         k=k_max, beam_size=beam, exclude_seen=exclude_seen)
                for i, items in zip(idx, ranked):
                    skip = set(results[i]["known"]) if exclude_seen else set()
                    results[i]["ranked"] = self._with_cold_start([(str(a), float(b)) for a, b in items], requests[i]["k"], skip)
                    results[i]["fallback"] = None
            out = []
            for res in results:
                out.append({
                    "items": [{"item_id": entry[0], "score": entry[1], "semantic_id": list(model.semantic_id(entry[0])),
                               "source": entry[2] if len(entry) > 2 else "popularity"}
                              for entry in res["ranked"]],
                    "unknown_items": res["unknown_items"],
                    "fallback": res["fallback"],
                    "batch_size": len(requests),
                })
            return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def recommend(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            await self._sync()
        except Exception as exc:  # noqa: BLE001 - the log replica restarting must not stop recommendations
            log.warning("Recommender: added-items log unreachable (%s); serving the catalog as of position %d",
                        exc, self.applied)
        self.batch_sizes[len(requests)] += 1
        self.requests += len(requests)
        # The beam search runs here, in the replica's event loop, not in a worker thread. It is mostly
        # Python driving small torch ops, so it holds the GIL: in a worker thread it starves the loop,
        # which then takes in only a few requests per batch (mean batch ~3 at 64 concurrent requests on
        # 2 cores). Blocking the loop instead lets the requests that arrived meanwhile queue up and
        # form the next, full batch: QPS at concurrency 64 rose ~1.6x (benchmarks/serve_load.py).
        return self._recommend_batch(requests)

    async def semantic_ids(self, item_ids: list[str]) -> dict[str, Any]:
        """{item_id: semantic ID list, or {"refused": reason}, or None when unknown} after a sync."""
        await self._sync()
        with self._lock:
            out: dict[str, Any] = {}
            for i in item_ids:
                if i in self.refused:
                    out[i] = {"refused": self.refused[i]}
                else:
                    out[i] = list(self.model.semantic_id(i)) if self.model.has_item(i) else None
            return out

    def stats(self) -> dict[str, Any]:
        sizes = self.batch_sizes
        batches = sum(sizes.values())
        return {"requests": self.requests, "batches": batches, "max_batch_size_seen": max(sizes, default=0),
                "mean_batch_size": round(self.requests / batches, 3) if batches else 0.0,
                "batch_size_histogram": {str(k): v for k, v in sorted(sizes.items())},
                "max_batch_size": self.recommend._get_max_batch_size(),
                "batch_wait_timeout_s": self.recommend._get_batch_wait_timeout_s(),
                "added_items_applied": self.applied, "torch_threads": torch_threads()}


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP front: validation, limits, routing to the deployments; OpenAPI docs at /docs."""

    def __init__(self, tokenizer, recommender, added_log, info: dict[str, Any], limits: dict[str, int]):
        self.tokenizer = tokenizer
        self.recommender = recommender
        self.added_log = added_log
        self.info = info
        self.limits = limits
        _LIMITS["max_request_bytes"] = limits["max_request_bytes"]
        self._fields: list[str] | None = None

    async def _text_fields(self) -> list[str]:
        if self._fields is None:
            self._fields = (await self.tokenizer.info.remote())["fields"]
        return self._fields

    @api.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, body: RecommendRequest) -> JSONResponse:
        """Top-k next items for a history (unknown ids are reported and ignored; empty history: popularity)."""
        max_k, max_history = self.limits["max_k"], self.limits["max_history"]
        if body.k <= 0:
            raise ApiError(422, f"k: must be at least 1, got {body.k}", "k")
        if body.k > max_k:
            raise ApiError(422, f"k: must be at most {max_k}, got {body.k}", "k")
        if len(body.history) > max_history:
            raise ApiError(413, f"history: {len(body.history)} items is over the limit of {max_history}", "history")
        for i, h in enumerate(body.history):
            if not h or len(h) > 256:
                raise ApiError(422, f"history.{i}: item ids are 1..256 characters", f"history.{i}")
        result = await self.recommender.recommend.remote(
            {"user_id": body.user_id, "history": body.history, "k": body.k, "exclude_seen": body.exclude_seen})
        # A ready Response skips FastAPI's validation and re-encoding of the answer against the
        # response model (a deep walk of every item), the largest per-request cost of this handler.
        return JSONResponse({"user_id": body.user_id, "k": body.k, **result})

    @api.post("/tokenize")
    async def tokenize(self, body: ItemsRequest) -> dict[str, Any]:
        """Codes (pre-suffix semantic ID) of new items' text, without retraining and without adding them."""
        items = _check_items(body.items, await self._text_fields(), self.limits["max_request_items"], need_id=False)
        return {"items": await self.tokenizer.tokenize.remote(items)}

    @api.post("/items", status_code=201)
    async def add_items(self, body: ItemsRequest) -> JSONResponse:
        """Add items to the servable catalog: tokenized, added to the constraint tables, recommendable at once."""
        items = _check_items(body.items, await self._text_fields(), self.limits["max_request_items"], need_id=True)
        tokenized = await self.tokenizer.tokenize.remote(items)
        entries = [{"item_id": it["item_id"], "fields": {k: v for k, v in it.items() if k not in ("item_id", "text") and v is not None},
                    "text": tok["text"], "codes": tok["codes"]} for it, tok in zip(items, tokenized)]
        appended = await self.added_log.append.remote(entries)
        if appended["conflicts"]:
            raise ApiError(409, f"item_id(s) already in the catalog: {', '.join(appended['conflicts'][:10])}", "items.item_id")
        sids = await self.recommender.semantic_ids.remote([e["item_id"] for e in entries])
        added = [{"item_id": e["item_id"], "text": e["text"], "codes": e["codes"], "semantic_id": sids[e["item_id"]]}
                 for e in entries if isinstance(sids[e["item_id"]], list)]
        refused = [{"item_id": e["item_id"], "codes": e["codes"], "reason": sids[e["item_id"]]["refused"]}
                   for e in entries if isinstance(sids[e["item_id"]], dict)]
        if not added:
            first = refused[0]
            return JSONResponse(status_code=422, content={
                "error": f"items.0: item {first['item_id']!r} cannot be served: {first['reason']}", "field": "items.0",
                "added": [], "refused": refused})
        return JSONResponse(status_code=201, content={"added": added, "refused": refused})

    @api.get("/items/{item_id}")
    async def get_item(self, item_id: str) -> dict[str, Any]:
        """An item's text, fields and semantic ID (catalog items and items added via POST /items)."""
        found = await self.tokenizer.lookup.remote(item_id)
        if found is not None:
            return found
        entry = await self.added_log.get.remote(item_id)
        if entry is None:
            raise ApiError(404, f"item_id {item_id!r} is not in the catalog", "item_id")
        sids = await self.recommender.semantic_ids.remote([item_id])
        if isinstance(sids[item_id], dict):
            raise ApiError(404, f"item_id {item_id!r} was added but refused: {sids[item_id]['refused']}", "item_id")
        return {"item_id": item_id, "text": entry["text"], "fields": entry["fields"], "semantic_id": sids[item_id],
                "added": True}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness of the whole graph: every deployment answers."""
        tok, stats, added = await asyncio.gather(self.tokenizer.info.remote(), self.recommender.stats.remote(),
                                                 self.added_log.size.remote())
        return {"status": "ok", "catalog_items": tok["num_items"], "added_items": added,
                "recommender_requests": stats["requests"]}

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        """Batching statistics of the Recommender replica that answers (batch size histogram)."""
        return {"recommender": await self.recommender.stats.remote()}

    @api.get("/version")
    async def version(self) -> dict[str, Any]:
        """The run being served: its URI, checkpoints (stage fingerprints, completion times), versions."""
        return self.info


# --------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------


def run_info(run: RunDir, cfg: Config) -> dict[str, Any]:
    """What GET /version answers: the run and its checkpoints."""
    import cost_dist

    metrics = run.read_metrics()
    checkpoints: dict[str, Any] = {}
    for stage in ("tokenize", "assign", "generate"):
        marker = run.read_json(f"{stage}/_COMPLETE") if run.exists(stage, "_COMPLETE") else {}
        files = {}
        for rel in {"tokenize": ("tokenize/model.pt",), "assign": ("assign/codes.parquet", "assign/meta.json"),
                    "generate": ("generate/best.pt", "generate/last.pt")}[stage]:
            info = run.fs.get_file_info(run.path(rel))
            if info.size is not None:
                files[rel] = {"bytes": int(info.size), "mtime": info.mtime.isoformat() if info.mtime else None}
        checkpoints[stage] = {"fingerprint": marker.get("fingerprint"), "completed_at": marker.get("completed_at"),
                              "files": files}
    return {"app": APP_NAME, "cost_dist": getattr(cost_dist, "__version__", "0.1.0"), "run": run.uri(),
            "config_name": cfg.name, "checkpoints": checkpoints, "versions": metrics.get("versions", {})}


def build_app(args: dict[str, Any] | None = None):
    """The Serve application for a finished run (args: see AppArgs; `serve/app.py` re-exports this)."""
    try:
        parsed = AppArgs.model_validate(dict(args or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"serve app args: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    run = RunDir(resolve_run_uri(parsed.run))
    check_servable(run)
    cfg = load_run_config(run)
    sc, res = cfg.serve, cfg.resources.serve
    max_batch_size = parsed.max_batch_size or sc.max_batch_size
    wait = parsed.batch_wait_timeout_s if parsed.batch_wait_timeout_s is not None else sc.batch_wait_timeout_s
    beam_size = parsed.beam_size or sc.beam_size
    cold_start = parsed.cold_start_fraction if parsed.cold_start_fraction is not None else sc.cold_start_fraction
    limits = {"max_k": parsed.max_k or sc.max_k, "max_history": sc.max_history,
              "max_request_items": sc.max_request_items, "max_request_bytes": sc.max_request_bytes}
    if parsed.replicas:
        scaling: dict[str, Any] = {"num_replicas": parsed.replicas}
    else:
        scaling = {"autoscaling_config": {"min_replicas": res.min_replicas, "max_replicas": res.max_replicas,
                                          "target_ongoing_requests": res.target_ongoing_requests}}
    max_ongoing = max(res.max_ongoing_requests, max_batch_size)

    added_log = AddedItemsLog.bind(run.uri(), parsed.added_items, run.uri("assign/codes.parquet"))
    tokenizer = Tokenizer.options(
        **scaling, max_ongoing_requests=max_ongoing,
        ray_actor_options={"num_cpus": res.tokenizer_num_cpus},
    ).bind(run.uri(), parsed.device)
    recommender = Recommender.options(
        **scaling, max_ongoing_requests=max_ongoing,
        ray_actor_options={"num_cpus": res.recommender_num_cpus, "num_gpus": res.recommender_num_gpus},
    ).bind(run.uri(), added_log, max_batch_size, wait, beam_size, cold_start, _torch_device(parsed.device, res.recommender_num_gpus))
    return Ingress.options(
        **scaling, max_ongoing_requests=max(2 * max_ongoing, 128),
        ray_actor_options={"num_cpus": res.ingress_num_cpus},
    ).bind(tokenizer, recommender, added_log, run_info(run, cfg), limits)


def stop_serve_on_sigterm() -> threading.Event:
    """Turn SIGTERM (`kill`, `timeout`, a supervisor) into SystemExit in the main thread, so that the
    caller's `finally: serve.shutdown()` runs. HAProxy runs as a process of its own: a driver that dies
    without serve.shutdown leaves it holding the HTTP port.

    Returns an Event the handler sets. A SystemExit raised while the main thread blocks inside Ray
    (serve.start waiting for its proxies) is caught by Ray, which fails that call with an error or
    exit status of its own instead: the event tells the caller that was the signal's doing."""
    import signal

    received = threading.Event()

    def _exit(signum, frame):
        received.set()
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit)
    return received


def serve_run(run_uri: str, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True, **app_args: Any):
    """Serve a run locally (`cost-dist serve RUN`): start Ray Serve on host:port and deploy the app."""
    import signal

    from cost_dist.distributed import init_ray

    app = build_app({"run": run_uri, **app_args})
    cfg = load_run_config(RunDir(resolve_run_uri(run_uri)))
    init_ray()

    def deploy():
        serve.start(http_options={"host": host, "port": port})
        handle = serve.run(app, name=APP_NAME, route_prefix=cfg.serve.route_prefix)
        log.info("serving %s on http://%s:%d%s (docs: /docs)", run_uri, host, port, cfg.serve.route_prefix)
        print(f"cost-dist: serving {run_uri} on http://{host}:{port}{cfg.serve.route_prefix.rstrip('/')}/docs",
              flush=True)
        return handle

    if not blocking:
        return deploy()
    # Installed after init_ray (ray.init sets a handler of its own) and before serve.start: a SIGTERM
    # while the app is still deploying must also reach serve.shutdown, or HAProxy keeps the port.
    terminated = stop_serve_on_sigterm()
    try:
        deploy()
        while not terminated.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # noqa: BLE001 - re-raised unless it is how Ray reported our SIGTERM
        # ray.get interrupted by the handler's SystemExit re-raises it as SystemExit(1)
        # (_raylet.raise_sys_exit_with_custom_error_message), other Ray calls as an error of their own.
        if not terminated.is_set():
            raise
        log.info("SIGTERM while deploying: the call in progress ended with %s(%s)", type(exc).__name__, exc)
    finally:
        try:
            serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - the original error or the signal's exit status matters more
            log.warning("serve.shutdown failed: %s: %s", type(exc).__name__, exc)
    if terminated.is_set():
        raise SystemExit(128 + signal.SIGTERM)
    return None
