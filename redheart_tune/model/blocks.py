"""Shared building blocks of the Red Heart modules.

Shapes: B batch, T tokens, E encoder width, C channels.  A padding mask is (B, T)
bool with True on real tokens; the encoder's masks are right-padded prefixes with
at least one real token per row.

Dropout (``ModelConfig.dropout``) acts on vectors (pooled summaries, experts,
heads, output MLPs), between stacked RNN layers, and on the residual branches and
FFN of Transformer layers.  Per-token MLPs and attention probabilities have none:
on a CPU a (B, T, C) random mask costs more than the layer it regularises (a
third of a tiny step), and the Transformer layers already regularise the tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp(widths: Sequence[int], dropout: float, last_act: bool = False) -> nn.Sequential:
    """Linear layers through ``widths``, with LayerNorm, GELU and dropout between them.

    ``last_act`` also puts LayerNorm/GELU/dropout after the last Linear, for an MLP whose
    output feeds another layer rather than being a prediction.
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2 or last_act:
            layers += [nn.LayerNorm(b), nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, T, C) over the real tokens of mask (B, T) -> (B, C)."""
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * m).sum(1) / m.sum(1)


class AttentionPool(nn.Module):
    """One learned query scores every real token; the output is the score-weighted sum."""

    def __init__(self, dim: int):
        super().__init__()
        # No bias: softmax ignores a constant shift, so a bias would never receive gradient.
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = self.score(x).squeeze(-1)  # (B, T)
        s = s.masked_fill(~mask, float("-inf"))
        w = torch.softmax(s, dim=-1)  # (B, T); padded tokens get weight 0
        return torch.einsum("bt,btc->bc", w, x)  # (B, C)


class ResidualMLP(nn.Module):
    """Pre-norm residual block x + MLP(LN(x)) on vectors or sequences."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class GatedMoE(nn.Module):
    """Dense mixture of experts: a softmax gate weighs the outputs of all experts.

    Dense (every expert runs on every row) rather than top-k, so every expert gets
    gradient on every step and no load-balancing loss is needed.  The experts are
    two-layer MLPs stored as stacked weights so they run as one batched matmul.
    Returned as a residual: x + sum_i gate_i(x) * expert_i(LN(x)).
    """

    def __init__(self, dim: int, hidden: int, n_experts: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, n_experts)
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(n_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(n_experts, dim))
        self.drop = nn.Dropout(dropout)
        # Same scale as nn.Linear's default init, per expert.
        nn.init.uniform_(self.w1, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
        nn.init.uniform_(self.w2, -1 / math.sqrt(hidden), 1 / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)  # (B, C)
        g = torch.softmax(self.gate(h), dim=-1)  # (B, N)
        e = F.gelu(torch.einsum("bc,nch->bnh", h, self.w1) + self.b1)  # (B, N, H)
        e = torch.einsum("bnh,nhc->bnc", e, self.w2) + self.b2  # (B, N, C)
        return x + self.drop(torch.einsum("bn,bnc->bc", g, e))


def reverse_within_length(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reverse each row's real tokens in place, padding stays at the end; applying it twice undoes it."""
    T = x.shape[1]
    t = torch.arange(T, device=x.device)  # (T,)
    lengths = mask.sum(1, keepdim=True)  # (B, 1)
    idx = torch.where(t < lengths, lengths - 1 - t, t)  # (B, T)
    return torch.gather(x, 1, idx.unsqueeze(-1).expand_as(x))


class BiRNN(nn.Module):
    """Bidirectional multi-layer LSTM/GRU over the real tokens of right-padded sequences -> (B, T, 2H).

    One ``nn.LSTM``/``nn.GRU`` call (every layer, both directions: one cuDNN call on a
    GPU) over the packed real tokens, so neither direction ever carries padding into a
    real token; the backward direction starts at each row's last real token.  Dropout
    acts between layers (the RNN's own ``dropout``).  Outputs on padding are zero.

    ``lengths``: each row's real tokens as a CPU tensor (packing sorts by them on the
    host).  Give it where the mask's device is not the CPU: without it the lengths are
    read back from the device, which makes the host wait.  The rows are sorted here, as
    ``pack_padded_sequence(enforce_sorted=False)`` sorts them (the same ``torch.sort``, so the
    same order and numbers), but its two host waits are left out: its sort order goes to the
    device with a blocking copy, and unpacking reads the inverse order back.  Here both orders
    are made on the host and sent without waiting.
    """

    def __init__(self, kind: str, d_in: int, d_hidden: int, n_layers: int, dropout: float):
        super().__init__()
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = rnn_cls(
            d_in,
            d_hidden,
            num_layers=n_layers,
            bidirectional=True,
            batch_first=True,
            dropout=dropout if n_layers > 1 else 0.0,
        )

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        if lengths is None:
            lengths = mask.sum(1)
        if x.device.type == "meta":  # the memory planner's sizing pass: full rows, no packing to sort
            return self.rnn(x)[0]
        lengths, order = torch.sort(torch.as_tensor(lengths, dtype=torch.int64, device="cpu"), descending=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        order, inverse = (t.to(x.device, non_blocking=True) for t in (order, inverse))
        packed = nn.utils.rnn.pack_padded_sequence(
            x.index_select(0, order), lengths, batch_first=True, enforce_sorted=True
        )
        if x.is_cuda and self.training and self.rnn.dropout > 0:
            _reseed_cudnn_dropout(x.device)
        out, _ = nn.utils.rnn.pad_packed_sequence(
            self.rnn(packed)[0], batch_first=True, total_length=x.shape[1]
        )
        return out.index_select(0, inverse)


def _reseed_cudnn_dropout(device: torch.device) -> None:
    """Make cuDNN draw this RNN call's dropout masks from the generator as it stands now.

    cuDNN keeps one dropout state per device across RNN calls and reseeds it from the generator only
    on the first call after the generator was set. Under activation checkpointing that breaks: each
    neural analyzer's recompute restores the generator to its own entry and reseeds, while its forward
    had continued the state the analyzer before it left, so the recompute drew other masks than the
    forward and the gradients were silently wrong. Setting the generator to its own state marks it set
    without moving it, so every call reseeds from where it stands, in the forward and the recompute
    alike. The cost: the reseed reads one number back (a host sync) per call with dropout on.
    """
    torch.cuda.set_rng_state(torch.cuda.get_rng_state(device), device)


def transformer_layers(
    d_model: int, n_heads: int, d_ffn: int, n_layers: int, dropout: float
) -> nn.ModuleList:
    """A stack of pre-norm Transformer encoder layers (call each with src_key_padding_mask=~mask).

    Dropout acts on the residual branches and the FFN, not on the attention
    probabilities: that one costs more than the rest of the layer on CPU (a
    (B, heads, T, T) random mask) and regularises little on sentences this short.
    """
    layers = nn.ModuleList(
        nn.TransformerEncoderLayer(
            d_model, n_heads, d_ffn, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        for _ in range(n_layers)
    )
    for layer in layers:
        layer.self_attn.dropout = 0.0
    return layers
