"""Reference SpikingJelly (2.0) models, written the way SpikingJelly users write them.

Factories for ``psu-export`` (random weights, seeded; no download)::

    psu-export convert psu_export.models.ref_spikingjelly:make_conv out.onnx --input-shape 1,12,12 --time-steps 8

* :func:`make_conv`: a multi-step (``step_mode='m'``) conv net from ``layer.*`` wrappers
  (Conv2d, BatchNorm2d, MaxPool2d, AvgPool2d, Flatten, Dropout, Linear and a
  ``SeqToANNContainer``) with LIF neurons; input ``[T, B, 1, 12, 12]``.
* :func:`make_mlp` and its named variants (``make_mlp_if_hard`` ...): one neuron class
  and option per factory, in either step mode; input ``[T, B, 16]`` (``'m'``) or a
  single step ``[B, 16]`` driven over time by the converter (``'s'``).
* :func:`make_repeating_csnn`: SpikingJelly's conv Fashion-MNIST tutorial network, which
  repeats one image ``[B, 1, 28, 28]`` over its own T inside ``forward``.
* :func:`make_single_step_loop`: ``step_mode='s'`` neurons called in a Python loop over
  ``x[t]`` inside ``forward`` (``functional.reset_net`` at the start).
* :func:`make_stepwise_layers`: stateless layers run step by step inside a multi-step net,
  through ``layer.MultiStepContainer`` and ``functional.multi_step_forward``; input
  ``[T, B, 1, 12, 12]``.
* :func:`make_sew_resnet18`, :func:`make_spiking_resnet18`, :func:`make_spiking_vgg`:
  model-zoo architectures, multi-step, for ``3,32,32`` inputs.
* :func:`make_spikformer`, :func:`make_spike_driven_transformer`, :func:`make_qkformer`,
  :func:`make_maxformer`: the zoo's spiking vision transformers (LIF neurons, attention over
  spikes), one block (a stage) of 48-64 dimensions, for ``3,32,32`` inputs; :func:`make_plif_mnist_net`: the zoo's ``MNISTNet`` from the
  parametric-LIF paper (``ParametricLIFNode``, batch norm, dropout, voting layer), 8
  channels, for ``1,28,28`` inputs, multi-step or driven step by step.
* :func:`make_lif_fc_mnist`: the network of SpikingJelly's single-layer tutorial
  (``lif_fc_mnist.py``: ``Flatten``, ``Linear(784, 10)``, ``LIFNode(tau=2)``), single-step as
  published (driven over time by the converter) or multi-step, for ``1,28,28`` inputs.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

import torch
from torch import nn

SAMPLE = 16
FRAMEWORK = "spikingjelly"
#: neuron class -> factory of a reference model using it (read by tests/test_meta.py)
REFERENCE_MODELS = {"IFNode": "make_mlp_if_hard", "LIFNode": "make_mlp_lif_soft", "ParametricLIFNode": "make_mlp_plif_soft_step"}


@contextlib.contextmanager
def _seeded(seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def _neuron(kind: str, step_mode: str, v_reset=0.0, decay_input: bool = True, v_threshold: float = 1.0):
    from spikingjelly.activation_based import neuron, surrogate

    common = dict(v_threshold=v_threshold, v_reset=v_reset, surrogate_function=surrogate.ATan(), step_mode=step_mode)
    if kind == "if":
        return neuron.IFNode(**common)
    if kind == "lif":
        return neuron.LIFNode(tau=2.5, decay_input=decay_input, **common)
    if kind == "lif_tau2":  # SpikingJelly's default tau: the step multiplies by 1 / tau (ops.neuron.step_spec)
        return neuron.LIFNode(tau=2.0, decay_input=decay_input, **common)
    if kind == "plif":
        return neuron.ParametricLIFNode(init_tau=3.0, decay_input=decay_input, **common)
    raise ValueError(kind)


class ConvNet(nn.Module):
    """Multi-step conv SNN: ``x[T, B, 1, 12, 12] -> [T, B, 10]`` output spikes."""

    def __init__(self, v_reset=0.0):
        super().__init__()
        from spikingjelly.activation_based import functional, layer

        self.net = nn.Sequential(
            layer.Conv2d(1, 6, 3, padding=1, bias=False),
            layer.BatchNorm2d(6),
            _neuron("lif", "m", v_reset=v_reset),
            layer.MaxPool2d(2),
            layer.SeqToANNContainer(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)),
            _neuron("plif", "m", v_reset=v_reset, v_threshold=0.4),
            layer.AvgPool2d(2),
            layer.Flatten(),
            layer.Dropout(0.2),
            layer.Linear(8 * 3 * 3, 10),
            _neuron("if", "m", v_reset=v_reset),
        )
        functional.set_step_mode(self.net, "m")
        with torch.no_grad():  # a stronger readout, as after training: the output layer spikes
            self.net[0].weight.mul_(3.0)
            self.net[4][0].weight.mul_(2.0)
            self.net[9].weight.mul_(6.0)
        for m in self.modules():  # non-trivial running statistics, as after training
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.net(x)


def make_conv() -> nn.Module:
    with _seeded(0):
        return ConvNet()


def make_conv_soft() -> nn.Module:
    with _seeded(1):
        return ConvNet(v_reset=None)


class RepeatingCSNN(nn.Module):
    """SpikingJelly's conv Fashion-MNIST tutorial network (``CSNN``), multi-step, as published:
    one image ``[B, 1, 28, 28]`` repeated over ``T`` steps inside ``forward``, IF neurons, the
    firing rates ``mean(0)`` out.  ``channels`` is 128 in the tutorial."""

    def __init__(self, time_steps: int = 4, channels: int = 8, gain: float = 3.0):
        super().__init__()
        from spikingjelly.activation_based import functional, layer, neuron, surrogate

        self.T = time_steps
        self.conv_fc = nn.Sequential(
            layer.Conv2d(1, channels, kernel_size=3, padding=1, bias=False),
            layer.BatchNorm2d(channels),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
            layer.MaxPool2d(2, 2),
            layer.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            layer.BatchNorm2d(channels),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
            layer.MaxPool2d(2, 2),
            layer.Flatten(),
            layer.Linear(channels * 7 * 7, channels * 4 * 4, bias=False),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
            layer.Linear(channels * 4 * 4, 10, bias=False),
            neuron.IFNode(surrogate_function=surrogate.ATan()),
        )
        functional.set_step_mode(self, step_mode="m")
        with torch.no_grad():  # as after training: non-trivial running statistics, every layer firing
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                elif isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.mul_(gain)

    def forward(self, x):
        x_seq = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        return self.conv_fc(x_seq).mean(0)


def make_repeating_csnn(time_steps: int = 4, channels: int = 8) -> nn.Module:
    """The tutorial CSNN (input shape ``1,28,28``, no time axis: the model repeats it ``time_steps`` times)."""
    with _seeded(4):
        return RepeatingCSNN(time_steps, channels).eval()


def make_csnn_tutorial() -> nn.Module:
    """The tutorial CSNN at its published size: 128 channels, T = 4."""
    return make_repeating_csnn(4, 128)


def make_csnn_tutorial_long() -> nn.Module:
    """The tutorial CSNN, 128 channels, T = 64 (for benchmarks at a longer T)."""
    return make_repeating_csnn(64, 128)


class MLP(nn.Module):
    """``Linear -> neuron -> Linear -> neuron``; in ``'m'`` over ``[T, B, 16]``, in ``'s'`` one step."""

    def __init__(self, kind: str, step_mode: str, v_reset=0.0, decay_input: bool = True):
        super().__init__()
        from spikingjelly.activation_based import functional, layer

        self.net = nn.Sequential(
            layer.Linear(SAMPLE, 32),
            _neuron(kind, step_mode, v_reset, decay_input),
            layer.Linear(32, 10),
            _neuron(kind, step_mode, v_reset, decay_input, v_threshold=0.5),
        )
        functional.set_step_mode(self.net, step_mode)
        with torch.no_grad():  # larger weights, as after training: both layers fire on inputs in [0, 1)
            self.net[0].weight.mul_(2.0)
            self.net[2].weight.mul_(4.0)

    def forward(self, x):
        return self.net(x)


def make_mlp(kind: str = "lif", step_mode: str = "m", v_reset=0.0, decay_input: bool = True, seed: int = 0) -> nn.Module:
    with _seeded(seed):
        return MLP(kind, step_mode, v_reset, decay_input)


#: named variants, one neuron class / option each: (kind, step_mode, v_reset, decay_input)
VARIANTS = {
    "if_hard": ("if", "m", 0.0, True),
    "if_soft": ("if", "m", None, True),
    "lif_hard": ("lif", "m", 0.0, True),
    "lif_hard_vreset": ("lif", "m", -0.2, True),
    "lif_soft": ("lif", "m", None, True),
    "lif_tau2_hard": ("lif_tau2", "m", 0.0, True),
    "lif_tau2_nodecay_soft": ("lif_tau2", "m", None, False),
    "lif_nodecay_hard": ("lif", "m", 0.0, False),
    "lif_nodecay_soft": ("lif", "m", None, False),
    "plif_hard": ("plif", "m", 0.0, True),
    "plif_soft": ("plif", "m", None, True),
    "plif_nodecay": ("plif", "m", 0.0, False),
    "lif_step": ("lif", "s", 0.0, True),
    "plif_soft_step": ("plif", "s", None, True),
    "if_soft_step": ("if", "s", None, True),
}


def _variant_factory(name: str):
    kind, mode, v_reset, decay_input = VARIANTS[name]

    def factory() -> nn.Module:
        return make_mlp(kind, mode, v_reset, decay_input, seed=len(name))

    factory.__name__ = f"make_mlp_{name}"
    factory.__doc__ = f"MLP with {kind} neurons, step_mode={mode!r}, v_reset={v_reset}, decay_input={decay_input}."
    return factory


for _name in VARIANTS:
    globals()[f"make_mlp_{_name}"] = _variant_factory(_name)


class SingleStepLoop(nn.Module):
    """``step_mode='s'`` neurons called in a loop over time inside ``forward``."""

    def __init__(self):
        super().__init__()
        from spikingjelly.activation_based import layer

        self.fc1 = layer.Linear(SAMPLE, 24)
        self.sn1 = _neuron("lif", "s", v_reset=None, decay_input=False)
        self.fc2 = layer.Linear(24, 10)
        self.sn2 = _neuron("if", "s")

    def forward(self, x):
        from spikingjelly.activation_based import functional

        functional.reset_net(self)
        out = []
        for t in range(x.shape[0]):
            out.append(self.sn2(self.fc2(self.sn1(self.fc1(x[t])))))
        return torch.stack(out)


def make_single_step_loop() -> nn.Module:
    with _seeded(3):
        return SingleStepLoop()


class StepwiseLayers(nn.Module):
    """Multi-step neurons between stateless layers that SpikingJelly runs one step at a time
    (a Python loop over T): ``layer.MultiStepContainer`` and ``functional.multi_step_forward``."""

    def __init__(self):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron

        self.conv = layer.MultiStepContainer(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.sn1 = neuron.LIFNode(step_mode="m")
        self.pool = nn.Sequential(nn.MaxPool2d(2), nn.Flatten())
        self.fc = nn.Linear(8 * 6 * 6, 10)
        self.sn2 = neuron.IFNode(step_mode="m")

    def forward(self, x):
        from spikingjelly.activation_based import functional

        functional.reset_net(self)
        y = self.sn1(self.conv(x))
        y = functional.multi_step_forward(y, self.pool)
        return self.sn2(functional.multi_step_forward(y, [self.fc]))


def make_stepwise_layers() -> nn.Module:
    with _seeded(4):
        net = StepwiseLayers()
        net.conv[0].weight.data *= 3.0
        net.fc.weight.data *= 3.0
    return net.eval()


class FiringRateNet(nn.Module):
    """SpikingJelly's classic ``lif_fc_mnist`` example: one static image, ``T`` single-step
    calls, the output firing rate summed as ``out = f_0`` at step 0 and ``out += f_t``
    after it (``style`` "if_first"), or with step 0 written before the loop
    (``style`` "before_loop", ``out = out + f_t``), then divided by T."""

    def __init__(self, time_steps: int = 8, style: str = "if_first"):
        super().__init__()
        self.time_steps, self.style = time_steps, style
        self.layer = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10, bias=False), _neuron("lif", "s"))

    def forward(self, x):
        if self.style == "if_first":
            for t in range(self.time_steps):
                if t == 0:
                    out_fr = self.layer(x)
                else:
                    out_fr += self.layer(x)
        else:
            out_fr = self.layer(x)
            for _ in range(1, self.time_steps):
                out_fr = out_fr + self.layer(x)
        return out_fr / self.time_steps


def make_firing_rate_net(style: str = "if_first", time_steps: int = 8) -> nn.Module:
    with _seeded(5):
        return FiringRateNet(time_steps, style)


# ----------------------------------------------------------------------------- model zoo


def import_zoo(name: str):
    """Import ``spikingjelly.activation_based.model.<name>``.

    The zoo modules import ``load_state_dict_from_url`` from torchvision at import time
    (only for pretrained downloads).  Without torchvision, that one name is taken from
    ``torch.hub`` (the function torchvision itself re-exports) for the duration of the
    import only; nothing named ``torchvision`` stays behind in ``sys.modules``.
    """
    full = f"spikingjelly.activation_based.model.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("torchvision"):
            raise
    shim = types.ModuleType("torchvision")
    utils = types.ModuleType("torchvision._internally_replaced_utils")
    utils.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    shim._internally_replaced_utils = utils
    names = ("torchvision", "torchvision._internally_replaced_utils")
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(dict(zip(names, (shim, utils))))
    try:
        sys.modules.pop(full, None)
        return importlib.import_module(full)
    finally:
        for n, previous in saved.items():
            if previous is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = previous


def _zoo_kwargs():
    from spikingjelly.activation_based import neuron, surrogate

    return dict(spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(), detach_reset=True)


def _multi_step(net: nn.Module) -> nn.Module:
    from spikingjelly.activation_based import functional

    functional.set_step_mode(net, "m")
    return net


def make_sew_resnet18() -> nn.Module:
    """SEW ResNet-18 (ADD connect function), IF neurons, 10 classes; input ``[T, B, 3, 32, 32]``."""
    zoo = import_zoo("sew_resnet")
    with _seeded(4):
        return _multi_step(zoo.sew_resnet18(pretrained=False, cnf="ADD", num_classes=10, **_zoo_kwargs()))


def make_spiking_resnet18() -> nn.Module:
    """Spiking ResNet-18, IF neurons, 10 classes; input ``[T, B, 3, 32, 32]``."""
    zoo = import_zoo("spiking_resnet")
    with _seeded(5):
        return _multi_step(zoo.spiking_resnet18(pretrained=False, num_classes=10, **_zoo_kwargs()))


def make_spiking_vgg() -> nn.Module:
    """The zoo's ``SpikingVGG`` with a small configuration and classifier; input ``[T, B, 3, 32, 32]``.

    (``spiking_vgg11`` itself has a 25088 x 4096 classifier: too large for a test.)
    """
    from spikingjelly.activation_based import layer, neuron, surrogate

    zoo = import_zoo("spiking_vgg")
    with _seeded(6):
        net = zoo.SpikingVGG([8, "M", 16, "M", 16, "M"], batch_norm=True, num_classes=10, init_weights=True,
                             spiking_neuron=neuron.LIFNode, surrogate_function=surrogate.ATan(), detach_reset=True)
        net.avgpool = layer.AdaptiveAvgPool2d((2, 2))
        net.classifier = nn.Sequential(
            layer.Linear(16 * 2 * 2, 32),
            neuron.LIFNode(surrogate_function=surrogate.ATan()),
            layer.Dropout(),
            layer.Linear(32, 10),
        )
        return _multi_step(_firing(net, gain=2.0, norm_bias=1.0))


def _firing(net: nn.Module, gain: float, norm_bias: float) -> nn.Module:
    """``net`` with its weights scaled by ``gain`` and its batch norms shifted by
    ``norm_bias``, so that the deep layers of an untrained zoo network spike (with the
    default initialisation they stay silent, and a parity check of silence proves little)."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.bias.fill_(norm_bias)
        for param in net.parameters():
            if param.dim() > 1:
                param.mul_(gain)
    return net


