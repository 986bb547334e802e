"""Plain training-loop helpers shared by the generator and SASRec loops (no Ray, no DeepSpeed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class EarlyStopping:
    """Best-on-validation tracking with patience, restorable from a checkpoint's saved state.

    `update` is called after each validation; a score that does not beat the best counts as a bad
    evaluation, and `patience` bad evaluations in a row stop training (`stopped_early`).
    """

    patience: int
    history: list[dict] = field(default_factory=list)
    best: float = -1.0
    best_epoch: int = -1
    best_valid: dict = field(default_factory=dict)
    bad_evals: int = 0
    stopped_early: bool = False

    @classmethod
    def restore(cls, patience: int, state: dict[str, Any] | None) -> "EarlyStopping":
        """From the `extra` state of the latest checkpoint (empty or None: a fresh start)."""
        state = state or {}
        return cls(patience=patience, history=list(state.get("history", [])), best=float(state.get("best", -1.0)),
                   best_epoch=int(state.get("best_epoch", -1)), best_valid=dict(state.get("best_valid", {})),
                   bad_evals=int(state.get("bad_evals", 0)), stopped_early=bool(state.get("stopped_early", False)))

    def update(self, score: float, metrics: dict[str, float], epoch: int) -> bool:
        """Record a validation result; True when it is the new best (the caller saves that checkpoint)."""
        if score > self.best:
            self.best, self.best_epoch, self.best_valid, self.bad_evals = score, epoch, dict(metrics), 0
            return True
        self.bad_evals += 1
        self.stopped_early = self.bad_evals >= self.patience
        return False

    def state(self) -> dict[str, Any]:
        """What a checkpoint saves to resume this tracking (everything but the patience)."""
        out = asdict(self)
        out.pop("patience")
        return out


def cpu_state_dict(module) -> dict:
    """The module's parameters as float32 CPU tensors: a checkpoint any device and precision can load."""
    return {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
