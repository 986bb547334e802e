"""Opt-in: load every dataset in ../shared/data and check the counts its README states.

Run with:  python -m pytest -m realdata tests/test_data_realdata.py -q   (or COST_DIST_REALDATA=1)
(COST_DIST_DATA may point elsewhere than ../shared/data). Skipped by default: CI has no real data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cost_dist.config import DataConfig
from cost_dist.data.prepare import prepare_dataset

DATA = Path(os.environ.get("COST_DIST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

pytestmark = pytest.mark.realdata


@pytest.fixture(autouse=True)
def _opt_in(request):
    """Run only when asked: `-m realdata` (a marker expression selecting it) or COST_DIST_REALDATA=1."""
    expr = request.config.getoption("markexpr") or ""
    if not (os.environ.get("COST_DIST_REALDATA") or ("realdata" in expr and "not realdata" not in expr)):
        pytest.skip("opt-in: pytest -m realdata (or COST_DIST_REALDATA=1)")

# dataset, folder, (users, items, interactions), sequence length (mean, median) — from each folder's README.
EXPECTED = [
    ("ml-100k", "movielens-100k", (943, 1682, 100_000), (106.0, 65.0)),
    ("ml-latest-small", "movielens-latest-small", (610, 9724, 100_836), (165.3, 70.5)),
    ("amazon-lcrec", "amazon-scientific-lcrec", (8317, 4344, 58_492), (7.03, 6.0)),
    ("amazon-2014", "amazon-beauty-2014-5core-notext", (22_363, 12_101, 198_502), (8.88, 6.0)),
]


@pytest.mark.parametrize("dataset, folder, counts, seq_len", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_counts_match_the_readme(dataset, folder, counts, seq_len):
    path = DATA / folder
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    data = prepare_dataset(DataConfig(dataset=dataset, path=str(path)))
    s = data.stats
    assert (s["num_users"], s["num_items"], s["num_interactions"]) == counts
    assert s["seq_len"]["mean"] == pytest.approx(seq_len[0], abs=0.05)  # the READMEs round
    assert s["seq_len"]["median"] == seq_len[1]
    assert data.interactions.num_rows == counts[2] and data.items.num_rows == counts[1]
    # Nothing but unused catalog rows may be dropped from these (already filtered) datasets.
    assert set(s["dropped"]) <= {"unused_items"}
    if dataset == "ml-latest-small":
        assert s["raw"]["item_rows"] == 9742 and s["dropped"] == {"unused_items": 18}


def test_mind_sample_raw_counts():
    path = DATA / "mind-small-sample"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    data = prepare_dataset(DataConfig(dataset="mind", path=str(path)))
    raw = data.stats["raw"]
    assert (raw["impressions"], raw["users"], raw["news_rows"], raw["impression_clicks"]) == (5000, 4637, 2000, 7542)
    # Only news with a text row survive (96 % of clicks have none in this sample).
    items = set(data.items.column("item_id").to_pylist())
    assert set(data.interactions.column("item_id").to_pylist()) <= items
    assert data.stats["dropped"]["unknown_items"] > 0 and data.stats["num_users"] > 0
    assert min(len(s) for s in data.sequences.column("item_ids").to_pylist()) >= 3
