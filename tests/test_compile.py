"""What ``torch.compile`` would see of each unit's forward: whole graphs, or where they break.

A GPU step is launch-bound; compiling a unit's forward (and so its backward) into few kernels is the way
past that, and it only pays where a unit traces as one graph.  ``torch._dynamo.explain`` traces without
compiling, so this runs on a CPU.  Every unit traces whole except group_b, whose four analyzers' RNNs
pack their rows by length: Dynamo does not trace ``pack_padded_sequence`` (it marks it skipped), so
group_b breaks around each packed RNN call and nowhere else.
"""

import pytest
import torch

from benchmarks.synthetic import synthetic_data
from redheart_tune.config import load_config
from redheart_tune.model.family import build_model
from redheart_tune.model.groups import UNITS
from tests.conftest import REPO


@pytest.fixture(scope="module")
def model_and_inputs():
    data = synthetic_data(8, 24)
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["model.dropout=0.1"])
    model = build_model(cfg.model, data.tasks, data.input_dim).train()
    tokens = torch.randn(6, 24, data.input_dim)
    lengths = torch.tensor([24, 20, 17, 9, 24, 3])
    mask = torch.arange(24)[None, :] < lengths[:, None]
    yield model, (tokens, mask, tokens.mean(1)), lengths
    torch._dynamo.reset()


@pytest.mark.parametrize("unit", UNITS)
def test_each_unit_traces_as_one_graph_but_the_packed_rnns(unit, model_and_inputs):
    model, inputs, lengths = model_and_inputs
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda t, m, p: model.forward_unit(unit, t, m, p, lengths=lengths))(
        *inputs
    )
    reasons = [str(b.reason) for b in explained.break_reasons]
    if unit != "group_b":
        assert explained.graph_break_count == 0, reasons
        assert explained.graph_count == 1
        return
    assert reasons and all("pack_padded_sequence" in r for r in reasons), reasons
