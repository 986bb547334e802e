"""The tokenizer on real Ray Train workers with real DeepSpeed engines (CPU / gloo).

- equivalence: 2 workers x B and 1 worker x 2B give the same loss and gradients (cross-worker negatives);
- the tiny pipeline run (tests/conftest.py `tiny_run`, shared with other tests): unique IDs, meta,
  diagnostics, SemanticTokenizer, CoST's level-1 codes against the synthetic topics vs random IDs;
- resume: stopped after epoch 1, resumed (through one injected worker failure, so FailureConfig's
  restart from the checkpoint is exercised too) -> the same model and codes as the uninterrupted run;
- a corrupt checkpoint is a clear CheckpointError (checked on the driver before any worker starts).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import TINY_CONFIG
from cost_dist.config import Config, TokenizerConfig
from cost_dist.distributed import latest_checkpoint_path
from cost_dist.errors import CheckpointError
from cost_dist.rundir import RunDir
from cost_dist.tokenizer.baselines import random_codes
from cost_dist.tokenizer.diagnostics import normalized_mutual_information
from cost_dist.tokenizer.embeddings import read_embeddings
from cost_dist.tokenizer.inference import SemanticTokenizer
from cost_dist.tokenizer.losses import quantizer_loss
from cost_dist.tokenizer.model import RQVAE, kmeans_centroids
from cost_dist.tokenizer.train import RAY_TRAIN_DIR, ray_train_name, run_gradient_probe, run_tokenize_stage, train_quantizer


def test_cross_worker_equivalence_2x16_vs_1x32(ray_session, tmp_path):
    """Same global batch: 2 workers x 16 rows and 1 worker x 32 rows -> same loss and gradients (1e-5)."""
    tcfg = TokenizerConfig(loss="re+co", hidden_dims=[64, 32], latent_dim=16, num_levels=3, codebook_size=8,
                           kmeans_init_iters=20, batch_size=16)
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(32, 24)).astype(np.float32)
    batch /= np.linalg.norm(batch, axis=1, keepdims=True)
    storage = str(tmp_path / "ray_train")
    one = run_gradient_probe(tcfg, batch, 1, storage, "probe1", str(tmp_path / "one.pt"), seed=7)
    two = run_gradient_probe(tcfg, batch, 2, storage, "probe2", str(tmp_path / "two.pt"), seed=7)
    assert (one["world_size"], two["world_size"]) == (1, 2)

    loss_diff = max(abs(one["losses"][k] - two["losses"][k]) for k in one["losses"])
    grad_diff = max(float((one["grads"][n] - two["grads"][n]).abs().max()) for n in one["grads"])
    print(f"\nequivalence 2x16 vs 1x32: loss {one['losses']['loss']:.6f} vs {two['losses']['loss']:.6f}; "
          f"max abs loss diff {loss_diff:.3e}, max abs grad diff {grad_diff:.3e}")
    assert loss_diff <= 1e-5
    assert grad_diff <= 1e-5
    assert all(g is not None and float(g.abs().max()) > 0 for g in one["grads"].values() if g is not None)
    torch.testing.assert_close(one["codes"], two["codes"], rtol=0, atol=0)

    # The k-means init used the first global batch: level 1 = faiss k-means of the encoded batch.
    torch.manual_seed(7)
    model = RQVAE.from_config(tcfg, 24)
    z = model.encoder(torch.from_numpy(batch)).detach().numpy()
    np.testing.assert_allclose(two["codebooks"][0].numpy(), kmeans_centroids(z, 8, 20, 7), atol=1e-5)

    # The negatives really are global: per-worker negatives (16 rows each) give a different InfoNCE.
    model.quantizer.codebooks.data.copy_(two["codebooks"])
    x = torch.from_numpy(batch)
    local = [quantizer_loss(x[i:i + 16], model(x[i:i + 16]), "co", 0.1, 0.1)["loss_co"] for i in (0, 16)]
    full = quantizer_loss(x, model(x), "co", 0.1, 0.1)["loss_co"]
    assert float(full.detach()) == pytest.approx(two["losses"]["loss_co"], abs=1e-5)
    assert abs(float(sum(local).detach()) / 2 - float(full.detach())) > 1e-3


# ---- the tiny pipeline run ---------------------------------------------------------------------------


def test_tiny_run_ids_meta_diagnostics(tiny_run, tiny_config):
    table = pq.read_table(tiny_run.path("assign/codes.parquet"))
    m = tiny_config.tokenizer.num_levels
    assert str(table.schema.field("item_id").type) == "string"
    sid_type = table.schema.field("semantic_id").type
    assert pa.types.is_fixed_size_list(sid_type) and sid_type.list_size == m + 1 and sid_type.value_type == pa.int32()
    ids = np.asarray(table.column("semantic_id").to_pylist())
    assert len({tuple(r) for r in ids}) == len(ids), "semantic IDs must be unique"
    emb_ids, _ = read_embeddings(tiny_run)
    assert sorted(table.column("item_id").to_pylist()) == sorted(emb_ids)
    meta = tiny_run.read_json("assign/meta.json")
    assert meta["num_levels"] == m and meta["codebook_size"] == tiny_config.tokenizer.codebook_size
    assert meta["num_suffix"] == int(ids[:, -1].max()) + 1
    assert ids[:, :m].max() < meta["codebook_size"]

    metrics = tiny_run.read_metrics()
    history = metrics["tokenizer"]["train"]["history"]
    assert [h["epoch"] for h in history] == list(range(1, tiny_config.tokenizer.epochs + 1))
    assert all({"loss", "loss_rq", "loss_co", "recon_cos"} <= set(h) for h in history)
    diag = metrics["tokenizer"]["diagnostics"]
    assert len(diag["levels"]) == m and all(lv["perplexity"] >= 1 for lv in diag["levels"])
    assert 0 <= diag["collision_share"] <= 1
    assert set(diag["neighbourhood_preservation"]) == {"prefix1", "prefix2"}
    assert diag["recon_cos"] is not None
    assert tiny_run.read_bytes("plots/code_usage.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_semantic_tokenizer_reproduces_assigned_codes(tiny_run, tiny_config):
    tok = SemanticTokenizer.load(tiny_run)
    item_ids, emb = read_embeddings(tiny_run)
    table = pq.read_table(tiny_run.path("assign/codes.parquet"))
    by_id = dict(zip(table.column("item_id").to_pylist(), table.column("semantic_id").to_pylist()))
    expected = np.asarray([by_id[i][: tok.num_levels] for i in item_ids])
    np.testing.assert_array_equal(tok.codes(emb), expected)
    assert tok.input_dim == emb.shape[1]


def test_cost_level1_codes_recover_topics_far_better_than_random(tiny_run, tiny_config):
    """NMI(level-1 codes, latent topic): CoST >= 0.4 and >= 3x random IDs.

    Random codes are independent of the topic, so their NMI is only the finite-sample bias (about
    (K-1)(T-1)/(2n)/H ~ 0.07 for 300 items, K=16 codes, T=8 topics); 0.4 means the first code alone
    carries a large part of the topic's information.
    """
    items = pq.read_table(tiny_run.path("prepare/items.parquet"), columns=["item_id", "topic"])
    topic_of = dict(zip(items.column("item_id").to_pylist(), items.column("topic").to_pylist()))
    item_ids, emb = read_embeddings(tiny_run)
    topics = np.asarray([topic_of[i] for i in item_ids])
    cost = SemanticTokenizer.load(tiny_run).codes(emb)[:, 0]
    rand = random_codes(emb, tiny_config.tokenizer.num_levels, tiny_config.tokenizer.codebook_size, seed=0)[:, 0]
    nmi_cost = normalized_mutual_information(cost, topics)
    nmi_rand = normalized_mutual_information(rand, topics)
    print(f"\nlevel-1 NMI vs topics: CoST {nmi_cost:.3f}, random {nmi_rand:.3f}")
    assert nmi_cost >= 0.4
    assert nmi_cost >= 3 * nmi_rand
    assert tiny_run.read_metrics()["tokenizer"]["diagnostics"]["topics"]["level1_nmi"] == pytest.approx(nmi_cost)


def _copy_stage(src: RunDir, dst: RunDir, stage: str) -> None:
    shutil.copytree(src.path(stage), dst.path(stage), dirs_exist_ok=True)


def test_resume_after_epoch_1_and_worker_failure_matches_uninterrupted(tiny_run, tiny_config, tmp_path):
    """Stop after epoch 1, rerun (one worker dies at epoch 3 and is restarted from the epoch-2 checkpoint):
    the final weights and codes equal the uninterrupted tiny run's (same seed, same config)."""
    run = RunDir(str(tmp_path / "resumed"))
    for stage in ("prepare", "embed"):
        _copy_stage(tiny_run, run, stage)
    _, emb = read_embeddings(run)
    assert tiny_config.tokenizer.epochs == 3

    first = train_quantizer(tiny_config, run, emb, stop_after_epoch=1)
    assert first["epochs_done"] == 1 and len(first["history"]) == 1

    marker = tmp_path / "failed_once"
    second = train_quantizer(tiny_config, run, emb, fail_at_epoch=2, fail_marker=str(marker))
    assert marker.exists(), "the injected failure did not happen"
    assert second["epochs_done"] == 3

    reference = tiny_run.read_torch("tokenize/model.pt")["state_dict"]
    for name, value in reference.items():
        torch.testing.assert_close(second["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)
    ref_history = tiny_run.read_metrics()["tokenizer"]["train"]["history"]
    assert [h["loss"] for h in second["history"]] == pytest.approx([h["loss"] for h in ref_history], abs=1e-6)

    payload = dict(tiny_run.read_torch("tokenize/model.pt"), state_dict=second["state_dict"])
    np.testing.assert_array_equal(SemanticTokenizer(payload).codes(emb), SemanticTokenizer.load(tiny_run).codes(emb))

    # A damaged checkpoint is one clear error naming the file, before any worker starts.
    latest = latest_checkpoint_path(run.path(RAY_TRAIN_DIR), ray_train_name(tiny_config, run, emb.shape[1]))
    victim = next(iter(sorted(Path(latest).rglob("*model_states.pt"))))
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model_states.pt is corrupt"):
        run_tokenize_stage(tiny_config, run)


def test_checkpoint_every_saves_fewer_checkpoints_and_the_same_model(tiny_run, tiny_config, tmp_path):
    """tokenizer.checkpoint_every=2 over 3 epochs: checkpoints after epochs 2 and 3 only, same final weights."""
    run = RunDir(str(tmp_path / "sparse"))
    for stage in ("prepare", "embed"):
        _copy_stage(tiny_run, run, stage)
    _, emb = read_embeddings(run)
    cfg = Config.load(TINY_CONFIG, ["tokenizer.checkpoint_every=2"])
    out = train_quantizer(cfg, run, emb)
    assert out["epochs_done"] == 3 and len(out["history"]) == 3
    checkpoints = sorted(Path(run.path(RAY_TRAIN_DIR)).rglob("checkpoint_*"))
    assert len([c for c in checkpoints if c.is_dir()]) == 2, checkpoints
    reference = tiny_run.read_torch("tokenize/model.pt")["state_dict"]
    for name, value in reference.items():
        torch.testing.assert_close(out["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)


def test_cli_tokenize_and_assign_bad_inputs_are_one_line_errors(ray_session, tiny_config, tmp_path, capsys):
    """`cost-dist tokenize` on NaN embeddings and `cost-dist assign` without a tokenizer: exit 2, one line."""
    from cost_dist.cli import main
    from cost_dist.pipeline import stage_fingerprints

    config = str(Path(__file__).resolve().parent / "tiny.yaml")
    run = RunDir(str(tmp_path / "bad_run"))
    fps = stage_fingerprints(tiny_config)
    for stage in ("prepare", "embed"):
        run.mark_complete(stage, fps[stage])
    rows = np.ones((40, 8), dtype=np.float32)
    rows[5, 3] = np.nan
    run.write_parquet("embed/embeddings.parquet", pa.table({
        "item_id": [f"i{k}" for k in range(40)],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 8)}))
    assert main(["tokenize", "--run", run.uri(), "--config", config]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "embeddings.parquet" in err and "NaN" in err and "'i5'" in err
    run.mark_complete("tokenize", fps["tokenize"])
    assert main(["assign", "--run", run.uri(), "--config", config]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenize/model.pt" in err and "run the tokenize stage first" in err
