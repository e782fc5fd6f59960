"""The analyzers: neural_* (group B, linked by a shared exchange) and advanced_* (independent).

Both read the encoder's real token sequence with its padding mask.  The neural
analyzers follow the Red Heart recipe (per-token MLP, optional self-attention,
bidirectional LSTM/GRU, mixture of experts) and then exchange summaries: each
one attends over the other three's messages before it predicts.  That exchange is
why group B is linked.  The advanced analyzers are independent Transformer
readers of the encoder output; they read nothing else.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from redheart_tune.model.blocks import AttentionPool, BiRNN, GatedMoE, mlp, transformer_layers
from redheart_tune.model.presets import AdvancedSize, NeuralSize


class NeuralAnalyzer(nn.Module):
    """Group B analyzer: summarize the tokens, then predict after reading the others' messages.

    Used in two steps by the model, because every analyzer's prediction needs the
    other three's messages: ``summarize`` for all four first, then ``predict``.
    """

    def __init__(
        self,
        input_dim: int,
        size: NeuralSize,
        d_exchange: int,
        n_exchange_heads: int,
        out_dim: int,
        dropout: float,
    ):
        super().__init__()
        c = size.trunk[-1]
        self.trunk = mlp((input_dim, *size.trunk), 0.0, last_act=True)  # per token: no dropout (blocks.py)
        self.attn = None
        if size.n_heads > 0:
            self.attn_norm = nn.LayerNorm(c)
            self.attn = nn.MultiheadAttention(c, size.n_heads, batch_first=True)
        self.rnn = None
        if size.rnn != "none":
            self.rnn = BiRNN(size.rnn, c, size.d_rnn, size.rnn_layers, dropout)
            c = 2 * size.d_rnn
        self.pool = AttentionPool(c)
        self.moe = (
            GatedMoE(c, size.d_expert, size.n_experts, dropout) if size.n_experts > 0 else nn.Identity()
        )
        self.message = nn.Linear(c, d_exchange)
        self.exchange = nn.MultiheadAttention(d_exchange, n_exchange_heads, dropout=dropout, batch_first=True)
        self.out = mlp((c + d_exchange, size.d_out, out_dim), dropout)

    def summarize(
        self, tokens: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T, E), mask (B, T) -> summary (B, C) and the message the others read (B, X).
        ``lengths``: the rows' real tokens on the CPU (``BiRNN``)."""
        h = self.trunk(tokens)  # (B, T, C)
        if self.attn is not None:
            a = self.attn_norm(h)
            h = h + self.attn(a, a, a, key_padding_mask=~mask, need_weights=False)[0]
        if self.rnn is not None:
            h = self.rnn(h, mask, lengths)  # (B, T, 2 * d_rnn)
        s = self.moe(self.pool(h, mask))  # (B, C)
        return s, self.message(s)

    def predict(self, summary: torch.Tensor, message: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Own summary (B, C) and message (B, X), the other analyzers' messages (B, 3, X) -> (B, out_dim)."""
        heard, _ = self.exchange(message.unsqueeze(1), others, others, need_weights=False)  # (B, 1, X)
        return self.out(torch.cat([summary, heard.squeeze(1)], dim=-1))


class AdvancedAnalyzer(nn.Module):
    """Independent analyzer: Transformer over the tokens, attention pooling plus the pooled vector, experts."""

    def __init__(self, input_dim: int, size: AdvancedSize, out_dim: int, dropout: float):
        super().__init__()
        d = size.d_model
        self.input_proj = nn.Sequential(nn.Linear(input_dim, d), nn.LayerNorm(d))
        self.pooled_proj = nn.Linear(input_dim, d)
        self.layers = transformer_layers(d, size.n_heads, size.d_ffn, size.n_layers, dropout)
        self.norm = nn.LayerNorm(d)
        self.pool = AttentionPool(d)
        self.moe = GatedMoE(d, size.d_expert, size.n_experts, dropout)
        self.out = mlp((d, d // 2, out_dim), dropout)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(tokens)  # (B, T, C)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=~mask)
        s = self.pool(self.norm(h), mask) + self.pooled_proj(pooled)  # (B, C)
        return self.out(self.moe(s))  # (B, out_dim)
