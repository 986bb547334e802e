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


def test_trailing_padding_is_trimmed_without_changing_the_model():
    """Short histories give short encoder inputs; the dropped all-PAD columns change no output."""
    from cost_dist.config import GeneratorConfig
    from cost_dist.generator.model import TigerModel
    from cost_dist.generator.vocab import trim_padding

    cat = _catalog()
    vocab = Vocabulary(2, 2, 2, num_user_tokens=4, max_len=4)
    split = pa.table({"user_id": ["u1", "u2"], "history": [["a", "b"], ["e"]], "target": ["e", "c"]})
    packed = torch.from_numpy(eval_examples(vocab, cat, split, "test"))
    token_table = torch.from_numpy(vocab.item_tokens(cat.semantic_ids))
    trimmed, targets = examples_to_tensors(packed, token_table, vocab.max_len)
    full = torch.from_numpy(encode_inputs(vocab, cat, ["u1", "u2"], [["a", "b"], ["e"]]))
    L = token_table.shape[1]
    assert trimmed.shape[1] == 2 + 2 * L < full.shape[1]
    assert torch.equal(trimmed, full[:, :trimmed.shape[1]]) and torch.equal(trim_padding(full), trimmed)
    assert trim_padding(full.numpy()).shape == tuple(trimmed.shape)  # numpy too

    torch.manual_seed(0)
    model = TigerModel(vocab, GeneratorConfig(num_encoder_layers=1, num_decoder_layers=1, d_model=16, num_heads=2,
                                              d_kv=8, d_ff=32, num_user_tokens=4)).eval()
    with torch.no_grad():
        assert torch.allclose(model.position_log_probs(trimmed, targets), model.position_log_probs(full, targets), atol=1e-5)


def test_group_by_length_keeps_every_example_and_the_batch_sizes():
    from cost_dist.generator.data import group_by_length

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, size=100)
    packed = np.full((100, 2 + 8), -1, dtype=np.int64)
    packed[:, 0], packed[:, 1] = 0, np.arange(100)  # column 1 identifies the example
    for i, n in enumerate(lengths):
        packed[i, 2:2 + n] = 1
    batches = list(torch.split(torch.from_numpy(packed), [16] * 6 + [4]))
    grouped = list(group_by_length(batches, window=4, seed=0))
    assert sorted(len(b) for b in grouped) == sorted(len(b) for b in batches)
    assert sorted(torch.cat(grouped)[:, 1].tolist()) == list(range(100))
    # within each window, examples are sorted by length before being cut, so batches are narrow
    spread = [int((b[:, 2:] >= 0).sum(1).max() - (b[:, 2:] >= 0).sum(1).min()) for b in grouped]
    assert np.mean(spread) < 3 < np.mean([int((b[:, 2:] >= 0).sum(1).max() - (b[:, 2:] >= 0).sum(1).min()) for b in batches])
    # reproducible, and off with window <= 1
    assert all(torch.equal(a, b) for a, b in zip(grouped, group_by_length(batches, window=4, seed=0)))
    assert all(a is b for a, b in zip(batches, group_by_length(batches, window=1, seed=0)))
