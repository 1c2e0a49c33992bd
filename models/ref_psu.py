"""Small reference models of the project's Parallel Spiking Units (:mod:`psu_export.psu`).

Factories for ``psu-export`` (random weights, seeded)::

    psu-export convert psu_export.models.ref_psu:make_psu_net out.onnx --input-shape 16 --time-steps 8

``Linear -> unit -> Linear -> unit`` over ``[T, B, 16]`` for each unit: :func:`make_psu_net`
(``PSU``, any T), :func:`make_ipsu_net` (``IPSU``, paper form, LIF-initialised) and
:func:`make_rpsu_net` (``RPSU``, ``code_compat=True``); the learned units accept
``T <= MAX_STEPS``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

FRAMEWORK = "psu"
SAMPLE = 16
MAX_STEPS = 16
#: neuron class -> factory of a reference model using it (read by tests/test_meta.py)
REFERENCE_MODELS = {"PSU": "make_psu_net", "IPSU": "make_ipsu_net", "RPSU": "make_rpsu_net"}


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


class UnitNet(nn.Module):
    """``x[T, B, 16] -> Linear -> unit -> Linear -> unit -> [T, B, 10]`` spikes."""

    def __init__(self, make, gain: float = 6.0):
        super().__init__()
        self.fc1, self.n1, self.fc2, self.n2 = nn.Linear(SAMPLE, 24), make(), nn.Linear(24, 10), make()
        self.gain = gain  # larger weights, as after training: both layers fire on inputs in [0, 1)

    def forward(self, x):
        return self.n2(self.fc2(self.n1(self.fc1(x) * self.gain)) * self.gain)


def make_psu_net() -> nn.Module:
    from psu_export.psu import PSU

    with _seeded(0):
        return UnitNet(lambda: PSU(2.0, 0.5)).eval()


def make_ipsu_net() -> nn.Module:
    from psu_export.psu import IPSU

    with _seeded(1):
        return UnitNet(lambda: IPSU(MAX_STEPS, 2.0, 0.5, init="lif")).eval()


def make_rpsu_net() -> nn.Module:
    from psu_export.psu import RPSU

    with _seeded(2):
        return UnitNet(lambda: RPSU(MAX_STEPS, 3.0, 0.5, code_compat=True)).eval()
