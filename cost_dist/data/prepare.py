"""The prepare stage: any supported source -> the canonical items / interactions / sequences tables.

Order of work for a loaded dataset (the same for every source, see loaders.py for the sources):
1. load (rename to canonical columns, ids as strings, timestamps as int64);
2. drop (or reject, with data.on_bad_rows=error) rows with empty ids or unreadable timestamps,
   duplicate item ids, interactions naming unknown items;
3. optional k-core, then users with fewer than data.min_user_interactions (>= 3) interactions,
   repeated until stable;
4. items nobody interacted with are dropped unless data.keep_unused_items;
5. item text from the template (HTML unescaped);
6. sort by user, then time (ties in file order), build sequences, compute stats.

The synthetic dataset is generated already valid and is streamed to Parquet in batches, so 10^6
items never sit in memory as text.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cost_dist.config import Config, DataConfig
from cost_dist.data.loaders import LOADERS, RawDataset
from cost_dist.data.splits import build_sequences, sort_interactions
from cost_dist.data.stats import sequence_stats
from cost_dist.data.synthetic import SyntheticWorld
from cost_dist.data.text import DEFAULT_TEMPLATES, default_template, render_column
from cost_dist.data.validate import (ROW, BadRows, dedupe_items, drop_items_without_text, drop_null, drop_short_users,
                                     drop_unknown_items, kcore,
                                     require_rows, row_numbers)
from cost_dist.errors import DataError
from cost_dist.rundir import RunDir

log = logging.getLogger(__name__)

DATASETS = ("synthetic", "ml-100k", "ml-latest-small", "amazon-2014", "amazon-lcrec", "mind", "generic")
OUTPUT_FILES = ("items.parquet", "interactions.parquet", "sequences.parquet", "stats.json")


@dataclass
class PreparedData:
    items: pa.Table
    interactions: pa.Table
    sequences: pa.Table
    stats: dict[str, Any]


def check_data_config(cfg: DataConfig) -> None:
    if cfg.dataset not in DATASETS:
        raise DataError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    if cfg.min_user_interactions < 3:
        raise DataError(f"data.min_user_interactions must be >= 3 (leave-one-out needs train, valid and test), "
                        f"got {cfg.min_user_interactions}")
    if cfg.max_len < 1:
        raise DataError(f"data.max_len must be >= 1, got {cfg.max_len}")
    if cfg.kcore < 0:
        raise DataError(f"data.kcore must be >= 0, got {cfg.kcore}")
    BadRows(cfg.on_bad_rows)  # validates the policy name


def template_for(cfg: DataConfig, text_fields: list[str]) -> str:
    if cfg.text_template:
        return cfg.text_template
    if cfg.dataset in DEFAULT_TEMPLATES:
        wanted = DEFAULT_TEMPLATES[cfg.dataset]
        from cost_dist.data.text import template_fields

        if all(f in text_fields for f in template_fields(wanted)):
            return wanted
    if not text_fields:
        # No item text at all (e.g. the Amazon P5 files): the id is the only thing to embed.
        return "Item: {item_id}."
    return default_template(text_fields)


# --------------------------------------------------------------------------------------------------
# loaded datasets
# --------------------------------------------------------------------------------------------------


def _filter_users_and_items(interactions: pa.Table, cfg: DataConfig, bad: BadRows, source: str) -> pa.Table:
    """k-core and the minimum user length, repeated until neither removes anything."""
    while True:
        before = interactions.num_rows
        interactions = kcore(interactions, cfg.kcore, bad)
        interactions = drop_short_users(interactions, cfg.min_user_interactions, bad, source)
        if interactions.num_rows == before:
            return interactions


def prepare_loaded(raw: RawDataset, cfg: DataConfig, bad: BadRows) -> PreparedData:
    require_rows(raw.interactions, raw.interactions_source)
    require_rows(raw.items, raw.items_source)
    items = drop_null(raw.items, "item_id", bad, raw.items_source, "null_item_ids")
    items = dedupe_items(items, bad, raw.items_source)
    items = drop_items_without_text(items, raw.text_fields, bad, raw.items_source)
    inter = raw.interactions.append_column(ROW, pa.array(np.arange(1, raw.interactions.num_rows + 1)))
    inter = drop_null(inter, "user_id", bad, raw.interactions_source, "null_user_ids")
    inter = drop_null(inter, "item_id", bad, raw.interactions_source, "null_item_ids")
    n = pc.sum(pc.is_null(inter.column("timestamp"))).as_py() or 0
    if n:
        mask = pc.is_null(inter.column("timestamp"))
        bad.report("bad_timestamps", n, f"{raw.interactions_source}: {n} row(s) with an empty or unreadable timestamp",
                   examples=row_numbers(inter, mask))
        inter = inter.filter(pc.invert(mask))
    inter = drop_unknown_items(inter, items.column("item_id"), bad, raw.interactions_source)
    inter = inter.drop_columns([ROW])
    inter = _filter_users_and_items(inter, cfg, bad, raw.interactions_source)
    if inter.num_rows == 0:
        raise DataError(f"{raw.interactions_source}: no interactions left after validation and filtering "
                        f"(dropped: {bad.counts or 'nothing'}; users need >= {cfg.min_user_interactions} interactions)")

    used = pc.is_in(items.column("item_id"), value_set=pc.unique(inter.column("item_id")))
    unused = items.num_rows - (pc.sum(used).as_py() or 0)
    if unused and not cfg.keep_unused_items:
        log.info("dropping %d item(s) without interactions (data.keep_unused_items=false)", unused)
        items = items.filter(used)
        bad.counts["unused_items"] = bad.counts.get("unused_items", 0) + unused

    template = template_for(cfg, raw.text_fields)
    # Null or blank fields (an item keeps its other fields; the template renders the blank empty).
    empty_text = {f: items.num_rows - int(pc.sum(pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(items.column(f)), ""),
                                                             False)).as_py() or 0)
                  for f in raw.text_fields}
    for field, n_empty in empty_text.items():
        if n_empty:
            log.info("%s: %d item(s) have an empty %r (rendered empty in the text)", raw.items_source, n_empty, field)
    without_text = 0 if raw.text_fields else items.num_rows
    if not raw.text_fields:
        log.warning("%s: the items have no text fields; item text is the template %r", raw.items_source, template)
    items = items.append_column("text", render_column(items, template, cfg.unescape_html))

    inter = sort_interactions(inter)
    sequences = build_sequences(inter)
    lengths = pc.list_value_length(sequences.column("item_ids")).to_numpy(zero_copy_only=False)
    stats = {
        "dataset": cfg.dataset,
        **sequence_stats(lengths, items.num_rows, cfg.max_len),
        "order_only": raw.order_only,
        "time_range": None if raw.order_only else [int(pc.min(inter.column("timestamp")).as_py()),
                                                   int(pc.max(inter.column("timestamp")).as_py())],
        "text_fields": raw.text_fields,
        "text_template": template,
        "items_without_text": int(without_text),
        "empty_text_values": {k: v for k, v in empty_text.items() if v},
        "repeat_interactions": inter.num_rows - inter.group_by(["user_id", "item_id"]).aggregate([]).num_rows,
        "dropped": dict(bad.counts),
        "raw": raw.raw_counts,
    }
    return PreparedData(items, inter, sequences, stats)


# --------------------------------------------------------------------------------------------------
# synthetic (streamed)
# --------------------------------------------------------------------------------------------------


def _synthetic_batches(cfg: DataConfig, seed: int):
    """(world, template, item batch iterator with text, user batch iterator)."""
    world = SyntheticWorld.build(cfg.synthetic, seed)
    template = template_for(cfg, ["title", "category", "description"])

    def items():
        for batch in world.item_batches(cfg.synthetic.batch_size):
            text = render_column(batch, template, cfg.unescape_html)
            yield batch.append_column("text", text)

    return world, template, items(), world.user_batches(cfg.synthetic.batch_size)


def _synthetic_stats(cfg: DataConfig, template: str, lengths: np.ndarray, t_min: int, t_max: int) -> dict[str, Any]:
    return {
        "dataset": "synthetic",
        **sequence_stats(lengths, cfg.synthetic.num_items, cfg.max_len),
        "order_only": False,
        "time_range": [int(t_min), int(t_max)],
        "text_fields": ["title", "category", "description"],
        "text_template": template,
        "items_without_text": 0,
        "empty_text_values": {},
        "repeat_interactions": 0,  # the generator never repeats an item within a user while the topic has others
        "dropped": {},
        "raw": {"num_topics": cfg.synthetic.num_topics, "topic_stickiness": cfg.synthetic.topic_stickiness},
    }


def prepare_dataset(data_cfg: DataConfig, seed: int = 0) -> PreparedData:
    """Load, validate, filter and template a dataset in memory (the synthetic one included)."""
    check_data_config(data_cfg)
    if data_cfg.dataset == "synthetic":
        _, template, items, users = _synthetic_batches(data_cfg, seed)
        items_t = pa.concat_tables(list(items))
        inter_parts, seq_parts = zip(*users)
        interactions = pa.concat_tables(inter_parts)
        sequences = pa.concat_tables(seq_parts)
        lengths = pc.list_value_length(sequences.column("item_ids")).to_numpy(zero_copy_only=False)
        ts = interactions.column("timestamp")
        stats = _synthetic_stats(data_cfg, template, lengths, pc.min(ts).as_py(), pc.max(ts).as_py())
        return PreparedData(items_t, interactions, sequences, stats)
    bad = BadRows(data_cfg.on_bad_rows)
    raw = LOADERS[data_cfg.dataset](data_cfg, bad)
    return prepare_loaded(raw, data_cfg, bad)


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


class _ParquetStream:
    """A Parquet file written batch by batch under a temporary name, moved into place on success."""

    def __init__(self, run: RunDir, rel: str):
        self.run = run
        self.final = run.path(rel)
        head, _, tail = self.final.rpartition("/")
        run.fs.create_dir(head, recursive=True)
        self.tmp = f"{head}/.tmp-{uuid.uuid4().hex[:8]}-{tail}"
        self.writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, table.schema, filesystem=self.run.fs)
        self.writer.write_table(table)

    def __enter__(self) -> "_ParquetStream":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.writer is not None:
            self.writer.close()
        if exc_type is None and self.writer is not None:
            self.run.fs.move(self.tmp, self.final)
        elif self.writer is not None:
            try:
                self.run.fs.delete_file(self.tmp)
            except OSError:
                pass


def _rel(prefix: str, name: str) -> str:
    return f"{prefix.strip('/')}/{name}" if prefix else name


def write_prepared(run: RunDir | str, data: PreparedData, prefix: str = "") -> None:
    """Write the four outputs under RUN/prefix/ (atomically each; stats.json last). run: a RunDir or a path/URI."""
    run = RunDir(run) if isinstance(run, str) else run
    run.write_parquet(_rel(prefix, "items.parquet"), data.items)
    run.write_parquet(_rel(prefix, "interactions.parquet"), data.interactions)
    run.write_parquet(_rel(prefix, "sequences.parquet"), data.sequences)
    run.write_json(_rel(prefix, "stats.json"), data.stats)


def prepare_to(run: RunDir | str, data_cfg: DataConfig, seed: int = 0, prefix: str = "") -> dict[str, Any]:
    """Prepare a dataset and write it under RUN/prefix/; returns the stats. Synthetic data is streamed."""
    run = RunDir(run) if isinstance(run, str) else run
    check_data_config(data_cfg)
    if data_cfg.dataset != "synthetic":
        data = prepare_dataset(data_cfg, seed)
        write_prepared(run, data, prefix)
        _log_summary(data.stats)
        return data.stats
    _, template, items, users = _synthetic_batches(data_cfg, seed)
    with _ParquetStream(run, _rel(prefix, "items.parquet")) as out:
        for batch in items:
            out.write(batch)
    lengths: list[np.ndarray] = []
    t_min, t_max = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    with _ParquetStream(run, _rel(prefix, "interactions.parquet")) as out_i, \
            _ParquetStream(run, _rel(prefix, "sequences.parquet")) as out_s:
        for inter, seqs in users:
            out_i.write(inter)
            out_s.write(seqs)
            lengths.append(pc.list_value_length(seqs.column("item_ids")).to_numpy(zero_copy_only=False))
            t_min = min(t_min, pc.min(inter.column("timestamp")).as_py())
            t_max = max(t_max, pc.max(inter.column("timestamp")).as_py())
    stats = _synthetic_stats(data_cfg, template, np.concatenate(lengths), t_min, t_max)
    run.write_json(_rel(prefix, "stats.json"), stats)
    _log_summary(stats)
    return stats


def _log_summary(stats: dict[str, Any]) -> None:
    log.info("prepared %s: %d users, %d items, %d interactions (dropped: %s)", stats["dataset"], stats["num_users"],
             stats["num_items"], stats["num_interactions"], stats["dropped"] or "nothing")


def run_prepare_stage(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Stage `prepare`: RUN/prepare/{items,interactions,sequences}.parquet + stats.json; metrics key `data`."""
    stats = prepare_to(run, cfg.data, cfg.seed, prefix="prepare")
    return {"data": stats}
