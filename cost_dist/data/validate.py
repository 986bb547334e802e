"""Checks that turn raw tables into valid canonical ones: every problem is an error or a counted drop.

`BadRows` is the single place where the `data.on_bad_rows` policy ("drop" or "error") is applied:
a drop is logged and counted (the counts end up in stats.json under `dropped`), an error is a
DataError whose message names the file/column and gives examples. Problems that cannot be dropped
(missing columns, empty input) are always errors.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cost_dist.errors import DataError

log = logging.getLogger(__name__)

POLICIES = ("drop", "error")


class BadRows:
    """Applies the bad-row policy and keeps the counts of what was dropped, by reason."""

    def __init__(self, policy: str = "drop"):
        if policy not in POLICIES:
            raise DataError(f"data.on_bad_rows must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.counts: dict[str, int] = {}

    def report(self, reason: str, count: int, message: str, examples: Sequence[Any] = ()) -> None:
        """Record `count` rows dropped for `reason`; raise instead when the policy is "error"."""
        if count <= 0:
            return
        ex = ""
        if len(examples):
            shown = ", ".join(repr(e) for e in list(examples)[:5])
            ex = f" (e.g. {shown})"
        if self.policy == "error":
            raise DataError(f"{message}{ex}; set data.on_bad_rows=drop to drop them instead")
        log.warning("dropped %d: %s%s", count, message, ex)
        self.counts[reason] = self.counts.get(reason, 0) + int(count)


def require_columns(table: pa.Table, columns: Iterable[str], source: str, hint: str = "") -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        found = ", ".join(table.column_names) or "none"
        raise DataError(
            f"{source}: missing column(s) {', '.join(repr(c) for c in missing)} (found: {found})" + (f"; {hint}" if hint else "")
        )


def require_rows(table: pa.Table, source: str) -> None:
    if table.num_rows == 0:
        raise DataError(f"{source} is empty (no rows)")


ROW = "__row"  # 1-based data row of the source file, carried while validating so messages can cite it


def row_numbers(table: pa.Table, mask, limit: int = 5) -> list[str]:
    """'row N' labels (source file rows when the table carries ROW) of the first masked rows."""
    idx = np.flatnonzero(np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool))[:limit]
    if ROW in table.column_names:
        rows = table.column(ROW).take(pa.array(idx)).to_pylist()
    else:
        rows = (idx + 1).tolist()
    return [f"row {r}" for r in rows]


def drop_null(table: pa.Table, column: str, bad: BadRows, source: str, reason: str) -> pa.Table:
    """Drop rows whose `column` is null (or an empty string for ids)."""
    col = table.column(column)
    mask = pc.is_null(col)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        mask = pc.or_(mask, pc.equal(pc.utf8_trim_whitespace(col), ""))
    mask = pc.fill_null(mask, True)
    n = pc.sum(mask).as_py() or 0
    if n:
        bad.report(reason, n, f"{source}: {n} row(s) with an empty {column!r}", examples=row_numbers(table, mask))
        table = table.filter(pc.invert(mask))
    return table


def dedupe_items(items: pa.Table, bad: BadRows, source: str) -> pa.Table:
    """Keep the first row of every item_id; duplicates are a counted drop or an error."""
    ids = items.column("item_id")
    codes = pc.dictionary_encode(ids).combine_chunks().indices.to_numpy(zero_copy_only=False)
    _, first = np.unique(codes, return_index=True)
    if len(first) == items.num_rows:
        return items
    keep = np.zeros(items.num_rows, dtype=bool)
    keep[first] = True
    dupes = pc.filter(ids, pa.array(~keep)).to_pylist()
    bad.report("duplicate_item_ids", len(dupes), f"{source}: {len(dupes)} duplicate item id row(s) (the first row of each id is kept)",
               examples=list(dict.fromkeys(dupes)))
    return items.filter(pa.array(keep))


def drop_items_without_text(items: pa.Table, text_fields: list[str], bad: BadRows, source: str) -> pa.Table:
    """Items whose every text field is null or blank have nothing to embed: drop (counted) or error.

    A dataset without any text field (e.g. Amazon P5 sequences) is not affected: its text is the id.
    """
    if not text_fields or items.num_rows == 0:
        return items
    has_text = None
    for f in text_fields:
        col = items.column(f)
        present = pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(col), ""), False)
        has_text = present if has_text is None else pc.or_(has_text, present)
    n = items.num_rows - (pc.sum(has_text).as_py() or 0)
    if n:
        missing = pc.filter(items.column("item_id"), pc.invert(has_text)).to_pylist()
        bad.report("items_without_text", n, f"{source}: {n} item(s) with no text (every one of {', '.join(text_fields)} is empty)",
                   examples=missing)
        items = items.filter(has_text)
    return items


def drop_unknown_items(interactions: pa.Table, item_ids: pa.Array | pa.ChunkedArray, bad: BadRows, source: str) -> pa.Table:
    """Drop interactions whose item is not in the catalog."""
    if isinstance(item_ids, pa.ChunkedArray):
        item_ids = item_ids.combine_chunks()
    known = pc.is_in(interactions.column("item_id"), value_set=item_ids)
    known = pc.fill_null(known, False)
    n = interactions.num_rows - (pc.sum(known).as_py() or 0)
    if n:
        unknown = pc.filter(interactions.column("item_id"), pc.invert(known))
        distinct = pc.unique(unknown)
        bad.report("unknown_items", n, f"{source}: {n} interaction(s) name {len(distinct)} item id(s) that are not in the items file",
                   examples=distinct.to_pylist())
        interactions = interactions.filter(known)
    return interactions


def _counts(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(codes per row, count per code) for a string column."""
    enc = pc.dictionary_encode(column).combine_chunks()
    codes = enc.indices.to_numpy(zero_copy_only=False)
    return codes, np.bincount(codes, minlength=len(enc.dictionary))


def kcore(interactions: pa.Table, k: int, bad: BadRows) -> pa.Table:
    """Iteratively drop users and items with fewer than k interactions until none is left (k-core)."""
    if k <= 1:
        return interactions
    before = interactions.num_rows
    while True:
        ucodes, ucounts = _counts(interactions.column("user_id"))
        icodes, icounts = _counts(interactions.column("item_id"))
        keep = (ucounts[ucodes] >= k) & (icounts[icodes] >= k)
        if keep.all():
            break
        interactions = interactions.filter(pa.array(keep))
    dropped = before - interactions.num_rows
    if dropped:
        # k-core is a filter the user asked for, so it never raises under on_bad_rows=error.
        log.info("k-core (k=%d) removed %d interaction(s)", k, dropped)
        bad.counts["kcore"] = bad.counts.get("kcore", 0) + dropped
    return interactions


def drop_short_users(interactions: pa.Table, min_len: int, bad: BadRows, source: str) -> pa.Table:
    """Users with fewer than `min_len` interactions cannot be split leave-one-out: drop or error."""
    if min_len <= 0 or interactions.num_rows == 0:
        return interactions
    ucodes, ucounts = _counts(interactions.column("user_id"))
    keep = ucounts[ucodes] >= min_len
    if keep.all():
        return interactions
    short_users = pc.unique(pc.filter(interactions.column("user_id"), pa.array(~keep))).to_pylist()
    n = int((~keep).sum())
    bad.report("short_user_interactions", n, f"{source}: {len(short_users)} user(s) have fewer than {min_len} interactions "
               f"({n} interaction(s)); leave-one-out needs {min_len}", examples=short_users)
    bad.counts["short_users"] = bad.counts.get("short_users", 0) + len(short_users)
    return interactions.filter(pa.array(keep))
