"""Dataset loaders: one function per source format, each returning a RawDataset.

A loader only reads and renames: items get `item_id` + the dataset's text fields (strings),
interactions get `user_id, item_id, timestamp` (int64, may hold nulls) in file order. Validation,
filtering, text templating and sorting happen afterwards in prepare.py, the same way for every
source. Order-only sources (no timestamps) use the position in the user's list as the timestamp.
"""

from __future__ import annotations

import ast
import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cost_dist.config import DataConfig
from cost_dist.data.readers import decode_string_columns, epoch_seconds, open_text, read_table, to_timestamps
from cost_dist.data.validate import BadRows, require_columns
from cost_dist.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class RawDataset:
    items: pa.Table  # item_id + text fields (strings)
    interactions: pa.Table  # user_id, item_id, timestamp (int64), file order
    text_fields: list[str]
    items_source: str  # for messages: where items came from
    interactions_source: str
    order_only: bool = False  # timestamps are list positions, not times
    raw_counts: dict[str, Any] = field(default_factory=dict)  # what the files held before any filtering


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _folder(cfg: DataConfig) -> Path:
    if not cfg.path:
        raise DataError(f"dataset {cfg.dataset!r} needs --path (data.path): the folder holding its files")
    p = Path(cfg.path)
    if not p.is_dir():
        raise DataError(f"dataset folder not found: {p}")
    return p


def _find(folder: Path, patterns: list[str], what: str) -> Path:
    for pattern in patterns:
        hits = sorted(glob.glob(str(folder / pattern)))
        if hits:
            return Path(hits[0])
    raise DataError(f"{folder}: no {what} file (looked for {', '.join(patterns)})")


def _string_table(columns: dict[str, list]) -> pa.Table:
    return pa.table({k: pa.array(v, type=pa.string()) for k, v in columns.items()})


def _interactions_table(users: list | pa.Array, items: list | pa.Array, timestamps: list | np.ndarray | pa.Array) -> pa.Table:
    return pa.table({
        "user_id": pa.array(users, type=pa.string()) if not isinstance(users, (pa.Array, pa.ChunkedArray)) else users,
        "item_id": pa.array(items, type=pa.string()) if not isinstance(items, (pa.Array, pa.ChunkedArray)) else items,
        "timestamp": pa.array(timestamps, type=pa.int64()) if not isinstance(timestamps, (pa.Array, pa.ChunkedArray)) else timestamps,
    })


def _order_only(sequences: list[tuple[str, list[str]]]) -> pa.Table:
    """Interactions from (user, items in time order) lists: the list position is the timestamp."""
    users, items, ts = [], [], []
    for user, seq in sequences:
        users.extend([user] * len(seq))
        items.extend(seq)
        ts.extend(range(len(seq)))
    return _interactions_table(users, items, ts)


