"""Reading Parquet / CSV / TSV / JSON-lines files into Arrow tables with clear errors.

String columns are read as bytes and decoded here, so a row with non-UTF-8 bytes becomes a counted
drop (or a DataError naming the file, column and row) instead of an Arrow error from deep inside the
CSV reader. Ids are always read as strings ("007" stays "007").
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cost_dist.data.validate import BadRows
from cost_dist.errors import DataError

log = logging.getLogger(__name__)


def file_format(path: str | Path) -> str:
    """parquet | csv | tsv | jsonl, from the file name (a .gz suffix is ignored)."""
    name = str(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for ext, fmt in ((".parquet", "parquet"), (".pq", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".tab", "tsv"),
                     (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl")):
        if name.endswith(ext):
            return fmt
    raise DataError(f"{path}: cannot tell the file format from its name (use .parquet, .csv, .tsv or .jsonl, optionally .gz)")


def check_file(path: str | Path, role: str) -> Path:
    if path is None:
        raise DataError(f"no {role} file given")
    p = Path(path)
    if not p.exists():
        raise DataError(f"{role} file not found: {p}")
    if p.is_dir():
        raise DataError(f"{role} path {p} is a directory, expected a file")
    return p


def open_text(path: str | Path) -> io.BufferedReader:
    """Binary stream of a file, gunzipped when its name ends in .gz."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def read_table(path: str | Path, role: str, string_columns: Iterable[str], bad: BadRows,
               delimiter: str | None = None, column_names: list[str] | None = None, skip_rows: int = 0,
               fmt: str | None = None) -> pa.Table:
    """Read a whole file; `string_columns` (those present) come back as UTF-8 strings, bad rows dropped."""
    p = check_file(path, role)
    fmt = fmt or file_format(p)
    string_columns = list(string_columns)
    try:
        if fmt == "parquet":
            table = pq.read_table(p)
        elif fmt in ("csv", "tsv"):
            sep = delimiter or ("\t" if fmt == "tsv" else ",")
            # column_names: the file has no header row we use (skip_rows skips a header we replace).
            read_opts = pacsv.ReadOptions(column_names=column_names, skip_rows=skip_rows)
            parse_opts = pacsv.ParseOptions(delimiter=sep, quote_char='"' if sep == "," else False)
            # Bytes first: decoding (and reporting bad bytes) is ours, not the CSV reader's.
            conv = pacsv.ConvertOptions(column_types={c: pa.binary() for c in string_columns},
                                        strings_can_be_null=False)
            with open_text(p) as f:
                table = pacsv.read_csv(f, read_options=read_opts, parse_options=parse_opts, convert_options=conv)
        else:
            table = read_jsonl(p, role, bad)
    except DataError:
        raise
    except (pa.ArrowInvalid, OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{role} file {p} cannot be read as {fmt}: {str(exc).splitlines()[0]}") from None
    return decode_string_columns(table, [c for c in string_columns if c in table.column_names], f"{role} file {p}", bad)


def read_jsonl(path: Path, role: str, bad: BadRows) -> pa.Table:
    """JSON lines (or one JSON array of objects) -> table; lines that are not UTF-8 or not JSON are bad rows."""
    with open_text(path) as f:
        data = f.read()
    stripped = data.lstrip()
    if stripped[:1] == b"[":
        try:
            records = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{role} file {path}: not valid UTF-8 JSON: {exc}") from None
        if not all(isinstance(r, dict) for r in records):
            raise DataError(f"{role} file {path}: a JSON array of objects was expected")
        return records_to_table(records, f"{role} file {path}")
    records: list[dict[str, Any]] = []
    bad_utf8: list[int] = []
    bad_json: list[int] = []
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad_utf8.append(lineno)
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad_json.append(lineno)
            continue
        if not isinstance(rec, dict):
            bad_json.append(lineno)
            continue
        records.append(rec)
    bad.report("non_utf8", len(bad_utf8), f"{role} file {path}: {len(bad_utf8)} line(s) are not valid UTF-8",
               examples=[f"line {n}" for n in bad_utf8])
    bad.report("bad_json", len(bad_json), f"{role} file {path}: {len(bad_json)} line(s) are not a JSON object",
               examples=[f"line {n}" for n in bad_json])
    return records_to_table(records, f"{role} file {path}")


def records_to_table(records: list[dict[str, Any]], source: str) -> pa.Table:
    """Column-wise table from dict records; keys missing in a record are nulls."""
    keys: dict[str, None] = {}
    for rec in records:
        keys.update(dict.fromkeys(rec))
    columns = {}
    for k in keys:
        values = [rec.get(k) for rec in records]
        try:
            columns[k] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            # Mixed types (e.g. ids that are sometimes ints, sometimes strings): keep them as text.
            columns[k] = pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values],
                                  type=pa.string())
    return pa.table(columns) if columns else pa.table({})


