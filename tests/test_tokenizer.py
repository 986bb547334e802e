"""Tokenizer pieces without Ray Train: losses against hand-computed values, k-means init, IDs, bad input."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from cost_dist.config import Config, TokenizerConfig
from cost_dist.embed import fixed_size_list
from cost_dist.errors import CheckpointError, CostDistError, DataError
from cost_dist.rundir import RunDir
from cost_dist.tokenizer.assign import assign_suffixes, semantic_id_table
from cost_dist.tokenizer.baselines import ResidualKMeans, balanced_assign, random_codes
from cost_dist.tokenizer.diagnostics import (code_usage, collision_share, nearest_neighbours,
                                             neighbourhood_preservation, normalized_mutual_information, purity)
from cost_dist.tokenizer.embeddings import embeddings_matrix
from cost_dist.tokenizer.inference import SemanticTokenizer
from cost_dist.tokenizer.losses import info_nce, quantizer_loss
from cost_dist.tokenizer.model import RQVAE, ResidualQuantizer, kmeans_centroids
from cost_dist.tokenizer.train import check_tokenizer_config, kmeans_init_distributed, run_tokenize_stage


# ---- losses -----------------------------------------------------------------------------------------


def test_info_nce_matches_hand_computation():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    # cos(x0, xh0)=1, cos(x0, xh1)=1/sqrt2; cos(x1, xh0)=0, cos(x1, xh1)=1/sqrt2
    c = 1 / math.sqrt(2)
    l0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(c / tau)))
    l1 = -math.log(math.exp(c / tau) / (math.exp(0 / tau) + math.exp(c / tau)))
    assert float(info_nce(x, x_hat, 0, tau)) == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # A worker holding only row 1 of the global batch: its positive sits at offset 1.
    assert float(info_nce(x[1:], x_hat, 1, tau)) == pytest.approx(l1, rel=1e-6)


def test_quantizer_loss_kinds_combine_terms_as_configured():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x_hat = torch.tensor([[0.5, 0.5], [0.0, 2.0]])
    out = {"x_hat": x_hat, "loss_rq": torch.tensor(0.3)}
    mse = float(((x_hat - x) ** 2).sum(-1).mean())  # squared norms (0.25 + 0.25, 0 + 1), mean over rows
    assert mse == pytest.approx(0.75)
    nce = float(info_nce(x, x_hat, 0, 0.1))
    re = quantizer_loss(x, out, "re", alpha=0.1, tau=0.1)
    co = quantizer_loss(x, out, "co", alpha=0.1, tau=0.1)
    both = quantizer_loss(x, out, "re+co", alpha=0.1, tau=0.1)
    assert float(re["loss"]) == pytest.approx(0.75 + 0.3)
    assert "loss_co" not in re
    assert float(co["loss"]) == pytest.approx(0.1 * nce + 0.3, rel=1e-6)
    assert "loss_re" not in co
    assert float(both["loss"]) == pytest.approx(0.75 + 0.1 * nce + 0.3, rel=1e-6)
    with pytest.raises(CostDistError, match="tokenizer.loss"):
        quantizer_loss(x, out, "mse", alpha=0.1, tau=0.1)


def test_rq_loss_codes_and_straight_through_by_hand():
    q = ResidualQuantizer(num_levels=2, codebook_size=2, dim=2, shared=False, beta=0.25)
    with torch.no_grad():
        q.codebooks.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.1, 0.0], [0.0, -0.1]]]))
    z = torch.tensor([[0.9, 0.2]], requires_grad=True)
    out = q(z)
    # level 1: nearest (1, 0); residual (-0.1, 0.2); level 2: nearest (0.1, 0)? d=(0.04+0.04)=0.08 vs (0.01+0.09)=0.1
    assert out["codes"].tolist() == [[0, 0]]
    r0 = torch.tensor([0.9, 0.2])
    e1 = torch.tensor([1.0, 0.0])
    r1 = r0 - e1
    e2 = torch.tensor([0.1, 0.0])
    per_level = [((r - e) ** 2).sum() * (1 + 0.25) for r, e in ((r0, e1), (r1, e2))]
    assert float(out["loss_rq"].detach()) == pytest.approx(float(sum(per_level)), rel=1e-6)
    # Straight-through: z_q has the quantized value and the gradient of the identity.
    assert torch.allclose(out["z_q"], (e1 + e2)[None])
    out["z_q"].sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))
    assert q.codes(z.detach()).tolist() == [[0, 0]]


def test_kmeans_init_fits_the_given_batch():
    torch.manual_seed(0)
    model = RQVAE(input_dim=8, hidden_dims=[16], latent_dim=4, num_levels=2, codebook_size=4)
    batch = torch.randn(64, 8)
    kmeans_init_distributed(model, batch, TokenizerConfig(kmeans_init_iters=20), seed=3)
    z = model.encoder(batch).detach().numpy()
    expected_l1 = kmeans_centroids(z, 4, 20, 3)
    np.testing.assert_allclose(model.quantizer.codebooks[0].detach().numpy(), expected_l1, atol=1e-6)
    # Level 2 is fitted on the residuals left by level 1.
    idx = ((z[:, None, :] - expected_l1[None]) ** 2).sum(-1).argmin(1)
    expected_l2 = kmeans_centroids(z - expected_l1[idx], 4, 20, 4)
    np.testing.assert_allclose(model.quantizer.codebooks[1].detach().numpy(), expected_l2, atol=1e-5)
    # Every code of level 1 is used on the init batch: k-means, not random vectors.
    assert len(set(model.codes(batch)[:, 0].tolist())) == 4


# ---- IDs ----------------------------------------------------------------------------------------------


def test_suffixes_resolve_forced_collisions_in_item_id_order():
    codes = np.array([[1, 2, 3], [0, 0, 0], [1, 2, 3], [1, 2, 3], [0, 0, 1]])
    ids = ["c", "x", "a", "b", "y"]
    suffix = assign_suffixes(codes, ids)
    assert suffix.tolist() == [2, 0, 0, 1, 0]  # a, b, c share (1, 2, 3)
    table = semantic_id_table(ids, codes, suffix)
    assert table.schema.field("semantic_id").type == pa.list_(pa.int32(), 4)
    full = [tuple(v) for v in table.column("semantic_id").to_pylist()]
    assert len(set(full)) == len(full)
    # Deterministic: the same input in another order gives each item the same suffix.
    perm = [4, 2, 0, 3, 1]
    again = assign_suffixes(codes[perm], [ids[i] for i in perm])
    assert dict(zip([ids[i] for i in perm], again.tolist())) == dict(zip(ids, suffix.tolist()))


def test_random_ids_are_a_deterministic_hash_of_the_vector():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)).astype(np.float32)
    a = random_codes(x, 3, 16, seed=1)
    assert a.shape == (500, 3) and a.min() >= 0 and a.max() < 16
    np.testing.assert_array_equal(a, random_codes(x, 3, 16, seed=1))
    np.testing.assert_array_equal(a[7], random_codes(x[7:8], 3, 16, seed=1)[0])  # no dependence on the batch
    assert (a != random_codes(x, 3, 16, seed=2)).any()
    # Roughly uniform: every code appears at level 1.
    assert len(np.unique(a[:, 0])) == 16


def test_residual_kmeans_baseline_codes_and_reconstruction():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 6)).astype(np.float32) * 5
    x = (centers[rng.integers(0, 4, 200)] + rng.normal(size=(200, 6)) * 0.1).astype(np.float32)
    model = ResidualKMeans.fit(x, num_levels=2, codebook_size=4, iters=20, seed=0)
    codes = model.codes(x)
    assert codes.shape == (200, 2)
    recon = model.reconstruct(x)
    assert np.mean(np.linalg.norm(recon - x, axis=1)) < 0.5  # clusters recovered at level 1


def test_balanced_assign_fills_the_nearest_clusters_up_to_capacity():
    # Every point is nearest to cluster 0; it keeps its two closest points, the others go to cluster 1.
    dist = np.array([[0.1, 1.0], [0.2, 1.0], [0.3, 0.5], [0.4, 0.9]])
    np.testing.assert_array_equal(balanced_assign(dist, capacity=2), [0, 0, 1, 1])
    np.testing.assert_array_equal(balanced_assign(dist, capacity=4), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="5 points do not fit in 2 clusters of 2"):
        balanced_assign(np.zeros((5, 2)), capacity=2)


def topic_embeddings(n: int, dim: int, topics: int, seed: int) -> np.ndarray:
    """Unit vectors around a few topic directions, like sentence embeddings of a small catalog."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(topics, dim))
    x = centers[rng.integers(0, topics, n)] + rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_balanced_residual_kmeans_uses_every_level_evenly():
    x = topic_embeddings(1000, 64, 8, seed=0)
    plain = ResidualKMeans.fit(x, num_levels=3, codebook_size=32, iters=50, seed=0).codes(x)
    balanced = ResidualKMeans.fit(x, num_levels=3, codebook_size=32, iters=50, seed=0, balanced=True).codes(x)
    plain_ppl = [u["perplexity"] for u in code_usage(plain, 32)]
    balanced_ppl = [u["perplexity"] for u in code_usage(balanced, 32)]
    # Nearest-centroid codes of equal-size-cluster centroids are close to uniform at every level
    # (perplexity 32 = uniform), and fewer items share a full code.
    assert min(balanced_ppl) > 0.9 * 32
    assert all(b > p for b, p in zip(balanced_ppl, plain_ppl))
    assert collision_share(balanced) < collision_share(plain)


