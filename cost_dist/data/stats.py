"""Dataset statistics (stats.json of the prepare stage) and their printed table."""

from __future__ import annotations

from typing import Any

import numpy as np


def sequence_stats(lengths: np.ndarray, num_items: int, max_len: int) -> dict[str, Any]:
    """Counts and sequence-length figures from the per-user sequence lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    users = int(len(lengths))
    inter = int(lengths.sum())
    return {
        "num_users": users,
        "num_items": int(num_items),
        "num_interactions": inter,
        "density": round(inter / (users * num_items), 6) if users and num_items else 0.0,
        "seq_len": {
            "mean": round(float(lengths.mean()), 3) if users else 0.0,
            "median": float(np.median(lengths)) if users else 0.0,
            "min": int(lengths.min()) if users else 0,
            "max": int(lengths.max()) if users else 0,
        },
        # Leave-one-out: every user gives one valid and one test example; training keeps seq[:-2].
        "splits": {
            "train_interactions": int((lengths - 2).clip(min=0).sum()),
            "valid_users": users,
            "test_users": users,
            "max_len": int(max_len),
            "truncated_test_histories": int((lengths - 1 > max_len).sum()),
        },
    }


def format_stats_table(stats: dict[str, Any]) -> str:
    """A small two-column table of the figures a person checks first."""
    rows: list[tuple[str, str]] = [
        ("dataset", str(stats.get("dataset", "?"))),
        ("users", f"{stats.get('num_users', 0):,}"),
        ("items", f"{stats.get('num_items', 0):,}"),
        ("interactions", f"{stats.get('num_interactions', 0):,}"),
        ("density", f"{stats.get('density', 0):.6f}"),
    ]
    sl = stats.get("seq_len") or {}
    if sl:
        rows.append(("sequence length", f"mean {sl.get('mean')}, median {sl.get('median')}, min {sl.get('min')}, max {sl.get('max')}"))
    if stats.get("order_only"):
        rows.append(("time", "order only (list position used as timestamp)"))
    elif stats.get("time_range"):
        import datetime as dt

        lo, hi = stats["time_range"]
        fmt = lambda s: dt.datetime.fromtimestamp(s, dt.timezone.utc).strftime("%Y-%m-%d")  # noqa: E731
        rows.append(("time range", f"{fmt(lo)} .. {fmt(hi)}"))
    sp = stats.get("splits") or {}
    if sp:
        rows.append(("leave-one-out", f"train {sp.get('train_interactions', 0):,} interactions; valid/test {sp.get('test_users', 0):,} users; "
                     f"max_len {sp.get('max_len')}"))
    rows.append(("text fields", ", ".join(stats.get("text_fields") or []) or "none"))
    rows.append(("text template", str(stats.get("text_template", ""))))
    if stats.get("items_without_text"):
        rows.append(("items without text", f"{stats['items_without_text']:,}"))
    empty = stats.get("empty_text_values") or {}
    if empty:
        rows.append(("empty text fields", ", ".join(f"{k} {v:,}" for k, v in empty.items())))
    if stats.get("repeat_interactions"):
        rows.append(("repeat interactions", f"{stats['repeat_interactions']:,} (same user and item again; kept)"))
    dropped = stats.get("dropped") or {}
    rows.append(("dropped", ", ".join(f"{k} {v:,}" for k, v in dropped.items()) or "nothing"))
    raw = stats.get("raw") or {}
    if raw:
        rows.append(("raw input", ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in raw.items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
