"""Reference Norse (1.1) models, written the way Norse users write them.

Factories for ``psu-export`` (random weights, seeded)::

    psu-export convert psu_export.models.ref_norse:make_sequential_state out.onnx --input-shape 16 --input-kind step

* :func:`make_sequential_state`: ``SequentialState(Linear, LIFCell, Linear, LIFBoxCell)``
  driven one step at a time as ``out, state = model(x_t, state)`` (``--input-kind step``;
  the converter threads the state and stacks ``out`` over time).
* :func:`make_cell_loop`: ``LIFCell`` / ``LIFBoxCell`` called in a Python loop inside
  ``forward`` with the states threaded by hand; input ``[T, B, 16]``.
* :func:`make_lif_sequence`: the sequence module ``LIF`` inside ``SequentialState`` over
  ``[T, B, 16]`` (the model returns spikes and the final states).
* :func:`make_li_readout`: Norse's tutorial classifier, a ``LIFCell`` layer read out by a
  non-spiking ``LICell`` whose voltages are maxed over time (``log_softmax`` of the max);
  :func:`make_li_sequence` the same with the sequence modules ``LIF`` and ``LI``.
* :func:`make_lifted_conv`: ``Lift``-ed convolutions between ``LIF`` and ``LI`` over
  ``[T, B, 1, 16, 16]``.
* :func:`make_box_subtract` / :func:`make_box_value`: ``LIFBoxCell`` with
  ``reset_subtract`` / ``reset_value`` in a cell loop.

Parameters are chosen so that the neurons fire on inputs in [0, 1) within a few steps
(the Norse defaults need currents of order 10).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

SAMPLE = 16
FRAMEWORK = "norse"
#: neuron class -> factory of a reference model using it (read by tests/test_meta.py)
REFERENCE_MODELS = {"LIFCell": "make_cell_loop", "LIFBoxCell": "make_cell_loop", "LIF": "make_lif_sequence",
                    "LICell": "make_li_readout", "LI": "make_li_sequence", "LILinearCell": "make_convnet4"}
#: one step's input shape of the factories that do not take ``SAMPLE`` features
SAMPLE_SHAPES = {"make_convnet4": (1, 16, 16), "make_lifted_conv": (1, 16, 16)}


@contextlib.contextmanager
def _seeded(seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def _lif_p(**kw):
    import norse.torch as nt

    base = dict(tau_syn_inv=torch.as_tensor(200.0), tau_mem_inv=torch.as_tensor(100.0), v_leak=torch.as_tensor(0.0),
                v_th=torch.as_tensor(0.3), v_reset=torch.as_tensor(0.0))
    base.update({k: torch.as_tensor(v) for k, v in kw.items()})
    return nt.LIFParameters(**base)


def _box_p(subtract: bool = False, **kw):
    import norse.torch as nt
    from norse.torch.functional.reset import reset_subtract, reset_value

    base = dict(tau_mem_inv=torch.as_tensor(200.0), v_leak=torch.as_tensor(0.0), v_th=torch.as_tensor(0.5), v_reset=torch.as_tensor(0.0))
    base.update({k: torch.as_tensor(v) for k, v in kw.items()})
    return nt.LIFBoxParameters(**base, reset_method=reset_subtract if subtract else reset_value)


def make_sequential_state() -> nn.Module:
    """``SequentialState`` of cells, driven step by step: ``out, state = model(x_t, state)``."""
    import norse.torch as nt

    with _seeded(0):
        return nt.SequentialState(
            nn.Linear(SAMPLE, 32),
            nt.LIFCell(_lif_p(v_leak=0.05, v_reset=-0.1)),
            nn.Linear(32, 10),
            nt.LIFBoxCell(_box_p(subtract=True)),
        )


class CellLoop(nn.Module):
    """Cells in a loop over ``x[T, B, 16]`` with hand-threaded states; returns output spikes and voltages."""

    def __init__(self, box_subtract: bool = False):
        super().__init__()
        import norse.torch as nt

        self.fc1 = nn.Linear(SAMPLE, 24)
        self.lif = nt.LIFCell(_lif_p(tau_mem_inv=150.0, tau_syn_inv=300.0), dt=1e-3)
        self.fc2 = nn.Linear(24, 10)
        self.box = nt.LIFBoxCell(_box_p(subtract=box_subtract, v_leak=0.02), dt=1e-3)
        with torch.no_grad():  # larger weights, as after training: both layers fire on inputs in [0, 2)
            self.fc1.weight.mul_(3.0)
            self.fc2.weight.mul_(4.0)

    def forward(self, x):
        s1 = s2 = None
        spikes, voltages = [], []
        for t in range(x.shape[0]):
            z1, s1 = self.lif(self.fc1(x[t]), s1)
            z2, s2 = self.box(self.fc2(z1), s2)
            spikes.append(z2)
            voltages.append(s2.v)
        return torch.stack(spikes), torch.stack(voltages)


def make_cell_loop() -> nn.Module:
    with _seeded(1):
        return CellLoop(box_subtract=False)


def make_box_subtract() -> nn.Module:
    with _seeded(2):
        return CellLoop(box_subtract=True)


def make_box_value() -> nn.Module:
    with _seeded(3):
        return CellLoop(box_subtract=False)


def make_lif_sequence() -> nn.Module:
    """The sequence module ``LIF`` over ``[T, B, 16]`` in a ``SequentialState``."""
    import norse.torch as nt

    with _seeded(4):
        return nt.SequentialState(
            nn.Linear(SAMPLE, 32),
            nt.LIF(_lif_p(v_leak=0.02, v_reset=-0.05)),
            nn.Linear(32, 10),
            nt.LIF(_lif_p(tau_mem_inv=80.0)),
        )


class LIReadout(nn.Module):
    """``Linear -> LIFCell -> Linear -> LICell``, the voltages' max over time as class scores."""

    def __init__(self):
        super().__init__()
        import norse.torch as nt

        self.fc1, self.lif = nn.Linear(SAMPLE, 32), nt.LIFCell(_lif_p())
        self.fc2, self.out = nn.Linear(32, 10), nt.LICell(nt.LIParameters(tau_syn_inv=torch.as_tensor(150.0), tau_mem_inv=torch.as_tensor(90.0), v_leak=torch.as_tensor(0.05)))

    def forward(self, x):
        s1 = s2 = None
        voltages = []
        for step in range(x.shape[0]):
            z, s1 = self.lif(self.fc1(x[step]), s1)
            v, s2 = self.out(self.fc2(z), s2)
            voltages.append(v)
        scores, _ = torch.max(torch.stack(voltages), 0)
        return torch.log_softmax(scores, dim=1), torch.stack(voltages)


