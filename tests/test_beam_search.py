"""Constrained beam search vs exhaustive scoring, on small random models (no Ray needed)."""

import functools
import warnings

import numpy as np
import torch

from cost_dist.config import GeneratorConfig
from cost_dist.generator.constraints import PrefixIndex
from cost_dist.generator.model import TigerModel
from cost_dist.generator.search import beam_search, exact_scores
from cost_dist.generator.testing import random_semantic_ids
from cost_dist.generator.vocab import ItemCatalog, Vocabulary, encode_inputs

SMALL = GeneratorConfig(num_encoder_layers=2, num_decoder_layers=2, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_user_tokens=10)


@functools.lru_cache(maxsize=None)
def _model(vocab):
    torch.manual_seed(0)
    return TigerModel(vocab, SMALL).eval()


def _setup(n=60, M=3, K=6, seed=0, users=4, hist=4):
    """A random catalog and users over one shared random model (model construction is the slow part)."""
    sid, S = random_semantic_ids(n, M, K, seed)
    catalog = ItemCatalog([f"i{i}" for i in range(n)], sid, M, K, S)
    vocab = Vocabulary(M, K, max(S, 8), SMALL.num_user_tokens, max_len=5)
    model = _model(vocab)
    index = PrefixIndex(sid, [s for _, s in vocab.position_ranges])
    rng = np.random.default_rng(seed)
    histories = [[f"i{j}" for j in rng.choice(n, hist, replace=False)] for _ in range(users)]
    inputs = torch.from_numpy(encode_inputs(vocab, catalog, [f"u{u}" for u in range(users)], histories))
    tokens = torch.from_numpy(vocab.item_tokens(sid))
    return catalog, vocab, model, index, inputs, tokens, histories


def test_prefix_index_children_match_brute_force():
    sid, S = random_semantic_ids(200, 3, 5, seed=1)
    index = PrefixIndex(sid, [5, 5, 5, S])
    # walk every item's path: each step's token must be valid and lead to the item's leaf
    parents = torch.zeros(len(sid), dtype=torch.long)
    for t in range(4):
        child, valid = index.children(t, parents)
        tok = torch.from_numpy(sid[:, t])
        assert valid[torch.arange(len(sid)), tok].all()
        # valid children of a prefix == tokens that some item with this prefix has
        for i in range(0, len(sid), 37):
            expected = {int(r[t]) for r in sid if tuple(r[:t]) == tuple(sid[i, :t])}
            assert set(torch.nonzero(valid[i]).flatten().tolist()) == expected
        parents = child[torch.arange(len(sid)), tok]
    assert torch.equal(index.leaf_to_row[parents], torch.arange(len(sid)))
    # dead beams (-1) have no valid children
    _, valid = index.children(0, torch.tensor([-1]))
    assert not valid.any()


def test_beam_equal_to_catalog_size_equals_exhaustive_ranking():
    catalog, vocab, model, index, inputs, tokens, _ = _setup()
    n = len(catalog)
    exact = exact_scores(model, tokens, inputs, rows_per_pass=97)  # odd pass size: several passes
    rows, scores = beam_search(model, index, inputs, k=n, beam_size=n)
    for b in range(inputs.shape[0]):
        order = torch.argsort(exact[b], descending=True, stable=True)
        assert torch.equal(rows[b], order), "beam ranking differs from exhaustive scoring"
        assert torch.allclose(scores[b], exact[b][order], atol=1e-4)


def test_teacher_forced_scores_match_single_forward():
    _, _, model, _, inputs, tokens, _ = _setup(n=20)
    exact = exact_scores(model, tokens, inputs)
    direct = model.score_ids(inputs[:1].repeat(len(tokens), 1), tokens)
    assert torch.allclose(exact[0], direct, atol=1e-5)


def test_only_real_distinct_items_and_exclusion():
    catalog, vocab, model, index, inputs, tokens, histories = _setup(n=120, users=6, hist=8)
    rows, scores = beam_search(model, index, inputs, k=10, beam_size=12)
    assert rows.shape == (6, 10)
    for r, s in zip(rows, scores):
        assert (r >= 0).all() and (r < len(catalog)).all()
        assert len(set(r.tolist())) == 10
        assert (s[:-1] >= s[1:]).all()  # best first
    exclude = [torch.from_numpy(catalog.rows(h)) for h in histories]
    rows_x, _ = beam_search(model, index, inputs, k=10, beam_size=10, exclude_rows=exclude)
    for r, seen in zip(rows_x, exclude):
        assert (r >= 0).all() and len(set(r.tolist())) == 10
        assert not set(r.tolist()) & set(seen.tolist())


def test_exclusion_keeps_k_results_when_most_items_are_seen():
    catalog, vocab, model, index, inputs, tokens, _ = _setup(n=30, users=2, hist=4)
    # exclude the model's 20 favourite items: k=10 unseen items must still come back, in exact order
    exact = exact_scores(model, tokens, inputs)
    seen = [torch.argsort(exact[b], descending=True)[:20] for b in range(2)]
    rows, _ = beam_search(model, index, inputs, k=10, beam_size=10, exclude_rows=seen)
    for b in range(2):
        assert (rows[b] >= 0).all()
        assert not set(rows[b].tolist()) & set(seen[b].tolist())
        assert len(set(rows[b].tolist())) == 10


def test_beam_search_is_deterministic_in_train_mode_model():
    # dropout must be off whatever mode the caller left the model in
    _, _, model, index, inputs, _, _ = _setup(n=40)
    model.train()
    a = beam_search(model, index, inputs, k=5, beam_size=8)
    model.train()
    b = beam_search(model, index, inputs, k=5, beam_size=8)
    assert torch.equal(a[0], b[0])


def test_cached_decoding_passes_the_cache_under_the_name_transformers_takes():
    # transformers 5.24 renamed T5Stack.forward's past_key_values to cache (the old name warns and
    # goes in 5.40): beam search must decode without a deprecation FutureWarning on any release
    import inspect

    from transformers.models.t5.modeling_t5 import T5Stack

    _, _, model, index, inputs, _, _ = _setup(n=40)
    assert model._cache_kwarg in inspect.signature(T5Stack.forward).parameters
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is deprecated.*", category=FutureWarning)
        beam_search(model, index, inputs, k=5, beam_size=8)
