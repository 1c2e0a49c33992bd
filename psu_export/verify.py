"""Verify: three-way parity between the original, the rewrite and onnxruntime.

On the same inputs this compares

* the original model, run sequentially by its own framework (the reference);
* the rewritten time-parallel PyTorch model (isolates rewrite error);
* the exported ONNX file under each onnxruntime provider (isolates export error),

per neuron layer (spike agreement; the ONNX model is run with each ``psu`` node's spike
output exposed) and per model output (max abs error, spike agreement for binary
outputs, argmax agreement of the time-summed output).  A spike that differs where the
reference membrane lies within float rounding of the threshold is counted as a
``float tie`` and reported separately; every other difference fails the check.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch

from .capture import InputLayout, NeuronModule, reset_neurons
from .errors import UsageError
from .cuda_graph import LAYER_OUTPUTS_KEY, with_static_output_shapes
from .ops import layer_spike_outputs
from .runtime import PROVIDERS, GraphRunner, make_session, provider_available

SCHEMA_VERSION = 1
#: relative tolerance for non-spike outputs (membranes, logits)
OUTPUT_RTOL = 1e-4
#: |v - threshold| below this (relative) makes a differing spike a float tie.  The synaptic
#: layers may differ by an ulp (about 6e-8 relative) between torch and onnxruntime, and a
#: static input repeats the same difference every step: the membrane accumulates it over
#: about 1 / (1 - decay) steps, times the current's size (measured: 1.2e-5 for snnTorch
#: tutorial 5 at T = 256, decay 0.95); 1e-4 leaves a margin.
TIE_RTOL = 1e-4


# ------------------------------------------------------------------ running the three models


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


#: steps a whole-sequence temporary of verify's covers at a time (a layer over all steps is
#: hundreds of MB at T = 100,000; a temporary as large would add as much again)
CHUNK_STEPS = 4096


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the operating system (glibc's ``malloc_trim``; a
    no-op elsewhere).  A run leaves the memory it freed in the heap, scattered among what it
    keeps (the original's steps, the rewrite's chunks of steps): 190-250 MB of resident
    memory after each run of the 784-1000-10 MLP at T = 100,000 (measured), under the next
    run's peak."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None)  # the C library this process runs with
    except (OSError, TypeError):  # (Windows takes no None)
        return None


def spike_record(t: torch.Tensor) -> torch.Tensor:
    """A copy of a layer's output kept for comparison: bool where every value is 0 or 1 (a
    quarter of float32's memory; at T = 100,000 a 1,000-neuron layer's record is 100 MB
    instead of 400), else the values themselves.  Records of steps stack to float where
    any step is not 0 / 1 (``torch.stack`` promotes)."""
    if t.dtype != torch.bool and all(bool(((c == 0) | (c == 1)).all()) for c in t.split(CHUNK_STEPS)):
        return t.to(torch.bool)
    return t.clone()


def joined(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Chunks of steps as one sequence (a single chunk as it is, not copied)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


@dataclass(frozen=True)
class NearThreshold:
    """Where a layer's spikes were decided on a value within float rounding of the threshold
    (where a differing spike is a float tie): the flat positions, ascending, in its ``[T, B,
    ...]`` record.  Such values are rare: an int64 each instead of a bool mask of every
    element (100 MB for a 1,000-neuron layer at T = 100,000)."""

    shape: tuple[int, ...]
    positions: torch.Tensor

    @classmethod
    def of_mask(cls, mask: torch.Tensor) -> "NearThreshold":
        return cls(tuple(mask.shape), mask.reshape(-1).nonzero().squeeze(1))

    @classmethod
    def joined(cls, parts: "list[NearThreshold]") -> "NearThreshold":
        """Consecutive chunks of steps as one sequence."""
        if len(parts) == 1:
            return parts[0]
        offsets, positions, steps = 0, [], 0
        for part in parts:
            positions.append(part.positions + offsets)
            offsets += math.prod(part.shape)
            steps += part.shape[0]
        return cls((steps, *parts[0].shape[1:]), torch.cat(positions))


def near_threshold(decided_on: torch.Tensor, threshold: torch.Tensor) -> NearThreshold:
    """Where ``|v - threshold| <= TIE_RTOL * max(|threshold|, 1)`` (``v``: the value each spike
    was decided on, ``[T, B, ...]``), a chunk of steps at a time."""
    limit = TIE_RTOL * torch.clamp(threshold.abs(), min=1.0)
    return NearThreshold.joined([NearThreshold.of_mask(torch.le(torch.sub(chunk, threshold).abs_(), limit))
                                 for chunk in decided_on.split(CHUNK_STEPS)])


class _LayerRecord:
    """One layer's outputs over a run, a call at a time (as :func:`spike_record`), stacked
    every :data:`CHUNK_STEPS` calls: 100,000 small tensors held to the end leave their memory
    scattered when freed (290 MB of RSS after 100,000 steps of 1,000 neurons, measured)."""

    def __init__(self, neuron: NeuronModule):
        self.neuron, self.chunks, self.calls = neuron, [], []

    def add(self, value: torch.Tensor) -> None:
        self.calls.append(spike_record(value))
        if len(self.calls) == CHUNK_STEPS:
            self.chunks.append(torch.stack(self.calls))
            self.calls = []

    def over_time(self) -> torch.Tensor | None:
        if not self.chunks:
            return self.neuron.over_time(self.calls) if self.calls else None
        return joined(self.chunks + ([torch.stack(self.calls)] if self.calls else []))


def run_original(model: torch.nn.Module, neurons: list[NeuronModule], layout: InputLayout, x: torch.Tensor):
    """The framework's own sequential run; returns (outputs, {layer: spikes [T, B, ...]}) (spiking
    layers, as :func:`spike_record`)."""
    records = {n.name: _LayerRecord(n) for n in neurons if n.converter.call_convention(n.module).returns_spikes}
    handles = []
    for n in neurons:
        if n.name in records:
            def hook(module, args, out, _record=records[n.name]):
                _record.add((out[0] if isinstance(out, (tuple, list)) else out).detach())
            handles.append(n.module.register_forward_hook(hook))
    reset_neurons(neurons)
    try:
        with torch.no_grad():
            out = layout.driver(model)(x)
    finally:
        for h in handles:
            h.remove()
        reset_neurons(neurons)
    layers = {name: record.over_time() for name, record in records.items()}
    return_freed_memory()
    return _as_tuple(out), {name: spikes for name, spikes in layers.items() if spikes is not None}


def run_parallel(parallel, x: torch.Tensor, observe=None):
    """The rewritten model's run, :data:`CHUNK_STEPS` steps at a time where it can
    (:meth:`~psu_export.rewrite.ParallelModel.run_in_chunks`); returns (outputs, {layer:
    spikes}) (as :func:`spike_record`).

    ``observe(index, input, parameters, outputs)`` also sees each site's kernel call, once
    per chunk of steps, in time order (a layer's values over those steps: keep only what
    is needed, at long T they are large)."""
    spikes: dict[str, list[torch.Tensor]] = {}

    def record(index, cur, params, outputs):
        spikes.setdefault(parallel.sites[index].name, []).append(spike_record(outputs[0]))
        if observe is not None:
            observe(index, cur, params, outputs)

    parallel.site_observer = record
    try:
        with torch.no_grad():
            out = parallel.run_in_chunks(x, CHUNK_STEPS)
    finally:
        parallel.site_observer = None
    layers = {name: joined(chunks) for name, chunks in spikes.items()}
    return_freed_memory()
    return _as_tuple(out), layers


def onnx_with_layer_outputs(path) -> tuple[bytes, dict[str, str], int]:
    """The ONNX model with each psu node's spike output appended as a graph output.

    Returns the serialised model, ``{layer: output name}`` and the number of the model's
    own outputs (which come first).
    """
    model = onnx.load(str(path))
    n_outputs = len(model.graph.output)
    recorded = {p.key: p.value for p in model.metadata_props}.get(LAYER_OUTPUTS_KEY)
    layer_outputs = json.loads(recorded) if recorded else layer_spike_outputs(model)
    existing = {o.name for o in model.graph.output}
    for out in layer_outputs.values():
        if out not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    if recorded:  # a static build: the appended outputs get their static shapes too
        model = with_static_output_shapes(model)
    return model.SerializeToString(), layer_outputs, n_outputs


def run_onnx(model_bytes: bytes, layer_outputs: dict[str, str], n_outputs: int, x: np.ndarray, provider: str, cuda_graph: bool = False):
    """Run under one provider; returns (model outputs, {layer: spikes}).

    ``cuda_graph``: replay the run as a CUDA graph (a static build on the cuda provider),
    as it is deployed.
    """
    import onnxruntime as ort

    if not provider_available(provider):
        available = ", ".join(ort.get_available_providers())
        raise ProviderUnavailable(f"{PROVIDERS[provider]} is not available in this onnxruntime (available: {available})")
    # one run: no host memory arena (the cuda provider's sessions stay as they were checked on a GPU)
    session = make_session(model_bytes, provider, cuda_graph=cuda_graph, memory_arena=provider != "cpu")
    if PROVIDERS[provider] not in session.get_providers():
        raise ProviderUnavailable(f"onnxruntime could not start {PROVIDERS[provider]}")
    names = [o.name for o in session.get_outputs()]
    return_freed_memory()  # (under this run's peak)
    if cuda_graph:
        runner = GraphRunner(session, x).warm_up()
        runner.clear_outputs()
        values = runner.run(x)  # a replay
    else:
        values = session.run(None, {session.get_inputs()[0].name: x})
    by_name = dict(zip(names, values))
    outputs = tuple(torch.from_numpy(np.asarray(v)) for v in values[:n_outputs])
    layers = {layer: spike_record(torch.from_numpy(np.asarray(by_name[out]))) for layer, out in layer_outputs.items()}
    return outputs, layers


class ProviderUnavailable(Exception):
    pass


# ------------------------------------------------------------------ metrics


def _is_binary(t: torch.Tensor) -> bool:
    if t.dtype == torch.bool:
        return t.numel() > 0
    return t.numel() > 0 and bool(torch.all((t == 0) | (t == t.abs().max())))


def _argmax_classes(t: torch.Tensor, time_first: bool) -> torch.Tensor | None:
    if t.dim() < 2:
        return None
    if t.dim() >= 3 and time_first:
        # a bool sum first copies all of it to int64 (800 MB for a 100 MB record): in chunks
        t = sum(steps.sum(0, dtype=torch.int32) for steps in t.split(CHUNK_STEPS)) if t.dtype == torch.bool else t.sum(0)
    if t.dtype == torch.bool:
        t = t.float()
    return t.reshape(t.shape[0], -1).argmax(-1) if t.dim() > 2 else t.argmax(-1)


@dataclass
class Comparison:
    """One model output or neuron layer compared against the reference."""

    name: str
    spike_agreement: float | None = None
    max_abs_error: float = 0.0
    argmax_agreement: float | None = None
    mismatches: int = 0
    float_ties: int = 0
    #: differences downstream of a layer with float ties (caused by the flipped spikes)
    after_tie: int = 0
    passed: bool = True


def compare_tensors(name: str, ref: torch.Tensor, got: torch.Tensor, time_first: bool, near: NearThreshold | None = None) -> Comparison:
    """``ref`` against ``got``; a binary ``ref`` is compared as spikes, differences where
    ``near`` (:func:`near_threshold`: the membrane within :data:`TIE_RTOL` of the threshold) counted
    as float ties (and, time-first, the same neuron's later differences as following from
    them).  Temporaries stay at a few bytes an element: at T = 100,000 a layer's record is
    hundreds of MB."""
    if ref.dtype != got.dtype:  # a record of spikes against one of other values
        ref, got = ref.float(), got.float()
    if ref.shape != got.shape:
        return Comparison(name, spike_agreement=0.0, max_abs_error=float("inf"), argmax_agreement=0.0, mismatches=ref.numel(), passed=False)
    c = Comparison(name)
    ref_classes, got_classes = _argmax_classes(ref, time_first), _argmax_classes(got, time_first)
    if ref_classes is not None:
        c.argmax_agreement = float((ref_classes == got_classes).float().mean())
    if _is_binary(ref):
        differ = ref != got
        c.mismatches = int(torch.count_nonzero(differ))
        c.spike_agreement = 1.0 - c.mismatches / ref.numel()
        c.max_abs_error = float(c.mismatches > 0) if ref.dtype == torch.bool else float(torch.sub(ref, got).abs_().max())
        if near is not None and near.shape == tuple(ref.shape) and c.mismatches:
            ties = near.positions[differ.reshape(-1)[near.positions]]  # flat positions of the differing near ones
            c.float_ties = ties.numel()
            if time_first and ref.dim() >= 2 and c.float_ties:
                # a flipped spike changes that neuron's own later membrane (a reset more or
                # less): its later differences follow from the tie
                per_step = ref[0].numel()
                tie_steps, tie_neurons = ties // per_step, ties % per_step
                first_tie = torch.full((per_step,), ref.shape[0]).scatter_reduce_(0, tie_neurons, tie_steps, "amin")
                later = torch.arange(ref.shape[0]).unsqueeze(1) > first_tie
                later_ties = int(torch.count_nonzero(tie_steps > first_tie[tie_neurons]))
                c.after_tie = int(torch.count_nonzero(later.logical_and_(differ.reshape(ref.shape[0], per_step)))) - later_ties
        c.passed = c.mismatches == c.float_ties + c.after_tie
    else:
        c.max_abs_error = float(torch.sub(ref, got).abs_().max()) if ref.numel() else 0.0
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        c.passed = c.max_abs_error <= OUTPUT_RTOL * scale
    return c


@dataclass
class ProviderResult:
    provider: str
    available: bool = True
    error: str | None = None
    outputs: list[Comparison] = field(default_factory=list)
    layers: list[Comparison] = field(default_factory=list)
    export_layers: list[Comparison] = field(default_factory=list)  # rewritten torch vs ONNX
    export_outputs: list[Comparison] = field(default_factory=list)  # rewritten torch vs ONNX (approximate modes)
    #: ``--reset psu|stochastic``: agreement with the original is informative (the reset is
    #: estimated on purpose); only the export parity (rewritten torch vs ONNX) decides
    approximate: bool = False

    @property
    def passed(self) -> bool:
        if not (self.available and self.error is None):
            return False
        if self.approximate:
            return all(c.passed for c in self.export_layers + self.export_outputs)
        return all(c.passed for c in self.outputs + self.layers + self.export_layers)

    def summary(self) -> dict:
        def worst(values):
            values = [v for v in values if v is not None]
            return min(values) if values else None

        return {
            "available": self.available,
            "error": self.error,
            "passed": self.passed,
            "spike_agreement": worst([c.spike_agreement for c in self.layers] + [c.spike_agreement for c in self.outputs]),
            "export_spike_agreement": worst([c.spike_agreement for c in self.export_layers]),
            "argmax_agreement": worst([c.argmax_agreement for c in self.outputs]),
            "max_abs_error": max([c.max_abs_error for c in self.outputs], default=0.0),
            "float_ties": sum(c.float_ties for c in self.outputs + self.layers),
            "after_tie": sum(c.after_tie for c in self.outputs + self.layers),
            "outputs": [asdict(c) for c in self.outputs],
            "layers": [asdict(c) for c in self.layers],
            "export_layers": [asdict(c) for c in self.export_layers],
            **({"export_outputs": [asdict(c) for c in self.export_outputs],
                "original_agreement": "informative (approximate reset mode; passed = export parity)"} if self.approximate else {}),
        }


@dataclass
class ParityReport:
    """The result of one verification (DESIGN.md section 5 JSON via :meth:`to_json`)."""

    mode: str
    time_steps: int
    batch: int
    inputs: str
    rewrite: ProviderResult
    providers: list[ProviderResult]
    neuron_sites: list[dict]
    extra_checks: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: accuracy on ``--data`` targets: {"original": .., "converted": ..} (converted in approximate modes)
    accuracy: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        ran = [p for p in self.providers if p.available or p.error]
        return bool(ran) and all(p.passed for p in ran) and self.rewrite.passed and all(e["passed"] for e in self.extra_checks)

    @property
    def provider_failed(self) -> bool:
        return any(p.error for p in self.providers)

    def to_json(self) -> dict:
        ran = [p.summary() for p in self.providers if p.available]

        def worst(key):
            values = [s[key] for s in ran if s[key] is not None]
            return min(values) if values else None

        layer_agreement = {}
        for p in self.providers:
            for c in p.layers:
                layer_agreement[c.name] = min(layer_agreement.get(c.name, 1.0), c.spike_agreement if c.spike_agreement is not None else 1.0)
        return {
            "schema_version": SCHEMA_VERSION,
            "passed": self.passed,
            "mode": self.mode,
            "time_steps": self.time_steps,
            "batch": self.batch,
            "inputs": self.inputs,
            "spike_agreement": worst("spike_agreement"),
            "export_spike_agreement": worst("export_spike_agreement"),
            "argmax_agreement": worst("argmax_agreement"),
            "max_abs_error": max((s["max_abs_error"] for s in ran), default=None),
            "float_ties": sum(s["float_ties"] for s in ran),
            "after_tie": sum(s["after_tie"] for s in ran),
            "rewrite": self.rewrite.summary(),
            "providers": {p.provider: p.summary() for p in self.providers},
            "neuron_sites": [dict(site, spike_agreement=layer_agreement.get(site["name"])) for site in self.neuron_sites],
            "extra_time_steps": self.extra_checks,
            "notes": self.notes,
            **({"accuracy": self.accuracy} if self.accuracy else {}),
            **({"original_agreement_informative": True,
                "passed_means": "export parity: the rewritten torch model and onnxruntime agree exactly (export_spike_agreement 1.0); "
                                "spike_agreement / argmax_agreement / accuracy against the original are informative, the reset being estimated"}
               if self.mode != "exact" else {}),
        }

    def write(self, path) -> None:
        from .files import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_json(), indent=2))


# ------------------------------------------------------------------ inputs


def load_data(path, layout: InputLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``--data FILE.npz``: array ``input`` shaped like the model's input, optional ``target``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "input" not in data:
                raise UsageError(f"{path} has no array named 'input' (found: {', '.join(data.files) or 'none'}).")
            x = np.asarray(data["input"])
            target = np.asarray(data["target"]) if "target" in data else None
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"Could not read --data {path}: {type(exc).__name__}: {exc}") from exc
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer) and x.dtype != np.bool_:
        raise UsageError(f"--data {path}: 'input' has dtype {x.dtype}; a numeric array is needed.")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise UsageError(f"--data {path}: 'input' contains NaN or Inf values.")
    expected = layout.sample_shape
    lead = 1 if layout.kind == "static" else 2
    if x.ndim != lead + len(expected) or tuple(x.shape[lead:]) != tuple(expected):
        raise UsageError(
            f"--data {path}: 'input' has shape {list(x.shape)}, but the model takes "
            f"{layout.describe()} ({layout.kind} input)."
        )
    if 0 in x.shape[:lead]:
        raise UsageError(f"--data {path}: 'input' is empty.")
    return torch.from_numpy(x), (torch.from_numpy(target) if target is not None else None)


def synthetic_example(layout: InputLayout, batch: int, time_steps: int, seed: int) -> torch.Tensor:
    """The unscaled inputs of :func:`synthetic_inputs`: seeded uniform in [0, 1)."""
    return layout.example(batch, time_steps, generator=torch.Generator().manual_seed(seed))


def synthetic_inputs(model, neurons, layout: InputLayout, batch: int, time_steps: int, seed: int = 0, first_run=None):
    """Seeded uniform inputs, scaled up until every neuron layer fires (or the largest scale).

    Returns (inputs, the original's :func:`run_original` on them): verify compares against
    that run rather than running the original's loop again.  ``first_run``: ``(inputs,
    run)`` on the unscaled inputs (:func:`synthetic_example`) when made already."""
    x, reference = first_run or (synthetic_example(layout, batch, time_steps, seed), None)
    for scale in (1, 2, 4, 8, 16):
        if scale > 1:
            reference = None  # the last run's records go before the next run keeps its own
            x.mul_(2.0)  # in place (exact): one copy of a long input
        if reference is None:
            reference = run_original(model, neurons, layout, x)
        rates = [int(torch.count_nonzero(s)) / max(1, s.numel()) for s in reference[1].values()]
        if rates and min(rates) > 0.01:
            break
    return x, reference
