"""Reference BrainCog (0.2.7) models, written the way BrainCog's model zoo writes them.

Factories for ``psu-export`` (random weights, seeded; no download)::

    psu-export convert psu_export.models.ref_braincog:make_mlp_lif out.onnx --input-shape 16 --time-steps 8

* :func:`make_mlp_lif`, :func:`make_mlp_if`, :func:`make_mlp_plif`: ``Linear`` layers and
  one node class, ``forward`` resets the nodes (``n_reset``), loops over ``x[t]`` of a
  ``[T, B, 16]`` input and returns the mean of the per-step outputs, as
  ``braincog.model_zoo``'s networks do (``sum(outputs) / len(outputs)``).
* :func:`make_conv`: the same loop around ``Conv2d`` / ``BatchNorm2d`` / ``MaxPool2d``
  blocks with ``LIFNode``s, input ``[T, B, 1, 16, 16]``.
* :func:`make_zoo_static`: the model zoo's own input path: one image ``[B, 1, 16, 16]``
  repeated over ``step`` steps by the ``direct`` encoder (``einops.repeat``), then read as
  ``inputs[t]`` in the loop; T is fixed.
* :func:`make_layer_by_layer`: ``layer_by_layer=True`` nodes on all steps folded into the
  batch, ``[(T B), ...]``; the model repeats one input ``[B, 16]`` over its ``step`` (BrainCog's
  ``direct`` encoding), so T is fixed.

Import BrainCog's nodes with :func:`import_nodes` (see there: works without torchvision).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

SAMPLE = 16
FRAMEWORK = "braincog"
#: neuron class -> factory of a reference model using it (read by tests/test_meta.py)
REFERENCE_MODELS = {"LIFNode": "make_mlp_lif", "IFNode": "make_mlp_if", "PLIFNode": "make_mlp_plif"}
#: factories whose one-step input is not ``(SAMPLE,)``
SAMPLE_SHAPES = {"make_conv": (1, 16, 16), "make_zoo_static": (1, 16, 16)}


def import_nodes():
    """``braincog.base.node.node``.

    The package ``braincog.base`` imports, in its ``__init__``, BrainCog's brain-area models
    and model zoo, which import torchvision (whose PyPI builds need a multi-GB torch); the
    node module itself needs only torch and einops.  Without torchvision, ``braincog.base``
    is entered as a package whose ``__init__`` is not run (it stays so in this process), and
    the node module and its surrogates are imported from BrainCog's own files.
    """
    name = "braincog.base.node.node"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("torchvision"):
            raise
    import braincog

    spec = importlib.machinery.ModuleSpec("braincog.base", None, is_package=True)
    spec.submodule_search_locations = [str(Path(braincog.__file__).parent / "base")]
    sys.modules["braincog.base"] = importlib.util.module_from_spec(spec)
    return importlib.import_module(name)


@contextlib.contextmanager
def _seeded(seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


class StepLoopNet(nn.Module):
    """``layers`` run on each step ``x[t]``; the output is the mean of the steps' outputs."""

    def __init__(self, layers: nn.Sequential):
        super().__init__()
        self.layers = layers

    def reset(self):
        for module in self.modules():
            if hasattr(module, "n_reset"):
                module.n_reset()

    def forward(self, inputs):
        self.reset()
        outputs = []
        for t in range(inputs.shape[0]):
            outputs.append(self.layers(inputs[t]))
        return sum(outputs) / len(outputs)


def _mlp(node_class, **kwargs) -> StepLoopNet:
    node = import_nodes()
    cls = getattr(node, node_class)
    with _seeded():
        layers = nn.Sequential(nn.Linear(SAMPLE, 32), cls(**kwargs), nn.Linear(32, 10), cls(**kwargs))
        for layer in layers:
            if isinstance(layer, nn.Linear):
                layer.weight.data *= 3.0  # fire in every layer with inputs of unit scale
    return StepLoopNet(layers).eval()


def make_mlp_lif() -> StepLoopNet:
    return _mlp("LIFNode", threshold=0.5, tau=2.0)


def make_mlp_if() -> StepLoopNet:
    return _mlp("IFNode", threshold=1.0)


def make_mlp_plif() -> StepLoopNet:
    return _mlp("PLIFNode", threshold=1.0, tau=3.0)


def make_conv() -> StepLoopNet:
    node = import_nodes()
    with _seeded():
        layers = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), node.LIFNode(threshold=0.5, tau=2.0), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), node.LIFNode(threshold=0.5, tau=2.0), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, 10), node.LIFNode(threshold=0.5, tau=2.0),
        )
        for layer in layers:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                layer.weight.data *= 3.0
    return StepLoopNet(layers).eval()


class ZooStaticNet(StepLoopNet):
    """``braincog.model_zoo``'s forward: ``inputs = self.encoder(inputs)`` (``direct``: the image
    repeated over ``step`` steps), ``self.reset()``, then the step loop over ``inputs[t]``."""

    def __init__(self, layers: nn.Sequential, step: int = 8):
        super().__init__(layers)
        self.step = step

    def forward(self, inputs):
        from einops import repeat

        return super().forward(repeat(inputs, "b c w h -> t b c w h", t=self.step))


def make_zoo_static() -> ZooStaticNet:
    return ZooStaticNet(make_conv().layers).eval()


class LayerByLayerNet(nn.Module):
    """One input ``[B, 16]`` repeated over ``step`` steps and folded into the batch; every
    node takes the ``[(T B), ...]`` of all steps (``layer_by_layer=True``)."""

    def __init__(self, step: int = 8):
        super().__init__()
        node = import_nodes()
        self.step = step
        kwargs = dict(threshold=0.5, tau=2.0, step=step, layer_by_layer=True)
        with _seeded():
            self.layers = nn.Sequential(nn.Linear(SAMPLE, 32), node.LIFNode(**kwargs), nn.Linear(32, 10), node.LIFNode(**kwargs))
            for layer in self.layers:
                if isinstance(layer, nn.Linear):
                    layer.weight.data *= 3.0

    def forward(self, inputs):
        for module in self.modules():
            if hasattr(module, "n_reset"):
                module.n_reset()
        folded = inputs.unsqueeze(0).repeat(self.step, 1, 1).flatten(0, 1)  # [(T B), 16]
        outputs = self.layers(folded).unflatten(0, (self.step, -1))
        return outputs.mean(0)


def make_layer_by_layer() -> LayerByLayerNet:
    return LayerByLayerNet().eval()
