"""The four task heads of group A.  Each reads its own task feature from the backbone.

A head reads one feature vector, not a sequence: self-attention or an RNN over a
"sequence" of one repeated row computes nothing a dense layer does not.  So each
head is an MLP trunk, a dense mixture of experts and residual MLP blocks, sized
per task by the preset.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from redheart_tune.model.blocks import GatedMoE, ResidualMLP, mlp
from redheart_tune.model.presets import HeadSize


class TaskHead(nn.Module):
    """Backbone task feature (B, d_model) -> prediction (B, out_dim)."""

    def __init__(self, size: HeadSize, out_dim: int, dropout: float):
        super().__init__()
        c = size.trunk[-1]
        self.trunk = mlp(size.trunk, dropout, last_act=True)
        self.moe = GatedMoE(c, size.d_expert, size.n_experts, dropout)
        self.blocks = nn.Sequential(*[ResidualMLP(c, 2 * c, dropout) for _ in range(size.n_blocks)])
        self.out = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, out_dim))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        h = self.trunk(feature)  # (B, C)
        h = self.blocks(self.moe(h))  # (B, C)
        return self.out(h)  # (B, out_dim)