def _load_json(path: Path, role: str) -> Any:
    try:
        with open_text(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{role} file {path} is not valid UTF-8: {exc}") from None
    except (json.JSONDecodeError, OSError, EOFError) as exc:
        raise DataError(f"{role} file {path} is not valid JSON: {exc}") from None


# --------------------------------------------------------------------------------------------------
# generic files
# --------------------------------------------------------------------------------------------------


def load_generic(cfg: DataConfig, bad: BadRows) -> RawDataset:
    """Interactions + items files (Parquet / CSV / TSV / JSONL) with a column mapping."""
    cols = cfg.columns
    if not cfg.interactions or not cfg.items:
        raise DataError("dataset 'generic' needs both an interactions file and an items file "
                        "(--interactions FILE --items FILE, or data.interactions / data.items)")
    src_i = f"interactions file {cfg.interactions}"
    inter = read_table(cfg.interactions, "interactions", [cols.user_id, cols.item_id], bad, delimiter=cfg.delimiter)
    needed = [cols.user_id, cols.item_id] + ([cols.timestamp] if cols.timestamp else [])
    require_columns(inter, needed, src_i, hint="map them with --user-col/--item-col/--time-col (data.columns.*); "
                    "--time-col '' means the file has no time column")
    n = inter.num_rows
    if cols.timestamp:
        ts = to_timestamps(inter.column(cols.timestamp), src_i, cols.timestamp)
    else:
        ts = pa.array(np.arange(n, dtype=np.int64))  # row order is the time order
    interactions = _interactions_table(inter.column(cols.user_id), inter.column(cols.item_id), ts)

    src_t = f"items file {cfg.items}"
    text_fields = list(cols.text_fields)
    items_raw = read_table(cfg.items, "items", [cols.item_id, *text_fields], bad, delimiter=cfg.delimiter)
    require_columns(items_raw, [cols.item_id, *text_fields], src_t,
                    hint="map them with --item-col / --text-fields (data.columns.*)")
    items = pa.table({"item_id": items_raw.column(cols.item_id), **{f: items_raw.column(f) for f in text_fields if f != cols.item_id}})
    return RawDataset(items, interactions, [f for f in text_fields if f != cols.item_id], src_t, src_i,
                      order_only=not cols.timestamp,
                      raw_counts={"interaction_rows": n, "item_rows": items_raw.num_rows})


# --------------------------------------------------------------------------------------------------
# MovieLens
# --------------------------------------------------------------------------------------------------

# RecBole's ml-100k column names -> the item text fields we expose.
_RECBOLE_RENAMES = {"movie_title": "title", "class": "genres"}


def _read_recbole(path: Path, role: str, bad: BadRows, id_cols: list[str]) -> pa.Table:
    """A RecBole atomic file: TSV whose header cells are `name:type`; the `:type` is dropped."""
    with open_text(path) as f:
        header = f.readline().decode("utf-8", errors="replace").rstrip("\r\n").split("\t")
    names = [h.split(":", 1)[0] for h in header]
    types = {h.split(":", 1)[0]: (h.split(":", 1)[1] if ":" in h else "token") for h in header}
    strings = [n for n in names if types[n] in ("token", "token_seq") or n in id_cols]
    return read_table(path, role, strings, bad, delimiter="\t", column_names=names, skip_rows=1, fmt="tsv")


def load_recbole(cfg: DataConfig, bad: BadRows) -> RawDataset:
    """RecBole atomic files (`<name>.inter` + `<name>.item`, optionally .gz), e.g. ml-100k."""
    folder = _folder(cfg)
    inter_path = _find(folder, ["*.inter", "*.inter.gz"], "RecBole .inter")
    item_path = _find(folder, ["*.item", "*.item.gz"], "RecBole .item")
    inter = _read_recbole(inter_path, "interactions", bad, ["user_id", "item_id"])
    src_i = f"interactions file {inter_path}"
    require_columns(inter, ["user_id", "item_id", "timestamp"], src_i)
    items_raw = _read_recbole(item_path, "items", bad, ["item_id"])
    src_t = f"items file {item_path}"
    require_columns(items_raw, ["item_id"], src_t)
    renamed = {c: _RECBOLE_RENAMES.get(c, c) for c in items_raw.column_names}
    items = items_raw.rename_columns([renamed[c] for c in items_raw.column_names])
    text_fields = [c for c in items.column_names if c != "item_id"]
    items = decode_string_columns(items, text_fields, src_t, bad)
    interactions = _interactions_table(inter.column("user_id"), inter.column("item_id"),
                                       to_timestamps(inter.column("timestamp"), src_i, "timestamp"))
    return RawDataset(items, interactions, text_fields, src_t, src_i,
                      raw_counts={"interaction_rows": inter.num_rows, "item_rows": items_raw.num_rows})


def load_movielens_csv(cfg: DataConfig, bad: BadRows) -> RawDataset:
    """GroupLens CSV layout (ml-latest-small, ml-latest, ml-25m): ratings.csv + movies.csv."""
    folder = _folder(cfg)
    ratings_path = _find(folder, ["ratings.csv", "ratings.csv.gz"], "ratings.csv")
    movies_path = _find(folder, ["movies.csv", "movies.csv.gz"], "movies.csv")
    src_i = f"interactions file {ratings_path}"
    ratings = read_table(ratings_path, "interactions", ["userId", "movieId"], bad)
    require_columns(ratings, ["userId", "movieId", "timestamp"], src_i)
    src_t = f"items file {movies_path}"
    movies = read_table(movies_path, "items", ["movieId", "title", "genres"], bad)
    require_columns(movies, ["movieId", "title", "genres"], src_t)
    genres = pc.replace_substring(movies.column("genres"), "|", ", ")
    items = pa.table({"item_id": movies.column("movieId"), "title": movies.column("title"), "genres": genres})
    interactions = _interactions_table(ratings.column("userId"), ratings.column("movieId"),
                                       to_timestamps(ratings.column("timestamp"), src_i, "timestamp"))
    return RawDataset(items, interactions, ["title", "genres"], src_t, src_i,
                      raw_counts={"interaction_rows": ratings.num_rows, "item_rows": movies.num_rows})


# --------------------------------------------------------------------------------------------------
# Amazon
# --------------------------------------------------------------------------------------------------


def _amazon_meta_line(line: str) -> dict | None:
    """The 2014 metadata is one Python dict literal per line (not strict JSON); accept both."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        try:
            rec = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    return rec if isinstance(rec, dict) else None


def _categories_text(value: Any) -> str | None:
    """2014 `categories` is a list of category paths; join the paths' names (deduplicated, in order)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    names: list[str] = []
    for path in value:
        for name in (path if isinstance(path, list) else [path]):
            if isinstance(name, str) and name not in names:
                names.append(name)
    return ", ".join(names)


def _text_or_join(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(str(v) for v in value if v is not None)
    return str(value)


def _iter_lines(path: Path, role: str, bad: BadRows):
    with open_text(path) as f:
        data = f.read()
    bad_utf8 = []
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError:
            bad_utf8.append(lineno)
    bad.report("non_utf8", len(bad_utf8), f"{role} file {path}: {len(bad_utf8)} line(s) are not valid UTF-8",
               examples=[f"line {n}" for n in bad_utf8])


def load_amazon_2014(cfg: DataConfig, bad: BadRows) -> RawDataset:
    """Amazon 2014 review data: `reviews_*.json(.gz)` (5-core) + `meta_*.json(.gz)`; or, if absent,
    the P5 / S3-Rec layout `sequential_data.txt` + `datamaps.json` (order only, no item text)."""
    folder = _folder(cfg)
    try:
        reviews_path = _find(folder, ["reviews_*.json", "reviews_*.json.gz", "*_5.json", "*_5.json.gz"], "reviews")
    except DataError:
        if glob.glob(str(folder / "sequential_data.txt*")):
            return _load_amazon_p5(folder, bad)
        raise DataError(f"{folder}: no Amazon 2014 files (reviews_*.json[.gz] + meta_*.json[.gz], "
                        "or sequential_data.txt[.gz] + datamaps.json[.gz])") from None
    meta_path = _find(folder, ["meta_*.json", "meta_*.json.gz"], "metadata (meta_*.json)")
    src_i = f"interactions file {reviews_path}"
    users, items, ts = [], [], []
    bad_lines = []
    for lineno, line in _iter_lines(reviews_path, "interactions", bad):
        try:
            rec = json.loads(line)
            users.append(rec.get("reviewerID"))
            items.append(rec.get("asin"))
            t = rec.get("unixReviewTime")
            ts.append(int(t) if t is not None else None)
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            bad_lines.append(lineno)
    bad.report("bad_json", len(bad_lines), f"{src_i}: {len(bad_lines)} line(s) are not a review JSON object",
               examples=[f"line {n}" for n in bad_lines])
    interactions = _interactions_table(users, items, ts)

    src_t = f"items file {meta_path}"
    fields = ["title", "brand", "categories", "description"]
    records, bad_meta = [], []
    for lineno, line in _iter_lines(meta_path, "items", bad):
        rec = _amazon_meta_line(line)
        if rec is None or "asin" not in rec:
            bad_meta.append(lineno)
            continue
        records.append({"item_id": str(rec["asin"]), "title": rec.get("title"), "brand": rec.get("brand"),
                        "categories": _categories_text(rec.get("categories")),
                        "description": _text_or_join(rec.get("description"))})
    bad.report("bad_json", len(bad_meta), f"{src_t}: {len(bad_meta)} line(s) are not a product record with an 'asin'",
               examples=[f"line {n}" for n in bad_meta])
    items = _string_table({k: [r[k] for r in records] for k in ["item_id", *fields]})
    return RawDataset(items, interactions, fields, src_t, src_i,
                      raw_counts={"interaction_rows": len(users), "item_rows": len(records)})


def _load_amazon_p5(folder: Path, bad: BadRows) -> RawDataset:
    """P5 / S3-Rec layout: `user item item ...` lines (ints, time order) + datamaps.json (ints -> ASINs)."""
    seq_path = _find(folder, ["sequential_data.txt", "sequential_data.txt.gz"], "sequential_data.txt")
    maps_path = _find(folder, ["datamaps.json", "datamaps.json.gz"], "datamaps.json")
    maps = _load_json(maps_path, "datamaps")
    if not isinstance(maps, dict) or "id2item" not in maps:
        raise DataError(f"datamaps file {maps_path} lacks the key 'id2item'")
    id2item: dict[str, str] = maps["id2item"]
    id2user: dict[str, str] = maps.get("id2user", {})
    sequences = []
    for lineno, line in _iter_lines(seq_path, "interactions", bad):
        parts = line.split()
        if len(parts) < 2:
            continue
        user = id2user.get(parts[0], parts[0])
        # Item ints without an ASIN keep their int (they become unknown items and are reported).
        sequences.append((user, [id2item.get(p, p) for p in parts[1:]]))
    interactions = _order_only(sequences)
    items = _string_table({"item_id": list(id2item.values())})
    return RawDataset(items, interactions, [], f"datamaps file {maps_path}", f"interactions file {seq_path}", order_only=True,
                      raw_counts={"interaction_rows": interactions.num_rows, "item_rows": items.num_rows,
                                  "sequences": len(sequences)})


def load_amazon_lcrec(cfg: DataConfig, bad: BadRows) -> RawDataset:
    """LC-Rec / LETTER layout: `<name>.inter.json` {user: [items in time order]} + `<name>.item.json`
    {item: {title, description, brand, categories}}; order only."""
    folder = _folder(cfg)
    inter_path = _find(folder, ["*.inter.json", "*.inter.json.gz"], "LC-Rec *.inter.json")
    item_path = _find(folder, ["*.item.json", "*.item.json.gz"], "LC-Rec *.item.json")
    inter = _load_json(inter_path, "interactions")
    if not isinstance(inter, dict):
        raise DataError(f"interactions file {inter_path}: expected a JSON object {{user: [items]}}")
    sequences = []
    bad_users = []
    for user, seq in inter.items():
        if not isinstance(seq, list):
            bad_users.append(user)
            continue
        sequences.append((str(user), [str(i) for i in seq if i is not None]))
    bad.report("bad_json", len(bad_users), f"interactions file {inter_path}: {len(bad_users)} user(s) whose value is not a list",
               examples=bad_users)
    interactions = _order_only(sequences)
    meta = _load_json(item_path, "items")
    if not isinstance(meta, dict):
        raise DataError(f"items file {item_path}: expected a JSON object {{item: {{title, ...}}}}")
    preferred = ["title", "brand", "categories", "description"]
    keys: dict[str, None] = {}
    for rec in meta.values():
        if isinstance(rec, dict):
            keys.update(dict.fromkeys(rec))
    fields = [k for k in preferred if k in keys] + [k for k in keys if k not in preferred]
    ids, cols = [], {f: [] for f in fields}
    for item, rec in meta.items():
        rec = rec if isinstance(rec, dict) else {}
        ids.append(str(item))
        for f in fields:
            v = rec.get(f)
            cols[f].append(v if v is None or isinstance(v, str) else (", ".join(map(str, v)) if isinstance(v, list) else str(v)))
    items = _string_table({"item_id": ids, **cols})
    return RawDataset(items, interactions, fields, f"items file {item_path}", f"interactions file {inter_path}", order_only=True,
                      raw_counts={"interaction_rows": interactions.num_rows, "item_rows": len(ids), "sequences": len(sequences)})


# --------------------------------------------------------------------------------------------------
# MIND
# --------------------------------------------------------------------------------------------------

MIND_NEWS_COLUMNS = ["news_id", "category", "subcategory", "title", "abstract", "url", "title_entities", "abstract_entities"]
MIND_BEHAVIOR_COLUMNS = ["impression_id", "user_id", "time", "history", "impressions"]


def load_mind(cfg: DataConfig, bad: BadRows) -> RawDataset:
    """MIND news.tsv + behaviors.tsv: clicked impressions become interactions at the impression time;
    with data.mind_include_history, each user's click history (from their earliest impression) comes
    first, one second apart, ending just before that impression."""
    import pandas as pd

    folder = _folder(cfg)
    news_path = _find(folder, ["news.tsv", "news.tsv.gz"], "news.tsv")
    beh_path = _find(folder, ["behaviors.tsv", "behaviors.tsv.gz"], "behaviors.tsv")
    news = read_table(news_path, "items", MIND_NEWS_COLUMNS, bad, delimiter="\t", column_names=MIND_NEWS_COLUMNS)
    if news.num_columns != len(MIND_NEWS_COLUMNS):
        raise DataError(f"items file {news_path}: expected {len(MIND_NEWS_COLUMNS)} tab-separated columns")
    fields = ["category", "subcategory", "title", "abstract"]
    items = pa.table({"item_id": news.column("news_id"), **{f: news.column(f) for f in fields}})

    src_i = f"interactions file {beh_path}"
    beh = read_table(beh_path, "interactions", MIND_BEHAVIOR_COLUMNS, bad, delimiter="\t", column_names=MIND_BEHAVIOR_COLUMNS)
    if beh.num_columns != len(MIND_BEHAVIOR_COLUMNS):
        raise DataError(f"{src_i}: expected {len(MIND_BEHAVIOR_COLUMNS)} tab-separated columns")
    times = pd.to_datetime(beh.column("time").to_pandas(), format="%m/%d/%Y %I:%M:%S %p", errors="coerce", utc=True)
    bad_time = times.isna().to_numpy()
    if bad_time.any():
        bad.report("bad_timestamp", int(bad_time.sum()), f"{src_i}: {int(bad_time.sum())} impression(s) with an unreadable time",
                   examples=[f"row {r + 1}" for r in np.flatnonzero(bad_time)])
    secs = np.nan_to_num(epoch_seconds(times)).astype(np.int64)
    users = beh.column("user_id").to_pylist()
    histories = beh.column("history").to_pylist()
    impressions = beh.column("impressions").to_pylist()

    out_u, out_i, out_t = [], [], []
    # The history is the user's clicks before the logging period: take it from the earliest impression.
    first_row: dict[str, int] = {}
    for row, user in enumerate(users):
        if bad_time[row] or user is None:
            continue
        if user not in first_row or secs[row] < secs[first_row[user]]:
            first_row[user] = row
    if cfg.mind_include_history:
        for user, row in first_row.items():
            hist = (histories[row] or "").split()
            t0 = int(secs[row]) - len(hist)
            out_u.extend([user] * len(hist))
            out_i.extend(hist)
            out_t.extend(range(t0, t0 + len(hist)))
    clicks = 0
    for row, user in enumerate(users):
        if bad_time[row] or user is None:
            continue
        for token in (impressions[row] or "").split():
            news_id, _, label = token.rpartition("-")
            if label == "1" and news_id:
                out_u.append(user)
                out_i.append(news_id)
                out_t.append(int(secs[row]))
                clicks += 1
    interactions = _interactions_table(out_u, out_i, out_t)
    return RawDataset(items, interactions, fields, f"items file {news_path}", src_i,
                      raw_counts={"impressions": beh.num_rows, "users": len(set(u for u in users if u)),
                                  "news_rows": news.num_rows, "impression_clicks": clicks,
                                  "history_clicks": interactions.num_rows - clicks})


LOADERS: dict[str, Callable[[DataConfig, BadRows], RawDataset]] = {
    "generic": load_generic,
    "ml-100k": load_recbole,
    "ml-latest-small": load_movielens_csv,
    "amazon-2014": load_amazon_2014,
    "amazon-lcrec": load_amazon_lcrec,
    "mind": load_mind,
}
