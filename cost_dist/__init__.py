"""cost-dist: CoST semantic IDs and a TIGER-style generative recommender, trained and served on Ray."""

__version__ = "0.1.0"