def make_spikformer() -> nn.Module:
    """The zoo's ``Spikformer``, one block of 64 dimensions and 4 heads over 4 x 4 patches; its
    ``forward`` takes ``[T, B, 3, 32, 32]`` (a ``[B, 3, 32, 32]`` image is repeated over its T)."""
    zoo = import_zoo("spikformer")
    with _seeded(7):
        return _firing(zoo.Spikformer(T=4, in_channels=3, img_size_h=32, img_size_w=32, patch_size=4, num_classes=10,
                                      embed_dims=64, num_heads=4, depths=1), gain=2.0, norm_bias=1.0)


def make_spike_driven_transformer() -> nn.Module:
    """The zoo's ``SpikeDrivenTransformer`` (v1), one block of 64 dimensions and 4 heads; input
    ``[T, B, 3, 32, 32]``."""
    zoo = import_zoo("spike_driven_transformer")
    with _seeded(8):
        return _firing(zoo.SpikeDrivenTransformer(T=4, in_channels=3, num_classes=10, embed_dims=64, num_heads=4, depths=1),
                       gain=2.0, norm_bias=0.5)


def make_qkformer() -> nn.Module:
    """The zoo's hierarchical ``QKFormer`` (Q-K attention), 48 dimensions, one block a stage;
    input ``[T, B, 3, 32, 32]``."""
    zoo = import_zoo("qkformer")
    with _seeded(10):
        return _firing(zoo.QKFormer(T=4, in_channels=3, num_classes=10, embed_dims=48, num_heads=(1, 2, 2), depths=(1, 1, 1)),
                       gain=2.0, norm_bias=1.0)


