"""TIGER's encoder-decoder over semantic-ID tokens: a small T5 from transformers in a plain nn.Module.

The module knows nothing of Ray. It exposes what training and decoding need: the training loss
(cross-entropy restricted to each position's token range), teacher-forced per-position log-probs
(exact scoring), and the encoder / single-step decoder with a key/value cache (beam search).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from cost_dist.generator.vocab import EOS, PAD, Vocabulary


def t5_config(vocab: Vocabulary, cfg):
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab.size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_encoder_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads,
        dropout_rate=cfg.dropout,
        feed_forward_proj="relu",
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
        use_cache=True,
        is_encoder_decoder=True,
    )


BEAM_ATTENTION = "cost_dist_beam_grouped"


def _beam_grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None, **kwargs):
    """T5 attention where the keys/values may hold one row per user and the queries W rows per user.

    Beam search decodes B users x W beams, but the W beams of a user attend to the same encoder
    states: the cross-attention keys/values are computed and cached once per user ([B, H, T, d])
    instead of once per beam, which saves W times their projection FLOPs and cache memory. Every
    other call (self-attention, training, batches where the row counts match) is T5's own eager
    attention.
    """
    from transformers.models.t5.modeling_t5 import eager_attention_forward

    if key.shape[0] == query.shape[0]:
        return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                       position_bias=position_bias, **kwargs)
    B = key.shape[0]
    W = query.shape[0] // B
    q = query.view(B, W, *query.shape[1:])  # [B, W, H, q, d]
    scores = torch.einsum("bwhqd,bhkd->bwhqk", q, key)
    if scaling is not None and scaling != 1.0:
        scores = scores * scaling
    if position_bias is not None:
        scores = scores + position_bias  # [1, H, q, k] broadcasts
    if attention_mask is not None:
        scores = scores + attention_mask[:, None]  # [B, 1, q, k] -> [B, 1, 1, q, k]
    weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.einsum("bwhqk,bhkd->bwhqd", weights, value).reshape(B * W, *query.shape[1:])
    return out.transpose(1, 2).contiguous(), None


def _register_beam_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(BEAM_ATTENTION, _beam_grouped_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(BEAM_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


class TigerModel(nn.Module):
    def __init__(self, vocab: Vocabulary, cfg):
        super().__init__()
        from transformers import T5ForConditionalGeneration

        self.vocab = vocab
        _register_beam_attention()
        self.t5 = T5ForConditionalGeneration(t5_config(vocab, cfg))
        self.t5.set_attn_implementation(BEAM_ATTENTION)
        # Additive mask per decoding position: 0 on the position's token range, -inf elsewhere.
        mask = torch.full((vocab.id_length, vocab.size), float("-inf"))
        for t, (start, size) in enumerate(vocab.position_ranges):
            mask[t, start:start + size] = 0.0
        self.register_buffer("position_mask", mask, persistent=False)
        self._cache_kwarg = decoder_cache_kwarg(type(self.t5.get_decoder()))

    # ---- training / exact scoring -----------------------------------------------------------------

    def position_log_probs(self, input_ids: torch.Tensor, target_tokens: torch.Tensor,
                           encoder_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced log-softmax over each position's range: [B, L, V] (-inf outside the range)."""
        attention_mask = (input_ids != PAD).long()
        decoder_input = torch.cat([torch.full_like(target_tokens[:, :1], PAD), target_tokens[:, :-1]], dim=1)
        kwargs = {}
        if encoder_hidden is not None:
            kwargs["encoder_outputs"] = (encoder_hidden,)
        out = self.t5(input_ids=None if encoder_hidden is not None else input_ids, attention_mask=attention_mask,
                      decoder_input_ids=decoder_input, use_cache=False, **kwargs)
        logits = out.logits.float() + self.position_mask[None, :, :]
        return F.log_softmax(logits, dim=-1)

    def forward(self, input_ids: torch.Tensor, target_tokens: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean cross-entropy of the target IDs' tokens (softmax over each position's own range)."""
        log_probs = self.position_log_probs(input_ids, target_tokens)
        nll = -log_probs.gather(-1, target_tokens.unsqueeze(-1)).squeeze(-1)
        if label_smoothing > 0:
            # Smooth over the position's own range only (the -inf entries are outside it).
            finite = torch.isfinite(log_probs)
            smooth = -(log_probs.masked_fill(~finite, 0.0).sum(-1) / finite.sum(-1))
            nll = (1 - label_smoothing) * nll + label_smoothing * smooth
        return nll.mean()

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
        """Log-prob of each row's full ID: [B] = sum over positions (teacher forced)."""
        log_probs = self.position_log_probs(input_ids, target_tokens)
        return log_probs.gather(-1, target_tokens.unsqueeze(-1)).squeeze(-1).sum(-1)

    # ---- incremental decoding ---------------------------------------------------------------------

    def encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention_mask = (input_ids != PAD).long()
        hidden = self.t5.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, attention_mask

    def decode_step(self, tokens: torch.Tensor, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor, cache,
                    token_range: tuple[int, int]) -> torch.Tensor:
        """One decoder step for [N] = [B * W] last tokens with the running cache: logits [N, size] (float32)
        of the tokens start .. start + size - 1 (token_range = (start, size), the next position's range).

        encoder_hidden / encoder_mask have one row per user (B rows): the W beams of user b are rows
        b*W .. b*W+W-1 of `tokens`, and share that user's cached cross-attention keys/values.
        Only the range's rows of the output projection are applied: with hashed user tokens the
        vocabulary is mostly tokens a decoding step can never emit (2,000 of ~2,200 on Amazon), and
        the full projection would cost more than a decoder layer.
        """
        hidden = self.t5.get_decoder()(input_ids=tokens[:, None], encoder_hidden_states=encoder_hidden,
                                       encoder_attention_mask=encoder_mask, use_cache=True,
                                       **{self._cache_kwarg: cache}).last_hidden_state[:, -1, :]
        start, size = token_range
        # What T5ForConditionalGeneration.forward does before lm_head: transformers 5.23 reads
        # scale_decoder_outputs, older releases tie_word_embeddings (the tests compare with its forward).
        if getattr(self.t5.config, "scale_decoder_outputs", self.t5.config.tie_word_embeddings):
            hidden = hidden * (self.t5.config.d_model ** -0.5)
        return F.linear(hidden, self.t5.lm_head.weight[start:start + size]).float()


def decoder_cache_kwarg(stack_class) -> str:
    """The name T5's decoder stack takes its key/value cache under: transformers 5.24 renamed
    `past_key_values` to `cache` (the old name warns, and goes in 5.40); older releases know only
    `past_key_values`. Read from the signature (deprecate_kwarg keeps it via functools.wraps)."""
    return "cache" if "cache" in inspect.signature(stack_class.forward).parameters else "past_key_values"


def new_cache():
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    return EncoderDecoderCache(DynamicCache(), DynamicCache())
