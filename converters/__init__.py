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

import contextlib
import importlib
import importlib.metadata
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import torch

from psu_export.spec import NeuronSpec


def is_step_function(fn, compare: str) -> bool:
    """Whether ``fn``'s forward is the Heaviside step a spec's ``compare`` assumes:
    1 where ``x > 0`` (``"gt"``) or ``x >= 0`` (``"ge"``), else 0 (probed at and around 0)."""
    probe = torch.tensor([-1.0, -1e-7, 0.0, 1e-7, 1.0, 3.0])
    expected = torch.tensor([0.0, 0.0, 1.0 if compare == "ge" else 0.0, 1.0, 1.0, 1.0])
    try:
        with torch.no_grad():
            out = fn(probe.clone())
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and torch.equal(out.float(), expected)


def classes_by_name(module, table) -> dict[type, str]:
    """``{class: reason}`` for the ``(class name, reason)`` rows of ``table`` that ``module``
    (a framework's namespace, or ``None`` when it is not installed) defines."""
    if module is None:
        return {}
    found = {name: getattr(module, name, None) for name, _ in table}
    return {found[name]: why for name, why in table if isinstance(found[name], type)}


def scalar_param(value, what: str, problems: list[str]) -> float:
    """``value`` (a number or a one-element tensor) as a float; a non-scalar or non-finite value
    appends its reason to ``problems`` (the converter then refuses the module with all of them)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            problems.append(f"a non-scalar {what} is not supported")
            return 0.0
        value = float(value.detach())
    value = float(value)
    if not math.isfinite(value):
        problems.append(f"{what} = {value} is not finite")
    return value


def step_with_held_state(module: torch.nn.Module, call: Callable, x) -> list:
    """One step of a neuron that keeps its state inside the module between calls: the capture
    op ``call`` on ``x`` with the state ``module._psu_state`` (emptied by the converter's
    ``reset_state``), which the returned states then replace; returns ``[spikes, *states]``."""
    outs = call(x, module._psu_state)
    module._psu_state = list(outs[1:])
    return outs


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
    #: False for a non-spiking integrator (Norse ``LICell``): the module returns its membrane,
    #: so parity compares its outputs, not per-layer spikes
    returns_spikes: bool = True


EXACT = "exact"
UNSUPPORTED = "unsupported"


def spec_options(reset: str, reset_timing: str = "same_step", compare: str = "gt", charge: str = "leaky",
                 reset_form: str = "standard", zero_scope: str = "membrane", two_state: bool = False,
                 spike_from: str = "updated") -> dict:
    """The discrete options of a :class:`NeuronSpec` (no parameters), as coverage rows state them.

    :func:`options_of` gives the same dict for a real spec, so a row's claim can be checked
    against the spec ``to_spec`` really returns (``tests/test_meta.py``).
    """
    out = {"reset": reset, "reset_timing": reset_timing, "compare": compare, "charge": charge,
           "reset_form": reset_form, "two_state": bool(two_state)}
    if reset == "zero":
        out["zero_scope"] = zero_scope
    if spike_from != "updated":
        out["spike_from"] = spike_from
    return out


def options_of(spec: NeuronSpec) -> dict:
    """:func:`spec_options` of a real spec."""
    return spec_options(spec.reset, spec.reset_timing, spec.compare, spec.charge, spec.reset_form, spec.zero_scope, spec.two_state,
                        spec.spike_from)


class CoverageRow(NamedTuple):
    """One row of the coverage table (:mod:`psu_export.coverage`): a neuron class with one option.

    ``status`` is :data:`EXACT` (converted bit for bit) or :data:`UNSUPPORTED` (refused, with
    ``reason``: the message the converter gives).  ``spec``: for exact rows, the discrete
    :class:`NeuronSpec` options (:func:`spec_options`) ``to_spec`` returns for that option,
    from which the table derives which ``--reset`` algorithm applies; ``None`` when the
    option does not decide them.
    """

    neuron_class: str
    option: str
    status: str
    reason: str = ""
    spec: dict | None = None


def exact(neuron_class: str, option: str, spec: dict | None = None) -> CoverageRow:
    return CoverageRow(neuron_class, option, EXACT, "", spec)


def unsupported(neuron_class: str, option: str, reason: str) -> CoverageRow:
    return CoverageRow(neuron_class, option, UNSUPPORTED, reason, None)


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

    def coverage(self) -> list[CoverageRow]:
        """What this converter handles, class by class and option by option (README's coverage table).

        Override it with rows written from the code of :meth:`to_spec` and with the class
        names known statically, so the table does not depend on which frameworks are
        installed.  This default lists the installed classes only, one row each.
        """
        rows = [exact(cls.__name__, "all options") for cls in self.neuron_classes()]
        rows += [unsupported(cls.__name__, "any", why) for cls, why in self.unsupported_classes().items()]
        return rows

    def coverage_class(self, module: torch.nn.Module) -> str:
        """The ``neuron_class`` of the coverage rows that ``module`` falls under."""
        return type(module).__name__

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

    @contextlib.contextmanager
    def tracing_scope(self, model: torch.nn.Module):
        """While ``model`` is traced (``torch.export``): keep the framework's process-wide state
        of other models out of reach (snnTorch's reset utilities walk every neuron ever built)."""
        yield

    @contextlib.contextmanager
    def capture_scope(self, model: torch.nn.Module):
        """While psu-export captures ``model`` (not while the naive baseline is exported): run the
        framework's own Python loops over time that are not neurons (Norse ``Lift``,
        SpikingJelly ``multi_step_forward``) on all steps at once, so that the capture keeps T
        variable."""
        yield

    def consumes_sequence(self, module: torch.nn.Module) -> bool:
        """True when ``module`` takes the whole ``[T, B, ...]`` sequence in one call (multi-step)."""
        return False

    def as_sequence(self, module: torch.nn.Module, value: torch.Tensor) -> torch.Tensor:
        """The input or output of one whole-sequence call (:meth:`consumes_sequence`) as
        ``[T, B, ...]``, the layout of the capture op (BrainCog's ``layer_by_layer`` nodes
        take time folded into the batch, ``[(T B), ...]``)."""
        return value

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


_CONVERTER_MODULES = ("snntorch", "spikingjelly", "norse", "braincog", "psu", "nir")
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
