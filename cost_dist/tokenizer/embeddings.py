"""Reading and checking the item embeddings the tokenizer consumes (RUN/embed/embeddings.parquet)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cost_dist.errors import DataError

EMBEDDINGS_FILE = "embed/embeddings.parquet"


def embeddings_matrix(table: pa.Table, source: str) -> tuple[list[str], np.ndarray]:
    """(item_ids, float32 matrix [n, d]) from an `item_id, embedding` table, with clear errors."""
    for col in ("item_id", "embedding"):
        if col not in table.column_names:
            raise DataError(f"{source}: missing column {col!r} (columns: {', '.join(table.column_names)})")
    if table.num_rows == 0:
        raise DataError(f"{source}: no rows")
    ids_col = table.column("item_id")
    if ids_col.null_count:
        raise DataError(f"{source}: column 'item_id' has {ids_col.null_count} null value(s)")
    item_ids = [str(v) for v in ids_col.to_pylist()]
    if len(set(item_ids)) != len(item_ids):
        seen, dup = set(), None
        for v in item_ids:
            if v in seen:
                dup = v
                break
            seen.add(v)
        raise DataError(f"{source}: duplicate item_id {dup!r} in column 'item_id'")
    col = table.column("embedding").combine_chunks()
    if col.null_count:
        bad = item_ids[int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])]
        raise DataError(f"{source}: column 'embedding' is null for item {bad!r}")
    if pa.types.is_fixed_size_list(col.type):
        dim = col.type.list_size
        values = col.flatten()
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        if len(set(lengths.tolist())) != 1:
            i = int(np.flatnonzero(lengths != lengths[0])[0])
            raise DataError(f"{source}: column 'embedding' has vectors of different sizes "
                            f"({lengths[0]} for {item_ids[0]!r}, {lengths[i]} for {item_ids[i]!r})")
        dim = int(lengths[0])
        values = col.flatten()
    else:
        raise DataError(f"{source}: column 'embedding' must be a list of floats, got {col.type}")
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise DataError(f"{source}: column 'embedding' must hold floats, got {values.type}")
    if dim == 0:
        raise DataError(f"{source}: column 'embedding' holds empty vectors")
    matrix = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(item_ids), dim)
    check_finite(matrix, source, item_ids)
    return item_ids, matrix


def check_finite(matrix: np.ndarray, source: str, item_ids: list[str] | None = None) -> None:
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        who = f"item {item_ids[i]!r}" if item_ids is not None else f"row {i}"
        raise DataError(f"{source}: column 'embedding' has NaN or infinite values ({int((~finite).sum())} row(s), "
                        f"first: {who})")


def check_dim(matrix: np.ndarray, expected: int, source: str) -> None:
    if matrix.ndim != 2 or matrix.shape[1] != expected:
        got = matrix.shape[1] if matrix.ndim == 2 else f"an array of shape {matrix.shape}"
        raise DataError(f"{source}: embedding size {got} does not match the tokenizer's input size {expected}")


def read_embeddings(run) -> tuple[list[str], np.ndarray]:
    """Read and check RUN/embed/embeddings.parquet."""
    table = run.read_parquet(EMBEDDINGS_FILE)
    return embeddings_matrix(table, run.uri(EMBEDDINGS_FILE))
