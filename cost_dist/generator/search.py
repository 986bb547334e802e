"""Batched constrained beam search and exact (exhaustive, teacher-forced) scoring.

Beam search decodes a whole batch of users at once: B users x W beams are one decoder batch, the
decoder's key/value cache is kept across steps and reordered with the surviving beams, and the
trie constraint is applied as a mask on the whole [B*W, size_t] score block (PrefixIndex.children).
Decoding is deterministic and fully explicit: greedy top-W by summed log-probs, log-softmax at
temperature 1 over each position's own token range (the same normalisation as training and as
exact scoring), fixed length L, no sampling, no length penalty, no model generation defaults.
"""

from __future__ import annotations

import torch

from cost_dist.generator.constraints import PrefixIndex
from cost_dist.generator.model import TigerModel, new_cache
from cost_dist.generator.vocab import PAD, trim_padding

NEG_INF = float("-inf")


@torch.no_grad()
def beam_search(model: TigerModel, index: PrefixIndex, input_ids: torch.Tensor, k: int, beam_size: int,
                exclude_rows: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k distinct catalog rows per user and their log-probs: ([B, k] int64, -1 = none; [B, k] float).

    exclude_rows: per user, catalog rows never to return (seen items). The beam is widened by the
    largest exclusion count in the batch: each of the W beams alive before the last step leads to at
    least one distinct item, so at least W - |excluded| >= beam_size unseen items remain (or the
    whole catalog was enumerated), and k <= beam_size distinct unseen results are guaranteed when
    the catalog has them.
    """
    model.eval()
    input_ids = trim_padding(input_ids)
    device = input_ids.device
    B = input_ids.shape[0]
    L = index.id_length
    extra = max((len(r) for r in exclude_rows), default=0) if exclude_rows is not None else 0
    W = max(beam_size, k) + extra

    enc, enc_mask = model.encode(input_ids)  # one row per user: beams share it (see TigerModel.decode_step)
    scores = torch.full((B, W), NEG_INF, device=device)
    scores[:, 0] = 0.0  # one live beam at the root, so no duplicate hypotheses
    parents = torch.zeros(B, W, dtype=torch.long, device=device)
    parents[:, 1:] = -1
    tokens = torch.full((B * W,), PAD, dtype=torch.long, device=device)
    cache = new_cache()
    excluded_keys = _exclusion_keys(index, exclude_rows, device) if extra else None
    base = (torch.arange(B, device=device) * W)[:, None]
    user_of_beam = torch.arange(B, device=device).repeat_interleave(W)  # [B * W]

    for t in range(L):
        size = index.position_sizes[t]
        start = model.vocab.position_ranges[t][0]
        if t == 0:
            # Only the root beam is alive, and every beam of a user would decode the same PAD token:
            # decode one row per user and share it, instead of W identical rows (1/L of the work).
            logits = model.decode_step(tokens[:B], enc, enc_mask, cache, (start, size)).repeat_interleave(W, dim=0)
        else:
            logits = model.decode_step(tokens, enc, enc_mask, cache, (start, size))
        log_probs = torch.log_softmax(logits, dim=-1)
        child, valid = index.children(t, parents.view(-1))
        if t == L - 1 and excluded_keys is not None:
            valid &= ~_is_member(excluded_keys, user_of_beam[:, None] * index.num_items + child)
        cand = torch.where(valid, scores.view(-1, 1) + log_probs, torch.full_like(log_probs, NEG_INF)).view(B, W * size)
        scores, flat = cand.topk(W, dim=1)
        beam = flat // size
        code = flat % size
        parents = child.view(B, W * size).gather(1, flat)
        parents = torch.where(torch.isfinite(scores), parents, torch.full_like(parents, -1))
        if t < L - 1:
            # Beams of one user share the encoder, so the cross-attention cache needs no reordering.
            # After step 0 the self-attention cache holds one row per user (see above), not B * W.
            cache.self_attention_cache.reorder_cache(user_of_beam if t == 0 else (base + beam).view(-1))
            tokens = (code + start).view(-1)

    scores, rows = scores[:, :k], parents[:, :k]
    alive = rows >= 0
    rows = torch.where(alive, index.leaf_to_row[rows.clamp_min(0)], torch.full_like(rows, -1))
    return rows, scores


def _exclusion_keys(index: PrefixIndex, exclude_rows: list[torch.Tensor], device) -> torch.Tensor:
    keys = [u * index.num_items + index.row_to_leaf[r.to(device)] for u, r in enumerate(exclude_rows) if len(r)]
    if not keys:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(keys).unique()  # sorted


def _is_member(sorted_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    if sorted_keys.numel() == 0:
        return torch.zeros_like(query, dtype=torch.bool)
    idx = torch.searchsorted(sorted_keys, query).clamp_max(sorted_keys.numel() - 1)
    return sorted_keys[idx] == query


@torch.no_grad()
def exact_scores(model: TigerModel, item_tokens: torch.Tensor, input_ids: torch.Tensor, rows_per_pass: int = 8192) -> torch.Tensor:
    """Log-prob of every item's full ID for every user, teacher forced: [B, n_items].

    The encoder runs once per user; the decoder runs on (user, item) pairs in passes of about
    rows_per_pass rows. Exhaustive, so meant for small and medium catalogs (and as ground truth).
    """
    model.eval()
    input_ids = trim_padding(input_ids)
    B, n = input_ids.shape[0], item_tokens.shape[0]
    enc, _ = model.encode(input_ids)
    out = torch.empty(B, n, device=input_ids.device)
    chunk = max(1, rows_per_pass // max(B, 1))
    for lo in range(0, n, chunk):
        items = item_tokens[lo:lo + chunk]
        c = items.shape[0]
        hidden = enc.repeat_interleave(c, dim=0)
        ids = input_ids.repeat_interleave(c, dim=0)
        targets = items.repeat(B, 1)
        log_probs = model.position_log_probs(ids, targets, encoder_hidden=hidden)
        out[:, lo:lo + c] = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1).view(B, c)
    return out
