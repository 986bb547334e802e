"""Recommender (the API of the Serve deployment and the evaluation actors) on a hand-built run directory.

The checkpoint holds a randomly initialised small generator: these tests are about loading, input
checks, catalog updates and the contract of recommend(), not about quality.
"""

import numpy as np
import pyarrow as pa
import pytest
import torch

from cost_dist.config import GeneratorConfig
from cost_dist.errors import CheckpointError, DataError
from cost_dist.generator.inference import Recommender, beam_chunks
from cost_dist.generator.model import TigerModel
from cost_dist.generator.testing import random_semantic_ids
from cost_dist.generator.vocab import Vocabulary
from cost_dist.rundir import RunDir

SMALL = GeneratorConfig(num_encoder_layers=1, num_decoder_layers=1, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_user_tokens=10)
N, M, K = 40, 3, 4


def _write_codes(run, item_ids, sid, num_suffix):
    col = pa.FixedSizeListArray.from_arrays(pa.array(sid.reshape(-1).astype(np.int32)), sid.shape[1])
    run.write_parquet("assign/codes.parquet", pa.table({"item_id": item_ids, "semantic_id": col}))
    run.write_json("assign/meta.json", {"num_levels": M, "codebook_size": K, "num_suffix": num_suffix})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = RunDir(str(tmp_path_factory.mktemp("rec_run")))
    sid, S = random_semantic_ids(N, M, K, seed=3)
    items = [f"i{i}" for i in range(N)]
    _write_codes(run, items, sid, S)
    run.write_parquet("prepare/items.parquet", pa.table({"item_id": items, "text": ["t"] * N}))
    vocab = Vocabulary(M, K, S + 1, SMALL.num_user_tokens, max_len=5)  # one spare suffix value for add_items
    torch.manual_seed(0)
    model = TigerModel(vocab, SMALL)
    import dataclasses

    run.write_torch("generate/best.pt", {"config": dataclasses.asdict(SMALL), "vocab": vocab.to_dict(), "epoch": 0,
                                         "valid": {}, "state_dict": model.state_dict()})
    run.write_parquet("generate/popularity.parquet", pa.table({"item_id": ["i3", "i1", "i2"], "count": [9, 5, 5]}))
    return run


@pytest.fixture(scope="module")
def rec(run_dir):
    return Recommender.load(run_dir, device="cpu", default_beam_size=10)


def test_recommend_contract(rec):
    out = rec.recommend([["i1", "i2"], ["i5"]], ["u1", None], k=5)
    assert len(out) == 2
    for recs in out:
        assert len(recs) == 5
        items = [i for i, _ in recs]
        assert len(set(items)) == 5 and all(rec.has_item(i) for i in items)
        scores = [s for _, s in recs]
        assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
    # an unknown user is hashed to a user token: still answered
    assert len(rec.recommend([["i1"]], ["never-seen-user"], k=3)[0]) == 3
    # exclude_seen
    history = [f"i{i}" for i in range(0, 30)]
    got = [i for i, _ in rec.recommend([history], None, k=10, exclude_seen=True)[0]]
    assert len(got) == 10 and not set(got) & set(history)
    # exclude_seen with the whole past as `seen`: items the model does not read are masked too
    past = [f"i{i}" for i in range(0, 30)]
    got = [i for i, _ in rec.recommend([["i1", "i2"]], None, k=10, exclude_seen=True, seen=[past])[0]]
    assert len(got) == 10 and not set(got) & set(past)
    with pytest.raises(DataError, match="seen lists"):
        rec.recommend([["i1"]], None, k=3, exclude_seen=True, seen=[["i1"], ["i2"]])


def test_beam_chunks_bound_the_beams_of_a_pass():
    """Users with many seen items get passes of their own instead of widening everyone's beam."""
    excluded = np.array([0, 0, 1, 2, 5, 30, 200, 5000])  # already ascending, as recommend sorts them
    order = np.arange(len(excluded))
    chunks = beam_chunks(order, excluded, max_users=4, beam=10)
    assert np.concatenate(chunks).tolist() == order.tolist()  # every user once, in order
    for chunk in chunks:
        assert 1 <= len(chunk) <= 4
        assert len(chunk) == 1 or len(chunk) * (10 + excluded[chunk].max()) <= 4 * 10
    assert [c.tolist() for c in chunks] == [[0, 1, 2], [3, 4], [5], [6], [7]]
    assert [c.tolist() for c in beam_chunks(order[:2], np.zeros(2, int), max_users=4, beam=10)] == [[0, 1]]


