"""Meta-test: every neuron class a converter converts has a reference model under models/,
and that model converts with parity against its own framework's sequential run.

Reference models are declared in ``models/ref_*.py``: ``FRAMEWORK`` (the converter's
name), ``SAMPLE`` (one step's input size; ``SAMPLE_SHAPES``: a factory's own shape) and
``REFERENCE_MODELS`` (neuron class -> factory name).  The classes to cover are those with an ``exact`` row in the converter's
coverage (:meth:`FrameworkConverter.coverage`, the README table), which must in turn
name every class of ``neuron_classes()`` for installed frameworks.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

import psu_export.models as models_pkg
from conftest import assert_static_build_matches
from psu_export.converters import EXACT, FrameworkConverter, converters, options_of

TIME_STEPS = 8
#: the module to import to know a framework is installed (skip its models otherwise)
IMPORTS = {"snntorch": "snntorch", "spikingjelly": "spikingjelly.activation_based", "norse": "norse.torch", "nir": "nir", "psu": "psu_export.psu"}


def _reference_modules():
    out = []
    for info in pkgutil.iter_modules(models_pkg.__path__):
        if info.name.startswith("ref_"):
            module = importlib.import_module(f"{models_pkg.__name__}.{info.name}")
            if hasattr(module, "REFERENCE_MODELS"):
                out.append(module)
    return out


REF_MODULES = _reference_modules()


def _references() -> dict[tuple[str, str], tuple[object, str]]:
    """(framework, neuron class) -> (models module, factory name)."""
    out = {}
    for module in REF_MODULES:
        for cls, factory in module.REFERENCE_MODELS.items():
            key = (module.FRAMEWORK, cls)
            assert key not in out, f"{cls} ({module.FRAMEWORK}) has reference models in two modules"
            out[key] = (module, factory)
    return out


def _exact_classes(conv: FrameworkConverter) -> list[str]:
    return list(dict.fromkeys(r.neuron_class for r in conv.coverage() if r.status == EXACT))


def _factories() -> list[tuple[str, object, str, tuple[str, ...]]]:
    """Unique (framework, module, factory, classes it stands for)."""
    grouped: dict[tuple[str, str], list[str]] = {}
    modules = {}
    for (framework, cls), (module, factory) in _references().items():
        grouped.setdefault((framework, factory), []).append(cls)
        modules[(framework, factory)] = module
    return [(fw, modules[(fw, f)], f, tuple(classes)) for (fw, f), classes in grouped.items()]


def test_every_converted_class_has_a_reference_model():
    refs = _references()
    missing, broken = [], []
    for conv in converters():
        for cls in _exact_classes(conv):
            if (conv.name, cls) not in refs:
                missing.append(f"{conv.name}.{cls}")
                continue
            module, factory = refs[(conv.name, cls)]
            if not callable(getattr(module, factory, None)):
                broken.append(f"{conv.name}.{cls}: {module.__name__} has no factory {factory!r}")
    assert not missing, (
        "neuron classes converted exactly (coverage rows) without a reference model: " + ", ".join(missing)
        + ". Add a factory to models/ref_<framework>.py and list it in its REFERENCE_MODELS."
    )
    assert not broken, "; ".join(broken)
    known = {(conv.name, cls) for conv in converters() for cls in _exact_classes(conv)}
    stray = sorted(f"{fw}.{cls}" for fw, cls in refs if (fw, cls) not in known)
    assert not stray, f"REFERENCE_MODELS name classes that no converter converts exactly: {stray}"


@pytest.mark.parametrize("conv", converters(), ids=lambda c: c.name)
def test_registered_classes_are_in_the_coverage(conv):
    """For an installed framework, the registry's classes are the coverage's classes."""
    if not conv.neuron_classes() and not conv.available():
        pytest.skip(f"{conv.name} is not installed")
    rows = conv.coverage()
    names = {r.neuron_class for r in rows}
    if type(conv).coverage_class is FrameworkConverter.coverage_class:  # coverage rows are per Python class
        absent = [c.__name__ for c in conv.neuron_classes() if c.__name__ not in names]
        assert not absent, f"{conv.name}: registered neuron classes missing from coverage(): {absent}"
    refused = {(r.neuron_class, r.reason) for r in rows if r.status != EXACT and r.option == "any"}
    absent = [c.__name__ for c, why in conv.unsupported_classes().items() if (c.__name__, why) not in refused]
    assert not absent, f"{conv.name}: unsupported classes missing from coverage() (or with another reason): {absent}"


@pytest.mark.parametrize("framework, module, factory, classes", _factories(), ids=[f"{fw}-{'+'.join(c)}" for fw, _, _, c in _factories()])
def test_reference_model_converts_with_parity(framework, module, factory, classes, tmp_path):
    pytest.importorskip(IMPORTS.get(framework, framework))
    from psu_export.pipeline import prepare

    model = getattr(module, factory)()
    shape = getattr(module, "SAMPLE_SHAPES", {}).get(factory, (module.SAMPLE,))
    conversion = prepare(model, input_shape=shape, time_steps=TIME_STEPS)
    path = tmp_path / f"{factory}.onnx"
    conversion.export(path)

    # the model really contains the classes it stands for, converted by this framework's converter
    found: dict[str, list] = {}
    for n in conversion.neurons:
        if n.converter.name == framework:
            found.setdefault(n.converter.coverage_class(n.module), []).append(n)
    absent = [c for c in classes if c not in found]
    assert not absent, f"{module.__name__}.{factory} is the reference model of {absent} but has no such neuron (found {sorted(found)})"

    # each neuron's spec is one the coverage rows of its class claim
    conv = next(c for c in converters() if c.name == framework)
    claimed: dict[str, list[dict]] = {}
    for row in conv.coverage():
        if row.status == EXACT and row.spec is not None:
            claimed.setdefault(row.neuron_class, []).append(row.spec)
    for cls in classes:
        for n in found[cls]:
            if cls in claimed:
                assert options_of(n.spec) in claimed[cls], f"{framework}.{cls} {n.name}: spec {options_of(n.spec)} is in no coverage row of the class"

    # the network fires (otherwise parity says little)
    inputs = conversion.inputs(batch=4)
    x, (_, layers) = inputs.x, inputs.reference  # verify's inputs and the original's run on them
    spiking = {n.name for n in conversion.neurons if n.spec is not None and n.spec.reset != "none"}
    rates = {name: float(s.float().mean()) for name, s in layers.items() if name in spiking}
    assert rates and all(r > 0 for r in rates.values()) and any(r < 1 for r in rates.values()), f"firing rates {rates}"

    # parity: the framework's own sequential run vs the rewrite vs onnxruntime (cpu)
    report = conversion.verify(path, providers=("cpu",), extra_time_steps=False)
    summary = report.to_json()
    assert report.passed, f"{framework} {classes} ({module.__name__}.{factory}): parity failed: {summary}"
    assert summary["spike_agreement"] == 1.0, summary
    assert torch.isfinite(torch.tensor(summary["max_abs_error"] or 0.0))

    # the --cuda-graph build (static, every scan unrolled) computes the same floats
    static_path = tmp_path / f"{factory}_static.onnx"
    conversion.export(static_path, batch=int(x.shape[conversion.layout.batch_axis]), cuda_graph=True)
    assert_static_build_matches(path, static_path, x)
