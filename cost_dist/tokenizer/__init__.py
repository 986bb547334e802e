"""Semantic tokenization of item embeddings: the CoST quantizer and its baselines.

- `model`: the RQ-VAE quantizer (plain torch module: MLP encoder, residual codebooks, MLP decoder).
- `losses`: L_rq, reconstruction MSE, InfoNCE over (gathered) in-batch negatives, and their mixes.
- `baselines`: residual k-means (faiss) and random IDs, behind the same code interface.
- `train`: the Ray Train + DeepSpeed training loop and the `tokenize` stage.
- `assign`: the `assign` stage (Ray Data inference -> unique semantic IDs, diagnostics, plot).
- `inference`: `SemanticTokenizer`, the trained tokenizer loaded from a run (used by Serve).
- `diagnostics`: code usage, perplexity, collisions, neighbourhood preservation.
"""
