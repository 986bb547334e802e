"""The RQ-VAE quantizer of CoST / TIGER as a plain torch module (nothing here knows about Ray).

x (d) -> MLP encoder -> z (latent) -> M residual levels, each picking the nearest of K code vectors
-> z_q = sum of picked codes -> MLP decoder -> x_hat (d). The decoder sees z_q through the
straight-through estimator z + sg(z_q - z), so reconstruction / contrastive gradients reach the
encoder while the codebooks learn from L_rq only (VQ-VAE style). The residual passed to the next
level is r_l = r_{l-1} - sg(e_l), so each level's codebook gets the gradient of its own level only.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the squared L2 distance ||a - b||^2 (the paper's norms; not a per-element mean)."""
    return (a.float() - b.float()).pow(2).sum(-1).mean()


def code_distances(residual: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance [n, K] from every row to every code vector."""
    return residual.pow(2).sum(-1, keepdim=True) - 2.0 * residual @ codebook.t() + codebook.pow(2).sum(-1)[None, :]


def nearest_code(residual: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code vector (squared L2) for every row; ties go to the lowest index."""
    return code_distances(residual, codebook).argmin(dim=-1)


def kmeans_centroids(points: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """faiss k-means centroids [k, dim] of float32 points (deterministic for a fixed seed)."""
    import faiss

    points = np.ascontiguousarray(points, dtype=np.float32)
    if points.shape[0] < k:
        raise ValueError(f"k-means needs at least {k} points, got {points.shape[0]}")
    km = faiss.Kmeans(points.shape[1], k, niter=int(iters), seed=int(seed), verbose=False,
                      max_points_per_centroid=max(256, (points.shape[0] + k - 1) // k))
    km.train(points)
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, points.shape[1])


class ResidualQuantizer(nn.Module):
    """M levels of K code vectors (one codebook per level, or one shared by all levels)."""

    def __init__(self, num_levels: int, codebook_size: int, dim: int, shared: bool = False, beta: float = 0.25):
        super().__init__()
        self.num_levels = int(num_levels)
        self.codebook_size = int(codebook_size)
        self.dim = int(dim)
        self.shared = bool(shared)
        self.beta = float(beta)
        n_books = 1 if shared else num_levels
        self.codebooks = nn.Parameter(torch.randn(n_books, codebook_size, dim) * 0.1)

    def codebook(self, level: int) -> torch.Tensor:
        return self.codebooks[0 if self.shared else level]

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        residual = z
        quantized = torch.zeros_like(z)
        codes = []
        residuals = []
        loss_rq = z.new_zeros(())
        for level in range(self.num_levels):
            book = self.codebook(level)
            idx = nearest_code(residual.detach(), book.detach())
            e = book[idx]
            # L_rq: codebook term pulls e to sg(r), commitment term pulls r to sg(e).
            loss_rq = loss_rq + sq_dist(e, residual.detach()) + self.beta * sq_dist(residual, e.detach())
            residuals.append(residual)
            codes.append(idx)
            quantized = quantized + e.detach()
            residual = residual - e.detach()
        z_q = z + (quantized - z).detach()  # straight-through estimator
        return {"z": z, "z_q": z_q, "codes": torch.stack(codes, dim=-1), "loss_rq": loss_rq,
                "residuals": torch.stack(residuals, dim=0)}

    @torch.no_grad()
    def codes(self, z: torch.Tensor) -> torch.Tensor:
        residual = z
        out = []
        for level in range(self.num_levels):
            book = self.codebook(level)
            idx = nearest_code(residual, book)
            out.append(idx)
            residual = residual - book[idx]
        return torch.stack(out, dim=-1)

    @torch.no_grad()
    def kmeans_init(self, z: np.ndarray, iters: int, seed: int) -> torch.Tensor:
        """Codebooks from k-means on a batch of latents: level l on the residuals left by levels < l.

        A shared codebook is fitted on the level-1 residuals (the latents themselves). Returns the new
        codebooks tensor (also copied into the parameter).
        """
        residual = np.asarray(z, dtype=np.float32)
        books = []
        for level in range(1 if self.shared else self.num_levels):
            centroids = kmeans_centroids(residual, self.codebook_size, iters, seed + level)
            books.append(centroids)
            idx = nearest_code(torch.from_numpy(residual), torch.from_numpy(centroids)).numpy()
            residual = residual - centroids[idx]
        new = torch.from_numpy(np.stack(books)).to(self.codebooks.device, self.codebooks.dtype)
        self.codebooks.data.copy_(new)
        return new


class RQVAE(nn.Module):
    """CoST / RQ-VAE quantizer: encoder -> residual quantizer -> decoder."""

    def __init__(self, input_dim: int, hidden_dims: Sequence[int] = (512, 256, 128), latent_dim: int = 96,
                 num_levels: int = 3, codebook_size: int = 64, shared_codebook: bool = False, beta: float = 0.25):
        super().__init__()
        self.input_dim = int(input_dim)
        self.encoder = mlp([input_dim, *hidden_dims, latent_dim])
        self.quantizer = ResidualQuantizer(num_levels, codebook_size, latent_dim, shared_codebook, beta)
        self.decoder = mlp([latent_dim, *reversed(list(hidden_dims)), input_dim])

    @classmethod
    def from_config(cls, tcfg, input_dim: int) -> "RQVAE":
        return cls(input_dim, tcfg.hidden_dims, tcfg.latent_dim, tcfg.num_levels, tcfg.codebook_size,
                   tcfg.shared_codebook, tcfg.beta)

    @property
    def num_levels(self) -> int:
        return self.quantizer.num_levels

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(x)
        out = self.quantizer(z)
        out["x_hat"] = self.decoder(out["z_q"])
        return out

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.codes(self.encoder(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)["x_hat"]