def make_maxformer() -> nn.Module:
    """The zoo's ``MaxFormer`` in its CIFAR configuration, 48 dimensions, one block a stage;
    input ``[T, B, 3, 32, 32]``."""
    zoo = import_zoo("maxformer")
    with _seeded(10):
        return _firing(zoo.MaxFormer(T=4, in_channels=3, num_classes=10, embed_dims=48, depths=(1, 1, 1), cifar=True),
                       gain=2.0, norm_bias=0.5)


def make_plif_mnist_net(step_mode: str = "m") -> nn.Module:
    """The zoo's ``parametric_lif_net.MNISTNet`` with 8 channels, ``ParametricLIFNode``s;
    ``step_mode`` ``'m'``: input ``[T, B, 1, 28, 28]``, ``'s'``: one step ``[B, 1, 28, 28]``."""
    from spikingjelly.activation_based import functional, neuron, surrogate

    zoo = import_zoo("parametric_lif_net")
    with _seeded(9):
        net = zoo.MNISTNet(channels=8, spiking_neuron=neuron.ParametricLIFNode, surrogate_function=surrogate.ATan(), detach_reset=True)
    _firing(net, gain=4.0, norm_bias=1.0)
    functional.set_step_mode(net, step_mode)
    return net


def make_plif_mnist_net_step() -> nn.Module:
    """:func:`make_plif_mnist_net` in single-step mode (``[B, 1, 28, 28]`` a step)."""
    return make_plif_mnist_net("s")


def make_lif_fc_mnist(step_mode: str = "s") -> nn.Module:
    """The single-layer tutorial's network (``examples/lif_fc_mnist.py``): ``Flatten``,
    ``Linear(784, 10, bias=False)``, ``LIFNode(tau=2.0)`` with its ``ATan`` surrogate;
    ``step_mode`` ``'s'`` as published (one ``[B, 1, 28, 28]`` step per call), ``'m'`` for
    ``[T, B, 1, 28, 28]``.  Weights scaled so that the random-init layer fires."""
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    with _seeded(11):
        net = nn.Sequential(layer.Flatten(), layer.Linear(28 * 28, 10, bias=False),
                            neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()))
    with torch.no_grad():
        net[1].weight.mul_(4.0)
    functional.set_step_mode(net, step_mode)
    return net


def make_lif_fc_mnist_multi_step() -> nn.Module:
    """:func:`make_lif_fc_mnist` in multi-step mode (``[T, B, 1, 28, 28]``)."""
    return make_lif_fc_mnist("m")