def test_heavy_users_are_answered_in_their_own_passes(rec):
    """Exclude-seen answers stay k distinct unseen items when one user's past covers most of the catalog."""
    heavy = [f"i{i}" for i in range(0, 34)]
    out = rec.recommend([["i1"], heavy[-3:], ["i2", "i3"]], None, k=5, exclude_seen=True,
                        seen=[["i1"], heavy, ["i2", "i3"]])
    assert len(out[1]) == 5 and not {i for i, _ in out[1]} & set(heavy)
    assert all(len(r) == 5 for r in out)


def test_recommend_bad_input(rec):
    with pytest.raises(DataError, match="empty history"):
        rec.recommend([[]], ["u1"], k=3)
    with pytest.raises(DataError, match="unknown item 'nope'"):
        rec.recommend([["nope"]], ["u1"], k=3)
    with pytest.raises(DataError, match="k must be"):
        rec.recommend([["i1"]], None, k=0)
    with pytest.raises(DataError, match="user ids"):
        rec.recommend([["i1"]], ["a", "b"], k=3)
    with pytest.raises(DataError, match="unknown item"):
        rec.semantic_id("nope")


def test_semantic_id_popular_and_scores(rec):
    assert len(rec.semantic_id("i0")) == M + 1
    assert rec.popular(2) == [("i3", 9.0), ("i1", 5.0)]
    assert [i for i, _ in rec.popular(2, exclude=["i3"])] == ["i1", "i2"]
    scores = rec.score_all([["i1", "i2"]], ["u1"])
    top = [i for i, _ in rec.recommend([["i1", "i2"]], ["u1"], k=N, beam_size=N)[0]]
    assert top == [rec.catalog.item_ids[j] for j in np.argsort(-scores[0], kind="stable")]


def test_add_items_gets_next_suffix_and_is_recommendable(run_dir):
    rec = Recommender.load(run_dir, device="cpu")
    prefix = rec.catalog.semantic_ids[0, :M]
    taken = rec.catalog.semantic_ids[(rec.catalog.semantic_ids[:, :M] == prefix).all(1), M].max()
    ids = rec.add_items(["new1"], prefix[None, :])
    assert ids == [tuple(int(v) for v in prefix) + (int(taken) + 1,)]
    assert rec.has_item("new1") and rec.semantic_id("new1") == ids[0]
    everything = [i for i, _ in rec.recommend([["i1"]], None, k=N + 1, beam_size=N + 1)[0]]
    assert "new1" in everything and len(set(everything)) == N + 1
    # the same prefix again needs a suffix beyond the trained suffix vocabulary
    S = rec.vocab.num_suffix
    while True:
        try:
            rec.add_items([f"more{len(rec)}"], prefix[None, :])
        except DataError as exc:
            assert "suffix" in str(exc)
            break
    assert rec.catalog.semantic_ids[:, M].max() == S - 1
    with pytest.raises(DataError, match="already in the catalog"):
        rec.add_items(["i1"], np.zeros((1, M), dtype=np.int64))
    with pytest.raises(DataError, match="codes must"):
        rec.add_items(["x"], np.full((1, M), K))


def test_corrupt_or_mismatched_checkpoint(run_dir, tmp_path):
    bad = RunDir(str(tmp_path / "bad"))
    for rel in ("assign/codes.parquet", "assign/meta.json"):
        bad.write_bytes(rel, run_dir.read_bytes(rel))
    bad.write_bytes("generate/best.pt", b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt"):
        Recommender.load(bad)
    bad.write_torch("generate/best.pt", {"weights": 1})
    with pytest.raises(CheckpointError, match="not a generator checkpoint"):
        Recommender.load(bad)
    ckpt = run_dir.read_torch("generate/best.pt")
    ckpt["vocab"] = dict(ckpt["vocab"], codebook_size=K + 1)  # weights no longer fit
    bad.write_torch("generate/best.pt", ckpt)
    with pytest.raises(CheckpointError, match="does not fit"):
        Recommender.load(bad)


def test_codes_that_disagree_with_meta_or_catalog(run_dir, tmp_path):
    from cost_dist.generator.train import load_catalog_checked

    bad = RunDir(str(tmp_path / "bad2"))
    for rel in ("generate/best.pt", "assign/codes.parquet"):
        bad.write_bytes(rel, run_dir.read_bytes(rel))
    bad.write_json("assign/meta.json", {"num_levels": M, "codebook_size": 2, "num_suffix": 5})
    with pytest.raises(DataError, match="codebook_size"):
        Recommender.load(bad)
    bad.write_json("assign/meta.json", {"num_levels": M + 1, "codebook_size": K, "num_suffix": 5})
    with pytest.raises(DataError, match="values per item"):
        Recommender.load(bad)
    bad.write_json("assign/meta.json", run_dir.read_json("assign/meta.json"))
    bad.write_parquet("prepare/items.parquet", pa.table({"item_id": ["i0", "i1", "zz"], "text": ["t"] * 3}))
    with pytest.raises(DataError, match="disagrees with"):
        load_catalog_checked(bad)
