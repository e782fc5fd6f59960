"""Group C: the emotion DSP simulator and the Kalman filter that reads its output.

The simulator turns the token sequence into a per-token stream of emotion
estimates ("the signal"); its own prediction is that stream's mean over the real
tokens.  It also cuts the signal into frames of ``hop`` tokens, as a DSP does.
The Kalman filter treats the frames as noisy measurements of a hidden emotion
state and runs a real predict/update recursion over them, so it needs the
simulator's output as input: that is why group C is linked.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from redheart_tune.model.blocks import masked_mean, mlp
from redheart_tune.model.presets import DSPSize


class EmotionDSPSimulator(nn.Module):
    """Tokens -> emotion signal: its mean over the real tokens (B, out_dim) and its frames.

    Frequency analyser (non-negative band energies), resonance (a convolution
    along the tokens plus self-attention), valence/arousal, and a synthesiser
    that mixes them into a per-token estimate.  No dropout: all of it is per token
    (blocks.py).
    """

    def __init__(self, input_dim: int, size: DSPSize, out_dim: int):
        super().__init__()
        h = size.d_hidden
        self.hop = size.hop
        self.proj = mlp((input_dim, h, h), 0.0, last_act=True)
        self.resonance_conv = nn.Conv1d(h, h, size.kernel, padding=size.kernel // 2)
        self.attn_norm = nn.LayerNorm(h)
        self.resonance_attn = nn.MultiheadAttention(h, size.n_heads, batch_first=True)
        self.bands = nn.Linear(h, size.n_bands)
        self.valence_arousal = nn.Linear(h, 2)
        self.synth = mlp((size.n_bands + h + 2, h, out_dim), 0.0)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> prediction (B, out_dim), frames (B, ceil(T / hop), out_dim), frame mask (B, ceil(T / hop))."""
        m = mask.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
        # Padding is zeroed so the convolution hears silence past the end of the text.
        x = self.proj(tokens) * m  # (B, T, H)
        r = self.resonance_conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T, H)
        a = self.attn_norm(x)
        x = x + r + self.resonance_attn(a, a, a, key_padding_mask=~mask, need_weights=False)[0]
        energy = F.softplus(self.bands(x))  # (B, T, n_bands), band energies are non-negative
        va = torch.tanh(self.valence_arousal(x))  # (B, T, 2)
        signal = self.synth(torch.cat([energy, x, va], dim=-1))  # (B, T, out_dim)
        # Frames: mean of the real tokens of each window of hop tokens; a frame is real if any token is.
        B, T, C = signal.shape
        pad = -T % self.hop
        s = F.pad(signal * m, (0, 0, 0, pad)).view(B, -1, self.hop, C)  # (B, n_frames, hop, C)
        count = F.pad(m, (0, 0, 0, pad)).view(B, -1, self.hop, 1).sum(2)  # (B, n_frames, 1)
        frames = s.sum(2) / count.clamp(min=1)  # (B, n_frames, C)
        return masked_mean(signal, mask), frames, count.squeeze(-1) > 0


class DynamicKalmanFilter(nn.Module):
    """Kalman filter with learnable transition F, observation H, and diagonal noises Q, R.

    State and measurement both have the task's size.  The measurements are the
    DSP's signal frames; the prediction is the state after the last real frame,
    plus a small learned adapter (zero-initialised, so it starts as the plain filter).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.F = nn.Parameter(torch.eye(dim))
        self.H = nn.Parameter(torch.eye(dim))
        # Small process noise against unit measurement noise: the state starts smooth.
        self.log_q = nn.Parameter(torch.full((dim,), math.log(0.01)))
        self.log_r = nn.Parameter(torch.zeros(dim))
        self.x0 = nn.Parameter(torch.zeros(dim))
        self.log_p0 = nn.Parameter(torch.zeros(dim))
        self.adapter = nn.Linear(dim, dim)
        nn.init.zeros_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Measurements z (B, T, dim), mask (B, T) right-padded (T frames here) -> filtered state (B, dim)."""
        # The recursion runs in fp32 even under autocast: a bf16 covariance update loses positive-definiteness.
        # (The meta device, where the memory planner sizes the model, has no autocast to turn off.)
        no_autocast = (
            torch.autocast(device_type=z.device.type, enabled=False)
            if z.device.type != "meta"
            else contextlib.nullcontext()
        )
        with no_autocast:
            At, Kt = self.gains(z.shape[1])  # (T, n, n), (T, m, n)
            # x_t = x_{t-1} A_t^T + z_t K_t^T for row vectors: an affine recurrence, run as a scan.
            u = torch.einsum("btm,tmn->btn", z.float(), Kt)  # (B, T, n)
            A_cum, u_cum = affine_scan(At, u)  # state after t steps = x0 @ A_cum[t] + u_cum[:, t]
            last = mask.sum(1) - 1  # (B,) index of each row's last real step
            x = self.x0 @ A_cum[last] + u_cum[torch.arange(z.shape[0], device=z.device), last]  # (B, n)
            return x + self.adapter(x)

    def gains(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The filter's per-step transition A_t^T = ((I - K_t H) F)^T and gain K_t^T, for t < T.

        F, H, Q, R are shared by all rows and masks are prefixes, so the covariance
        and the gain are the same for every row still running: one (n, n)
        recursion serves the whole batch.  With gain K the update
        x <- F x + K (z - H F x) is x <- A x + K z.

        The recursion runs where the parameters are (on a GPU too: a host copy would make
        the device wait), once per forward pass: with the window's micro-batches in one
        pass, that is once per unit turn.
        """
        F, H, log_q, log_r, log_p0 = self.F, self.H, self.log_q, self.log_r, self.log_p0
        Ft, Ht = F.T, H.T
        Q, R = torch.diag(log_q.exp()), torch.diag(log_r.exp())
        P = torch.diag(log_p0.exp())  # (n, n)
        Kt = []
        for _ in range(T):
            P = F @ P @ Ft + Q  # predict the covariance
            HP = H @ P  # (m, n)
            S = HP @ Ht + R  # innovation covariance, symmetric
            K_T, _ = torch.linalg.solve_ex(S, HP)  # (m, n) = (P H^T S^-1)^T; no sync to check S (R > 0)
            P = P - HP.T @ K_T  # update: (I - K H) P, written with the symmetric K H P = (H P)^T S^-1 H P
            Kt.append(K_T)
        Kt = torch.stack(Kt)  # (T, m, n)
        At = Ft - Ft @ Ht @ Kt  # (T, n, n): ((I - K H) F)^T = F^T - F^T H^T K^T
        return At, Kt


def affine_scan(A: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of the row-vector affine steps x <- x @ A[t] + u[:, t] (Hillis-Steele, log2 T rounds).

    A (T, n, n) shared by the batch, u (B, T, n).  Returns (A_cum, u_cum) with the
    state after steps 0..t equal to x0 @ A_cum[t] + u_cum[:, t], for any x0.  The
    same result as the sequential loop, in log2(T) batched products instead of T
    small ones (each a kernel launch on a GPU).
    """
    d = 1
    while d < A.shape[0]:
        # Compose each step t >= d with the prefix ending at t - d: first (A, u)[t - d], then (A, u)[t].
        u = torch.cat([u[:, :d], torch.einsum("btn,tnm->btm", u[:, :-d], A[d:]) + u[:, d:]], dim=1)
        A = torch.cat([A[:d], A[:-d] @ A[d:]], dim=0)
        d *= 2
    return A, u
