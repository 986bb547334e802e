"""SASRec (Kang & McAuley, 2018): causal self-attention over a user's item sequence.

A plain torch module that knows nothing of Ray. Items are rows 1..n of the embedding table (row 0 is
padding); sequences are left-padded to `max_len`, so the last position always holds the newest item
and its output is the user's representation. Scores are inner products with the (tied) item
embeddings over the whole catalog, trained with full-softmax cross-entropy at every position, as in
the reference runs (RecBole's SASRec with CE loss): post-LN blocks, GELU feed-forward, dropout on the
embeddings, the attention weights and each sub-layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PAD = 0


class SASRec(nn.Module):
    def __init__(self, num_items: int, max_len: int, hidden: int = 64, num_blocks: int = 2, num_heads: int = 2,
                 inner_size: int = 256, dropout: float = 0.5):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of num_heads ({num_heads})")
        self.num_items, self.max_len, self.num_heads = int(num_items), int(max_len), int(num_heads)
        self.item_emb = nn.Embedding(self.num_items + 1, hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(self.max_len, hidden)
        self.emb_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.emb_dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(hidden, num_heads, dim_feedforward=inner_size, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=False, layer_norm_eps=1e-12)
        # enable_nested_tensor only applies to key padding masks, which we fold into the attention mask.
        self.blocks = nn.TransformerEncoder(layer, num_blocks, enable_nested_tensor=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Truncated-normal-like small init (std 0.02) as in BERT-style recommenders; it keeps the
        # initial logits near uniform over a catalog of thousands of items.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def attention_mask(self, seqs: torch.Tensor) -> torch.Tensor:
        """Boolean [B*heads, L, L] mask (True = blocked): causal, and padding keys blocked.

        A padding position may still attend to itself, so no row is fully blocked (which would make
        the softmax NaN); padding outputs are never scored.
        """
        b, length = seqs.shape
        causal = torch.ones(length, length, dtype=torch.bool, device=seqs.device).triu(1)
        pad_key = (seqs == PAD)[:, None, :]  # [B, 1, L]
        eye = torch.eye(length, dtype=torch.bool, device=seqs.device)[None]
        blocked = (causal[None] | pad_key) & ~eye
        return blocked.repeat_interleave(self.num_heads, dim=0)

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, hidden] of left-padded item-row sequences [B, L] (L <= max_len)."""
        length = seqs.shape[1]
        positions = torch.arange(self.max_len - length, self.max_len, device=seqs.device)
        x = self.item_emb(seqs) + self.pos_emb(positions)[None]
        x = self.emb_dropout(self.emb_norm(x))
        return self.blocks(x, mask=self.attention_mask(seqs))

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every real item (rows 1..n, so column j is item row j + 1)."""
        return hidden @ self.item_emb.weight[1:].T

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean full-softmax cross-entropy over positions whose target is not padding."""
        logits = self.item_logits(self(inputs))
        return F.cross_entropy(logits.reshape(-1, self.num_items), targets.reshape(-1) - 1, ignore_index=PAD - 1)

    @torch.no_grad()
    def last_scores(self, seqs: torch.Tensor) -> torch.Tensor:
        """Scores [B, n] of every item as the next one after each (left-padded) history."""
        return self.item_logits(self(seqs)[:, -1])
