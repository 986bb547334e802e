"""Per-user time order and leave-one-out on hand-made sequences."""

from __future__ import annotations

import pyarrow as pa
import pytest

from cost_dist.data.splits import build_sequences, leave_one_out, sort_interactions
from cost_dist.errors import DataError


def seqs(rows: dict[str, list[str]]) -> pa.Table:
    return pa.table({"user_id": list(rows), "item_ids": pa.array(list(rows.values()), type=pa.list_(pa.string()))})


def test_leave_one_out_exactly_as_the_papers():
    s = seqs({"u1": ["a", "b", "c"], "u2": [str(i) for i in range(10)]})
    out = leave_one_out(s, max_len=4)
    assert out["train"].to_pylist() == [{"user_id": "u1", "item_ids": ["a"]},
                                        {"user_id": "u2", "item_ids": [str(i) for i in range(8)]}]  # untruncated
    assert out["valid"].to_pylist() == [{"user_id": "u1", "history": ["a"], "target": "b"},
                                        {"user_id": "u2", "history": ["4", "5", "6", "7"], "target": "8"}]
    assert out["test"].to_pylist() == [{"user_id": "u1", "history": ["a", "b"], "target": "c"},
                                       {"user_id": "u2", "history": ["5", "6", "7", "8"], "target": "9"}]
    assert out["valid"].schema.field("history").type == pa.list_(pa.string())
    assert out["test"].schema.field("target").type == pa.string()


def test_leave_one_out_default_max_len_20_and_sliced_input():
    long = [f"i{i}" for i in range(30)]
    s = seqs({"skip": ["x", "y", "z"], "u": long})
    out = leave_one_out(s.slice(1), max_len=20)  # a sliced table (non-zero list offset) must work too
    assert out["test"].to_pylist() == [{"user_id": "u", "history": long[9:29], "target": "i29"}]
    assert out["valid"].column("history").to_pylist() == [long[8:28]]
    assert out["train"].column("item_ids").to_pylist() == [long[:28]]


def test_leave_one_out_rejects_short_sequences():
    with pytest.raises(DataError, match=r"needs >= 3 items per user; 1 user\(s\) have fewer \(e.g. \['short'\]\)"):
        leave_one_out(seqs({"ok": ["a", "b", "c"], "short": ["a", "b"]}), 20)
    with pytest.raises(DataError, match="lacks column 'item_ids'"):
        leave_one_out(pa.table({"user_id": ["u"]}), 20)


def test_time_order_with_stable_ties_in_file_order():
    inter = pa.table({
        "user_id": ["b", "a", "a", "a", "b", "a"],
        "item_id": ["b1", "a3", "a1", "a2", "b0", "a0"],
        "timestamp": pa.array([7, 5, 5, 5, 1, 0], type=pa.int64()),
    })
    out = build_sequences(inter)
    # a's three items tie at t=5: they keep their file order a3, a1, a2.
    assert out.to_pylist() == [{"user_id": "a", "item_ids": ["a0", "a3", "a1", "a2"]},
                               {"user_id": "b", "item_ids": ["b0", "b1"]}]
    assert sort_interactions(inter).column("item_id").to_pylist() == ["a0", "a3", "a1", "a2", "b0", "b1"]


def test_build_sequences_carries_extra_list_columns():
    inter = pa.table({"user_id": ["u", "u", "v"], "item_id": ["x", "y", "z"], "timestamp": pa.array([2, 1, 0], type=pa.int64()),
                      "topic": pa.array([3, 4, 5], type=pa.int32())})
    out = build_sequences(inter, {"topic": "topics"})
    assert out.to_pylist() == [{"user_id": "u", "item_ids": ["y", "x"], "topics": [4, 3]},
                               {"user_id": "v", "item_ids": ["z"], "topics": [5]}]
