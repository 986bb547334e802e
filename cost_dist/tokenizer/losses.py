"""Quantizer losses: L_re = MSE + L_rq (RQ-VAE), L_co = alpha * InfoNCE + L_rq (CoST), or both.

InfoNCE follows Eq. 4 of the CoST paper: the anchor is the input embedding x_i, the candidates are
the reconstructions x_hat_j of every row of the *global* batch (all workers, gathered with gradient),
the positive is the row's own reconstruction, similarity is cosine / tau. Each worker returns the
mean over its local rows; DeepSpeed averages the gradients over workers and the gather's backward
sums every worker's contribution into the row's owner, so N workers x B rows give the loss and
gradients of one worker with the N*B rows (see cost_dist.distributed).

"MSE" and L_rq use squared L2 norms per row (the paper's ||.||^2), averaged over rows: a mean over
elements would scale the reconstruction of a d=384 embedding down by 1/d, and the commitment term
then collapses the latents onto a handful of codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cost_dist.errors import CostDistError

LOSS_KINDS = ("re", "co", "re+co")


def info_nce(anchors: torch.Tensor, candidates: torch.Tensor, offset: int, tau: float) -> torch.Tensor:
    """Mean over the anchors of -log softmax(cos(anchor_i, candidates) / tau)[offset + i]."""
    logits = F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).t() / tau
    targets = torch.arange(anchors.shape[0], device=anchors.device) + int(offset)
    return F.cross_entropy(logits.float(), targets)


def quantizer_loss(x: torch.Tensor, out: dict[str, torch.Tensor], kind: str, alpha: float, tau: float,
                   gather=None) -> dict[str, torch.Tensor]:
    """The configured loss of one (local) batch: {"loss", "loss_rq", "loss_re"?, "loss_co"?}.

    `gather(t) -> (gathered, offset)` returns the global batch of reconstructions (gradient kept for
    the local rows) and where this worker's rows start in it; None means a single worker.
    """
    if kind not in LOSS_KINDS:
        raise CostDistError(f"tokenizer.loss must be one of {', '.join(LOSS_KINDS)}, got {kind!r}")
    parts: dict[str, torch.Tensor] = {"loss_rq": out["loss_rq"]}
    total = out["loss_rq"]
    x_hat = out["x_hat"]
    if "re" in kind.split("+"):
        parts["loss_re"] = (x_hat.float() - x.float()).pow(2).sum(-1).mean()
        total = total + parts["loss_re"]
    if "co" in kind.split("+"):
        candidates, offset = gather(x_hat) if gather is not None else (x_hat, 0)
        parts["loss_co"] = info_nce(x, candidates, offset, tau)
        total = total + alpha * parts["loss_co"]
    parts["loss"] = total
    return parts