def make_li_readout() -> nn.Module:
    with _seeded(5):
        return LIReadout()


def make_li_sequence() -> nn.Module:
    """``SequentialState(Linear, LIF, Linear, LI)`` over ``[T, B, 16]``."""
    import norse.torch as nt

    with _seeded(6):
        return nt.SequentialState(nn.Linear(SAMPLE, 32), nt.LIF(_lif_p()), nn.Linear(32, 10), nt.LI())


def make_convnet4() -> nn.Module:
    """Norse's own ``models.conv.ConvNet4`` (its MNIST example network: convolutions, ``LIFCell``
    x 3, an ``LILinearCell`` readout, outputs written into a buffer each step), for
    ``1,16,16`` inputs; weights scaled by 5 so that every layer fires (as after training)."""
    from norse.torch.models.conv import ConvNet4

    with _seeded(7):
        net = ConvNet4(num_channels=1, feature_size=16)
    with torch.no_grad():
        for layer in (net.conv1, net.conv2, net.fc1):
            layer.weight.mul_(5.0)
    return net


def make_lifted_conv() -> nn.Module:
    """``SequentialState`` of ``Lift``-ed convolution, pooling and linear layers (each run on
    every step by Norse's ``Lift``) between the sequence modules ``LIF`` and ``LI``, over
    ``[T, B, 1, 16, 16]``."""
    import norse.torch as nt

    with _seeded(8):
        net = nt.SequentialState(
            nt.Lift(nn.Conv2d(1, 8, 3, padding=1)), nt.LIF(_lif_p()), nt.Lift(nn.MaxPool2d(2)),
            nt.Lift(nn.Flatten()), nt.Lift(nn.Linear(8 * 8 * 8, 10)), nt.LI(),
        )
    with torch.no_grad():
        net[0].lifted_module.weight.mul_(3.0)
    return net


def make_single_cell() -> nn.Module:
    """A bare ``LIFCell`` as the whole model, driven step by step (``--input-kind step``)."""
    import norse.torch as nt

    return nt.LIFCell(_lif_p(v_th=0.1))


class RecurrentModel(nn.Module):
    """Uses ``LIFRecurrentCell``: refused (exit 3) with the reason."""

    def __init__(self):
        super().__init__()
        import norse.torch as nt

        self.cell = nt.LIFRecurrentCell(SAMPLE, 8)

    def forward(self, x):
        s = None
        out = []
        for t in range(x.shape[0]):
            z, s = self.cell(x[t], s)
            out.append(z)
        return torch.stack(out)


def make_recurrent() -> nn.Module:
    with _seeded(5):
        return RecurrentModel()


def make_refractory() -> nn.Module:
    """``LIFRefracCell`` in a ``SequentialState``: refused (exit 3) with the reason."""
    import norse.torch as nt

    with _seeded(6):
        return nt.SequentialState(nn.Linear(SAMPLE, 8), nt.LIFRefracCell())
