"""The SASRec baseline: model (model.py), inputs (data.py), Ray Train loop and stage (train.py), ranking
and leave-one-out evaluation (inference.py)."""

from cost_dist.sasrec.inference import METHOD, SASRecRanker, evaluate_sasrec
from cost_dist.sasrec.train import ensure_sasrec, run_sasrec_stage, train_sasrec

__all__ = ["METHOD", "SASRecRanker", "evaluate_sasrec", "ensure_sasrec", "run_sasrec_stage", "train_sasrec"]
