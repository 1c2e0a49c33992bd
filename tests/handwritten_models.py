"""Hand-written LIF loops (no neuron module) for tests/test_handwritten.py.

Each is written the way someone might write it without a framework; ``make_*`` are the
factories psu-export loads (``tests/handwritten_models.py:make_mlp``).
"""

from __future__ import annotations

import torch
from torch import nn


class SpikeFn(torch.autograd.Function):
    """A custom surrogate: Heaviside forward, fast-sigmoid-like backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x > 0).float()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (1 + 10 * x.abs()) ** 2


spike_fn = SpikeFn.apply


class TwoLayerMLP(nn.Module):
    """Subtract reset through a surrogate + detach, then zero reset with ``>=``; returns spikes and membranes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        self.beta, self.thr = 0.9, 1.0

    def forward(self, x):
        v1 = torch.zeros(x.shape[1], 16)
        v2 = torch.zeros(x.shape[1], 4)
        spikes, mems = [], []
        for t in range(x.shape[0]):
            v1 = self.beta * v1 + self.fc1(x[t])
            s1 = spike_fn(v1 - self.thr)
            v1 = v1 - s1.detach() * self.thr
            v2 = self.beta * v2 + self.fc2(s1)
            s2 = (v2 >= self.thr).float()
            v2 = v2 * (1 - s2)
            spikes.append(s2)
            mems.append(v2)
        return torch.stack(spikes), torch.stack(mems)


class BatchFirstMLP(TwoLayerMLP):
    """The same loop over a batch-first ``x[B, T, 8]`` (``x[:, t]``), stacked along dim 1."""

    def forward(self, x):
        return tuple(o.transpose(0, 1) for o in super().forward(x.transpose(0, 1)))


class FiringRate(TwoLayerMLP):
    """``for x_t in x`` and the firing rate ``count / x.shape[0]`` after the loop (with the last spikes)."""

    def forward(self, x):
        v1 = torch.zeros(x.shape[1], 16)
        v2 = torch.zeros(x.shape[1], 4)
        count = torch.zeros(x.shape[1], 4)
        for x_t in x:
            v1 = self.beta * v1 + self.fc1(x_t)
            s1 = (v1 > self.thr).float()
            v1 = v1 - s1 * self.thr
            v2 = self.beta * v2 + self.fc2(s1)
            s2 = (v2 > self.thr).float()
            v2 = v2 - s2 * self.thr
            count = count + s2
        return count / x.shape[0], s2


def leaky_integrate_and_fire(mem, x, w, beta, threshold=1):
    """snnTorch tutorial 2's hand-written LIF, as published: the spike tests the stored membrane."""
    spk = (mem > threshold)
    mem = beta * mem + w * x - spk * threshold
    return spk, mem


