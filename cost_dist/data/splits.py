"""Per-user time order, sequences and the leave-one-out split of the papers.

Sequence of a user = every interaction in time order, ties in file order (stable sort). Leave-one-out:
the last item is the test target, the second last the validation target, the rest is training;
model inputs are truncated to the last `max_len` items.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cost_dist.errors import DataError


def sort_interactions(interactions: pa.Table) -> pa.Table:
    """Sort by user_id, then timestamp; rows with equal (user, timestamp) keep their file order."""
    # Arrow's sort_indices is stable, so ties keep their input (file) order.
    order = pc.sort_indices(interactions, sort_keys=[("user_id", "ascending"), ("timestamp", "ascending")])
    return interactions.take(order)


def _user_offsets(user_ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Start offsets (plus the end) of runs of equal user ids in a sorted column."""
    n = len(user_ids)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    codes = pc.dictionary_encode(user_ids)
    if isinstance(codes, pa.ChunkedArray):
        codes = codes.combine_chunks()
    idx = codes.indices.to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    return np.r_[starts, n].astype(np.int64)


def build_sequences(interactions: pa.Table, extra_list_columns: dict[str, str] | None = None) -> pa.Table:
    """`user_id, item_ids` (time order) from interactions sorted by sort_interactions.

    extra_list_columns maps an interactions column to a list column of the output (e.g. the synthetic
    dataset's `topic` -> `topics`).
    """
    interactions = sort_interactions(interactions)
    offsets = _user_offsets(interactions.column("user_id"))
    users = interactions.column("user_id").combine_chunks().take(pa.array(offsets[:-1]))
    off = pa.array(offsets.astype(np.int32) if offsets[-1] < 2**31 else offsets, type=pa.int32() if offsets[-1] < 2**31 else pa.int64())
    list_type = pa.ListArray if off.type == pa.int32() else pa.LargeListArray
    columns = {"user_id": users, "item_ids": list_type.from_arrays(off, interactions.column("item_id").combine_chunks())}
    for src, dst in (extra_list_columns or {}).items():
        columns[dst] = list_type.from_arrays(off, interactions.column(src).combine_chunks())
    return pa.table(columns)


def _ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated indices of [start, end) ranges and the list offsets that delimit them."""
    lengths = np.maximum(ends - starts, 0)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    idx = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1] - starts, lengths)
    return idx, offsets


def _list(values: pa.Array, starts: np.ndarray, ends: np.ndarray) -> pa.Array:
    idx, offsets = _ranges(starts, ends)
    taken = values.take(pa.array(idx))
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), taken)
    return pa.LargeListArray.from_arrays(pa.array(offsets), taken)


def leave_one_out(sequences: pa.Table, max_len: int) -> dict[str, pa.Table]:
    """Split `user_id, item_ids` sequences: train = seq[:-2]; valid: history seq[:-2][-max_len:],
    target seq[-2]; test: history seq[:-1][-max_len:], target seq[-1]."""
    if max_len < 1:
        raise DataError(f"max_len must be >= 1, got {max_len}")
    for col in ("user_id", "item_ids"):
        if col not in sequences.column_names:
            raise DataError(f"sequences table lacks column {col!r} (found: {', '.join(sequences.column_names)})")
    seqs = sequences.column("item_ids").combine_chunks()
    if isinstance(seqs, pa.ChunkedArray):  # pragma: no cover - combine_chunks returns an Array
        seqs = seqs.chunk(0)
    lengths = pc.list_value_length(seqs).to_numpy(zero_copy_only=False)
    if len(lengths) and lengths.min() < 3:
        short = pc.filter(sequences.column("user_id"), pa.array(lengths < 3)).to_pylist()[:5]
        raise DataError(f"leave-one-out needs >= 3 items per user; {int((lengths < 3).sum())} user(s) have fewer (e.g. {short})")
    # Offsets index into .values (also for a sliced list array), so slices are taken from there.
    values = seqs.values
    starts = seqs.offsets.to_numpy()[:-1].astype(np.int64)
    ends = starts + lengths
    users = sequences.column("user_id").combine_chunks()
    train = pa.table({"user_id": users, "item_ids": _list(values, starts, ends - 2)})
    valid = pa.table({
        "user_id": users,
        "history": _list(values, np.maximum(starts, ends - 2 - max_len), ends - 2),
        "target": values.take(pa.array(ends - 2)),
    })
    test = pa.table({
        "user_id": users,
        "history": _list(values, np.maximum(starts, ends - 1 - max_len), ends - 1),
        "target": values.take(pa.array(ends - 1)),
    })
    return {"train": train, "valid": valid, "test": test}


def whole_past(sequences: pa.Table) -> dict[str, pa.Table]:
    """Leave-one-out splits whose histories are the user's whole past (not truncated to max_len):
    what `exclude_seen` masks under the full-sort protocol."""
    return leave_one_out(sequences, 2**31 - 1)



def run_whole_past(run) -> dict[str, pa.Table]:
    """`whole_past` of a run's prepared sequences (RUN/prepare/sequences.parquet)."""
    return whole_past(run.read_parquet("prepare/sequences.parquet"))

def sample_users(table: pa.Table, max_users: int, seed: int) -> pa.Table:
    """The evaluation user sample (`evaluate.max_users`, seeded), so every method sees the same users."""
    if max_users and len(table) > max_users:
        pick = np.sort(np.random.default_rng(seed).choice(len(table), max_users, replace=False))
        return table.take(pa.array(pick))
    return table
