"""Building blocks checked against plain references: RNN padding, the Kalman recursion, padding invariance."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from test_model import REDHEART_TASKS, E, make_batch, tiny

from redheart_tune.model.analyzers import AdvancedAnalyzer, NeuralAnalyzer
from redheart_tune.model.blocks import BiRNN, reverse_within_length
from redheart_tune.model.dsp import DynamicKalmanFilter
from redheart_tune.model.family import build_model
from redheart_tune.model.heads import TaskHead
from redheart_tune.model.losses import module_losses, total_loss
from redheart_tune.model.phases import Phase2CommunityNetwork
from redheart_tune.model.presets import AdvancedSize, HeadSize, ModelConfig, NeuralSize


def lengths_mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T) < torch.tensor(lengths)[:, None]


def test_reverse_within_length_is_an_involution():
    x = torch.arange(2 * 4).float().view(2, 4, 1)
    mask = lengths_mask([4, 2], 4)
    r = reverse_within_length(x, mask)
    assert r[0, :, 0].tolist() == [3, 2, 1, 0]
    assert r[1, :, 0].tolist() == [5, 4, 6, 7]  # padding stays where it is
    torch.testing.assert_close(reverse_within_length(r, mask), x)


def _per_direction_birnn(fwd: list[nn.Module], bwd: list[nn.Module], x, mask):
    """The earlier BiRNN: a one-layer RNN per direction and layer, the backward one over each row's real
    tokens reversed (padding kept at the end); outputs on padding zero."""
    for f, b in zip(fwd, bwd, strict=True):
        back = reverse_within_length(b(reverse_within_length(x, mask))[0], mask)
        x = torch.cat([f(x)[0], back], dim=-1)
    return x * mask.unsqueeze(-1).to(x.dtype)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_birnn_is_one_call_with_the_outputs_of_one_rnn_per_direction_and_layer(kind):
    """One cuDNN-shaped call (every layer, both directions, packed) gives what the 2 x layers separate
    single-direction RNNs gave, with the same weights and the same parameter count."""
    torch.manual_seed(0)
    rnn = BiRNN(kind, 5, 6, 3, dropout=0.0)
    cls = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
    fwd = [cls(w, 6, batch_first=True) for w in (5, 12, 12)]
    bwd = [cls(w, 6, batch_first=True) for w in (5, 12, 12)]
    with torch.no_grad():
        for i in range(3):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(fwd[i], f"{name}_l0").copy_(getattr(rnn.rnn, f"{name}_l{i}"))
                getattr(bwd[i], f"{name}_l0").copy_(getattr(rnn.rnn, f"{name}_l{i}_reverse"))
    assert sum(p.numel() for p in rnn.parameters()) == sum(p.numel() for m in fwd + bwd for p in m.parameters())
    x = torch.randn(3, 7, 5)
    mask = lengths_mask([7, 3, 1], 7)
    want = _per_direction_birnn(fwd, bwd, x, mask)
    torch.testing.assert_close(rnn(x, mask), want)
    torch.testing.assert_close(rnn(x, mask, lengths=mask.sum(1)), want)


def test_kalman_matches_reference_recursion():
    torch.manual_seed(0)
    kf = DynamicKalmanFilter(3)
    with torch.no_grad():  # a filter away from its identity initialisation
        kf.F.copy_(0.9 * torch.eye(3) + 0.05 * torch.randn(3, 3))
        kf.H.copy_(torch.eye(3) + 0.1 * torch.randn(3, 3))
        for p in (kf.x0, kf.log_q, kf.log_r, kf.log_p0, kf.adapter.weight):
            p.copy_(0.3 * torch.randn_like(p))
    z = torch.randn(4, 6, 3)
    lengths = [6, 1, 3, 5]
    got = kf(z, lengths_mask(lengths, 6))
    Q, R = torch.diag(kf.log_q.exp()), torch.diag(kf.log_r.exp())
    for b, n in enumerate(lengths):
        x, P = kf.x0, torch.diag(kf.log_p0.exp())
        for t in range(n):  # textbook predict / update
            x, P = kf.F @ x, kf.F @ P @ kf.F.T + Q
            K = P @ kf.H.T @ torch.linalg.inv(kf.H @ P @ kf.H.T + R)
            x, P = x + K @ (z[b, t] - kf.H @ x), (torch.eye(3) - K @ kf.H) @ P
        torch.testing.assert_close(got[b], x + kf.adapter(x), atol=1e-5, rtol=1e-5)


def test_outputs_ignore_padding():
    """More padding, filled with junk, changes no module's output: every module reads real tokens only."""
    model = tiny(REDHEART_TASKS).eval()
    tokens, mask, pooled, _, _ = make_batch(REDHEART_TASKS)
    junk = 5 * torch.randn(tokens.shape[0], 5, tokens.shape[2])
    more_tokens = torch.cat([torch.where(mask[..., None], tokens, 3.0), junk], dim=1)
    more_mask = torch.cat([mask, torch.zeros(mask.shape[0], 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        want = model(tokens, mask, pooled)
        got = model(more_tokens, more_mask, pooled)
    for m in want:
        torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-4, msg=m)


def assert_all_trained(module: nn.Module) -> None:
    dead = [n for n, p in module.named_parameters() if p.grad is None or not bool((p.grad != 0).any())]
    assert not dead, f"parameters with no gradient: {dead}"


def test_code_paths_tiny_leaves_out_train():
    """Self-attention and stacked GRUs in a neural analyzer, Transformer layers in advanced/phase2, head blocks."""
    torch.manual_seed(0)
    tokens, mask, pooled, _, _ = make_batch(REDHEART_TASKS, B=4, T=7)
    neural = NeuralAnalyzer(E, NeuralSize((24, 16), 2, "gru", 8, 2, 2, 16, 16), 8, 2, 3, dropout=0.1)
    summary, message = neural.summarize(tokens, mask)
    neural.predict(summary, message, torch.randn(4, 3, 8)).sum().backward()
    assert_all_trained(neural)
    size = AdvancedSize(d_model=16, n_layers=2, n_heads=2, d_ffn=32, n_experts=2, d_expert=16)
    for module in (AdvancedAnalyzer(E, size, 3, 0.1), Phase2CommunityNetwork(E, size, 3, 0.1)):
        module(tokens, mask, pooled).sum().backward()
        assert_all_trained(module)
    head = TaskHead(HeadSize((16, 24, 16), 2, 16, 2), 3, 0.1)
    head(torch.randn(4, 16)).sum().backward()
    assert_all_trained(head)


def test_mid_preset_trains_every_parameter():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="mid"), REDHEART_TASKS, E)
    tokens, mask, pooled, targets, target_mask = make_batch(REDHEART_TASKS, B=4, T=9)
    losses = module_losses(model(tokens, mask, pooled), targets, target_mask, REDHEART_TASKS)
    total_loss(losses, {}).backward()
    assert_all_trained(model)
