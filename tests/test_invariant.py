"""The repeated-input hoist (psu_export/invariant.py) on captured graphs: what runs once, and
that the graph still computes what the module does."""

from __future__ import annotations

import torch
from torch import nn

from psu_export.invariant import hoist_repeated_inputs

T = 4


class _Repeating(nn.Module):
    """A static image repeated over T, folded into the batch, through per-sample layers; then
    ``tail`` (what follows, on ``[T, B, ...]``)."""

    def __init__(self, tail):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4).eval()
        self.norm.running_mean.uniform_(-0.5, 0.5)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.ramp = nn.Buffer(torch.arange(T, dtype=torch.float32).view(T, 1, 1))
        self.tail = tail

    def forward(self, x):
        folded = x.unsqueeze(0).repeat(T, 1, 1, 1, 1).flatten(0, 1)
        y = torch.relu(self.norm(self.conv(folded))) * 0.5
        y = nn.functional.max_pool2d(y, 2).view(T, x.shape[0], -1)
        return self.tail(self, y)


def _exported(model):
    x = torch.rand(3, 1, 12, 12)
    batch = torch.export.Dim("batch", min=2)
    gm = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module()
    return gm, x


def _hoisted(tail):
    model = _Repeating(tail).eval()
    gm, x = _exported(model)
    before = len(gm.graph.nodes)
    names = hoist_repeated_inputs(gm.graph)
    gm.recompile()
    for batch in (3, 5):
        x = torch.rand(batch, 1, 12, 12)
        torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)
    return names, gm, before


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_per_sample_layers_run_once_on_the_image():
    names, gm, _ = _hoisted(lambda m, y: m.fc(y) + m.ramp)  # the time-dependent add reads the repeat
    assert names == ["conv", "norm", "relu", "mul", "max_pool2d", "fc"], names
    aten = torch.ops.aten
    conv = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default)
    assert conv.args[0].op == "placeholder"  # on x itself, [B, ...], not on T copies
    repeat = next(n for n in gm.graph.nodes if n.target is aten.repeat.default)
    assert repeat.args[0].args[0].target is aten.linear.default  # repeated only where time matters


def test_a_time_dependent_operation_stops_the_hoist():
    # the ramp (one value per step) is added before the linear layer: that layer reads [T, B, ...]
    names, gm, _ = _hoisted(lambda m, y: m.fc(y + m.ramp))
    assert names == ["conv", "norm", "relu", "mul", "max_pool2d"], names
    aten = torch.ops.aten
    linear = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    assert linear.args[0].target is aten.add.Tensor


def test_an_unchanged_graph_when_nothing_runs_once():
    class AddFirst(nn.Module):  # a value per step added to the repeat itself: nothing is the same at every step
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(144, 5)
            self.ramp = nn.Buffer(torch.arange(T, dtype=torch.float32).view(T, 1, 1, 1, 1))

        def forward(self, x):
            return self.fc((x.unsqueeze(0).repeat(T, 1, 1, 1, 1) + self.ramp).flatten(2))

    gm, _ = _exported(AddFirst().eval())
    ops = _ops(gm)
    assert hoist_repeated_inputs(gm.graph) == []
    assert _ops(gm) == ops


def test_a_view_across_samples_reads_the_repeat():
    # rows of 96 cut across samples of 144: the rows are not one [B, ...] value repeated
    names, gm, _ = _hoisted(lambda m, y: y.reshape(-1, 96).sum(-1))
    assert names == ["conv", "norm", "relu", "mul", "max_pool2d"], names
