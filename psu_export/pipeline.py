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

import onnx
import torch

from .capture import CapturedGraph, InputLayout, NeuronModule, capture, counting_calls, find_neuron_modules, probe_input_kind, refuse_unconvertible
from .cuda_graph import STATIC_KEY
from .emit import EmittedModel, export_onnx, metadata
from .errors import UsageError, one_line
from .find import NeuronSite, TimeLoop, find_sites, mark_time_length_args
from .loading import LoadedModel, load_model
from .rewrite import ParallelModel, rewrite
from .verify import (
    NearThreshold,
    ParityReport,
    ProviderResult,
    ProviderUnavailable,
    compare_tensors,
    load_data,
    near_threshold,
    onnx_with_layer_outputs,
    run_onnx,
    run_original,
    run_parallel,
    synthetic_example,
    synthetic_inputs,
)

#: ``--reset`` modes (DESIGN.md section 3): exact; psu = the paper's probabilistic reset;
#: stochastic = Bernoulli samples of it from the seeded hash RNG
MODES = ("exact", "psu", "stochastic")

#: the length of the example a dynamic-T export traces: T is a symbol in the trace, so any
#: length but 0 and 1 (which torch.export specialises) gives the same graph, and the user's T
#: (627 MB of example for a 784-input MLP at T = 100,000, batch 2) would only cost memory
EXPORT_EXAMPLE_STEPS = 16


@dataclass
class VerifyInputs:
    """The inputs of one parity check: ``--data`` (with its targets) or synthetic, and the
    original's :func:`~psu_export.verify.run_original` on them (synthetic inputs come with
    it, being chosen by running it; verify runs it on ``--data``), then the rewrite's outputs
    on them (``Conversion._compare`` sets them)."""

    x: torch.Tensor
    target: torch.Tensor | None
    described: str
    reference: tuple | None = None
    rewritten: tuple | None = None


@dataclass(frozen=True)
class CheckInputs:
    """The inputs of the parity check that is to follow a conversion (``convert``, ``verify``):
    the ``--data`` file, or synthetic ones of this seed and batch (None: :func:`synthetic_batch`
    of T)."""

    data: str | None = None
    seed: int = 0
    batch: int | None = None


@dataclass
class CheckRun:
    """The original's run at full length on a check's inputs (the synthetic ones unscaled):
    made by the probe to confirm a long sequence's loop, then the check's reference run (at
    T = 100,000 a Python loop takes minutes; :func:`prepare`)."""

    layout: InputLayout
    check: CheckInputs
    x: torch.Tensor
    target: torch.Tensor | None
    reference: tuple

    def matches(self, data, batch: int, steps: int, seed: int) -> bool:
        """Whether these are the inputs :meth:`Conversion.inputs` is asked for."""
        if data is not None or self.check.data is not None:
            return data == self.check.data
        return (self.x.shape[self.layout.batch_axis], self.check.seed, self.layout.time_steps) == (batch, seed, steps)


