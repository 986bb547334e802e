"""`Recommender`: a trained generator + its catalog, for evaluation actors and the Serve deployment.

Loads RUN/generate/best.pt (the checkpoint best on validation) and the catalog's semantic IDs, and
answers batched top-k requests with constrained beam search. Items can be added at run time with
their pre-suffix codes: each gets the next free collision suffix of its code prefix and becomes
recommendable at once (the prefix index is rebuilt).
"""

from __future__ import annotations

import logging
import threading
from typing import Sequence

import numpy as np
import torch

from cost_dist.config import GeneratorConfig, _build
from cost_dist.errors import CheckpointError, DataError
from cost_dist.generator.constraints import PrefixIndex
from cost_dist.generator.model import TigerModel
from cost_dist.generator.search import beam_search, exact_scores
from cost_dist.generator.vocab import PAD, ItemCatalog, Vocabulary, encode_rows

log = logging.getLogger(__name__)

BEST_CHECKPOINT = "generate/best.pt"
POPULARITY_FILE = "generate/popularity.parquet"


def load_generator_checkpoint(run, rel: str = BEST_CHECKPOINT) -> tuple[TigerModel, dict]:
    """Model (eval mode, CPU) and the raw checkpoint dict; a damaged file is a CheckpointError."""
    from cost_dist.rundir import RunDirError

    try:
        ckpt = run.read_torch(rel)
    except RunDirError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(ckpt, dict) or not {"config", "vocab", "state_dict"} <= set(ckpt):
        raise CheckpointError(f"{run.uri(rel)} is not a generator checkpoint (needs config, vocab, state_dict)")
    try:
        vocab = Vocabulary.from_dict(ckpt["vocab"])
        gcfg = _build(GeneratorConfig, ckpt["config"], "generator.")
        model = TigerModel(vocab, gcfg)
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{run.uri(rel)} does not fit the generator model: {exc}") from None
    model.eval()
    return model, ckpt


def beam_chunks(order: np.ndarray, excluded: np.ndarray, max_users: int, beam: int) -> list[np.ndarray]:
    """Consecutive slices of `order` (users by ascending exclusion count) for one beam-search pass each.

    A pass runs beam + (its largest exclusion count) beams per user (see search.beam_search), so a
    user with thousands of seen items would make a pass of max_users users thousands of times wider
    than planned (13 GB for MovieLens latest-small's heaviest users). Each slice holds at most
    max_users users and at most max_users * beam beams, but always at least one user.
    """
    budget = max_users * beam
    chunks, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < max_users and \
                (end + 1 - start) * (beam + int(excluded[order[end]])) <= budget:
            end += 1
        chunks.append(order[start:end])
        start = end
    return chunks