def test_rqkmeans_tokenize_stage_saves_what_it_fitted(tmp_path):
    x = topic_embeddings(300, 16, 4, seed=1)
    run = RunDir(str(tmp_path / "run"))
    run.write_parquet("embed/embeddings.parquet", pa.table({"item_id": pa.array([f"i{i}" for i in range(300)]),
                                                            "embedding": fixed_size_list(x)}))
    cfg = Config.from_dict({"seed": 3, "tokenizer": {"method": "rqkmeans", "kmeans_balanced": True, "num_levels": 2,
                                                     "codebook_size": 8, "kmeans_init_iters": 20}})
    metrics = run_tokenize_stage(cfg, run)
    assert metrics["tokenizer"]["train"]["kmeans_balanced"] is True
    expected = ResidualKMeans.fit(x, num_levels=2, codebook_size=8, iters=20, seed=3, balanced=True).codes(x)
    np.testing.assert_array_equal(SemanticTokenizer.load(run).codes(x), expected)


def test_diagnostics_by_hand():
    codes = np.array([[0, 0], [0, 1], [1, 0], [0, 0]])
    usage = code_usage(codes, 4)
    assert usage[0]["used"] == 2 and usage[0]["usage"] == 0.5
    p = np.array([3, 1]) / 4
    assert usage[0]["perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    assert collision_share(codes) == 0.5  # items 0 and 3 share (0, 0)
    neighbours = np.array([[3], [0], [1], [0]])
    np_scores = neighbourhood_preservation(codes, neighbours)
    assert np_scores["prefix1"] == pytest.approx(3 / 4)
    assert np_scores["prefix2"] == pytest.approx(2 / 4)
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    assert nearest_neighbours(emb, k=1)[:, 0].tolist() == [1, 0, 3, 2]
    labels = np.array([0, 0, 1, 1])
    assert normalized_mutual_information(labels, np.array([5, 5, 7, 7])) == pytest.approx(1.0)
    assert normalized_mutual_information(labels, np.array([1, 2, 1, 2])) == pytest.approx(0.0, abs=1e-12)
    assert purity(np.array([0, 0, 0, 1]), labels) == 0.75


# ---- bad input ----------------------------------------------------------------------------------------


def _table(ids, rows, fixed=True):
    flat = pa.array(np.asarray(rows, dtype=np.float32).reshape(-1))
    col = pa.FixedSizeListArray.from_arrays(flat, len(rows[0])) if fixed else pa.array([list(r) for r in rows])
    return pa.table({"item_id": ids, "embedding": col})


def test_bad_embeddings_are_clear_errors():
    good = _table(["a", "b"], [[1.0, 2.0], [3.0, 4.0]])
    ids, m = embeddings_matrix(good, "emb.parquet")
    assert ids == ["a", "b"] and m.shape == (2, 2)
    with pytest.raises(DataError, match=r"emb.parquet.*NaN.*'b'"):
        embeddings_matrix(_table(["a", "b"], [[1.0, 2.0], [np.nan, 4.0]]), "emb.parquet")
    with pytest.raises(DataError, match="missing column 'embedding'"):
        embeddings_matrix(pa.table({"item_id": ["a"], "vec": [[1.0]]}), "emb.parquet")
    with pytest.raises(DataError, match="different sizes"):
        embeddings_matrix(pa.table({"item_id": ["a", "b"], "embedding": [[1.0, 2.0], [1.0]]}), "emb.parquet")
    with pytest.raises(DataError, match="duplicate item_id 'a'"):
        embeddings_matrix(_table(["a", "a"], [[1.0], [2.0]]), "emb.parquet")
    with pytest.raises(DataError, match="fewer than tokenizer.codebook_size=64"):
        check_tokenizer_config(TokenizerConfig(), num_items=10)
    with pytest.raises(CostDistError, match="tokenizer.method"):
        check_tokenizer_config(TokenizerConfig(method="vq"), num_items=1000)


def test_semantic_tokenizer_wrong_size_nan_and_corrupt_checkpoint(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    tcfg = TokenizerConfig(hidden_dims=[8], latent_dim=4, num_levels=2, codebook_size=4)
    model = RQVAE.from_config(tcfg, 6)
    import dataclasses

    run.write_torch("tokenize/model.pt", {"method": "rqvae", "config": dataclasses.asdict(tcfg), "input_dim": 6,
                                          "seed": 0, "state_dict": model.state_dict()})
    tok = SemanticTokenizer.load(run)
    assert (tok.num_levels, tok.codebook_size, tok.input_dim) == (2, 4, 6)
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    np.testing.assert_array_equal(tok.codes(x), model.codes(torch.from_numpy(x)).numpy())
    with pytest.raises(DataError, match="embedding size 5 does not match the tokenizer's input size 6"):
        tok.codes(np.zeros((2, 5), dtype=np.float32))
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        tok.codes(bad)
    run.write_bytes("tokenize/model.pt", b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt"):
        SemanticTokenizer.load(run)
    with pytest.raises(CheckpointError, match="run the tokenize stage"):
        SemanticTokenizer.load(RunDir(str(tmp_path / "empty")))


def test_shared_codebook_is_one_table_for_every_level():
    torch.manual_seed(0)
    model = RQVAE(input_dim=8, hidden_dims=[16], latent_dim=4, num_levels=3, codebook_size=4, shared_codebook=True)
    assert tuple(model.quantizer.codebooks.shape) == (1, 4, 4)
    batch = torch.randn(40, 8)
    kmeans_init_distributed(model, batch, TokenizerConfig(kmeans_init_iters=10, shared_codebook=True), seed=0)
    z = model.encoder(batch).detach().numpy()
    np.testing.assert_allclose(model.quantizer.codebooks[0].detach().numpy(), kmeans_centroids(z, 4, 10, 0), atol=1e-6)
    out = model(batch)
    assert out["codes"].shape == (40, 3) and int(out["codes"].max()) < 4
    # z_q is the sum of the picked rows of the one table.
    book = model.quantizer.codebooks[0].detach()
    torch.testing.assert_close(out["z_q"].detach(), book[out["codes"]].sum(1), rtol=1e-5, atol=1e-5)
