"""The generator's token vocabulary and the item catalog it generates over.

Layout of token ids (one flat vocabulary, level-specific ranges so that code 5 of level 0 and code 5
of level 1 are different tokens, as in TIGER):

    0 PAD (also the decoder start token)   1 EOS   2 UNKNOWN_USER (no user id given)
    3 ..                      level 0 codes (K tokens), level 1 codes, ..., level M-1 codes
    3 + M*K ..                collision suffix tokens (S tokens)
    3 + M*K + S ..            hashed user tokens (U tokens)

An item's semantic ID is M codes plus a suffix: L = M + 1 "positions", position t having its own
token range (`position_ranges[t] = (start, size)`). The decoder generates exactly L tokens; its
softmax at position t runs over position t's range only (training and inference alike), which makes
teacher-forced scores and beam-search scores the same quantity.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from cost_dist.errors import DataError

log = logging.getLogger(__name__)

PAD = 0
EOS = 1
UNKNOWN_USER = 2
NUM_SPECIALS = 3


@dataclass(frozen=True)
class Vocabulary:
    num_levels: int  # M
    codebook_size: int  # K
    num_suffix: int  # S
    num_user_tokens: int  # U (0 = no user token; every user gets UNKNOWN_USER)
    max_len: int  # items of history the encoder sees

    @property
    def id_length(self) -> int:
        return self.num_levels + 1

    @property
    def size(self) -> int:
        return NUM_SPECIALS + self.num_levels * self.codebook_size + self.num_suffix + self.num_user_tokens

    @property
    def position_ranges(self) -> list[tuple[int, int]]:
        """(first token id, number of tokens) of each decoding position (M levels, then the suffix)."""
        out = [(NUM_SPECIALS + level * self.codebook_size, self.codebook_size) for level in range(self.num_levels)]
        out.append((NUM_SPECIALS + self.num_levels * self.codebook_size, self.num_suffix))
        return out

    @property
    def encoder_length(self) -> int:
        return 1 + self.max_len * self.id_length + 1  # user token, history, EOS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Vocabulary":
        return cls(**{k: int(d[k]) for k in ("num_levels", "codebook_size", "num_suffix", "num_user_tokens", "max_len")})

    def item_tokens(self, semantic_ids: np.ndarray) -> np.ndarray:
        """[n, L] per-position codes (level-local values) -> [n, L] vocabulary token ids."""
        starts = np.array([s for s, _ in self.position_ranges], dtype=np.int64)
        return semantic_ids.astype(np.int64) + starts[None, :]

    def user_token(self, user_id: str | None) -> int:
        """Hashed user token (stable across processes, unlike Python's hash)."""
        if user_id is None or self.num_user_tokens == 0:
            return UNKNOWN_USER
        digest = hashlib.blake2b(str(user_id).encode("utf-8"), digest_size=8).digest()
        bucket = int.from_bytes(digest, "little") % self.num_user_tokens
        return NUM_SPECIALS + self.num_levels * self.codebook_size + self.num_suffix + bucket


class ItemCatalog:
    """Item ids and their semantic IDs ([n, M+1] level-local codes), with lookups both ways."""

    def __init__(self, item_ids: Sequence[str], semantic_ids: np.ndarray, num_levels: int, codebook_size: int, num_suffix: int,
                 source: str = "codes"):
        semantic_ids = np.asarray(semantic_ids, dtype=np.int64)
        n = len(item_ids)
        if semantic_ids.ndim != 2 or semantic_ids.shape != (n, num_levels + 1):
            raise DataError(f"{source}: semantic_id must hold {num_levels + 1} values per item (M={num_levels} codes + suffix), "
                            f"got shape {semantic_ids.shape}")
        if n == 0:
            raise DataError(f"{source}: the catalog is empty")
        if semantic_ids.min() < 0:
            raise DataError(f"{source}: semantic_id has negative values")
        if semantic_ids[:, :num_levels].max() >= codebook_size:
            raise DataError(f"{source}: a code is >= codebook_size {codebook_size} (meta.json disagrees with codes)")
        if semantic_ids[:, num_levels].max() >= num_suffix:
            raise DataError(f"{source}: a suffix is >= num_suffix {num_suffix} (meta.json disagrees with codes)")
        self.item_ids = [str(i) for i in item_ids]
        self.row_of = {item: row for row, item in enumerate(self.item_ids)}
        if len(self.row_of) != n:
            raise DataError(f"{source}: item_id values are not unique")
        self.semantic_ids = semantic_ids
        self.num_levels, self.codebook_size, self.num_suffix = num_levels, codebook_size, num_suffix
        _check_unique_ids(semantic_ids, source)

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_run(cls, run) -> "ItemCatalog":
        """Read RUN/assign/codes.parquet + meta.json, validated against each other."""
        meta = run.read_json("assign/meta.json")
        for key in ("num_levels", "codebook_size", "num_suffix"):
            if key not in meta:
                raise DataError(f"{run.uri('assign/meta.json')}: missing key {key!r}")
        table = run.read_parquet("assign/codes.parquet")
        return cls.from_table(table, int(meta["num_levels"]), int(meta["codebook_size"]), int(meta["num_suffix"]),
                              source=run.uri("assign/codes.parquet"))

    @classmethod
    def from_table(cls, table: pa.Table, num_levels: int, codebook_size: int, num_suffix: int, source: str = "codes") -> "ItemCatalog":
        for col in ("item_id", "semantic_id"):
            if col not in table.column_names:
                raise DataError(f"{source}: missing column {col!r} (has {', '.join(table.column_names)})")
        sid = table.column("semantic_id").combine_chunks()
        if sid.null_count:
            raise DataError(f"{source}: semantic_id has nulls")
        lengths = pa.compute.list_value_length(sid).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != num_levels + 1).any():
            raise DataError(f"{source}: semantic_id must hold {num_levels + 1} values per item (meta.json num_levels={num_levels})")
        values = sid.flatten().to_numpy(zero_copy_only=False).reshape(len(table), num_levels + 1)
        return cls(table.column("item_id").to_pylist(), values, num_levels, codebook_size, num_suffix, source=source)

    def rows(self, item_ids: Iterable[str], what: str = "history") -> np.ndarray:
        out = []
        for item in item_ids:
            row = self.row_of.get(item)
            if row is None:
                raise DataError(f"unknown item {item!r} in {what}: it has no semantic ID in the catalog")
            out.append(row)
        return np.asarray(out, dtype=np.int64)

    def check_covers(self, item_ids: Iterable[str], source: str) -> None:
        missing = [i for i in set(item_ids) if i not in self.row_of]
        if missing:
            raise DataError(f"codes.parquet disagrees with {source}: {len(missing)} item(s) have no semantic ID, "
                            f"e.g. {sorted(missing)[:3]}")

    def add(self, item_ids: Sequence[str], semantic_ids: np.ndarray) -> None:
        new_ids = [str(i) for i in item_ids]
        for item in new_ids:
            if item in self.row_of:
                raise DataError(f"item {item!r} is already in the catalog")
        if len(set(new_ids)) != len(new_ids):
            raise DataError("add_items: item ids are not unique")
        merged = np.concatenate([self.semantic_ids, np.asarray(semantic_ids, dtype=np.int64)], axis=0)
        _check_unique_ids(merged, "add_items")
        for item in new_ids:
            self.row_of[item] = len(self.item_ids)
            self.item_ids.append(item)
        self.semantic_ids = merged