class Recommender:
    def __init__(self, model: TigerModel, catalog: ItemCatalog, popularity: dict[str, int] | None = None,
                 device: str | torch.device | None = None, batch_size: int = 256, default_beam_size: int = 20):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.vocab = model.vocab
        if (catalog.num_levels, catalog.codebook_size) != (self.vocab.num_levels, self.vocab.codebook_size) \
                or catalog.num_suffix > self.vocab.num_suffix:
            raise CheckpointError(
                f"codes.parquet (M={catalog.num_levels}, K={catalog.codebook_size}, S={catalog.num_suffix}) disagrees with the "
                f"generator's vocabulary (M={self.vocab.num_levels}, K={self.vocab.codebook_size}, S={self.vocab.num_suffix})")
        self.catalog = catalog
        self.batch_size = batch_size
        self.default_beam_size = default_beam_size
        self._lock = threading.Lock()
        self._rebuild()
        self._counts = {i: int(c) for i, c in (popularity or {}).items() if i in catalog.row_of}
        self._popular = sorted(self._counts, key=lambda i: (-self._counts[i], i))

    @classmethod
    def load(cls, run, device=None, batch_size: int = 256, default_beam_size: int = 20) -> "Recommender":
        model, _ = load_generator_checkpoint(run)
        catalog = ItemCatalog.from_run(run)
        popularity = None
        if run.exists(POPULARITY_FILE):
            t = run.read_parquet(POPULARITY_FILE)
            popularity = dict(zip(t.column("item_id").to_pylist(), t.column("count").to_pylist()))
        return cls(model, catalog, popularity, device=device, batch_size=batch_size, default_beam_size=default_beam_size)

    def _rebuild(self) -> None:
        self.index = PrefixIndex(self.catalog.semantic_ids, [s for _, s in self.vocab.position_ranges]).to(self.device)
        self.token_table = self.vocab.item_tokens(self.catalog.semantic_ids)

    # ---- lookups ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.catalog)

    def has_item(self, item_id: str) -> bool:
        return item_id in self.catalog.row_of

    def semantic_id(self, item_id: str) -> tuple[int, ...]:
        row = self.catalog.row_of.get(item_id)
        if row is None:
            raise DataError(f"unknown item {item_id!r}: it has no semantic ID in the catalog")
        return tuple(int(v) for v in self.catalog.semantic_ids[row])

    def popular(self, k: int, exclude: Sequence[str] = ()) -> list[tuple[str, float]]:
        """Most popular training items (count as score), skipping `exclude`."""
        skip = set(exclude)
        out = []
        for item in self._popular:
            if item not in skip:
                out.append((item, float(self._counts[item])))
                if len(out) >= k:
                    break
        return out

    # ---- recommendation ---------------------------------------------------------------------------

    def encode(self, histories: Sequence[Sequence[str]], user_ids: Sequence[str | None] | None) -> np.ndarray:
        if user_ids is None:
            user_ids = [None] * len(histories)
        if len(user_ids) != len(histories):
            raise DataError(f"{len(histories)} histories but {len(user_ids)} user ids")
        rows = [self.catalog.rows(h, what=f"the history of user {u!r}") for h, u in zip(histories, user_ids)]
        return encode_rows(self.vocab, self.token_table, [self.vocab.user_token(u) for u in user_ids], rows, users=user_ids)

    def recommend(self, histories: Sequence[Sequence[str]], user_ids: Sequence[str | None] | None = None, k: int = 10,
                  beam_size: int | None = None, exclude_seen: bool = False,
                  seen: Sequence[Sequence[str]] | None = None) -> list[list[tuple[str, float]]]:
        """Top-k distinct real items per user, best first, with their ID log-probs.

        With exclude_seen, the items of `seen` (default: the histories themselves) are never returned;
        pass the user's whole past as `seen` to mask more than the last max_len items the model reads.
        """
        if k < 1:
            raise DataError(f"k must be >= 1, got {k}")
        if seen is not None and len(seen) != len(histories):
            raise DataError(f"{len(histories)} histories but {len(seen)} seen lists")
        masked = seen if seen is not None else histories
        beam = max(beam_size or self.default_beam_size, k)
        with self._lock:
            inputs = self.encode(histories, user_ids)
            # Users in order of masked-item count, then history length: each chunk's beam is widened by
            # its largest exclusion count and its encoder input trimmed to its longest history, so
            # similar users share a chunk. Answers go back in the callers' order.
            excluded = np.array([len(set(m)) for m in masked]) if exclude_seen else np.zeros(len(histories))
            order = np.lexsort(((inputs != PAD).sum(1), excluded))
            out: list[list[tuple[str, float]]] = [[] for _ in histories]
            for chunk in beam_chunks(order, excluded, self.batch_size, beam):
                batch = torch.from_numpy(inputs[chunk]).to(self.device)
                exclude = None
                if exclude_seen:
                    exclude = [torch.from_numpy(np.unique(self.catalog.rows(masked[i]))) for i in chunk]
                rows, scores = beam_search(self.model, self.index, batch, k=k, beam_size=beam, exclude_rows=exclude)
                rows, scores = rows.cpu().numpy(), scores.cpu().numpy()
                for i, r, s in zip(chunk, rows, scores):
                    out[i] = [(self.catalog.item_ids[j], float(v)) for j, v in zip(r, s) if j >= 0]
            return out

    def score_all(self, histories: Sequence[Sequence[str]], user_ids: Sequence[str | None] | None = None,
                  rows_per_pass: int = 8192) -> np.ndarray:
        """Exact log-prob of every catalog item's ID per user: [B, n] (column = catalog row)."""
        with self._lock:
            inputs = torch.from_numpy(self.encode(histories, user_ids)).to(self.device)
            tokens = torch.from_numpy(self.token_table).to(self.device)
            return exact_scores(self.model, tokens, inputs, rows_per_pass=rows_per_pass).cpu().numpy()

    # ---- catalog updates --------------------------------------------------------------------------

    def add_items(self, item_ids: Sequence[str], codes: np.ndarray) -> list[tuple[int, ...]]:
        """Add items by their M pre-suffix codes; each gets the next free suffix of its code prefix."""
        codes = np.asarray(codes, dtype=np.int64)
        M, K, S = self.vocab.num_levels, self.vocab.codebook_size, self.vocab.num_suffix
        if codes.ndim != 2 or codes.shape != (len(item_ids), M):
            raise DataError(f"add_items: codes must have shape [{len(item_ids)}, {M}], got {list(codes.shape)}")
        if len(codes) and (codes.min() < 0 or codes.max() >= K):
            raise DataError(f"add_items: codes must lie in [0, {K})")
        with self._lock:
            next_suffix: dict[tuple[int, ...], int] = {}
            existing = self.catalog.semantic_ids
            for prefix, suffix in zip(map(tuple, existing[:, :M].tolist()), existing[:, M].tolist()):
                next_suffix[prefix] = max(next_suffix.get(prefix, 0), suffix + 1)
            new_ids = np.empty((len(item_ids), M + 1), dtype=np.int64)
            for i, prefix in enumerate(map(tuple, codes.tolist())):
                suffix = next_suffix.get(prefix, 0)
                if suffix >= S:
                    raise DataError(f"add_items: item {item_ids[i]!r} needs collision suffix {suffix} for codes {list(prefix)}, "
                                    f"beyond the generator's trained suffix vocabulary ({S} values); retrain with a larger "
                                    "tokenizer.max_suffix")
                next_suffix[prefix] = suffix + 1
                new_ids[i, :M], new_ids[i, M] = prefix, suffix
            self.catalog.add(list(item_ids), new_ids)
            self._rebuild()
            return [tuple(int(v) for v in row) for row in new_ids]