class StoredMembraneTest(TwoLayerMLP):
    """Tutorial 2's neuron in a network (``style="tutorial"``: bool spikes, as published;
    ``"float"``: the spike cast first; ``"zero"``: a zero reset; ``"leaky"``: snnTorch ``Leaky``
    rewritten by hand, the reset from the stored membrane and the output spike from the new one;
    ``"carried"``: the same neuron with the spike carried to the next step's reset; ``"stbp"``:
    STBP's (Wu et al. 2018) ``mem = mem * decay * (1 - spike) + x``, the carried spike zeroing
    the stored membrane before the charge)."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        with torch.no_grad():  # every layer fires
            self.fc1.weight.mul_(2.0)
            self.fc2.weight.mul_(2.0)

    def forward(self, x):
        mem1 = torch.zeros(x.shape[1], 16)
        mem2 = torch.zeros(x.shape[1], 4)
        spk1, spk2 = torch.zeros(x.shape[1], 16), torch.zeros(x.shape[1], 4)
        spikes = []
        for t in range(x.shape[0]):
            if self.style == "tutorial":
                spk1, mem1 = leaky_integrate_and_fire(mem1, self.fc1(x[t]), 1.0, self.beta)
                spk2, mem2 = leaky_integrate_and_fire(mem2, self.fc2(spk1.float()), 1.0, self.beta)
            elif self.style == "float":
                spk1 = (mem1 > self.thr).float()
                mem1 = self.beta * mem1 + self.fc1(x[t]) - spk1 * self.thr
                spk2 = (mem2 > self.thr).float()
                mem2 = self.beta * mem2 + self.fc2(spk1) - spk2 * self.thr
            elif self.style == "zero":
                spk1 = (mem1 > self.thr).float()
                mem1 = (self.beta * mem1 + self.fc1(x[t])) * (1 - spk1)
                spk2 = (mem2 > self.thr).float()
                mem2 = (self.beta * mem2 + self.fc2(spk1)) * (1 - spk2)
            elif self.style == "stbp":
                mem1 = mem1 * self.beta * (1.0 - spk1) + self.fc1(x[t])
                spk1 = (mem1 > self.thr).float()
                mem2 = mem2 * self.beta * (1.0 - spk2) + self.fc2(spk1)
                spk2 = (mem2 > self.thr).float()
            elif self.style == "carried":  # the spike of step t - 1 resets step t's charge
                mem1 = self.beta * mem1 + self.fc1(x[t]) - spk1 * self.thr
                spk1 = (mem1 > self.thr).float()
                mem2 = self.beta * mem2 + self.fc2(spk1) - spk2 * self.thr
                spk2 = (mem2 > self.thr).float()
            else:
                reset1 = (mem1 > self.thr).float()
                mem1 = self.beta * mem1 + self.fc1(x[t]) - reset1 * self.thr
                spk1 = (mem1 > self.thr).float()
                reset2 = (mem2 > self.thr).float()
                mem2 = self.beta * mem2 + self.fc2(spk1) - reset2 * self.thr
                spk2 = (mem2 > self.thr).float()
            spikes.append(spk2)
        return torch.stack(spikes), mem2


class WhereResets(nn.Module):
    """Zero resets written with ``torch.where`` / ``masked_fill``: on a float spike's mask,
    on the spike test itself (a second comparison), and spikes made by ``where(v > thr, 1, 0)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 4)
        self.beta, self.thr = 0.85, 1.0

    def forward(self, x):
        v1, v2, v3 = torch.zeros(x.shape[1], 16), torch.zeros(x.shape[1], 12), torch.zeros(x.shape[1], 4)
        spikes, mems = [], []
        for t in range(x.shape[0]):
            v1 = self.beta * v1 + self.fc1(x[t])
            s1 = torch.where(v1 > self.thr, 1.0, 0.0)
            v1 = torch.where(s1 > 0, torch.zeros_like(v1), v1)
            v2 = self.beta * v2 + self.fc2(s1)
            s2 = (v2 > self.thr).float()
            v2 = v2.masked_fill(s2.bool(), 0.0)
            v3 = self.beta * v3 + self.fc3(s2)
            s3 = (v3 > self.thr).float()
            v3 = torch.where(v3 > self.thr, 0.0, v3)
            spikes.append(s3)
            mems.append(v3)
        return torch.stack(spikes), torch.stack(mems)


class InPlaceResets(nn.Module):
    """Resets written in place: ``-=``, ``*=``, ``masked_fill_`` and ``v[mask] = 0`` on a clone;
    the first spike test a ``torch.heaviside`` with a tensor made in ``forward``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fcs = nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 12), nn.Linear(12, 4)])
        self.beta, self.thr = 0.9, 1.0

    def forward(self, x):
        v = [torch.zeros(x.shape[1], fc.out_features) for fc in self.fcs]
        spikes = []
        for t in range(x.shape[0]):
            h = x[t]
            for i, fc in enumerate(self.fcs):
                v[i] = self.beta * v[i] + fc(h)
                # (a tensor made in forward is a lifted constant, detached in place)
                h = torch.heaviside(v[i] - self.thr, torch.tensor(0.0)) if i == 0 else (v[i] > self.thr).float()
                if i == 0:
                    v[i] -= h * self.thr
                elif i == 1:
                    v[i] *= 1 - h
                elif i == 2:
                    v[i].masked_fill_(h.bool(), 0.0)
                else:
                    v[i] = v[i].clone()
                    v[i][h > 0] = 0.0
            spikes.append(h)
        return torch.stack(spikes)


class OddConvNet(nn.Module):
    """Nobody would write it like this: lazy state, per-channel decay buffer, heaviside,
    ``cur + v * decay`` order, a leaky readout with ``1 - 1/tau`` and a Python-float accumulator."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.register_buffer("decay", torch.tensor([0.9, 0.8, 0.7, 0.95]).view(4, 1, 1))
        self.tau = 2.0

    def forward(self, x):
        v, acc = None, 0.0
        u = torch.zeros(x.size(1), 5)
        for t in range(x.size(0)):
            cur = self.c1(x[t])
            v = torch.zeros_like(cur) if v is None else v
            v = cur + v * self.decay
            sp = torch.heaviside(v - 0.5, torch.zeros_like(v))
            v = v - 0.5 * sp
            u = (1 - 1 / self.tau) * u + self.fc(self.pool(sp).flatten(1))
            acc = acc + u
        return acc


