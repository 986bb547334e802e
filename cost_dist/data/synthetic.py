"""The built-in synthetic dataset: a catalog generated from latent topics, users following topic transitions.

Why it looks like this:
- every topic has its own vocabulary of made-up words and a category name, and an item's title,
  category and description draw mostly from its topic's words (plus shared filler words), so text
  embeddings of items cluster by topic, as real item text clusters by product type;
- within a topic, item popularity follows a Zipf law (weight ~ 1/rank^a), so a popularity baseline
  is meaningful but beatable;
- a user starts on a random topic and moves along a sparse topic-transition matrix: with probability
  `topic_stickiness` the next topic comes from the matrix, otherwise it is uniform noise. A model
  that learns the transitions therefore beats popularity by a clear margin; `oracle_scores` gives
  the Bayes-optimal next-item scores for tests.

Deterministic by seed: every random draw comes from a numpy Generator seeded with (seed, stream,
chunk), with fixed chunk sizes, so the output does not depend on the batch size used to stream it.
Items and users are produced in batches, so 10^6 items stay in bounded memory (only O(N) numeric
arrays are held: each item's topic and popularity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from cost_dist.config import SyntheticConfig
from cost_dist.errors import DataError

ITEM_CHUNK = 4096  # items per RNG chunk (fixed: keeps output independent of batch_size)
USER_CHUNK = 1024  # users per RNG chunk
BASE_TIME = 1_600_000_000  # 2020-09-13, Unix seconds
STEP_SECONDS = 600

_CONSONANTS = list("bdfgklmnprstvz") + ["br", "tr", "st", "ch", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
TITLE_FILLERS = ["deluxe", "classic", "premium", "compact", "portable", "original", "edition", "series", "mini",
                 "plus", "collection", "kit", "pack", "pro", "essential", "signature", "select", "standard"]
DESCRIPTION_FILLERS = ["with", "for", "and", "the", "a", "of", "quality", "great", "new", "durable", "everyday",
                       "design", "easy", "to", "use", "style", "made", "perfect", "gift", "home", "daily", "value",
                       "lightweight", "reliable", "simple", "modern", "long", "lasting"]


def _make_words(rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct pronounceable made-up words."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        n_syll = int(rng.integers(2, 4))
        w = "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(n_syll))
        if rng.random() < 0.5:
            w += _CONSONANTS[rng.integers(len(_CONSONANTS))]
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


@dataclass
class SyntheticWorld:
    """The latent structure: item topics and popularity, topic vocabularies, the transition matrix."""

    cfg: SyntheticConfig
    seed: int
    item_topic: np.ndarray  # [N] int32
    item_weight: np.ndarray  # [N] float64, popularity within its topic, sums to 1 per topic
    successors: np.ndarray  # [T, k] int64 topics each topic leads to
    successor_probs: np.ndarray  # [T, k] float64, rows sum to 1
    topic_words: list[list[str]]
    topic_names: list[str]
    # Sampling tables: items ordered by topic, then popularity (descending).
    order: np.ndarray  # [N] item indices
    topic_start: np.ndarray  # [T + 1] offsets into order
    cum_weight: np.ndarray  # [N] cumulative weight along order (each topic adds 1.0)

    @classmethod
    def build(cls, cfg: SyntheticConfig, seed: int) -> "SyntheticWorld":
        n, t = cfg.num_items, cfg.num_topics
        if t < 1:
            raise DataError(f"data.synthetic.num_topics must be >= 1, got {t}")
        if n < t:
            raise DataError(f"data.synthetic.num_items ({n}) must be >= num_topics ({t})")
        if cfg.num_users < 1:
            raise DataError(f"data.synthetic.num_users must be >= 1, got {cfg.num_users}")
        if not 3 <= cfg.min_seq_len <= cfg.max_seq_len:
            raise DataError(f"data.synthetic needs 3 <= min_seq_len <= max_seq_len, got {cfg.min_seq_len}, {cfg.max_seq_len}")
        if not 0.0 <= cfg.topic_stickiness <= 1.0:
            raise DataError(f"data.synthetic.topic_stickiness must be in [0, 1], got {cfg.topic_stickiness}")
        if cfg.words_per_topic < 3:
            raise DataError(f"data.synthetic.words_per_topic must be >= 3, got {cfg.words_per_topic}")
        rng = np.random.default_rng([seed, 0])
        words = _make_words(rng, t * cfg.words_per_topic)
        topic_words = [words[i * cfg.words_per_topic:(i + 1) * cfg.words_per_topic] for i in range(t)]
        topic_names = [f"{w[0].capitalize()} {w[1].capitalize()}" for w in topic_words]

        k = max(1, min(cfg.topic_successors, t))
        successors = np.stack([rng.choice(t, size=k, replace=False) for _ in range(t)]).astype(np.int64)
        successor_probs = rng.dirichlet(np.ones(k), size=t)

        # Topic sizes vary (Dirichlet), every topic has at least one item.
        sizes_p = rng.dirichlet(np.full(t, 5.0))
        item_topic = np.concatenate([np.arange(t), rng.choice(t, size=n - t, p=sizes_p)])
        item_topic = rng.permutation(item_topic).astype(np.int32)
        key = rng.random(n)
        order = np.lexsort((key, item_topic))  # by topic, then a random key = popularity rank
        topic_start = np.searchsorted(item_topic[order], np.arange(t + 1)).astype(np.int64)
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - np.repeat(topic_start[:-1], np.diff(topic_start))
        weight = 1.0 / np.power(rank + 1.0, cfg.zipf_exponent)
        totals = np.bincount(item_topic, weights=weight, minlength=t)
        item_weight = weight / totals[item_topic]
        cum_weight = np.cumsum(item_weight[order])
        return cls(cfg, seed, item_topic, item_weight, successors, successor_probs, topic_words, topic_names,
                   order, topic_start, cum_weight)

    # ---- ids -----------------------------------------------------------------------------------

    @property
    def item_width(self) -> int:
        return max(6, len(str(self.cfg.num_items - 1)))

    @property
    def user_width(self) -> int:
        return max(5, len(str(self.cfg.num_users - 1)))

    def item_id(self, index: int) -> str:
        return f"i{index:0{self.item_width}d}"

    def item_index(self, item_id: str) -> int:
        return int(item_id[1:])

    # ---- the truth, for oracles --------------------------------------------------------------------

    def transition_matrix(self) -> np.ndarray:
        """[T, T] probability of the next topic given the current one (stickiness and noise included)."""
        t = self.cfg.num_topics
        p = np.full((t, t), (1.0 - self.cfg.topic_stickiness) / t)
        for row in range(t):
            np.add.at(p[row], self.successors[row], self.cfg.topic_stickiness * self.successor_probs[row])
        return p

    def oracle_scores(self, current_topic: int) -> np.ndarray:
        """[N] true probability of each item being the next one (ignoring the no-repeat rule)."""
        return self.transition_matrix()[current_topic][self.item_topic] * self.item_weight

    # ---- items -----------------------------------------------------------------------------------

    def _item_chunk(self, chunk: int) -> dict[str, list]:
        start = chunk * ITEM_CHUNK
        stop = min(self.cfg.num_items, start + ITEM_CHUNK)
        n = stop - start
        rng = np.random.default_rng([self.seed, 1, chunk])
        wpt = self.cfg.words_per_topic
        # Every draw for the chunk at once (vectorised); the loop below only joins strings.
        # Topic words are drawn Zipf-like, so each topic has a few signature words.
        wprob = 1.0 / np.arange(1, wpt + 1)
        word_idx = rng.choice(wpt, size=(n, 14), p=wprob / wprob.sum())
        n_title = rng.integers(2, 4, size=n)
        filler_pos = (rng.random(n) * (n_title + 1)).astype(np.int64)
        title_filler = rng.integers(len(TITLE_FILLERS), size=n)
        model_no = rng.integers(10, 1000, size=n)
        desc_len = rng.integers(8, 14, size=n)
        desc_is_topic = rng.random((n, 13)) < 0.6
        desc_filler = rng.integers(len(DESCRIPTION_FILLERS), size=(n, 13))
        sub_word = rng.integers(2, wpt, size=n)
        ids, titles, categories, descriptions = [], [], [], []
        fillers_t = [f.capitalize() for f in TITLE_FILLERS]
        for k in range(n):
            idx = start + k
            topic = int(self.item_topic[idx])
            words = self.topic_words[topic]
            tw = word_idx[k]
            nt = int(n_title[k])
            title = [words[i].capitalize() for i in tw[:nt]]
            title.insert(int(filler_pos[k]), fillers_t[title_filler[k]])
            title.append(str(int(model_no[k])))
            desc = [words[tw[nt + i % (14 - nt)]] if desc_is_topic[k, i] else DESCRIPTION_FILLERS[desc_filler[k, i]]
                    for i in range(int(desc_len[k]))]
            ids.append(self.item_id(idx))
            titles.append(" ".join(title))
            categories.append(f"{self.topic_names[topic]} > {words[sub_word[k]].capitalize()}")
            descriptions.append(" ".join(desc).capitalize())
        return {"item_id": ids, "title": titles, "category": categories, "description": descriptions,
                "topic": self.item_topic[start:stop]}

    def item_batches(self, batch_size: int) -> Iterator[pa.Table]:
        """Items as tables of about batch_size rows: item_id, title, category, description, topic."""
        n_chunks = -(-self.cfg.num_items // ITEM_CHUNK)
        per_batch = max(1, batch_size // ITEM_CHUNK)
        for first in range(0, n_chunks, per_batch):
            parts = [self._item_chunk(c) for c in range(first, min(n_chunks, first + per_batch))]
            yield pa.table({
                "item_id": pa.array([x for p in parts for x in p["item_id"]], type=pa.string()),
                "title": pa.array([x for p in parts for x in p["title"]], type=pa.string()),
                "category": pa.array([x for p in parts for x in p["category"]], type=pa.string()),
                "description": pa.array([x for p in parts for x in p["description"]], type=pa.string()),
                "topic": pa.array(np.concatenate([p["topic"] for p in parts]), type=pa.int32()),
            })

    # ---- users -----------------------------------------------------------------------------------

    def _sample_items(self, rng: np.random.Generator, topics: np.ndarray) -> np.ndarray:
        """One item per entry of `topics`, by popularity within the topic."""
        lo = self.topic_start[topics]
        hi = self.topic_start[topics + 1]
        base = np.where(lo > 0, self.cum_weight[np.maximum(lo - 1, 0)], 0.0)
        target = base + rng.random(len(topics)) * (self.cum_weight[hi - 1] - base)
        pos = np.clip(np.searchsorted(self.cum_weight, target, side="right"), lo, hi - 1)
        return self.order[pos]

    def _user_chunk(self, chunk: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """(user indices, per-user item index arrays, per-user topic arrays) of one RNG chunk."""
        cfg = self.cfg
        start = chunk * USER_CHUNK
        stop = min(cfg.num_users, start + USER_CHUNK)
        b = stop - start
        rng = np.random.default_rng([self.seed, 2, chunk])
        lengths = rng.integers(cfg.min_seq_len, cfg.max_seq_len + 1, size=b)
        steps = int(lengths.max())
        t = cfg.num_topics
        topics = np.empty((b, steps), dtype=np.int64)
        items = np.empty((b, steps), dtype=np.int64)
        cum_succ = np.cumsum(self.successor_probs, axis=1)
        cur = rng.integers(t, size=b)
        for s in range(steps):
            if s > 0:
                u = rng.random(b)
                pick = np.minimum((u[:, None] > cum_succ[cur]).sum(axis=1), self.successors.shape[1] - 1)
                follow = rng.random(b) < cfg.topic_stickiness
                cur = np.where(follow, self.successors[cur, pick], rng.integers(t, size=b))
            topics[:, s] = cur
            cand = self._sample_items(rng, cur)
            # No repeats within a user while the topic has unseen items (a few vectorised retries).
            for _ in range(8):
                if s == 0:
                    break
                dup = (items[:, :s] == cand[:, None]).any(axis=1)
                if not dup.any():
                    break
                cand[dup] = self._sample_items(rng, cur[dup])
            items[:, s] = cand
        users = np.arange(start, stop)
        return users, [items[i, :lengths[i]] for i in range(b)], [topics[i, :lengths[i]] for i in range(b)]

    def user_batches(self, batch_size: int) -> Iterator[tuple[pa.Table, pa.Table]]:
        """(interactions, sequences) tables for about batch_size users at a time, already sorted."""
        n_chunks = -(-self.cfg.num_users // USER_CHUNK)
        per_batch = max(1, batch_size // USER_CHUNK)
        for first in range(0, n_chunks, per_batch):
            users_all, items_all, topics_all = [], [], []
            for c in range(first, min(n_chunks, first + per_batch)):
                users, items, topics = self._user_chunk(c)
                users_all.append(users)
                items_all.extend(items)
                topics_all.extend(topics)
            users = np.concatenate(users_all)
            lengths = np.array([len(x) for x in items_all], dtype=np.int64)
            flat_items = np.concatenate(items_all)
            flat_topics = np.concatenate(topics_all).astype(np.int32)
            uw, iw = self.user_width, self.item_width
            user_ids = pa.array([f"u{u:0{uw}d}" for u in users], type=pa.string())
            item_ids = pa.array([f"i{i:0{iw}d}" for i in flat_items], type=pa.string())
            # Each user's session starts at a user-specific time; items follow STEP_SECONDS apart.
            start_time = BASE_TIME + (users * 7919) % (365 * 86400)
            pos = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            timestamps = np.repeat(start_time, lengths) + pos * STEP_SECONDS
            interactions = pa.table({
                "user_id": user_ids.take(pa.array(np.repeat(np.arange(len(users)), lengths))),
                "item_id": item_ids,
                "timestamp": pa.array(timestamps.astype(np.int64)),
            })
            offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
            sequences = pa.table({
                "user_id": user_ids,
                "item_ids": pa.ListArray.from_arrays(offsets, item_ids),
                "topics": pa.ListArray.from_arrays(offsets, pa.array(flat_topics, type=pa.int32())),
            })
            yield interactions, sequences
