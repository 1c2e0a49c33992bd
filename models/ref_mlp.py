"""Reference snnTorch MLP for the benchmark suite (snnTorch tutorial 5 style).

``x[T, B, 784] -> Linear(784, 1000) -> Leaky -> Linear(1000, 10) -> Leaky``, a Python loop
over time threading each layer's membrane, returning the stacked output spikes and
membranes.  Weights are seeded (untrained, scaled so every layer fires); the benchmark
measures speed, and parity is checked bit-exactly by ``psu-export verify``::

    psu-export bench psu_export.models.ref_mlp:make_net --input-shape 784
"""

from __future__ import annotations

import torch
from torch import nn

INPUTS, HIDDEN, OUTPUTS = 784, 1000, 10


class SequenceInput:
    """Mixin for the reference loops: where each step's input comes from, ``x[T, B, ...]``
    here (:class:`StaticInput` feeds one input at every step instead)."""

    def time_steps(self, x) -> int:
        return x.shape[0]

    def step_input(self, x, step: int):
        return x[step]


class RefMLP(SequenceInput, nn.Module):
    def __init__(self, inputs: int = INPUTS, hidden: int = HIDDEN, outputs: int = OUTPUTS, beta: float = 0.95, reset_mechanism: str = "subtract"):
        super().__init__()
        import snntorch as snn

        self.fc1 = nn.Linear(inputs, hidden)
        self.lif1 = snn.Leaky(beta=beta, reset_mechanism=reset_mechanism)
        self.fc2 = nn.Linear(hidden, outputs)
        self.lif2 = snn.Leaky(beta=beta, reset_mechanism=reset_mechanism)

    def forward(self, x):
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()
        spk2_rec, mem2_rec = [], []
        for step in range(self.time_steps(x)):
            cur1 = self.fc1(self.step_input(x, step))
            spk1, mem1 = self.lif1(cur1, mem1)
            cur2 = self.fc2(spk1)
            spk2, mem2 = self.lif2(cur2, mem2)
            spk2_rec.append(spk2)
            mem2_rec.append(mem2)
        return torch.stack(spk2_rec, dim=0), torch.stack(mem2_rec, dim=0)


class StaticInput:
    """Mixin for the reference loops: one input ``x[B, ...]`` fed at every one of ``num_steps``
    steps (T is fixed inside the model, as in snnTorch's tutorials 5 and 6)."""

    num_steps: int

    def time_steps(self, x) -> int:
        return self.num_steps

    def step_input(self, x, step: int):
        return x  # the same input at every step


class RefStaticMLP(StaticInput, RefMLP):
    """snnTorch tutorial 5's network and loop: ``x[B, 784]`` fed to ``fc1`` at every step."""

    def __init__(self, num_steps: int, **sizes):
        super().__init__(**sizes)
        self.num_steps = num_steps


def _seeded(net: nn.Module, seed: int = 0, gain: float = 2.0) -> nn.Module:
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            nn.init.uniform_(m.weight, -gain / fan_in**0.5, gain / fan_in**0.5)
            nn.init.uniform_(m.bias, 0.0, 0.2)
    return net.eval()


def make_net(hidden: int = HIDDEN) -> RefMLP:
    """Factory for ``psu-export``: ``psu_export.models.ref_mlp:make_net`` (input shape 784)."""
    return _seeded(RefMLP(hidden=hidden))


def make_small_net(reset_mechanism: str = "subtract") -> RefMLP:
    """A narrow variant (64 -> 128 -> 10) for quick runs and long-sequence tests (input shape 64)."""
    return _seeded(RefMLP(inputs=64, hidden=128, outputs=10, reset_mechanism=reset_mechanism))


def make_small_reset_free_net() -> RefMLP:
    """The narrow variant without reset (``reset_mechanism="none"``): a linear membrane, closed form."""
    return make_small_net(reset_mechanism="none")


def make_static_net() -> RefStaticMLP:
    """Tutorial 5 as published, 25 steps (input shape 784; ``--time-steps 25``)."""
    return _seeded(RefStaticMLP(25))


def make_static_net_long() -> RefStaticMLP:
    """Tutorial 5 with 256 steps (input shape 784; ``--time-steps 256``)."""
    return _seeded(RefStaticMLP(256))