@dataclass
class Conversion:
    """A model captured, re-rolled and rewritten; ready to export and verify.

    ``check_run``: the probe's run on the parity check's inputs, until :meth:`inputs` takes it."""

    loaded: LoadedModel
    neurons: list[NeuronModule]
    layout: InputLayout
    captured: CapturedGraph
    sites: list[NeuronSite]
    loop: TimeLoop
    parallel: ParallelModel
    mode: str = "exact"
    seed: int = 0
    check_run: CheckRun | None = None

    def export(self, out_path, batch: int = 2, extra_metadata: dict[str, str] | None = None, cuda_graph: bool = False,
               row_blocks: bool = True) -> EmittedModel:
        """Write the ONNX file; ``cuda_graph``: a static build for batch ``batch`` and this T
        (:mod:`psu_export.cuda_graph`); ``row_blocks``: see :func:`~psu_export.emit.export_onnx`."""
        if cuda_graph and not self.captured.dynamic_batch and batch != 2:
            raise UsageError(f"--batch {batch}: this model was captured with its batch fixed at 2 ({'; '.join(self.captured.notes)}); "
                             "build it with --batch 2.")
        steps = self.layout.time_steps if cuda_graph or not self.layout.dynamic_time else min(self.layout.time_steps, EXPORT_EXAMPLE_STEPS)
        example = self.layout.example(batch, steps)
        meta = dict(metadata(self.parallel, self.loaded.source, self.mode), **(extra_metadata or {}))
        if self.mode != "exact":
            meta["psu_export.reset_seed"] = str(self.seed)
            meta["psu_export.reset_estimate"] = json.dumps(self.reset_estimate())
        return export_onnx(self.parallel, example, out_path, meta, self.captured.dynamic_batch, static=cuda_graph, row_blocks=row_blocks)

    # -- approximate reset modes ---------------------------------------------------------
    def estimate_sites(self) -> list[int]:
        """Indices of the sites whose reset is estimated (``--reset psu|stochastic``)."""
        return [i for i, s in enumerate(self.sites) if s.algorithm.name in ("probabilistic_reset", "stochastic_reset")]

    def reset_estimate(self) -> dict[str, dict[str, float]]:
        """Per estimated layer, the probability's scale and offset ``a``, ``b`` of ``sigmoid(a u + b)``."""
        out = {}
        for i in self.estimate_sites():
            out[self.sites[i].name] = {
                "prob_scale": float(getattr(self.parallel, f"site{i}_prob_scale")),
                "prob_offset": float(getattr(self.parallel, f"site{i}_prob_offset")),
            }
        return out

    def set_reset_estimate(self, estimate: dict[str, dict[str, float]]) -> None:
        """Load ``a``, ``b`` per layer (from calibration or from a file's metadata)."""
        by_name = {self.sites[i].name: i for i in self.estimate_sites()}
        for name, values in estimate.items():
            if name not in by_name:
                raise UsageError(f"calibration names layer {name!r}, which has no estimated reset in this conversion")
            for key in ("prob_scale", "prob_offset"):
                getattr(self.parallel, f"site{by_name[name]}_{key}").fill_(float(values[key]))

    def inputs(self, data=None, batch: int = 4, time_steps: int | None = None, seed: int = 0) -> VerifyInputs:
        """``--data`` or seeded synthetic inputs that make neurons fire (with the original's run
        on them; the probe's, :attr:`check_run`, when it ran on these inputs)."""
        kept, self.check_run = self.check_run, None  # taken by the first check (its records go after it)
        if not self.captured.dynamic_batch:
            batch = 2
        steps = time_steps or self.layout.time_steps
        if kept and not kept.matches(data, batch, steps, seed):
            kept = None
        if data is not None:
            x, target = (kept.x, kept.target) if kept else load_data(data, self.layout)
            return VerifyInputs(x, target, f"data:{Path(data).name}", kept.reference if kept else None)
        x, reference = synthetic_inputs(self.loaded.module, self.neurons, self.layout, batch, steps, seed, kept and (kept.x, kept.reference))
        return VerifyInputs(x, None, f"synthetic(seed={seed}, batch={batch}, T={steps})", reference)

    def verify(self, onnx_path, data=None, batch: int | None = None, providers=("cpu", "cuda"), required_providers=(), seed: int = 0, extra_time_steps=True, progress=None, raster=None) -> ParityReport:
        """Compare original, rewrite and ONNX; ``required_providers`` fail when unavailable.

        ``batch``: of the synthetic inputs (default :func:`synthetic_batch`; a ``--cuda-graph``
        build's own batch).

        ``raster``: also write a PNG spike raster of the original vs onnxruntime (CPU).
        """
        static = static_input_shape(check_onnx_matches(onnx_path, self))
        if static is not None:  # a --cuda-graph build runs at its own batch and T only
            batch, extra_time_steps = self._static_batch(static, onnx_path, batch), False
        batch = batch or synthetic_batch(self.layout.time_steps)
        inputs = self.inputs(data, batch, seed=seed)
        x = inputs.x
        if static is not None and tuple(x.shape) != static:
            raise UsageError(f"{onnx_path} is a --cuda-graph build for inputs of shape {list(static)}; the --data input is {list(x.shape)}.")
        if inputs.reference is None:  # --data: the original has not run on them yet
            inputs.reference = run_original(self.loaded.module, self.neurons, self.layout, x)
        if raster:
            self.write_raster(onnx_path, inputs, raster)
        rewrite_result, provider_results = self._compare(onnx_path, inputs, providers, required_providers, cuda_graph=static is not None)
        report = ParityReport(
            mode=self.mode,
            time_steps=self.layout.time_steps if self.layout.time_axis is None else int(x.shape[self.layout.time_axis]),
            batch=int(x.shape[self.layout.batch_axis]),
            inputs=inputs.described,
            rewrite=rewrite_result,
            providers=provider_results,
            neuron_sites=[site.to_json() for site in self.sites],
            notes=list(self.captured.notes) + (["static --cuda-graph build: the CUDA run is replayed as a CUDA graph"] if static else []),
        )
        if inputs.target is not None:
            report.accuracy = accuracies(self, inputs)
            if "original" in report.accuracy:
                report.notes.append(f"original model accuracy on --data targets: {report.accuracy['original']:.4f}")
            else:
                report.notes.append("target given, but the first output has no per-sample classes")
            if self.mode != "exact" and "converted" in report.accuracy:
                report.notes.append(f"converted model accuracy (--reset {self.mode}, informative): {report.accuracy['converted']:.4f}")
        del inputs, x  # the records of this check go before the next ones
        if extra_time_steps and self.layout.dynamic_time and data is None:
            for steps in other_time_steps(self.layout.time_steps):
                if progress:
                    progress(f"checking T={steps}")
                rw, prov = self._compare(onnx_path, self.inputs(None, batch, time_steps=steps, seed=seed + steps), ("cpu",))
                report.extra_checks.append({
                    "time_steps": steps,
                    "passed": rw.passed and all(p.passed for p in prov),
                    "spike_agreement": prov[0].summary()["spike_agreement"] if prov else None,
                    "max_abs_error": prov[0].summary()["max_abs_error"] if prov else None,
                })
        return report

    def write_raster(self, onnx_path, inputs: VerifyInputs, path) -> None:
        """A PNG spike raster of the original's run in ``inputs`` against onnxruntime's (cpu)."""
        from .raster import write_raster

        _, reference = inputs.reference
        _, converted = run_onnx(*onnx_with_layer_outputs(onnx_path), inputs.x.numpy(), "cpu")
        write_raster(path, reference, converted, f"original vs onnxruntime ({Path(onnx_path).name}, {self.mode} mode)")

    def _static_batch(self, static: tuple[int, ...], onnx_path, batch) -> int:
        """The batch of a static build (refusing a different ``--batch`` or ``--time-steps``)."""
        axis = self.layout.time_axis
        if axis is not None and static[axis] != self.layout.time_steps:
            raise UsageError(f"{onnx_path} is a --cuda-graph build for T={static[axis]}; verify it with --time-steps {static[axis]}.")
        if batch is not None and batch != static[self.layout.batch_axis]:
            raise UsageError(f"{onnx_path} is a --cuda-graph build for batch {static[self.layout.batch_axis]}; leave out --batch or give that.")
        return static[self.layout.batch_axis]

    def _compare(self, onnx_path, inputs: VerifyInputs, providers, required=(), cuda_graph: bool = False):
        """Original vs rewrite vs onnxruntime on ``inputs`` (keeping the rewrite's outputs in
        ``inputs.rewritten``, for :func:`accuracies`); ``cuda_graph``: the CUDA run replays a CUDA graph."""
        time_first = self.layout.batch_axis == 1  # the outputs' layout; layer spikes are always [T, B, ...]
        x = inputs.x
        ref_out, ref_layers = inputs.reference
        # ties are excused against onnxruntime too: its GEMM / conv / MatMul may round in the
        # last bit differently from torch's (library-specific summation order)
        near_chunks: dict[str, list[NearThreshold]] = {}

        def tie_candidates(index, cur, params, outputs):
            decided_on = self._decided_on(index, cur, params, outputs)
            if decided_on is not None:
                near_chunks.setdefault(self.parallel.sites[index].name, []).append(
                    near_threshold(decided_on, self.parallel.sites[index].spec.threshold))

        par_out, par_layers = run_parallel(self.parallel, x, observe=tie_candidates)
        inputs.rewritten = par_out
        near = {name: NearThreshold.joined(chunks) for name, chunks in near_chunks.items()}
        approximate = self.mode != "exact"
        rewrite_result = ProviderResult("torch-parallel", approximate=approximate)
        rewrite_result.outputs = [compare_tensors(f"output{i}", r, p, time_first) for i, (r, p) in enumerate(zip(ref_out, par_out))]
        rewrite_result.layers = [compare_tensors(name, ref_layers[name], par_layers[name], True, near.get(name)) for name in par_layers if name in ref_layers]
        _excuse_propagated_ties(rewrite_result)
        model_bytes, layer_outputs, n_outputs = onnx_with_layer_outputs(onnx_path)
        results = []
        for provider in providers:
            result = ProviderResult(provider, approximate=approximate)
            try:
                onnx_out, onnx_layers = run_onnx(model_bytes, layer_outputs, n_outputs, x.numpy(), provider,
                                                 cuda_graph=cuda_graph and provider == "cuda")
            except ProviderUnavailable as exc:
                result.available = False
                # asked for by name: a failure; part of "all": listed as unavailable
                result.error = str(exc) if provider in required else None
                results.append(result)
                continue
            except Exception as exc:  # onnxruntime failed: reported, exit code 4
                result.error = one_line(exc, 300)
                results.append(result)
                continue
            if len(onnx_out) != len(ref_out):
                result.error = f"the ONNX model has {len(onnx_out)} outputs, the original {len(ref_out)}"
            result.outputs = [compare_tensors(f"output{i}", r, o, time_first) for i, (r, o) in enumerate(zip(ref_out, onnx_out))]
            result.layers = [compare_tensors(name, ref_layers[name], onnx_layers[name], True, near.get(name)) for name in onnx_layers if name in ref_layers]
            result.export_layers = [compare_tensors(name, par_layers[name], onnx_layers[name], True, near.get(name)) for name in onnx_layers if name in par_layers]
            if approximate:
                result.export_outputs = [compare_tensors(f"output{i}", p, o, time_first) for i, (p, o) in enumerate(zip(par_out, onnx_out))]
            _excuse_propagated_ties(result)
            results.append(result)
        return rewrite_result, results

    def _decided_on(self, index: int, cur: torch.Tensor, params: list[torch.Tensor], outputs: list[torch.Tensor]) -> torch.Tensor | None:
        """The value each spike of site ``index``'s kernel call was decided on (its membrane, or
        for a same-step reset the charged membrane, recomputed with the kernel's own options);
        None where it cannot be told (approximate reset modes)."""
        site, options = self.parallel.sites[index], self.parallel.site_options[index]
        spec = site.spec
        if spec.reset_timing == "previous_step" or spec.reset == "none" or site.algorithm.name == "psu_module":
            return outputs[1]
        if spec.reset_timing == "same_step" and site.algorithm.name == "scan":
            from .ops.neuron import charged_values

            return charged_values(options, params, cur, outputs)
        return None


