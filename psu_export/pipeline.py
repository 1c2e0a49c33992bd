"""The pipeline, stage by stage: load -> capture -> find -> rewrite -> emit -> verify.

Each stage lives in its own module and hands the next a typed object; this module only
strings them together for the CLI and for library use::

    conversion = prepare("mymodels:make_net", weights="net.pt", input_shape=(1, 28, 28), time_steps=25)
    emitted = conversion.export("out.onnx")
    report = conversion.verify("out.onnx")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from .capture import CapturedGraph, InputLayout, NeuronModule, capture, find_neuron_modules, probe_input_kind, refuse_unconvertible
from .emit import EmittedModel, export_onnx, metadata
from .errors import UsageError
from .find import NeuronSite, TimeLoop, find_sites
from .loading import LoadedModel, load_model
from .rewrite import ParallelModel, rewrite
from .verify import (
    Comparison,
    ParityReport,
    ProviderResult,
    ProviderUnavailable,
    compare_tensors,
    load_data,
    onnx_with_layer_outputs,
    run_onnx,
    run_original,
    run_parallel,
    synthetic_inputs,
)

MODES = ("exact",)


@dataclass
class Conversion:
    """A model captured, re-rolled and rewritten; ready to export and verify."""

    loaded: LoadedModel
    neurons: list[NeuronModule]
    layout: InputLayout
    captured: CapturedGraph
    sites: list[NeuronSite]
    loop: TimeLoop
    parallel: ParallelModel
    mode: str = "exact"

    def export(self, out_path, batch: int = 2) -> EmittedModel:
        example = self.layout.example(batch)
        return export_onnx(self.parallel, example, out_path, metadata(self.parallel, self.loaded.source, self.mode), self.captured.dynamic_batch)

    def inputs(self, data=None, batch: int = 4, time_steps: int | None = None, seed: int = 0):
        """(input, target, description): ``--data`` or seeded synthetic inputs that make neurons fire."""
        if data is not None:
            x, target = load_data(data, self.layout)
            return x, target, f"data:{Path(data).name}"
        if not self.captured.dynamic_batch:
            batch = 2
        steps = time_steps or self.layout.time_steps
        x = synthetic_inputs(self.loaded.module, self.neurons, self.layout, batch, steps, seed)
        return x, None, f"synthetic(seed={seed}, batch={batch}, T={steps})"

    def verify(self, onnx_path, data=None, batch: int = 4, providers=("cpu", "cuda"), required_providers=(), seed: int = 0, extra_time_steps=True, progress=None) -> ParityReport:
        """Compare original, rewrite and ONNX; ``required_providers`` fail when unavailable."""
        check_onnx_matches(onnx_path, self)
        x, target, described = self.inputs(data, batch, seed=seed)
        rewrite_result, provider_results = self._compare(onnx_path, x, providers, required_providers)
        report = ParityReport(
            mode=self.mode,
            time_steps=int(x.shape[0]) if self.layout.kind != "static" else self.layout.time_steps,
            batch=int(x.shape[1] if self.layout.kind != "static" else x.shape[0]),
            inputs=described,
            rewrite=rewrite_result,
            providers=provider_results,
            neuron_sites=[site.to_json() for site in self.sites],
            notes=list(self.captured.notes),
        )
        if extra_time_steps and self.layout.dynamic_time and data is None:
            for steps in sorted({max(1, self.layout.time_steps // 2), self.layout.time_steps * 2 + 1} - {self.layout.time_steps}):
                if progress:
                    progress(f"checking T={steps}")
                x2, _, _ = self.inputs(None, batch, time_steps=steps, seed=seed + steps)
                rw, prov = self._compare(onnx_path, x2, ("cpu",))
                report.extra_checks.append({
                    "time_steps": steps,
                    "passed": rw.passed and all(p.passed for p in prov),
                    "spike_agreement": prov[0].summary()["spike_agreement"] if prov else None,
                    "max_abs_error": prov[0].summary()["max_abs_error"] if prov else None,
                })
        if target is not None:
            report.notes.append(_accuracy_note(self, x, target))
        return report

    def _compare(self, onnx_path, x, providers, required=()):
        time_first = self.layout.kind != "static"
        ref_out, ref_layers = run_original(self.loaded.module, self.neurons, self.layout, x)
        par_out, par_layers = run_parallel(self.parallel, x)
        gaps = self._threshold_gaps()
        rewrite_result = ProviderResult("torch-parallel")
        rewrite_result.outputs = [compare_tensors(f"output{i}", r, p, time_first) for i, (r, p) in enumerate(zip(ref_out, par_out))]
        rewrite_result.layers = [compare_tensors(name, ref_layers[name], par_layers[name], time_first, gaps.get(name)) for name in par_layers if name in ref_layers]
        _excuse_propagated_ties(rewrite_result)
        model_bytes, layer_outputs, n_outputs = onnx_with_layer_outputs(onnx_path)
        results = []
        for provider in providers:
            result = ProviderResult(provider)
            try:
                onnx_out, onnx_layers = run_onnx(model_bytes, layer_outputs, n_outputs, x.numpy(), provider)
            except ProviderUnavailable as exc:
                result.available = False
                # asked for by name: a failure; part of "all": listed as unavailable
                result.error = str(exc) if provider in required else None
                results.append(result)
                continue
            except Exception as exc:  # onnxruntime failed: reported, exit code 4
                result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                results.append(result)
                continue
            if len(onnx_out) != len(ref_out):
                result.error = f"the ONNX model has {len(onnx_out)} outputs, the original {len(ref_out)}"
            result.outputs = [compare_tensors(f"output{i}", r, o, time_first) for i, (r, o) in enumerate(zip(ref_out, onnx_out))]
            result.layers = [compare_tensors(name, ref_layers[name], onnx_layers[name], time_first, gaps.get(name)) for name in onnx_layers if name in ref_layers]
            result.export_layers = [compare_tensors(name, par_layers[name], onnx_layers[name], time_first) for name in onnx_layers if name in par_layers]
            _excuse_propagated_ties(result)
            results.append(result)
        return rewrite_result, results

    def _threshold_gaps(self) -> dict[str, torch.Tensor]:
        """Per layer, |v - threshold| (relative) where v is the value the spike was decided on."""
        gaps = {}
        for site in self.sites:
            spec = site.spec
            if spec.reset_timing == "previous_step" or spec.reset == "none":
                membrane = self.parallel.site_outputs[site.name][1]
                theta = spec.threshold
                gaps[site.name] = (membrane - theta).abs() / torch.clamp(theta.abs(), min=1.0)
        return gaps


def _excuse_propagated_ties(result: ProviderResult) -> None:
    """Output differences caused only by float ties in the layers are ties too."""
    layer_mismatch = sum(c.mismatches for c in result.layers)
    layer_ties = sum(c.float_ties for c in result.layers)
    if layer_ties and layer_mismatch == layer_ties:
        for c in result.outputs:
            if not c.passed:
                c.float_ties = c.mismatches
                c.passed = True


def _accuracy_note(conversion: Conversion, x, target) -> str:
    from .verify import _argmax_classes

    ref_out, _ = run_original(conversion.loaded.module, conversion.neurons, conversion.layout, x)
    classes = _argmax_classes(ref_out[0], conversion.layout.kind != "static")
    if classes is None or classes.shape[0] != target.shape[0]:
        return "target given, but the first output has no per-sample classes"
    accuracy = float((classes == target.long()).float().mean())
    return f"original model accuracy on --data targets: {accuracy:.4f}"


def check_onnx_matches(onnx_path, conversion: Conversion) -> None:
    """Refuse to verify an ONNX file that was not converted from this model."""
    path = Path(onnx_path)
    if not path.is_file():
        raise UsageError(f"The ONNX file {path} does not exist.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UsageError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).") from exc
    meta = {p.key: p.value for p in model.metadata_props}
    if "psu_export.neuron_sites" not in meta:
        raise UsageError(f"{path} was not written by psu-export convert (no psu_export metadata); convert the model first.")
    sites = json.loads(meta["psu_export.neuron_sites"])
    ours = [site.to_json() for site in conversion.sites]
    strip = lambda ss: [{k: s[k] for k in ("name", "source_class", "spec")} for s in ss]  # noqa: E731
    if strip(sites) != strip(ours) or json.loads(meta.get("psu_export.sample_shape", "null")) != list(conversion.layout.sample_shape):
        raise UsageError(
            f"{path} was not converted from this model: its neuron layers or input shape differ "
            f"(file: {[s['name'] for s in sites]}, shape {meta.get('psu_export.sample_shape')}; "
            f"model: {[s['name'] for s in ours]}, shape {list(conversion.layout.sample_shape)}). Convert it again."
        )


def sample_shape_from(input_shape: str | None, data, onnx_path=None) -> tuple[int, ...]:
    """``--input-shape``, or the shape implied by ``--data`` / the ONNX metadata."""
    if input_shape:
        try:
            shape = tuple(int(d) for d in input_shape.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise UsageError(f"--input-shape {input_shape!r} must be comma-separated positive integers, e.g. 1,28,28.") from None
        if not shape or any(d <= 0 for d in shape):
            raise UsageError(f"--input-shape {input_shape!r} must be comma-separated positive integers, e.g. 1,28,28.")
        return shape
    if onnx_path and Path(onnx_path).is_file():
        try:
            meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
            if "psu_export.sample_shape" in meta:
                return tuple(json.loads(meta["psu_export.sample_shape"]))
        except Exception:
            pass
    raise UsageError("--input-shape is required (one time step's sample shape without batch and time, e.g. 1,28,28).")


def prepare(model: "str | torch.nn.Module", weights: str | None = None, input_shape: tuple[int, ...] = (), time_steps: int = 25, trust_model: bool = False, input_kind: str = "auto", progress=None) -> Conversion:
    """Load, capture, find and rewrite: everything before export.

    ``model`` is a MODEL string of the CLI contract or, for library use, a module.
    """
    if time_steps < 1:
        raise UsageError(f"--time-steps must be at least 1 (got {time_steps}).")
    say = progress or (lambda message: None)
    say("loading the model")
    loaded = LoadedModel(model.eval(), f"module:{type(model).__name__}") if isinstance(model, torch.nn.Module) else load_model(model, weights, trust_model)
    neurons = find_neuron_modules(loaded.module)
    refuse_unconvertible(neurons)
    say(f"found {len(neurons)} neuron layers; probing how the model consumes time")
    layout = probe_input_kind(loaded.module, neurons, tuple(input_shape), time_steps, input_kind)
    say(f"input: {layout.kind}, T={layout.time_steps}{'' if layout.dynamic_time else ' (fixed by the model)'}; capturing")
    captured = capture(loaded.module, neurons, layout)
    say("re-rolling the time loop")
    sites, loop = find_sites(captured)
    parallel = rewrite(captured, sites, loop)
    return Conversion(loaded, neurons, layout, captured, sites, loop, parallel)
