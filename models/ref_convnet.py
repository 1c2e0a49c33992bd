"""Reference snnTorch convolutional SNN for the benchmark suite (snnTorch tutorial 6 style).

``x[T, B, 1, 28, 28] -> Conv(1, 12, 5) -> MaxPool 2 -> Leaky -> Conv(12, 64, 5) -> MaxPool 2
-> Leaky -> Linear(64*4*4, 10) -> Leaky``: a Python loop over time threading each layer's
membrane, returning the stacked output spikes and membranes.  Weights are seeded
(untrained, scaled so every layer fires)::

    psu-export bench psu_export.models.ref_convnet:make_net --input-shape 1,28,28

:func:`make_static_net` runs the tutorial's own loop instead: one image ``x[B, 1, 28, 28]``
fed for 50 steps.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .ref_mlp import SequenceInput, StaticInput, _seeded


class RefConvNet(SequenceInput, nn.Module):
    def __init__(self, beta: float = 0.5):
        super().__init__()
        import snntorch as snn

        self.conv1 = nn.Conv2d(1, 12, 5)
        self.lif1 = snn.Leaky(beta=beta)
        self.conv2 = nn.Conv2d(12, 64, 5)
        self.lif2 = snn.Leaky(beta=beta)
        self.fc1 = nn.Linear(64 * 4 * 4, 10)
        self.lif3 = snn.Leaky(beta=beta)

    def forward(self, x):
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()
        mem3 = self.lif3.init_leaky()
        spk3_rec, mem3_rec = [], []
        for step in range(self.time_steps(x)):
            cur1 = F.max_pool2d(self.conv1(self.step_input(x, step)), 2)
            spk1, mem1 = self.lif1(cur1, mem1)
            cur2 = F.max_pool2d(self.conv2(spk1), 2)
            spk2, mem2 = self.lif2(cur2, mem2)
            cur3 = self.fc1(spk2.flatten(1))
            spk3, mem3 = self.lif3(cur3, mem3)
            spk3_rec.append(spk3)
            mem3_rec.append(mem3)
        return torch.stack(spk3_rec, dim=0), torch.stack(mem3_rec, dim=0)


class RefStaticConvNet(StaticInput, RefConvNet):
    """snnTorch tutorial 6's loop: one image ``x[B, 1, 28, 28]`` fed at every step."""

    def __init__(self, num_steps: int, **options):
        super().__init__(**options)
        self.num_steps = num_steps


def make_net() -> RefConvNet:
    """Factory for ``psu-export``: ``psu_export.models.ref_convnet:make_net`` (input shape 1,28,28)."""
    return _seeded(RefConvNet(), gain=3.0)


def make_static_net() -> RefStaticConvNet:
    """Tutorial 6 style: the image fed for 50 steps (input shape 1,28,28; ``--time-steps 50``)."""
    return _seeded(RefStaticConvNet(50), gain=3.0)
