"""The shared backbone of group A: a Transformer over the encoder's token sequence.

It predicts nothing itself.  It gives each of the four heads its own task
feature vector, and is trained only through the heads' losses.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from redheart_tune.model.blocks import AttentionPool, masked_mean, mlp, transformer_layers
from redheart_tune.model.presets import BackboneSize
from redheart_tune.model.tasks import TASKS


class TaskBranch(nn.Module):
    """One task's view of the backbone: attention pooling, projection, specialisation, input skip."""

    def __init__(self, d_model: int, input_dim: int, dropout: float):
        super().__init__()
        self.pool = AttentionPool(d_model)
        self.projection = mlp([d_model, d_model, d_model], dropout, last_act=True)
        self.specialisation = nn.Linear(d_model, d_model)
        # The skip from the raw encoder mean keeps a short path from input to head.
        self.skip = nn.Linear(input_dim, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, mean_in: torch.Tensor) -> torch.Tensor:
        z = self.specialisation(self.projection(self.pool(h, mask)))  # (B, C)
        return self.norm(z + self.skip(mean_in))  # (B, C)


class Backbone(nn.Module):
    """Input projection, pre-norm Transformer encoder, and one TaskBranch per task."""

    def __init__(self, input_dim: int, size: BackboneSize, dropout: float):
        super().__init__()
        d = size.d_model
        self.input_proj = nn.Sequential(
            nn.Linear(input_dim, d),
            nn.LayerNorm(d),
            nn.GELU(),
            nn.Linear(d, d),
            nn.LayerNorm(d),
        )
        # No positional embedding: the encoder's token embeddings are contextual and already carry position.
        self.layers = transformer_layers(d, size.n_heads, size.d_ffn, size.n_layers, dropout)
        self.norm = nn.LayerNorm(d)
        self.branches = nn.ModuleDict({t: TaskBranch(d, input_dim, dropout) for t in TASKS})

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """tokens (B, T, E), mask (B, T) -> {task: (B, d_model)}."""
        h = self.input_proj(tokens)  # (B, T, C)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=~mask)
        h = self.norm(h)
        mean_in = masked_mean(tokens, mask)  # (B, E)
        return {t: branch(h, mask, mean_in) for t, branch in self.branches.items()}