#: verify's synthetic inputs hold 4 samples, fewer past 25,000 steps: at most this many
#: sample-steps, since the original, the rewrite and onnxruntime each keep every layer's
#: spikes over all of them (T = 100,000 at batch 4 took 3-4 GB on a 64-128-10 MLP)
SYNTHETIC_SAMPLE_STEPS = 100_000


def synthetic_batch(steps: int) -> int:
    """The batch of verify's synthetic inputs at ``steps`` steps: 4, down to 1 at 100,000."""
    return max(1, min(4, SYNTHETIC_SAMPLE_STEPS // steps))


def other_time_steps(steps: int) -> list[int]:
    """Sequence lengths besides the conversion T that verify also checks: a shorter one
    (T / 2, at most 1,000 steps: each check runs the original's loop again) and a longer one."""
    return sorted({max(1, min(steps // 2, 1000)), min(2 * steps + 1, steps + 64)} - {steps})


def _excuse_propagated_ties(result: ProviderResult) -> None:
    """Attribute differences downstream of a float tie to that tie.

    A spike flipped by a float tie (a membrane within rounding of the threshold) changes
    the input of every later layer and output.  Layers are in execution order; once a
    layer has ties, the differences of the layers and outputs after it are counted as
    ``after_tie`` (reported, not failing).  Differences before any tie still fail.
    """
    for comparisons, outputs in ((result.layers, result.outputs), (result.export_layers, [])):
        tie_upstream = False
        for c in comparisons + outputs:
            if tie_upstream and not c.passed:
                c.after_tie = c.mismatches - c.float_ties if c.spike_agreement is not None else 0
                c.passed = True
            tie_upstream = tie_upstream or c.float_ties > 0


def accuracies(conversion: Conversion, inputs: VerifyInputs) -> dict[str, float]:
    """Accuracy on ``inputs.target`` of the original and, in approximate modes, of the rewritten
    model (their runs in ``inputs``)."""
    from .verify import _argmax_classes

    time_first = conversion.layout.batch_axis == 1
    outputs = {"original": inputs.reference[0][0]}
    if conversion.mode != "exact":
        outputs["converted"] = inputs.rewritten[0]
    out = {}
    for name, output in outputs.items():
        classes = _argmax_classes(output, time_first)
        if classes is not None and classes.shape[0] == inputs.target.shape[0]:
            out[name] = float((classes == inputs.target.long()).float().mean())
    return out


def static_input_shape(model: onnx.ModelProto) -> tuple[int, ...] | None:
    """The input shape of a ``--cuda-graph`` build (None for other files)."""
    if {p.key: p.value for p in model.metadata_props}.get(STATIC_KEY) != "true":
        return None
    return tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)


def check_onnx_matches(onnx_path, conversion: Conversion) -> onnx.ModelProto:
    """Refuse to verify an ONNX file that was not converted from this model; returns the
    file's model (without external weights)."""
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
    if meta.get("psu_export.layout", conversion.layout.order) != conversion.layout.order:
        raise UsageError(
            f"{path} takes its input {meta['psu_export.layout'].replace('_', '-')}, but the model was probed as "
            f"{conversion.layout.describe()}; convert it again (or give verify the same --batch-first)."
        )
    if strip(sites) != strip(ours) or json.loads(meta.get("psu_export.sample_shape", "null")) != list(conversion.layout.sample_shape):
        raise UsageError(
            f"{path} was not converted from this model: its neuron layers or input shape differ "
            f"(file: {[s['name'] for s in sites]}, shape {meta.get('psu_export.sample_shape')}; "
            f"model: {[s['name'] for s in ours]}, shape {list(conversion.layout.sample_shape)}). Convert it again."
        )
    return model


def sample_shape_from(input_shape: str | None, onnx_path=None) -> tuple[int, ...]:
    """``--input-shape``, or the shape recorded in a converted ONNX file's metadata."""
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


def prepare(model: "str | torch.nn.Module", weights: str | None = None, input_shape: tuple[int, ...] = (), time_steps: int = 25, trust_model: bool = False, input_kind: str = "auto", progress=None, mode: str = "exact", seed: int = 0, nir_dt: float | None = None, nir_reset: str = "zero", batch_first: bool = False,
            check: CheckInputs | None = None) -> Conversion:
    """Load, capture, find and rewrite: everything before export.

    ``model`` is a MODEL string of the CLI contract or, for library use, a module;
    ``mode`` the ``--reset`` mode (:data:`MODES`), ``seed`` the stochastic reset's seed,
    ``batch_first`` that the sequence is ``[B, T, ...]`` (else found by probing).
    ``check``: the inputs of the parity check that will follow; a long sequence's probe then
    confirms its loop on them, and the check reuses the run (:class:`CheckRun`), so the
    original's loop runs once at T instead of twice.
    """
    if mode not in MODES:
        raise UsageError(f"--reset {mode!r} is not one of {', '.join(MODES)}.")
    if time_steps < 1:
        raise UsageError(f"--time-steps must be at least 1 (got {time_steps}).")
    say = progress or (lambda message: None)
    say("loading the model")
    loaded = LoadedModel(model.eval(), f"module:{type(model).__name__}") if isinstance(model, torch.nn.Module) else load_model(model, weights, trust_model, nir_dt, nir_reset)
    neurons = find_neuron_modules(loaded.module)
    refuse_unconvertible(neurons)
    if not neurons:  # no neuron module: a hand-written loop? (psu_export/patterns.py)
        from .patterns import prepare_handwritten

        say("no neuron module of a supported framework; looking for hand-written neuron loops")
        loaded, neurons, layout, captured = prepare_handwritten(loaded, tuple(input_shape), time_steps, input_kind, say, batch_first)
        check_run = None
    else:
        say(f"found {len(neurons)} neuron layers; probing how the model consumes time")
        runs: list[CheckRun] = []
        full_length_run = _run_on_check_inputs(loaded, neurons, check, runs) if check else None
        layout = probe_input_kind(loaded.module, neurons, tuple(input_shape), time_steps, input_kind, batch_first, full_length_run)
        check_run = next((run for run in runs if run.layout == layout), None)
        say(f"input: {layout.kind} {layout.describe()}, T={layout.time_steps}{'' if layout.dynamic_time else ' (fixed by the model)'}; capturing")
        captured = capture(loaded.module, neurons, layout)
        captured.notes.extend(getattr(loaded.module, "conversion_notes", []))  # e.g. a .nir graph's discretisation
    say("re-rolling the time loop")
    sites, loop = find_sites(captured, mode)
    if layout.dynamic_time and captured.writes_time_length and loop.reads_capture_length():
        say("the model uses a number equal to the captured T; capturing one step longer to see whether it is T")
        mark_time_length_args(loop, find_sites(_recapture(loaded, neurons, layout, captured.capture_steps + 1), mode)[1])
    parallel = rewrite(captured, sites, loop, mode, seed)
    return Conversion(loaded, neurons, layout, captured, sites, loop, parallel, mode, seed, check_run)


def _run_on_check_inputs(loaded: LoadedModel, neurons: list[NeuronModule], check: CheckInputs, runs: list[CheckRun]):
    """The probe's run at full length (:func:`~psu_export.capture.probe_input_kind`), made on
    ``check``'s inputs and kept as ``runs``' one entry; returns the calls per neuron, or None
    for ``--data`` of another length or shape (the probe then runs one sample of its own)."""
    def run(layout: InputLayout) -> dict[int, int] | None:
        runs.clear()  # a layout tried before this one (time-first, then batch-first) is not the answer
        if check.data is None:
            x, target = synthetic_example(layout, check.batch or synthetic_batch(layout.time_steps), layout.time_steps, check.seed), None
        else:
            try:
                x, target = load_data(check.data, layout)
            except UsageError:  # reported by the check itself, after the conversion
                return None
            if x.shape[layout.time_axis] != layout.time_steps:
                return None
        with counting_calls(neurons) as counts:
            reference = run_original(loaded.module, neurons, layout, x)
        runs.append(CheckRun(layout, check, x, target, reference))
        return dict(counts)

    return run


def _recapture(loaded: LoadedModel, neurons: list[NeuronModule], layout: InputLayout, steps: int) -> CapturedGraph:
    """The model captured again at ``steps`` steps, as :func:`prepare` captured it."""
    from .patterns import HandwrittenOriginal, capture_handwritten

    if isinstance(loaded.module, HandwrittenOriginal):
        return capture_handwritten(loaded.module.model, layout, steps)[0]
    return capture(loaded.module, neurons, layout, steps)


def file_reset_mode(onnx_path) -> tuple[str, int, dict]:
    """``(mode, seed, reset estimate)`` recorded in a converted ONNX file (exact when absent)."""
    try:
        meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    except Exception:
        return "exact", 0, {}
    mode = meta.get("psu_export.mode", "exact")
    return mode, int(meta.get("psu_export.reset_seed", 0)), json.loads(meta.get("psu_export.reset_estimate", "{}"))
