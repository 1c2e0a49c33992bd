"""Framework converters: one file per framework, all registered in :data:`REGISTRY`.

A converter knows, for the neuron classes of one framework:

* how to describe a module as a :class:`~psu_export.spec.NeuronSpec` (or why it cannot);
* how its ``forward`` passes state in and out (:class:`CallConvention`), so capture can
  replace the neuron by one opaque call whose data flow is visible;
* how to reset its state before capture.

Add a framework by writing ``converters/<framework>.py`` with a :class:`FrameworkConverter`
subclass and listing it in :data:`_CONVERTER_MODULES`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from psu_export.spec import NeuronSpec


class Unsupported(Exception):
    """A neuron module that cannot be converted faithfully; the message says why."""


@dataclass(frozen=True)
class CallConvention:
    """How one neuron call's tensors map to the capture op.

    The capture op takes ``(input, states)`` and returns ``[spikes, *new_states]`` with
    states in ``state_roles`` order (roles: ``"membrane"``, ``"current"``).
    ``forward(call)`` builds the replacement for ``module.forward`` given ``call``, the
    function that performs the opaque call.

    ``sequence``: the module consumes the whole sequence ``[T, B, ...]`` in one call
    (SpikingJelly ``step_mode='m'``, Norse ``LIF``); the op then takes the sequence and
    returns every output stacked over time (states included: ``[T, B, ...]``).
    """

    state_roles: tuple[str, ...]
    forward: Callable[[Callable], Callable]
    sequence: bool = False
    #: sequence modules with learned T x T matrices (IPSU, RPSU): the longest T they accept
    max_time_steps: int | None = None


class FrameworkConverter:
    """Base class of a framework converter."""

    #: short framework name, e.g. ``"snntorch"``
    name: ClassVar[str]
    #: importable module / pip distribution
    import_name: ClassVar[str]
    #: supported versions, as a pip specifier
    version_range: ClassVar[str]

    def neuron_classes(self) -> tuple[type, ...]:
        """Classes this converter handles (``()`` when the framework is not installed)."""
        raise NotImplementedError

    def unsupported_classes(self) -> dict[type, str]:
        """Neuron classes of the framework that are recognised but cannot be converted, with why."""
        return {}

    def to_spec(self, module: torch.nn.Module) -> NeuronSpec:
        """The exact spec of ``module``; raise :class:`Unsupported` with a reason otherwise."""
        raise NotImplementedError

    def call_convention(self, module: torch.nn.Module) -> CallConvention:
        raise NotImplementedError

    def site_kernel(self, module: torch.nn.Module):
        """Modules with their own parallel dynamics (the PSU family): ``(Algorithm, ResetOptions,
        {param: tensor})`` run by the ``psu::reset_neuron`` op; ``None`` (the default): the
        kernels follow the module's :class:`NeuronSpec`."""
        return None

    def reset_state(self, module: torch.nn.Module) -> None:
        """Forget state left over from earlier calls (so it is not baked in as a constant)."""

    def consumes_sequence(self, module: torch.nn.Module) -> bool:
        """True when ``module`` takes the whole ``[T, B, ...]`` sequence in one call (multi-step)."""
        return False

    def threads_state(self, model: torch.nn.Module) -> bool:
        """True when the top-level ``model`` is driven one step at a time as
        ``out, state = model(x_t, state)`` (e.g. Norse ``SequentialState``): the step
        driver then passes the returned state back in and stacks only ``out``."""
        return False

    def initial_state(self, module: torch.nn.Module, role: str, value: torch.Tensor, step_input: torch.Tensor) -> torch.Tensor | None:
        """The initial state the framework really uses when ``value`` is passed in for ``role``.

        ``None`` means the spec's default (``v_init`` / ``i_init``).
        """
        return value

    # -- availability -----------------------------------------------------------------
    def installed_version(self) -> str | None:
        try:
            return importlib.metadata.version(self.import_name)
        except importlib.metadata.PackageNotFoundError:
            return None

    def available(self) -> bool:
        try:
            importlib.import_module(self.import_name)
        except Exception:
            return False
        return True


_CONVERTER_MODULES = ("snntorch", "spikingjelly", "norse", "psu", "nir")
REGISTRY: dict[str, FrameworkConverter] = {}


def register(converter: FrameworkConverter) -> FrameworkConverter:
    """Register a converter; a second converter under the same name is an error."""
    if converter.name in REGISTRY:
        raise ValueError(f"a converter named {converter.name!r} is already registered")
    REGISTRY[converter.name] = converter
    return converter


def _load_all() -> None:
    for mod in _CONVERTER_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


_LOADED = False


def converters() -> list[FrameworkConverter]:
    # load every listed module once, even when one was imported directly before (which
    # fills REGISTRY with that converter alone)
    global _LOADED
    if not _LOADED:
        _load_all()
        _LOADED = True
    return list(REGISTRY.values())


def find_converter(module: torch.nn.Module) -> tuple[FrameworkConverter, str | None] | None:
    """The converter for ``module`` and, when the class is known but unconvertible, the reason.

    ``None`` when ``module`` is not a neuron of any registered framework.
    """
    for conv in converters():
        unsupported = conv.unsupported_classes()
        for cls, why in unsupported.items():
            if type(module) is cls:
                return conv, why
        if isinstance(module, conv.neuron_classes()):
            return conv, None
    return None
