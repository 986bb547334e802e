"""`SemanticTokenizer`: a trained tokenizer (any method) loaded from RUN/tokenize/model.pt.

`.codes(embeddings) -> [n, M] int64` gives the pre-suffix codes, for the assign stage and for new items
at serving time. Methods: "rqvae" (the trained CoST / RQ-VAE quantizer), "rqkmeans" (residual k-means
centroids), "random" (keyed hash of the embedding's float32 bytes and the run's seed: the same vector
always gets the same codes; see cost_dist.tokenizer.baselines.random_codes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cost_dist.errors import CheckpointError
from cost_dist.tokenizer.embeddings import check_dim, check_finite

MODEL_FILE = "tokenize/model.pt"


class SemanticTokenizer:
    def __init__(self, payload: dict[str, Any], source: str = "model.pt", device: str | None = None):
        import torch

        try:
            self.method = payload["method"]
            self.config = dict(payload["config"])
            self.input_dim = int(payload["input_dim"])
            self.seed = int(payload.get("seed", 0))
            state = payload["state_dict"]
            self.num_levels = int(self.config["num_levels"])
            self.codebook_size = int(self.config["codebook_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"tokenizer checkpoint {source} lacks {exc} (not written by the tokenize stage?)") from None
        self.device = torch.device(device or "cpu")
        self._model = None
        self._kmeans = None
        if self.method == "rqvae":
            from cost_dist.config import TokenizerConfig
            from cost_dist.tokenizer.model import RQVAE

            tcfg = TokenizerConfig(**{k: v for k, v in self.config.items() if k != "deepspeed"})
            model = RQVAE.from_config(tcfg, self.input_dim)
            try:
                model.load_state_dict(state)
            except (RuntimeError, KeyError) as exc:
                raise CheckpointError(f"tokenizer checkpoint {source} does not fit the configured model: {exc}") from None
            self._model = model.to(self.device).eval()
        elif self.method == "rqkmeans":
            from cost_dist.tokenizer.baselines import ResidualKMeans

            try:
                self._kmeans = ResidualKMeans(np.asarray(state["centroids"].numpy() if hasattr(state["centroids"], "numpy")
                                                         else state["centroids"]))
            except KeyError:
                raise CheckpointError(f"tokenizer checkpoint {source} has no k-means centroids") from None
        elif self.method != "random":
            raise CheckpointError(f"tokenizer checkpoint {source}: unknown method {self.method!r}")

    @classmethod
    def load(cls, run, device: str | None = None) -> "SemanticTokenizer":
        from cost_dist.rundir import RunDir, RunDirError

        if not isinstance(run, RunDir):
            run = RunDir(str(run))
        if not run.exists(MODEL_FILE):
            raise CheckpointError(f"missing tokenizer checkpoint {run.uri(MODEL_FILE)}: run the tokenize stage first")
        try:
            payload = run.read_torch(MODEL_FILE)
        except RunDirError as exc:
            raise CheckpointError(str(exc)) from None
        if not isinstance(payload, dict):
            raise CheckpointError(f"tokenizer checkpoint {run.uri(MODEL_FILE)} is not a cost-dist tokenizer")
        return cls(payload, source=run.uri(MODEL_FILE), device=device)

    def _check(self, embeddings: np.ndarray, source: str) -> np.ndarray:
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        check_dim(x, self.input_dim, source)
        check_finite(x, source)
        return x

    def codes(self, embeddings: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Pre-suffix codes [n, M] int64 for float vectors [n, input_dim]."""
        import torch

        x = self._check(embeddings, "tokenizer input")
        if self.method == "random":
            from cost_dist.tokenizer.baselines import random_codes

            return random_codes(x, self.num_levels, self.codebook_size, self.seed)
        if self.method == "rqkmeans":
            return self._kmeans.codes(x)
        out = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                # A copy per batch: x may be a read-only view of an Arrow buffer, which torch won't share.
                out.append(self._model.codes(torch.tensor(x[i:i + batch_size], device=self.device)).cpu().numpy())
        return np.concatenate(out).astype(np.int64) if out else np.zeros((0, self.num_levels), dtype=np.int64)

    def reconstruct(self, embeddings: np.ndarray, batch_size: int = 4096) -> np.ndarray | None:
        """Reconstructed vectors (rqvae: decoder output; rqkmeans: sum of centroids); None for random IDs."""
        import torch

        x = self._check(embeddings, "tokenizer input")
        if self.method == "random":
            return None
        if self.method == "rqkmeans":
            return self._kmeans.reconstruct(x)
        out = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                out.append(self._model.reconstruct(torch.from_numpy(x[i:i + batch_size]).to(self.device)).cpu().numpy())
        return np.concatenate(out)
