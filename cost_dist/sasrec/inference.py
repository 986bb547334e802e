"""SASRec inference: full-catalog scores for histories, top-k rankings, and its leave-one-out evaluation.

`SASRecRanker.load(run)` reads RUN/sasrec/best.pt (the checkpoint best on validation NDCG@10).
`rank(histories, k, exclude_seen)` returns item ids best first, like the Pop and dense rankers of
cost_dist.baselines, so all methods are scored by the same cost_dist.metrics code.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from cost_dist.config import Config
from cost_dist.data.splits import run_whole_past, sample_users
from cost_dist.errors import CheckpointError

log = logging.getLogger(__name__)

METHOD = "sasrec"


def seen_mask(seqs, num_items: int):
    """Boolean [B, n]: True where the item is in the (left-padded) history rows."""
    import torch

    # Padding goes to an extra column that is dropped, so it can never clash with a real item.
    cols = torch.where(seqs > 0, seqs - 1, torch.full_like(seqs, num_items))
    mask = torch.zeros((seqs.shape[0], num_items + 1), dtype=torch.bool, device=seqs.device)
    mask.scatter_(1, cols, True)
    return mask[:, :num_items]


def target_ranks(scores, histories, targets, exclude_seen: bool):
    """1-based rank of each target row among the catalog's scores [B, n] (inf when the target is excluded).

    With exclude_seen the history's items are skipped (as the other methods skip them), so a target
    that is in the history is a miss. Ties count in the target's favour; with float scores of a
    trained model they practically never happen.
    """
    import torch

    if exclude_seen:
        scores = scores.masked_fill(seen_mask(histories, scores.shape[1]), float("-inf"))
    target_scores = scores.gather(1, (targets - 1)[:, None])
    ranks = (scores > target_scores).sum(1).double() + 1
    return torch.where(torch.isneginf(target_scores[:, 0]), torch.full_like(ranks, float("inf")), ranks)


class SASRecRanker:
    def __init__(self, model, item_ids: list[str], max_len: int, batch_size: int = 512):
        from cost_dist.sasrec.data import ItemIndex

        self.model = model.eval()
        self.index = ItemIndex(item_ids)
        self.max_len = int(max_len)
        self.batch_size = int(batch_size)
        self.epoch: int | None = None

    @classmethod
    def load(cls, run, rel: str = "sasrec/best.pt", batch_size: int = 512) -> "SASRecRanker":
        from cost_dist.config import _build, SASRecConfig
        from cost_dist.sasrec.model import SASRec

        if not run.exists(rel):
            raise CheckpointError(f"missing {run.uri(rel)}: train SASRec first (cost_dist.sasrec.train_sasrec)")
        payload = run.read_torch(rel)
        try:
            scfg = _build(SASRecConfig, payload["config"], "sasrec.")
            model = SASRec(payload["num_items"], payload["max_len"], scfg.hidden, scfg.num_blocks, scfg.num_heads,
                           scfg.inner_size, scfg.dropout)
            model.load_state_dict(payload["state_dict"])
        except (KeyError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{run.uri(rel)} is not a SASRec checkpoint that fits its config: {exc}") from None
        ranker = cls(model, payload["item_ids"], payload["max_len"], batch_size)
        ranker.epoch = payload.get("epoch")
        return ranker

    def _padded(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        from cost_dist.sasrec.data import left_pad

        # Unknown items (not in the training catalog) are skipped, as the dense ranker does.
        rows = [self.index.rows(h, "history", strict=False) for h in histories]
        return left_pad(rows, self.max_len)

    def _scored_batches(self, histories: Sequence[Sequence[str]], exclude_seen: bool,
                        seen: Sequence[Sequence[str]] | None):
        """[batch, n] torch scores per batch of histories, the seen items at -inf when exclude_seen."""
        import torch

        from cost_dist.sasrec.data import left_pad

        if seen is not None and len(seen) != len(histories):
            raise ValueError(f"seen has {len(seen)} rows for {len(histories)} histories")
        for lo in range(0, len(histories), self.batch_size):
            seqs = torch.from_numpy(self._padded(histories[lo:lo + self.batch_size]))
            scores = self.model.last_scores(seqs)
            if exclude_seen:
                if seen is not None:
                    rows = [self.index.rows(h, "seen items", strict=False) for h in seen[lo:lo + self.batch_size]]
                    masked = torch.from_numpy(left_pad(rows, max((len(r) for r in rows), default=1) or 1))
                else:
                    masked = seqs
                scores = scores.masked_fill(seen_mask(masked, scores.shape[1]), float("-inf"))
            yield scores

    def scores(self, histories: Sequence[Sequence[str]], exclude_seen: bool = False,
               seen: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """[U, n] float32 scores (raw logits) of every catalog item (column j = item_ids[j]) as each
        user's next item; with exclude_seen, the seen items (as in `rank`) score -inf."""
        out = [b.float().numpy() for b in self._scored_batches(histories, exclude_seen, seen)]
        return np.concatenate(out, axis=0) if out else np.zeros((0, len(self.index)), dtype=np.float32)

    def rank(self, histories: Sequence[Sequence[str]], k: int, exclude_seen: bool = False,
             seen: Sequence[Sequence[str]] | None = None) -> list[list[str]]:
        """Top-k item ids per history, best first.

        With exclude_seen, the items of `seen` (default: the histories themselves) are skipped; pass
        the user's whole past as `seen` to mask more than the last max_len items the model reads.
        """
        import torch

        k = min(int(k), len(self.index))
        out: list[list[str]] = []
        for scores in self._scored_batches(histories, exclude_seen, seen):
            top = torch.topk(scores, k, dim=1)
            for values, idx in zip(top.values.tolist(), top.indices.tolist()):
                out.append([self.index.item_ids[j] for v, j in zip(values, idx) if v != float("-inf")])
        return out


def evaluate_sasrec(cfg: Config, run, splits: dict[str, pa.Table] | None = None,
                    ranker: SASRecRanker | None = None, mask_full_history: bool | None = None) -> dict[str, Any]:
    """{"valid": {...}, "test": {...}} Recall/NDCG@K of the best-on-validation SASRec (evaluate.ks).

    With evaluate.exclude_seen, the user's whole past is masked (RecBole's full-sort protocol, as the
    evaluate stage does) or, with mask_full_history false (default: not evaluate.mask_whole_past),
    only the last max_len items the model reads.
    """
    if mask_full_history is None:
        mask_full_history = cfg.evaluate.mask_whole_past
    from cost_dist.metrics import ranking_metrics
    from cost_dist.sasrec.train import load_splits

    ks = sorted(set(int(k) for k in cfg.evaluate.ks))
    splits = splits if splits is not None else load_splits(cfg, run)
    past = run_whole_past(run) if mask_full_history else None
    ranker = ranker or SASRecRanker.load(run)
    out: dict[str, Any] = {}
    for name in ("valid", "test"):
        table = sample_users(splits[name], cfg.evaluate.max_users, cfg.seed)
        histories = table.column("history").to_pylist()
        seen = None
        if past is not None:
            seen = sample_users(past[name], cfg.evaluate.max_users, cfg.seed).column("history").to_pylist()
        ranked = ranker.rank(histories, ks[-1], cfg.evaluate.exclude_seen, seen=seen)
        out[name] = ranking_metrics(ranked, table.column("target").to_pylist(), ks)
        log.info("sasrec %s (%d users): recall@10 %.4f ndcg@10 %.4f", name, len(table),
                 out[name].get("recall@10", 0.0), out[name].get("ndcg@10", 0.0))
    out["best_epoch"] = ranker.epoch
    return out
