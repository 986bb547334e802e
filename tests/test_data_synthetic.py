"""The synthetic generator: determinism, streaming, text structure, and that topic transitions beat popularity."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow.parquet as pq
import pytest

from cost_dist.config import DataConfig, SyntheticConfig
from cost_dist.data.prepare import prepare_dataset, prepare_to
from cost_dist.data.splits import leave_one_out
from cost_dist.data.synthetic import SyntheticWorld
from cost_dist.errors import DataError
from cost_dist.rundir import RunDir

TINY = dict(num_items=300, num_users=400, num_topics=8, min_seq_len=5, max_seq_len=15)


def cfg(**kw) -> DataConfig:
    return DataConfig(dataset="synthetic", synthetic=SyntheticConfig(**{**TINY, **kw}))


def test_deterministic_by_seed_and_independent_of_batch_size():
    a = prepare_dataset(cfg(), seed=3)
    b = prepare_dataset(cfg(batch_size=1), seed=3)  # batch size changes the streaming, not the data
    for name in ("items", "interactions", "sequences"):
        assert getattr(a, name).equals(getattr(b, name)), name
    c = prepare_dataset(cfg(), seed=4)
    assert not a.sequences.equals(c.sequences)
    assert a.items.column("text").to_pylist() != c.items.column("text").to_pylist()


def test_tables_follow_the_contract():
    d = prepare_dataset(cfg(), seed=0)
    assert d.items.column_names == ["item_id", "title", "category", "description", "topic", "text"]
    assert str(d.items.schema.field("topic").type) == "int32"
    assert d.items.column("item_id").to_pylist()[:2] == ["i000000", "i000001"]
    assert d.sequences.column("user_id").to_pylist()[:2] == ["u00000", "u00001"]
    assert d.sequences.column_names == ["user_id", "item_ids", "topics"]
    lengths = [len(s) for s in d.sequences.column("item_ids").to_pylist()]
    assert min(lengths) >= 5 and max(lengths) <= 15
    assert d.stats["num_users"] == 400 and d.stats["num_items"] == 300 and d.stats["num_interactions"] == sum(lengths)
    # Interactions are sorted by user then time and agree with the sequences.
    ts = d.interactions.column("timestamp").to_numpy()
    users = d.interactions.column("user_id").to_pylist()
    assert users == sorted(users)
    same_user = np.array(users[1:]) == np.array(users[:-1])
    assert (np.diff(ts)[same_user] > 0).all()
    assert d.interactions.column("item_id").to_pylist() == [i for s in d.sequences.column("item_ids").to_pylist() for i in s]
    # The topics column is each item's own topic.
    topic = dict(zip(d.items.column("item_id").to_pylist(), d.items.column("topic").to_pylist()))
    for items, topics in zip(d.sequences.column("item_ids").to_pylist()[:50], d.sequences.column("topics").to_pylist()[:50]):
        assert [topic[i] for i in items] == topics


def test_item_text_carries_the_topic():
    """Items of one topic share vocabulary far more than items of different topics (so embeddings cluster)."""
    d = prepare_dataset(cfg(num_items=160, num_users=5), seed=1)
    words = [set(f"{t} {c} {x}".lower().replace(">", " ").split()) for t, c, x in
             zip(*(d.items.column(f).to_pylist() for f in ("title", "category", "description")))]
    topics = np.array(d.items.column("topic").to_pylist())
    within, across = [], []
    for i in range(len(words)):
        for j in range(i + 1, len(words)):
            jac = len(words[i] & words[j]) / len(words[i] | words[j])
            (within if topics[i] == topics[j] else across).append(jac)
    assert np.mean(within) > 3 * np.mean(across)


def test_topic_transition_oracle_beats_popularity():
    d = prepare_dataset(cfg(), seed=0)
    world = SyntheticWorld.build(cfg().synthetic, 0)
    split = leave_one_out(d.sequences, 20)
    counts = collections.Counter(i for s in split["train"].column("item_ids").to_pylist() for i in s)
    popular = [i for i, _ in counts.most_common()]
    transition = world.transition_matrix()
    hits_pop = hits_oracle = 0
    tests = split["test"].to_pylist()
    for row, topics in zip(tests, d.sequences.column("topics").to_pylist()):
        seen = set(row["history"])
        pop = [i for i in popular if i not in seen][:10]
        scores = transition[topics[-2]][world.item_topic] * world.item_weight
        oracle = [world.item_id(i) for i in np.argsort(-scores, kind="stable") if world.item_id(i) not in seen][:10]
        hits_pop += row["target"] in pop
        hits_oracle += row["target"] in oracle
    recall_pop, recall_oracle = hits_pop / len(tests), hits_oracle / len(tests)
    assert recall_oracle > 1.3 * recall_pop and recall_oracle - recall_pop > 0.08, (recall_pop, recall_oracle)
    # The oracle scores are the true next-item distribution.
    assert np.isclose(world.oracle_scores(0).sum(), 1.0)


def test_streamed_write_matches_in_memory(tmp_path):
    c = cfg(num_items=9000, num_users=2100, batch_size=4096)
    run = RunDir(str(tmp_path / "out"))
    stats = prepare_to(run, c, seed=2)
    mem = prepare_dataset(c, seed=2)
    items_file = pq.ParquetFile(run.path("items.parquet"))
    assert items_file.metadata.num_row_groups >= 3  # written batch by batch
    assert pq.read_table(run.path("items.parquet")).equals(mem.items)
    assert pq.read_table(run.path("sequences.parquet")).equals(mem.sequences)
    assert pq.read_table(run.path("interactions.parquet")).equals(mem.interactions)
    assert stats == mem.stats
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]


def test_bad_synthetic_config():
    with pytest.raises(DataError, match=r"num_items \(5\) must be >= num_topics \(8\)"):
        prepare_dataset(cfg(num_items=5))
    with pytest.raises(DataError, match=r"min_seq_len <= max_seq_len"):
        prepare_dataset(cfg(min_seq_len=2))
