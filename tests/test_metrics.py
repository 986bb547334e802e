"""Ranking metrics against values computed by hand."""

import math

import numpy as np
import pytest

from cost_dist.metrics import ndcg_at_k, ranking_metrics, ranks_from_scores, recall_at_k


def test_hit_positions_by_hand():
    ranked = ["a", "b", "c", "d"]
    assert recall_at_k(ranked, "a", 1) == 1.0
    assert ndcg_at_k(ranked, "a", 1) == 1.0
    assert recall_at_k(ranked, "c", 2) == 0.0
    assert recall_at_k(ranked, "c", 3) == 1.0
    assert ndcg_at_k(ranked, "c", 3) == pytest.approx(1 / math.log2(4))  # rank 3 -> 1/log2(4) = 0.5
    assert ndcg_at_k(ranked, "c", 3) == pytest.approx(0.5)


def test_mean_over_users_with_missing_target_and_large_k():
    ranked = [["a", "b"], ["b", "a"], ["x", "y"], ["a"]]
    targets = ["a", "a", "a", None]  # user 3: target missing from the ranking; user 4: no target at all
    m = ranking_metrics(ranked, targets, [1, 2, 100])  # k=100 > any ranking / catalog
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@2"] == pytest.approx(2 / 4)
    assert m["recall@100"] == pytest.approx(2 / 4)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert m["ndcg@100"] == m["ndcg@2"]


def test_repeated_items_count_at_first_position():
    # "b" repeated: the distinct ranking is a, b, c -> c is at rank 3, not 4
    assert ndcg_at_k(["a", "b", "b", "c"], "c", 3) == pytest.approx(0.5)


def test_ties_in_scores_are_averaged_over_orders():
    # target (column 0) tied with one other item for ranks 2-3, one item strictly better
    scores = np.array([[0.5, 0.9, 0.5, 0.1]])
    m = ranks_from_scores(scores, np.array([0]), [1, 2, 3])
    assert m["recall@1"] == 0.0
    assert m["recall@2"] == pytest.approx(0.5)  # rank 2 in half of the orders
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["ndcg@2"] == pytest.approx(0.5 * (1 / math.log2(3)))
    assert m["ndcg@3"] == pytest.approx(0.5 * (1 / math.log2(3) + 1 / math.log2(4)))


def test_scores_missing_target_and_k_beyond_catalog():
    scores = np.array([[0.1, 0.2], [0.3, 0.1]])
    m = ranks_from_scores(scores, np.array([-1, 0]), [1, 10])
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["recall@10"] == pytest.approx(0.5)
    assert m["ndcg@10"] == pytest.approx(0.5)


def test_lengths_must_match():
    with pytest.raises(ValueError):
        ranking_metrics([["a"]], ["a", "b"], [1])
