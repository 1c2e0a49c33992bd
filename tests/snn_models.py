"""snnTorch test models, written the way users write them (factories take options)."""

from __future__ import annotations

import torch
from torch import nn

import snntorch as snn

from psu_export.models.ref_mlp import RefStaticMLP

IN, HID, OUT = 12, 24, 5


def _scaled(module: nn.Module, gain: float = 2.5) -> nn.Module:
    """Deterministic weights large enough that every layer fires and resets."""
    torch.manual_seed(1234)
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            nn.init.uniform_(m.weight, -gain / fan_in**0.5, gain / fan_in**0.5)
            nn.init.uniform_(m.bias, -0.2, 0.4)
    return module


class LoopNet(nn.Module):
    """Python loop over x[T, B, IN] threading the membranes (tutorial style)."""

    def __init__(self, neuron1: nn.Module, neuron2: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(IN, HID)
        self.lif1 = neuron1
        self.fc2 = nn.Linear(HID, OUT)
        self.lif2 = neuron2

    def _states(self, lif):
        return list(lif.init_synaptic()) if isinstance(lif, snn.Synaptic) else [lif.init_leaky()]

    def forward(self, x):
        s1, s2 = self._states(self.lif1), self._states(self.lif2)
        spikes, mems = [], []
        for step in range(x.shape[0]):
            out1 = self.lif1(self.fc1(x[step]), *s1)
            spk1, s1 = out1[0], list(out1[1:])
            out2 = self.lif2(self.fc2(spk1), *s2)
            spk2, s2 = out2[0], list(out2[1:])
            spikes.append(spk2)
            mems.append(s2[-1])
        return torch.stack(spikes, dim=0), torch.stack(mems, dim=0)


class HeldStateLoopNet(LoopNet):
    """The neurons called without their state (``spk, mem = self.lif1(cur)``): snnTorch keeps it
    in the module between calls; ``reset_mem`` / ``reset_hidden`` at the start of forward."""

    def forward(self, x):
        for lif in (self.lif1, self.lif2):
            lif.reset_mem()
        spikes, mems = [], []
        for step in range(x.shape[0]):
            spk1 = self.lif1(self.fc1(x[step]))[0]
            spk2, *states = self.lif2(self.fc2(spk1))
            spikes.append(spk2)
            mems.append(states[-1])
        return torch.stack(spikes, dim=0), torch.stack(mems, dim=0)


class FixedLengthLoopNet(LoopNet):
    """Reads ``x[t]`` for a fixed 30 steps, whatever the input's length (a shorter one fails)."""

    steps = 30

    def forward(self, x):
        s1, s2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        spikes = []
        for step in range(self.steps):
            spk1, s1 = self.lif1(self.fc1(x[step]), s1)
            spk2, s2 = self.lif2(self.fc2(spk1), s2)
            spikes.append(spk2)
        return torch.stack(spikes)


def fixed_length_loop() -> nn.Module:
    return _scaled(FixedLengthLoopNet(snn.Leaky(beta=0.8), snn.Leaky(beta=0.7)))


def held_state_loop() -> nn.Module:
    return _scaled(HeldStateLoopNet(snn.Synaptic(alpha=0.6, beta=0.8), snn.Leaky(beta=0.7)))


class BatchFirstLoopNet(LoopNet):
    """The same loop over a batch-first x[B, T, IN] (``x[:, t]``), outputs stacked along dim 1."""

    def forward(self, x):
        s1, s2 = self._states(self.lif1), self._states(self.lif2)
        spikes, mems = [], []
        for step in range(x.size(1)):
            spk1, *s1 = self.lif1(self.fc1(x[:, step]), *s1)
            spk2, *s2 = self.lif2(self.fc2(spk1), *s2)
            spikes.append(spk2)
            mems.append(s2[-1])
        return torch.stack(spikes, dim=1), torch.stack(mems, dim=1)


def batch_first_loop() -> nn.Module:
    return _scaled(BatchFirstLoopNet(snn.Leaky(beta=0.8), snn.Leaky(beta=0.7, reset_mechanism="zero")))


class IteratedLoopNet(LoopNet):
    """``for x_t in x`` (time-first) or ``for x_t in x.unbind(1)`` (batch-first), and the output
    layer's firing rate ``count / x.shape[0]`` (T read from the input after the loop), its
    membranes and its last spikes."""

    def __init__(self, batch_first: bool):
        super().__init__(snn.Leaky(beta=0.8), snn.Leaky(beta=0.7, reset_mechanism="zero"))
        self.batch_first = batch_first

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        count, mems = 0, []
        for x_t in (x.unbind(1) if self.batch_first else x):
            spk1, mem1 = self.lif1(self.fc1(x_t), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            count = count + spk2
            mems.append(mem2)
        return count / x.shape[1 if self.batch_first else 0], torch.stack(mems, dim=1 if self.batch_first else 0), spk2


def iterated_loop(batch_first: bool = False) -> nn.Module:
    return _scaled(IteratedLoopNet(batch_first))


class PreallocatedLoopNet(LoopNet):
    """Spikes written into a buffer made before the loop (``out[t] = spk``, or ``out[:, t]``
    batch-first), a running mean summed in the loop (``acc = acc + mem / x.shape[0]``) and
    the membranes in a record grown by ``torch.cat`` each step."""

    def __init__(self, batch_first: bool):
        super().__init__(snn.Leaky(beta=0.8), snn.Leaky(beta=0.7))
        self.batch_first = batch_first

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        time_dim = 1 if self.batch_first else 0
        out = torch.zeros(x.shape[0], x.shape[1], OUT)
        record = torch.empty(0, x.shape[1 - time_dim], OUT).movedim(0, time_dim)
        acc = 0
        for t in range(x.shape[time_dim]):
            spk1, mem1 = self.lif1(self.fc1(x[:, t] if self.batch_first else x[t]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            if self.batch_first:
                out[:, t] = spk2
            else:
                out[t] = spk2
            acc = acc + mem2 / x.shape[time_dim]
            record = torch.cat((record, mem2.unsqueeze(time_dim)), dim=time_dim)
        return out, acc, record


def preallocated_loop(batch_first: bool = False) -> nn.Module:
    return _scaled(PreallocatedLoopNet(batch_first))


class ReshapedInputNet(LoopNet):
    """``x[T, B, 3, 4]`` flattened before the loop (``x.view(x.size(0), x.size(1), -1)``)."""

    def forward(self, x):
        return super().forward(x.view(x.size(0), x.size(1), -1))


def reshaped_input() -> nn.Module:
    return _scaled(ReshapedInputNet(snn.Leaky(beta=0.8), snn.Leaky(beta=0.7)))


class StepListNet(LoopNet):
    """Returns the per-step spikes as a Python list (one output per step)."""

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        spikes = []
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spikes.append(spk2)
        return spikes


def step_list() -> nn.Module:
    return _scaled(StepListNet(snn.Leaky(beta=0.8), snn.Leaky(beta=0.7)))


class PoissonInputNet(LoopNet):
    """Rate-codes its input in forward (``torch.rand_like(x[t]) < x[t]``): random every run."""

    def forward(self, x):
        return super().forward((torch.rand_like(x) < x).float())


def poisson_input() -> nn.Module:
    return _scaled(PoissonInputNet(snn.Leaky(beta=0.8), snn.Leaky(beta=0.7)))


class Counting(LoopNet):
    """Running sums over the steps inside forward: the output layer's spike count and the sum
    of its membranes (``style``: how the sums start and grow; ``"after"``: Python's ``sum`` of
    the recorded steps after the loop), and the last step's spikes."""

    def __init__(self, style: str):
        super().__init__(snn.Leaky(beta=0.8), snn.Leaky(beta=0.7))
        self.style = style

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        if self.style in ("zeros", "inplace", "feedback"):
            count, total = torch.zeros(x.shape[1], OUT), torch.zeros(x.shape[1], OUT)
        else:
            count, total = 0, 0.5  # a sum that starts from a number other than 0
        spikes, membranes = [], []
        for step in range(x.shape[0]):
            cur1 = self.fc1(x[step])
            if self.style == "feedback":  # the running count feeds the next step: a recurrence
                cur1 = cur1 + 0.1 * count.sum(1, keepdim=True)
            spk1, mem1 = self.lif1(cur1, mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            if self.style == "inplace":
                count += spk2
                total += mem2
            elif self.style == "after":
                spikes.append(spk2)
                membranes.append(mem2)
            else:
                count = count + spk2
                total = total + mem2
        if self.style == "after":
            count, total = sum(spikes), sum(membranes, total)
        return count, total, spk2


def counting(style: str) -> nn.Module:
    return _scaled(Counting(style))


def leaky_loop(**options) -> nn.Module:
    return _scaled(LoopNet(snn.Leaky(**{"beta": 0.8, **options}), snn.Leaky(beta=0.7)))


def synaptic_loop(**options) -> nn.Module:
    return _scaled(LoopNet(snn.Synaptic(**{"alpha": 0.6, "beta": 0.8, **options}), snn.Leaky(beta=0.9)))


def per_channel_beta() -> nn.Module:
    beta = torch.linspace(-0.2, 1.3, HID)  # outside [0, 1] on purpose: snnTorch clamps when used
    threshold = torch.linspace(0.5, 1.5, HID)
    return _scaled(LoopNet(snn.Leaky(beta=beta, threshold=threshold), snn.Leaky(beta=0.7)))


class StaticLoop(RefStaticMLP):
    """A static input [B, IN] fed for num_steps steps (snnTorch tutorial 5 style)."""

    num_steps = 9

    def __init__(self):
        super().__init__(self.num_steps, inputs=IN, hidden=HID, outputs=OUT)


def static_loop() -> nn.Module:
    return _scaled(StaticLoop())


def conv_sequential(**options) -> nn.Module:
    """nn.Sequential with init_hidden neurons; the time loop lives outside (tutorial 7 style)."""
    grad = snn.surrogate.fast_sigmoid(slope=25)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.MaxPool2d(2),
        snn.Leaky(beta=0.6, spike_grad=grad, init_hidden=True, **options),
        nn.Conv2d(6, 8, 3),
        nn.MaxPool2d(2),
        snn.Leaky(beta=0.6, spike_grad=grad, init_hidden=True),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, OUT),
        snn.Leaky(beta=0.6, spike_grad=grad, init_hidden=True, output=True),
    )
    return _scaled(net, gain=3.0)


class ResetEachCall(nn.Module):
    """snnTorch tutorial 7's forward pass: ``utils.reset(net)``, then the net over ``x[T, B, ...]``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        from snntorch import utils

        utils.reset(self.net)
        spikes = []
        for step in range(x.size(0)):
            spk, _mem = self.net(x[step])
            spikes.append(spk)
        return torch.stack(spikes)


def reset_each_call() -> nn.Module:
    return ResetEachCall(conv_sequential())


def synaptic_sequential() -> nn.Module:
    return _scaled(nn.Sequential(nn.Linear(IN, HID), snn.Synaptic(alpha=0.5, beta=0.9, init_hidden=True), nn.Linear(HID, OUT), snn.Leaky(beta=0.5, init_hidden=True)))


def with_inhibition() -> nn.Module:
    return _scaled(LoopNet(snn.Leaky(beta=0.8, inhibition=True), snn.Leaky(beta=0.7)))


def with_state_quant() -> nn.Module:
    return _scaled(LoopNet(snn.Leaky(beta=0.8, state_quant=__import__("snntorch.functional.quant", fromlist=["state_quant"]).state_quant(num_bits=4)), snn.Leaky(beta=0.7)))


def with_rleaky() -> nn.Module:
    class R(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(IN, HID)
            self.rlif = snn.RLeaky(beta=0.8, linear_features=HID)

        def forward(self, x):
            spk, mem = self.rlif.init_rleaky()
            out = []
            for t in range(x.shape[0]):
                spk, mem = self.rlif(self.fc(x[t]), spk, mem)
                out.append(spk)
            return torch.stack(out)

    return R()


class LastStep(nn.Module):
    """Returns only the last step's membrane and spikes (no stacking)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(IN, OUT)
        self.lif = snn.Leaky(beta=0.8)

    def forward(self, x):
        mem = self.lif.init_leaky()
        for t in range(x.shape[0]):
            spk, mem = self.lif(self.fc(x[t]), mem)
        return spk, mem


def last_step() -> nn.Module:
    return _scaled(LastStep())
