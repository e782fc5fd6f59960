"""The phase networks (independent): small readers of the encoder output.

phase0 calibrates an emotion prediction from the pooled sentence vector; phase1
learns regret from pooled tokens; phase2 treats the tokens as members of a
community that interact before a verdict on the Bentham scores.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from redheart_tune.model.blocks import AttentionPool, mlp, transformer_layers
from redheart_tune.model.presets import AdvancedSize


class Phase0EmotionCalibrator(nn.Module):
    """Pooled vector (B, E) -> emotion (B, out_dim) through an MLP and a learned temperature."""

    def __init__(self, input_dim: int, hidden: tuple[int, ...], out_dim: int, dropout: float):
        super().__init__()
        self.net = mlp((input_dim, *hidden, out_dim), dropout)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled) * torch.exp(-self.log_temperature)


class Phase1EmpathyLearner(nn.Module):
    """Attention-pooled tokens beside the pooled vector -> regret (B, out_dim)."""

    def __init__(self, input_dim: int, hidden: int, out_dim: int, dropout: float):
        super().__init__()
        self.pool = AttentionPool(input_dim)
        self.net = mlp((2 * input_dim, hidden, out_dim), dropout)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([self.pool(tokens, mask), pooled], dim=-1))


class Phase2CommunityNetwork(nn.Module):
    """Tokens as community members: Transformer interaction, pooled verdict -> Bentham (B, out_dim)."""

    def __init__(self, input_dim: int, size: AdvancedSize, out_dim: int, dropout: float):
        super().__init__()
        d = size.d_model
        self.members = nn.Sequential(nn.Linear(input_dim, d), nn.LayerNorm(d))
        self.context = nn.Linear(input_dim, d)
        self.layers = transformer_layers(d, size.n_heads, size.d_ffn, size.n_layers, dropout)
        self.norm = nn.LayerNorm(d)
        self.pool = AttentionPool(d)
        self.out = mlp((d, d // 2, out_dim), dropout)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        # The whole sentence's vector is added to every member as shared context.
        h = self.members(tokens) + self.context(pooled).unsqueeze(1)  # (B, T, C)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=~mask)
        return self.out(self.pool(self.norm(h), mask))  # (B, out_dim)