def _check_unique_ids(semantic_ids: np.ndarray, source: str) -> None:
    uniq = np.unique(semantic_ids, axis=0)
    if len(uniq) != len(semantic_ids):
        raise DataError(f"{source}: {len(semantic_ids) - len(uniq)} semantic IDs are shared by several items "
                        "(IDs must be unique: the collision suffix should separate them)")


def encode_inputs(vocab: Vocabulary, catalog: ItemCatalog, user_ids: Sequence[str | None], histories: Sequence[Sequence[str]],
                  what: str = "history") -> np.ndarray:
    """Encoder inputs [B, T] (PAD on the right): user token, tokens of the last max_len items, EOS."""
    token_table = vocab.item_tokens(catalog.semantic_ids)
    return encode_rows(vocab, token_table, [vocab.user_token(u) for u in user_ids],
                       [catalog.rows(h, what) for h in histories], users=user_ids, what=what)


def trim_padding(input_ids):
    """Drop the trailing columns that are PAD in every row (torch or numpy, [B, T]).

    Encoder inputs are padded on the right to max_len items and PAD is masked out of attention, so
    these columns change nothing but the cost: a batch of short histories runs on short inputs.
    """
    used = (input_ids != PAD).any(0).nonzero()
    if isinstance(used, tuple):  # numpy
        used = used[0]
    width = int(used.max()) + 1 if len(used) else 1
    return input_ids[:, :width]


def encode_rows(vocab: Vocabulary, token_table: np.ndarray, user_tokens: Sequence[int], history_rows: Sequence[np.ndarray],
                users: Sequence[str | None] | None = None, what: str = "history") -> np.ndarray:
    out = np.full((len(history_rows), vocab.encoder_length), PAD, dtype=np.int64)
    for i, rows in enumerate(history_rows):
        if len(rows) == 0:
            who = users[i] if users is not None else i
            raise DataError(f"user {who!r} has an empty {what}: the generator needs at least one item to condition on")
        rows = rows[-vocab.max_len:]
        toks = token_table[rows].reshape(-1)
        out[i, 0] = user_tokens[i]
        out[i, 1:1 + len(toks)] = toks
        out[i, 1 + len(toks)] = EOS
    return out