class StaticResetFirst(nn.Module):
    """Static input looped ``steps`` times, the reset written *before* the charge, a spike counter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc = nn.Linear(6, 10)
        self.steps = 7

    def forward(self, x):
        v = torch.zeros(x.shape[0], 10)
        s = torch.zeros_like(v)
        count = torch.zeros_like(v)
        for _ in range(self.steps):
            v = v - s * 0.7
            v = 0.8 * v + self.fc(x)
            s = (v > 0.7).float()
            count = count + s
        return count


class TauForm(nn.Module):
    """``v = v + (x - v) / tau`` (SpikingJelly's decay-input charge written by hand), zero reset."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        v = torch.zeros(x.shape[1], 8)
        out = []
        for t in range(x.shape[0]):
            v = v + (self.fc(x[t]) - v) / 2.0
            s = (v > 0.3).float()
            v = v * (1 - s)
            out.append(s)
        return torch.stack(out)


class Recurrent(nn.Module):
    """Recurrent spike feedback: not a recognised neuron (exit 3)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.rec = nn.Linear(8, 8)

    def forward(self, x):
        v = torch.zeros(x.shape[1], 8)
        s = torch.zeros(x.shape[1], 8)
        out = []
        for t in range(x.shape[0]):
            v = 0.9 * v + self.fc(x[t]) + self.rec(s)
            s = (v > 1.0).float()
            v = v - s
            out.append(s)
        return torch.stack(out)


class PreResetReadout(nn.Module):
    """Returns the membrane *before* its reset, which an exact neuron cannot report (exit 3)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        v = torch.zeros(x.shape[1], 8)
        mems = []
        for t in range(x.shape[0]):
            v = 0.9 * v + self.fc(x[t])
            s = (v > 1.0).float()
            mems.append(v)
            v = v - s * 1.0
        return torch.stack(mems)


def make_mlp():
    return TwoLayerMLP()


def make_firing_rate():
    return FiringRate()


def make_tutorial_2():
    return StoredMembraneTest("tutorial")


def make_stored_test_float():
    return StoredMembraneTest("float")


def make_stored_test_zero():
    return StoredMembraneTest("zero")


def make_carried_spike():
    return StoredMembraneTest("carried")


def make_stbp():
    return StoredMembraneTest("stbp")


def make_leaky_by_hand():
    return StoredMembraneTest("leaky")


def make_in_place():
    return InPlaceResets()


def make_where():
    return WhereResets()


def make_conv():
    return OddConvNet()


def make_static():
    return StaticResetFirst()


def make_tau():
    return TauForm()


def make_recurrent():
    return Recurrent()


def make_pre_reset():
    return PreResetReadout()


def make_batch_first():
    return BatchFirstMLP()


class MultiStepLIF(nn.Module):
    """TET's (Deng et al. 2022) ``LIFSpike``: the neuron loops over the time axis of its own
    input ``[B, T, ...]`` (``mem = 0``, ``mem = mem * tau + x[:, t]``, zero reset) and stacks
    its spikes along that axis."""

    def __init__(self, tau: float = 0.5, thresh: float = 1.0):
        super().__init__()
        self.tau, self.thresh = tau, thresh

    def forward(self, x):
        mem, spikes = 0, []
        for t in range(x.shape[1]):
            mem = mem * self.tau + x[:, t, ...]
            spike = spike_fn(mem - self.thresh)
            mem = (1 - spike) * mem
            spikes.append(spike)
        return torch.stack(spikes, dim=1)


class TimeFolded(nn.Module):
    """TET's ``SeqToANNContainer``: a layer run on ``[B * T, ...]``."""

    def __init__(self, *layers):
        super().__init__()
        self.module = nn.Sequential(*layers)

    def forward(self, x):
        y = self.module(x.flatten(0, 1).contiguous())
        return y.view([x.shape[0], x.shape[1], *y.shape[1:]])


class MultiStepNet(nn.Module):
    """Conv / batch-norm / pool layers folded over time between TET ``LIFSpike`` neurons;
    ``repeat``: one image ``[B, 1, 8, 8]`` repeated over ``repeat`` steps (TET's CIFAR
    models), else the sequence ``[B, T, 1, 8, 8]`` (its DVS models)."""

    def __init__(self, repeat: int | None):
        super().__init__()
        torch.manual_seed(0)
        self.repeat = repeat
        with torch.no_grad():
            self.conv = TimeFolded(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6))
            self.conv.module[0].weight.mul_(3.0)
            self.pool = TimeFolded(nn.AvgPool2d(2))
            self.fc = TimeFolded(nn.Linear(6 * 4 * 4, 5))
            self.fc.module[0].weight.mul_(3.0)
        self.lif1, self.lif2 = MultiStepLIF(), MultiStepLIF(tau=0.7)

    def forward(self, x):
        if self.repeat is not None:
            x = x.unsqueeze(1).repeat(1, self.repeat, 1, 1, 1)
        x = self.pool(self.lif1(self.conv(x)))
        return self.lif2(self.fc(torch.flatten(x, 2)))


def make_multi_step_static():
    return MultiStepNet(repeat=5)


def make_multi_step_sequence():
    return MultiStepNet(repeat=None)
