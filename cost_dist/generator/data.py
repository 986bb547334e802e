"""Training examples and validation users for the generator, as compact integer arrays.

An example is one row of int32: [user_token, target_row, history_row_0 .. history_row_{max_len-1}]
with history rows left-aligned and -1 after the end. Catalog rows become tokens on the worker
(`examples_to_tensors`) through the catalog's [n, L] token table, so the dataset stays small
(max_len + 2 ints per example instead of the encoder's 2 + max_len * L tokens).

TIGER's training samples: every prefix of each training sequence, i.e. for a training sequence
s_1..s_m the targets s_2..s_m, each with the (at most max_len) items before it as history.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cost_dist.errors import DataError
from cost_dist.generator.vocab import EOS, PAD, ItemCatalog, Vocabulary


def _flat_rows(catalog: ItemCatalog, lists: pa.ChunkedArray | pa.Array, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Catalog rows of every element of a list<string> column, and the lists' offsets."""
    arr = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    values = pc.list_flatten(arr)
    rows = _rows_of(catalog, values, what)
    return rows, offsets


def _rows_of(catalog: ItemCatalog, values: pa.Array, what: str) -> np.ndarray:
    ids = pa.array(catalog.item_ids, type=pa.string())
    idx = pc.index_in(values.cast(pa.string()), value_set=ids)
    if idx.null_count:
        missing = pc.filter(values, pc.is_null(idx)).unique().to_pylist()
        raise DataError(f"codes.parquet disagrees with {what}: {len(missing)} item(s) have no semantic ID, e.g. {missing[:3]}")
    return idx.to_numpy(zero_copy_only=False).astype(np.int64)


def user_tokens(vocab: Vocabulary, users: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.array([vocab.user_token(u) for u in users.to_pylist()], dtype=np.int64)


def training_examples(vocab: Vocabulary, catalog: ItemCatalog, train: pa.Table) -> np.ndarray:
    """Every prefix of every training sequence: int32 [N, 2 + max_len] (see the module docstring)."""
    rows, offsets = _flat_rows(catalog, train.column("item_ids"), "the training sequences")
    utok = user_tokens(vocab, train.column("user_id"))
    lengths = np.diff(offsets)
    per_user = np.maximum(lengths - 1, 0)  # targets s_2..s_m
    n = int(per_user.sum())
    if n == 0:
        raise DataError("no training examples: every training sequence has fewer than 2 items")
    user_of = np.repeat(np.arange(len(lengths)), per_user)
    # target position (global index into rows): offsets[u] + 1 .. offsets[u] + m - 1
    first = np.repeat(offsets[:-1] + 1 - np.r_[0, np.cumsum(per_user)][:-1], per_user)
    target_pos = first + np.arange(n)
    start = np.maximum(offsets[:-1][user_of], target_pos - vocab.max_len)
    return _pack(vocab, utok[user_of], rows[target_pos], rows, start, target_pos)


def eval_examples(vocab: Vocabulary, catalog: ItemCatalog, split: pa.Table, what: str) -> np.ndarray:
    """Valid/test users (`user_id, history, target`): int32 [U, 2 + max_len], one row per user."""
    for col in ("user_id", "history", "target"):
        if col not in split.column_names:
            raise DataError(f"{what} split lacks column {col!r}")
    rows, offsets = _flat_rows(catalog, split.column("history"), f"the {what} histories")
    target = _rows_of(catalog, split.column("target").combine_chunks(), f"the {what} targets")
    utok = user_tokens(vocab, split.column("user_id"))
    start = np.maximum(offsets[:-1], offsets[1:] - vocab.max_len)
    return _pack(vocab, utok, target, rows, start, offsets[1:])


def _pack(vocab: Vocabulary, utok: np.ndarray, target: np.ndarray, rows: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    n = len(utok)
    if (end - start <= 0).any():
        raise DataError("an example has an empty history")
    out = np.full((n, 2 + vocab.max_len), -1, dtype=np.int64)
    out[:, 0] = utok
    out[:, 1] = target
    idx = start[:, None] + np.arange(vocab.max_len)[None, :]
    valid = idx < end[:, None]
    out[:, 2:] = np.where(valid, rows[np.minimum(idx, len(rows) - 1)], -1)
    if out.max() >= 2**31:
        raise DataError("catalog too large for int32 example rows")
    return out.astype(np.int32)


def history_lengths(packed):
    """Items in each packed row's history ([B, 2 + max_len]: user, target, items padded with -1); numpy or torch."""
    return (packed[:, 2:] >= 0).sum(1)


def examples_to_tensors(packed: torch.Tensor, token_table: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 2 + max_len] packed rows -> encoder input_ids [B, T] and target tokens [B, L] (same layout as encode_rows)."""
    packed = packed.long()
    B = packed.shape[0]
    L = token_table.shape[1]
    hist = packed[:, 2:]
    valid = hist >= 0
    body = token_table[hist.clamp_min(0)]  # [B, max_len, L]
    body = torch.where(valid[:, :, None], body, torch.full_like(body, PAD)).reshape(B, max_len * L)
    input_ids = torch.full((B, 2 + max_len * L), PAD, dtype=torch.long, device=packed.device)
    input_ids[:, 0] = packed[:, 0]
    input_ids[:, 1:1 + max_len * L] = body
    lengths = history_lengths(packed)
    input_ids[torch.arange(B, device=packed.device), 1 + lengths * L] = EOS
    targets = token_table[packed[:, 1]]
    # Columns after the longest history's EOS are PAD in every row: drop them (shorter batches, same result).
    width = 2 + int(lengths.max()) * L if B else input_ids.shape[1]
    return input_ids[:, :width], targets


def group_by_length(batches: Iterable[torch.Tensor], window: int, seed: int) -> Iterator[torch.Tensor]:
    """Regroup each `window` consecutive (already shuffled) packed batches by history length.

    The encoder input is trimmed to the longest history in its batch (`examples_to_tensors`), so a
    batch of short histories is cheap only if no long one sits in it: within a window, examples are
    sorted by history length (stable, so ties keep their shuffled order), cut back into batches of
    the original sizes, and those batches are yielded in a random order (as transformers'
    group_by_length sampler does). Batch count and sizes are unchanged, so every worker still takes
    the same number of steps. window <= 1: the batches as they come.
    """
    if window <= 1:
        yield from batches
        return
    rng = torch.Generator().manual_seed(int(seed))
    buffer: list[torch.Tensor] = []
    for batch in batches:
        buffer.append(batch)
        if len(buffer) == window:
            yield from _regroup(buffer, rng)
            buffer = []
    if buffer:
        yield from _regroup(buffer, rng)


def _regroup(buffer: list[torch.Tensor], rng: torch.Generator) -> Iterator[torch.Tensor]:
    packed = torch.cat(buffer)
    packed = packed[torch.argsort(history_lengths(packed), stable=True)]
    chunks = torch.split(packed, [len(b) for b in buffer])
    for i in torch.randperm(len(chunks), generator=rng).tolist():
        yield chunks[i]
