"""SASRec inputs: the item catalog as embedding rows, training windows, left-padded histories.

Items are numbered 1..n in the order of RUN/prepare/items.parquet (0 is padding), so every catalog
item can be scored, including items no training sequence contains (full-catalog evaluation).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from cost_dist.errors import DataError

PAD = 0


class ItemIndex:
    """item_id <-> embedding row (1-based; 0 = padding)."""

    def __init__(self, item_ids: Sequence[str]):
        self.item_ids = [str(i) for i in item_ids]
        if not self.item_ids:
            raise DataError("SASRec: the catalog is empty")
        self.row_of = {item: i + 1 for i, item in enumerate(self.item_ids)}
        if len(self.row_of) != len(self.item_ids):
            raise DataError("SASRec: the catalog has duplicate item ids")

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, items: Sequence[str], where: str, strict: bool = True) -> list[int]:
        out = []
        for item in items:
            row = self.row_of.get(item)
            if row is None:
                if strict:
                    raise DataError(f"SASRec: {where} names item {item!r}, which is not in the catalog")
                continue
            out.append(row)
        return out


def left_pad(rows: Sequence[Sequence[int]], max_len: int) -> np.ndarray:
    """[U, max_len] int64: the last max_len rows of each sequence, right-aligned, zeros in front."""
    out = np.zeros((len(rows), max_len), dtype=np.int64)
    for i, seq in enumerate(rows):
        seq = list(seq)[-max_len:]
        if seq:
            out[i, max_len - len(seq):] = seq
    return out


def training_windows(train: pa.Table, index: ItemIndex, max_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), both [N, max_len] int64, from the leave-one-out training sequences.

    Windows of max_len + 1 items end at the sequence's end, then every `stride` items earlier; in
    each, position p's target is the item after it (next-item prediction at every position). A target
    is kept (non-zero) only in the latest window that has it with at least max_len - stride items of
    context before it, so each training target is predicted exactly once, with long context.
    """
    if not 1 <= stride <= max_len:
        raise DataError(f"SASRec: window stride must be in 1..max_len ({max_len}), got {stride}")
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for user, items in zip(train.column("user_id").to_pylist(), train.column("item_ids").to_pylist()):
        seq = np.asarray(index.rows(items, f"the training sequence of user {user!r}"), dtype=np.int64)
        n = len(seq)
        end = n
        while end >= 2:
            start = max(0, end - max_len - 1)
            window = seq[start:end]
            x, y = window[:-1].copy(), window[1:].copy()
            if end - stride >= 2:  # an earlier window predicts the targets before end - stride
                target_index = np.arange(start + 1, end)
                y[target_index < end - stride] = PAD
            pad = max_len - len(x)
            inputs.append(np.pad(x, (pad, 0)))
            targets.append(np.pad(y, (pad, 0)))
            end -= stride
    if not inputs:
        raise DataError("SASRec: no training targets (every user's training sequence has fewer than 2 items)")
    return np.stack(inputs), np.stack(targets)


def eval_arrays(table: pa.Table, index: ItemIndex, max_len: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(histories [U, max_len] left-padded, target rows [U]) of a valid/test split table."""
    users = table.column("user_id").to_pylist()
    histories = [index.rows(h, f"the {split} history of user {u!r}") for u, h in zip(users, table.column("history").to_pylist())]
    targets = np.array([index.rows([t], f"the {split} target of user {u!r}")[0]
                        for u, t in zip(users, table.column("target").to_pylist())], dtype=np.int64)
    return left_pad(histories, max_len), targets