def _as_text_array(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    """Any scalar column as strings: ints stay ints ("7", not "7.0"), floats that are whole become ints."""
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return arr
    if pa.types.is_floating(t):
        vals = arr.to_pylist()
        return pa.chunked_array([pa.array([None if v is None else (str(int(v)) if float(v).is_integer() else repr(v)) for v in vals],
                                          type=pa.string())])
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_struct(t):
        vals = arr.to_pylist()
        return pa.chunked_array([pa.array([None if v is None else (", ".join(map(str, v)) if isinstance(v, list) else json.dumps(v))
                                           for v in vals], type=pa.string())])
    if pa.types.is_null(t):
        return pa.chunked_array([pa.nulls(len(arr), pa.string())])
    return arr.cast(pa.string())


def decode_string_columns(table: pa.Table, columns: list[str], source: str, bad: BadRows) -> pa.Table:
    """Turn `columns` into UTF-8 string columns; rows with undecodable bytes are dropped (or an error)."""
    drop = np.zeros(table.num_rows, dtype=bool)
    for name in columns:
        col = table.column(name)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type) or pa.types.is_string(col.type) \
                or pa.types.is_large_string(col.type):
            raw = col.cast(pa.binary()) if not pa.types.is_binary(col.type) else col
            try:
                decoded = raw.cast(pa.string())
                decoded.validate(full=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                values = raw.to_pylist()
                out, bad_rows = [], []
                for i, v in enumerate(values):
                    if v is None:
                        out.append(None)
                        continue
                    try:
                        out.append(v.decode("utf-8"))
                    except UnicodeDecodeError:
                        out.append(None)
                        bad_rows.append(i)
                bad.report("non_utf8", len(bad_rows), f"{source}: {len(bad_rows)} row(s) with non-UTF-8 bytes in column {name!r}",
                           examples=[f"row {r + 1}" for r in bad_rows])
                drop[bad_rows] = True
                decoded = pa.chunked_array([pa.array(out, type=pa.string())])
        else:
            decoded = _as_text_array(col)
        table = table.set_column(table.column_names.index(name), name, decoded)
    if drop.any():
        table = table.filter(pa.array(~drop))
    return table


def epoch_seconds(times) -> np.ndarray:
    """float seconds since the epoch (NaN for NaT) of a tz-aware pandas datetime Series, any resolution."""
    import pandas as pd

    delta = (times - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    return np.floor(delta.to_numpy(dtype="float64", na_value=np.nan))


def to_timestamps(col: pa.ChunkedArray, source: str, column: str) -> pa.Array:
    """int64 seconds from ints, floats, Arrow timestamps or date strings; unparseable values become null."""
    t = col.type
    if pa.types.is_integer(t):
        return col.cast(pa.int64()).combine_chunks()
    if pa.types.is_floating(t):
        return pc.floor(col).cast(pa.int64()).combine_chunks()
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return col.cast(pa.timestamp("s")).cast(pa.int64()).combine_chunks()
    if pa.types.is_null(t):
        return pa.nulls(len(col), pa.int64())
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
        import pandas as pd

        values = col.cast(pa.string()).to_pandas()
        present = values.notna() & (values.str.strip() != "")
        numeric = pd.to_numeric(values, errors="coerce")
        secs = np.floor(numeric.to_numpy(dtype="float64", na_value=np.nan))
        dates = present & numeric.isna()
        if dates.any():  # values that are not numbers are parsed as dates
            parsed = pd.to_datetime(values[dates], errors="coerce", utc=True, format="mixed")
            secs[dates.to_numpy()] = epoch_seconds(parsed)
        mask = np.isnan(secs)
        return pa.array(np.where(mask, 0, secs).astype("int64"), mask=mask, type=pa.int64())
    raise DataError(f"{source}: column {column!r} has type {t}, expected numbers or dates for timestamps")
