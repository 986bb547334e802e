"""Training examples (every prefix), encoder inputs and the catalog checks, on hand-made tables."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from cost_dist.errors import DataError
from cost_dist.generator.data import eval_examples, examples_to_tensors, training_examples
from cost_dist.generator.testing import with_suffix
from cost_dist.generator.vocab import EOS, NUM_SPECIALS, PAD, ItemCatalog, Vocabulary, encode_inputs


def _catalog():
    codes = np.array([[0, 1], [0, 1], [1, 0], [1, 1], [0, 0]])
    sid, S = with_suffix(codes)
    return ItemCatalog(["a", "b", "c", "d", "e"], sid, 2, 2, S)


def test_suffix_separates_collisions():
    cat = _catalog()
    assert cat.semantic_ids[:, 2].tolist() == [0, 1, 0, 0, 0]
    assert cat.num_suffix == 2


def test_every_prefix_is_an_example_with_truncated_history():
    cat = _catalog()
    vocab = Vocabulary(2, 2, 2, num_user_tokens=4, max_len=2)
    train = pa.table({"user_id": ["u1", "u2"], "item_ids": [["a", "b", "c", "d"], ["e", "a"]]})
    ex = training_examples(vocab, cat, train)
    # u1: targets b, c, d with histories [a], [a, b], [b, c] (max_len 2); u2: target a with history [e]
    assert ex[:, 1].tolist() == [1, 2, 3, 0]
    assert ex[:, 2:].tolist() == [[0, -1], [0, 1], [1, 2], [4, -1]]
    assert ex[0, 0] == vocab.user_token("u1") and ex[3, 0] == vocab.user_token("u2")


def test_worker_tensors_equal_driver_encoding():
    cat = _catalog()
    vocab = Vocabulary(2, 2, 2, num_user_tokens=4, max_len=3)
    split = pa.table({"user_id": ["u1", "u2"], "history": [["a", "b", "c", "d"], ["e"]], "target": ["e", "c"]})
    packed = torch.from_numpy(eval_examples(vocab, cat, split, "test"))
    token_table = torch.from_numpy(vocab.item_tokens(cat.semantic_ids))
    input_ids, targets = examples_to_tensors(packed, token_table, vocab.max_len)
    expected = encode_inputs(vocab, cat, ["u1", "u2"], [["b", "c", "d"], ["e"]])
    assert np.array_equal(input_ids.numpy(), expected)
    assert expected[1, 1 + 3] == EOS and (expected[1, 5:] == PAD).all()
    assert targets.tolist()[1] == vocab.item_tokens(cat.semantic_ids)[2].tolist()
    # level-specific ranges: code 1 of level 0 and code 1 of level 1 are different tokens
    assert vocab.item_tokens(np.array([[1, 1, 0]])).tolist() == [[NUM_SPECIALS + 1, NUM_SPECIALS + 2 + 1, NUM_SPECIALS + 4]]


def test_bad_inputs_are_clear_errors():
    cat = _catalog()
    vocab = Vocabulary(2, 2, 2, num_user_tokens=4, max_len=3)
    with pytest.raises(DataError, match="'zzz'"):
        training_examples(vocab, cat, pa.table({"user_id": ["u"], "item_ids": [["a", "zzz"]]}))
    with pytest.raises(DataError, match="empty history"):
        encode_inputs(vocab, cat, ["u9"], [[]])
    with pytest.raises(DataError, match="unknown item 'nope'"):
        encode_inputs(vocab, cat, ["u9"], [["nope"]])
    with pytest.raises(DataError, match="codebook_size"):
        ItemCatalog(["a"], np.array([[5, 0, 0]]), 2, 2, 1)
    with pytest.raises(DataError, match="num_suffix"):
        ItemCatalog(["a"], np.array([[0, 0, 3]]), 2, 2, 1)
    with pytest.raises(DataError, match="shared by several items"):
        ItemCatalog(["a", "b"], np.array([[0, 0, 0], [0, 0, 0]]), 2, 2, 1)
    with pytest.raises(DataError, match="3 values per item"):
        ItemCatalog(["a"], np.array([[0, 0]]), 2, 2, 1)
