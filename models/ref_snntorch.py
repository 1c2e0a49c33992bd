"""Small reference snnTorch (1.0) models, one per neuron class, for the meta-test and quick runs.

Factories for ``psu-export`` (random weights, seeded)::

    psu-export convert psu_export.models.ref_snntorch:make_leaky_loop out.onnx --input-shape 16 --time-steps 8

* :func:`make_leaky_loop`: ``Linear -> Leaky -> Linear -> Leaky`` in a Python loop over
  ``x[T, B, 16]`` with the membranes threaded by hand; returns spikes and membranes.
* :func:`make_synaptic_sequential`: ``nn.Sequential(Linear, Synaptic(init_hidden=True),
  Linear, Synaptic(init_hidden=True, output=True))``, one time step per call ``[B, 16]``
  (psu-export drives time).

The benchmark models are :mod:`~psu_export.models.ref_mlp` and :mod:`~psu_export.models.ref_convnet`.
"""

from __future__ import annotations

import torch
from torch import nn

from .ref_mlp import _seeded

FRAMEWORK = "snntorch"
SAMPLE = 16
#: neuron class -> factory of a reference model using it (read by tests/test_meta.py)
REFERENCE_MODELS = {"Leaky": "make_leaky_loop", "Synaptic": "make_synaptic_sequential"}


class LeakyLoop(nn.Module):
    def __init__(self):
        super().__init__()
        import snntorch as snn

        self.fc1 = nn.Linear(SAMPLE, 32)
        self.lif1 = snn.Leaky(beta=0.9)
        self.fc2 = nn.Linear(32, 10)
        self.lif2 = snn.Leaky(beta=0.8, threshold=0.5)

    def forward(self, x):
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()
        spikes, mems = [], []
        for step in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[step]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spikes.append(spk2)
            mems.append(mem2)
        return torch.stack(spikes), torch.stack(mems)


def make_leaky_loop() -> nn.Module:
    """``Leaky`` neurons in a loop over ``[T, B, 16]`` (input shape 16)."""
    return _seeded(LeakyLoop(), seed=0, gain=3.0)


def make_synaptic_sequential() -> nn.Module:
    """``Synaptic`` neurons with ``init_hidden=True`` in ``nn.Sequential``, one step per call (input shape 16)."""
    import snntorch as snn

    net = nn.Sequential(
        nn.Linear(SAMPLE, 32),
        snn.Synaptic(alpha=0.6, beta=0.85, init_hidden=True),
        nn.Linear(32, 10),
        snn.Synaptic(alpha=0.5, beta=0.8, threshold=0.5, init_hidden=True, output=True),
    )
    return _seeded(net, seed=1, gain=3.0)
