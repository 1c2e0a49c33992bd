"""Benchmarks: the converted model against what users run today, and against the ANN bound.

For one model, in ONE run, with the onnxruntime variants interleaved (so that load on the
machine hits them alike) and medians of repeated runs; PyTorch eager is timed in its own
block after them (:data:`EAGER_SETTLE_S`):

``eager``   the original model in PyTorch eager mode (its own sequential time loop);
``naive``   ``torch.onnx.export(original, dynamo=True)``: the time loop unrolled over a
            fixed T (one export per T), under onnxruntime;
``psu[-mode]`` the psu-export conversion (exact mode, plus the other reset modes of
            :data:`psu_export.pipeline.MODES`), under onnxruntime;
``bound``   the same network with every neuron replaced by an elementwise activation
            (Heaviside at the threshold) and time folded into the batch: the cost of the
            synaptic layers alone, which no exact SNN export can beat.

Times are reported in milliseconds and as ratios (``naive / psu``: speed-up over the
naive export; ``psu / bound``: distance from the bound; ``naive / bound``: the ceiling,
the speed-up over the naive export that an exact export would reach if its neurons cost
nothing, low for a model whose synaptic layers dominate, such as a compute-bound conv
net).  Export time, file size and node count are reported per T for the naive export
and for ours (ours must not grow).

Library use: :func:`run_benchmark`; command line: ``psu-export bench`` (:func:`bench`);
the reference suite: ``benchmarks/run_suite.py``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from . import runtime
from .errors import one_line
from .runtime import PROVIDERS, provider_available

# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' chatter (warnings and progress prints)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            import logging

            level = logging.root.manager.disable
            logging.disable(logging.WARNING)
            try:
                yield
            finally:
                logging.disable(level)


def machine_description() -> dict:
    import onnxruntime as ort
    import torch

    info = {}  # the first processor's fields
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = info.get("model name") or platform.processor() or platform.machine()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    # the widest vector unit: CPUs sold under one name (AMD EPYC) differ here, and with it
    # the speed of convolutions and matrix products (about 2x, AVX-512 against AVX2)
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("asimd", "NEON")) if flag in flags), None)
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "cpu": cpu,
        "cpu_vector_isa": isa,
        "cpu_cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def make_session(model, provider: str = "cpu", threads: int = 0):
    """A benchmark session (the CPU takes nodes the provider lacks, as in deployment)."""
    return runtime.make_session(model, provider, threads, fallback_to_cpu=True)


def node_count(path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def file_size(path) -> int:
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# ----------------------------------------------------------------------------- the bound


def _bound_classes():
    import torch
    from torch.utils._pytree import tree_map

    class _Activation(torch.nn.Module):
        """A neuron replaced by Heaviside(x - threshold), stateless and elementwise, called as its
        framework calls it (``CallConvention.forward``: the same arguments and outputs, e.g.
        snnTorch's ``(spk, mem)`` with ``output=True``), each state output being the input."""

        def __init__(self, neuron: torch.nn.Module, converter, threshold: float):
            super().__init__()
            self.threshold = float(threshold)
            converter.reset_state(neuron)
            convention = converter.call_convention(neuron)
            n_states = len(convention.state_roles)
            self._forward = convention.forward(lambda x, states: [(x > self.threshold).to(x.dtype)] + [x] * n_states)

        def forward(self, *args, **kwargs):
            return self._forward(*args, **kwargs)

        # the state initialisers snnTorch-style models call
        def init_leaky(self):
            return torch.zeros(())

        def init_synaptic(self):
            return torch.zeros(()), torch.zeros(())

        def reset_mem(self):
            return self


    class BoundModel(torch.nn.Module):
        """The model with neurons as activations and time folded into the batch: ``[T, B, ...]``
        (``time_axis`` 0) or ``[B, T, ...]`` (``time_axis`` 1) in, the same order out."""

        def __init__(self, module: torch.nn.Module, kind: str, time_axis: int):
            super().__init__()
            self.net = module
            self.kind, self.time_axis = kind, time_axis

        def forward(self, x):
            lead = x.shape[:2]
            folded = x.flatten(0, 1)
            if self.kind == "sequence":
                out = self.net(folded.unsqueeze(self.time_axis))  # one "step" carrying every step's batch
            else:
                out = self.net(folded)
            def unfold(o):  # SequentialState returns (output, [state or None per module])
                if not isinstance(o, torch.Tensor):
                    return o
                # a sequence model stacks its one "step" ([1, T*B, ...], batch-first [T*B, 1, ...]),
                # unless it reduced over time (a max or sum of the steps: [T*B, ...])
                stacked = self.kind == "sequence" and o.dim() >= 2 and o.shape[self.time_axis] == 1
                return o.reshape(*lead, *o.shape[(2 if stacked else 1):])

            return tuple(tree_map(unfold, out)) if isinstance(out, (tuple, list)) else (unfold(out),)

    return _Activation, BoundModel


def bound_model(module, neurons, kind: str, time_axis: int = 0):
    """The bound: ``module`` with each neuron an activation, time folded into the batch
    (``time_axis``: where the sequence input has time, 1 for batch-first)."""
    _Activation, BoundModel = _bound_classes()
    net = copy.deepcopy(module)
    for n in neurons:
        parent_name, _, attr = n.name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        threshold = float(n.spec.threshold.reshape(-1)[0]) if n.spec is not None else 1.0
        setattr(parent, attr, _Activation(getattr(parent, attr), n.converter, threshold))
    if kind == "static":  # multi-step neurons on an input the model repeats itself: time is folded already
        return net.eval()
    return BoundModel(net.eval(), kind, time_axis)


# ----------------------------------------------------------------------------- exports


def _export_dynamo(module, example, path, dynamic_shapes):
    import torch

    with _quiet(), torch.no_grad():
        program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
    program.save(str(path))


class BaselineExportError(RuntimeError):
    """A baseline (naive export or bound) could not be exported (the message says why)."""


def _root_cause(exc: BaseException) -> str:
    """The innermost cause, in one line (torch's export errors wrap it in a long generic message)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return one_line(exc, 300)


def export_naive(module, neurons, layout, time_steps: int, path) -> tuple[float, str]:
    """``torch.onnx.export`` of the original, unrolled over a fixed T; returns (seconds, exporter).

    Tries what a user would: the dynamo exporter with a dynamic batch, then with a static
    batch (some models specialise it), then the TorchScript exporter (``dynamo=False``).
    Raises :class:`BaselineExportError` with the dynamo exporter's root cause when all fail.
    """
    import torch

    from .capture import reset_neurons, traced_alone

    target = layout.driver(module)
    x = layout.example(2, time_steps)
    batch_axis = layout.batch_axis
    attempts = [
        ("dynamo, dynamic batch", lambda: _export_dynamo(target, x, path, ({batch_axis: torch.export.Dim("batch")},))),
        ("dynamo, static batch", lambda: _export_dynamo(target, x, path, None)),
        ("torchscript", lambda: _export_torchscript(target, x, path)),
    ]
    first_error = None
    reset_neurons(neurons)
    for name, attempt in attempts:
        t0 = time.perf_counter()
        try:
            with traced_alone(module):
                attempt()
            return time.perf_counter() - t0, name
        except Exception as exc:  # noqa: BLE001 - the next exporter may manage
            first_error = first_error or exc
        finally:
            reset_neurons(neurons)
    raise BaselineExportError(f"torch.onnx.export failed on the original model ({_root_cause(first_error)})")


def _export_torchscript(module, example, path):
    import torch

    with _quiet(), torch.no_grad():
        torch.onnx.export(module, (example,), str(path), dynamo=False)


def export_bound(module, neurons, layout, path) -> float:
    """Export :func:`bound_model`; raises :class:`BaselineExportError` when it cannot be built."""
    import torch

    from .capture import is_multi_step

    if any(n.converter.name == "handwritten" for n in neurons):
        raise BaselineExportError("the neurons are arithmetic written in the model's forward (hand-written loops), "
                                  "not modules that an activation could replace, so no bound is built")
    if layout.kind == "static" and not is_multi_step(neurons):
        raise BaselineExportError(f"the model repeats one input {layout.time_steps} times in its own loop; with its neurons "
                                  "replaced by activations it would still run every step, so no time-folded bound is built")
    try:
        model = bound_model(module, neurons, layout.kind, layout.time_axis or 0)
        x = layout.example(2, 4)
        axes = {layout.batch_axis: torch.export.Dim("batch")}
        if layout.time_axis is not None:
            axes[layout.time_axis] = torch.export.Dim("T")
        t0 = time.perf_counter()
        _export_dynamo(model, x, path, (axes,))
    except Exception as exc:  # noqa: BLE001 - e.g. the model reads neuron state the activation lacks
        raise BaselineExportError(f"the bound (neurons replaced by activations) does not export ({_root_cause(exc)})") from exc
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- timing


@dataclass
class Cell:
    """Median times (ms) of the variants for one (T, batch)."""

    time_steps: int
    batch: int
    times_ms: dict = field(default_factory=dict)
    runs: int = 0

    def ratio(self, a: str, b: str):
        if a in self.times_ms and b in self.times_ms and self.times_ms[b]:
            return self.times_ms[a] / self.times_ms[b]
        return None


#: pause after the eager block: PyTorch's OpenMP workers spin for a few ms after each call,
#: and an onnxruntime run started meanwhile took twice as long (measured: ref MLP, T=16,
#: batch 32, 4.3 instead of 2.3 ms when interleaved right after eager; 2.6 ms after 10 ms)
EAGER_SETTLE_S = 0.05


def _interleaved(runners: dict, min_runs: int, max_runs: int, budget_s: float, eager=None) -> tuple[dict, int]:
    """Run every variant once per round, rounds until ``budget_s`` (at least ``min_runs``).

    ``eager`` (the PyTorch run), if given, is timed for as many rounds in a block of its
    own afterwards, then the process pauses :data:`EAGER_SETTLE_S` (see there).
    """
    samples = {k: [] for k in runners}
    for fn in runners.values():  # warm-up
        fn()
    start = time.perf_counter()
    rounds = 0
    while rounds < max_runs and (rounds < min_runs or time.perf_counter() - start < budget_s):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    if eager is not None:
        eager()  # warm-up
        samples["eager"] = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            eager()
            samples["eager"].append(time.perf_counter() - t0)
        time.sleep(EAGER_SETTLE_S)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}, rounds


def run_benchmark(
    model: str,
    input_shape: tuple[int, ...],
    weights: str | None = None,
    time_steps=(16, 64, 256),
    batches=(1, 32),
    provider: str = "cpu",
    modes=None,
    threads: int = 0,
    work_dir=None,
    min_runs: int = 5,
    max_runs: int = 50,
    cell_budget_s: float = 2.0,
    eager: bool = True,
    progress=None,
    cache_dir=None,
    shared_thread_pool: bool = False,
) -> dict:
    """Benchmark one model (see module docstring); returns a JSON-able dict.

    ``shared_thread_pool``: give every onnxruntime session of the process one thread pool
    (:func:`psu_export.runtime.use_shared_thread_pool`), as a single deployed session has;
    per-session pools' spinning workers slowed whichever variant ran next.  It changes the
    whole process (later sessions must opt in), so only the standalone entry points
    (``psu-export bench``, ``benchmarks/run_suite.py``) turn it on.
    """
    import numpy as np
    import torch

    from . import pipeline
    from .capture import reset_neurons

    say = progress or (lambda m: None)
    if provider not in PROVIDERS:
        raise click.UsageError(f"unknown provider {provider!r} (cpu or cuda)")
    result = {"model": model, "input_shape": list(input_shape), "provider": provider, "machine": machine_description(), "threads": threads or "default"}
    if not provider_available(provider):
        result["skipped"] = f"onnxruntime provider {PROVIDERS[provider]} is not available here (install onnxruntime-gpu and run on a CUDA machine)"
        return result
    if threads:
        torch.set_num_threads(threads)
    shared = shared_thread_pool and runtime.use_shared_thread_pool(threads)
    result["ort_thread_pool"] = "shared" if shared else "per-session"
    modes = [m for m in (modes or pipeline.MODES) if m in pipeline.MODES]
    tmp = tempfile.TemporaryDirectory() if work_dir is None else None
    work = Path(work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if provider == "cuda" and torch.cuda.is_available() else "cpu"
    exports, cells, sites = [], [], {}
    try:
        for steps in time_steps:
            say(f"T={steps}: converting with psu-export")
            psu_paths, exact = {}, None
            for mode in modes:
                t0 = time.perf_counter()
                with _quiet():
                    conv = pipeline.prepare(model, weights=weights, input_shape=tuple(input_shape), time_steps=steps, mode=mode)
                    if conv.layout.kind == "static" and conv.layout.time_steps != steps:
                        raise click.UsageError(f"{model} runs {conv.layout.time_steps} steps in its own loop over one static input; "
                                               f"benchmark it with --time-steps {conv.layout.time_steps}")
                    path = work / f"psu_{mode}_T{steps}.onnx"
                    conv.export(path)
                if mode == "exact":
                    exact = conv  # its --cuda-graph build is timed too on the CUDA provider
                seconds = time.perf_counter() - t0
                name = "psu" if mode == "exact" else f"psu-{mode}"
                psu_paths[name] = path
                exports.append({"variant": name, "time_steps": steps, "export_s": round(seconds, 3), "file_bytes": file_size(path), "nodes": node_count(path)})
                sites[f"{name}@T={steps}"] = [site_record(s.name, s.algorithm) for s in conv.sites]
            module, neurons, layout = conv.loaded.module, conv.neurons, conv.layout
            naive_path, cached = naive_cache_path(cache_dir, model, weights, input_shape, steps), True
            try:
                if naive_path is None or not naive_path.exists():
                    say(f"T={steps}: naive torch.onnx.export (unrolled: its graph grows with T, so this can take minutes at T in the hundreds)")
                    naive_path = naive_path or work / f"naive_T{steps}.onnx"
                    (seconds, exporter), cached = export_naive(module, neurons, layout, steps, naive_path), False
                    naive_path.with_suffix(".json").write_text(json.dumps({"export_s": seconds, "exporter": exporter}))
                else:
                    say(f"T={steps}: naive export from the cache {naive_path}")
                    record = json.loads(naive_path.with_suffix(".json").read_text())
                    seconds, exporter = record["export_s"], record.get("exporter", "dynamo")
                exports.append({"variant": "naive", "time_steps": steps, "export_s": round(seconds, 3), "file_bytes": file_size(naive_path),
                                "nodes": node_count(naive_path), "cached": cached, "exporter": exporter})
            except BaselineExportError as exc:
                say(f"T={steps}: no naive baseline: {exc}")
                result.setdefault("baselines_unavailable", {})[f"naive at T={steps}"] = str(exc)
                naive_path = None
            bound_path = work / "bound.onnx"
            if not bound_path.exists() and "bound" not in result.get("baselines_unavailable", {}):
                try:
                    export_bound(module, neurons, layout, bound_path)
                except BaselineExportError as exc:
                    say(f"no bound: {exc}")
                    result.setdefault("baselines_unavailable", {})["bound"] = str(exc)
            baselines = {"naive": naive_path, "bound": bound_path if bound_path.exists() else None}
            paths = {**psu_paths, **{k: p for k, p in baselines.items() if p is not None}}
            sessions = {k: make_session(p, provider, threads) for k, p in paths.items()}
            eager_model = module.to(device)
            for batch in batches:
                x = layout.example(batch, steps, torch.Generator().manual_seed(steps * 1000 + batch))
                feed = x.numpy()
                runners = {}
                run_eager = _eager_runner(layout.driver(eager_model), neurons, x.to(device)) if eager else None
                for name, sess in sessions.items():
                    inp = sess.get_inputs()[0]
                    fixed = inp.shape[layout.batch_axis]
                    if isinstance(fixed, int) and fixed != batch:  # a baseline exported with a static batch
                        result.setdefault("baselines_unavailable", {})[f"{name} at T={steps}, batch {batch}"] = (
                            f"exported with a fixed batch of {fixed} (torch.onnx.export failed with a dynamic batch)")
                        continue
                    runners[name] = lambda sess=sess, inp=inp.name: sess.run(None, {inp: feed})
                if provider == "cuda" and exact is not None:  # the --cuda-graph build, replayed
                    runners[GRAPH_VARIANT] = _graph_runner(exact, work, steps, batch, feed, exports)
                # parity of ours against the naive export, on the spikes (first output)
                agree = float(np.mean(runners["naive"]()[0] == runners["psu"]()[0])) if "naive" in runners else None
                say(f"T={steps} B={batch}: timing {', '.join(runners)}" + (", then eager" if run_eager else ""))
                times, rounds = _interleaved(runners, min_runs, max_runs, cell_budget_s, run_eager)
                cell = Cell(steps, batch, {k: round(v, 4) for k, v in times.items()}, rounds)
                entry = asdict(cell)
                entry["spike_agreement_psu_vs_naive"] = agree
                entry["speedup_vs_naive"] = _r(cell.ratio("naive", "psu"))
                if GRAPH_VARIANT in cell.times_ms:
                    entry["cuda_graph_speedup_vs_naive"] = _r(cell.ratio("naive", GRAPH_VARIANT))
                entry["speedup_vs_eager"] = _r(cell.ratio("eager", "psu"))
                entry["psu_over_bound"] = _r(cell.ratio("psu", "bound"))
                # the speed-up over naive an exact export would reach if its neurons cost nothing
                entry["ceiling_vs_naive"] = _r(cell.ratio("naive", "bound"))
                cells.append(entry)
                say(f"T={steps} B={batch}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in cell.times_ms.items())
                    + f"; x{entry['speedup_vs_naive']} vs naive, {entry['psu_over_bound']} x bound")
            reset_neurons(neurons)
            module.to("cpu")
    finally:
        if tmp is not None:
            tmp.cleanup()
    result.update({"modes": modes, "exports": exports, "cells": cells, "algorithms": sites})
    return result


#: the variant name of the ``convert --cuda-graph`` build (CUDA provider only)
GRAPH_VARIANT = "psu-cuda-graph"


def _eager_runner(driver, neurons, x):
    """One sequential run of the original in PyTorch (its neurons' state reset first)."""
    import torch

    from .capture import reset_neurons

    def run():
        reset_neurons(neurons)
        with torch.no_grad():
            driver(x)
        if x.is_cuda:
            torch.cuda.synchronize()

    return run


def _graph_runner(conversion, work: Path, steps: int, batch: int, feed, exports: list):
    """Export the static build of ``conversion`` for (T, batch), and a function running it
    under a CUDA graph with host input and outputs (as ``session.run`` has them)."""
    from .runtime import GraphRunner

    path = work / f"psu_cuda_graph_T{steps}_B{batch}.onnx"
    t0 = time.perf_counter()
    with _quiet():
        emitted = conversion.export(path, batch=batch, cuda_graph=True)
    exports.append({"variant": GRAPH_VARIANT, "time_steps": steps, "batch": batch, "export_s": round(time.perf_counter() - t0, 3),
                    "file_bytes": file_size(path), "nodes": node_count(path), "waves": emitted.waves})
    runner = GraphRunner(runtime.make_session(path, "cuda", cuda_graph=True), feed).warm_up()
    return lambda: runner.run(feed)


def naive_cache_path(cache_dir, model, weights, input_shape, steps):
    """Where the naive export of (model, weights, shape, T) is cached (None: no cache).

    The unrolled export takes minutes at T=256; its export time is measured once and kept
    beside the file.  The key holds what the export depends on: a ``module:factory``
    model's module source, a model file's size and modification time, the weights' time,
    the shape, T and the torch version.
    """
    if cache_dir is None:
        return None
    import hashlib
    import importlib

    import torch

    if Path(model).is_file():
        stat = Path(model).stat()
        source, name = [stat.st_size, stat.st_mtime], Path(model).stem
    else:
        name = model.rsplit(".", 1)[-1].replace(":", "_")
        try:
            source = Path(importlib.import_module(model.split(":")[0]).__file__).read_text()
        except Exception:  # noqa: BLE001 - not importable here: the model name alone
            source = None
    key = json.dumps([model, source, weights and Path(weights).stat().st_mtime, list(input_shape), steps, torch.__version__])
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return Path(cache_dir) / f"naive_{name}_T{steps}_{digest}.onnx"


def _r(value):
    return None if value is None else round(value, 3)


# ----------------------------------------------------------------------------- reports


def markdown(results: list[dict]) -> str:
    lines = []
    machine = next((r["machine"] for r in results if "machine" in r), None)
    if machine:
        isa = f" ({machine['cpu_vector_isa']})" if machine.get("cpu_vector_isa") else ""
        lines.append(f"Machine: {machine['cpu']}{isa}, {machine['cpu_cores']} cores; GPU: {machine['gpu'] or 'none'}; "
                     f"torch {machine['torch']}, onnxruntime {machine['onnxruntime']}; load average at start {machine.get('load_average_at_start')}")
        lines.append("")
    for r in results:
        title = f"### {r['model']} (input {tuple(r['input_shape'])}, provider {r['provider']})"
        lines.append(title)
        if r.get("skipped"):
            lines += ["", f"skipped: {r['skipped']}", ""]
            continue
        variants = [v for v in ("eager", "naive", "psu", GRAPH_VARIANT, "psu-psu", "psu-stochastic", "bound") if any(v in c["times_ms"] for c in r["cells"])]
        lines.append("")
        graph = GRAPH_VARIANT in variants
        lines.append("| T | batch | " + " | ".join(f"{v} ms" for v in variants) + " | speed-up vs naive |"
                     + (" CUDA graph vs naive |" if graph else "") + " speed-up vs eager | psu / bound | ceiling vs naive | runs |")
        lines.append("|---:|---:|" + "---:|" * (len(variants) + graph) + "---:|---:|---:|---:|---:|")
        for c in r["cells"]:
            t = c["times_ms"]
            row = [str(c["time_steps"]), str(c["batch"])] + [f"{t[v]:.3f}" if v in t else "-" for v in variants]
            row += [_fmt(c["speedup_vs_naive"], "x")] + ([_fmt(c.get("cuda_graph_speedup_vs_naive"), "x")] if graph else [])
            row += [_fmt(c["speedup_vs_eager"], "x"), _fmt(c["psu_over_bound"], "x"), _fmt(c.get("ceiling_vs_naive"), "x"), str(c["runs"])]
            lines.append("| " + " | ".join(row) + " |")
        lines += [""] + _ceiling_lines(r["cells"])
        lines.append("| variant | T | export s | file kB | nodes |")
        lines.append("|---|---:|---:|---:|---:|")
        for e in r["exports"]:
            note = " (cached)" if e.get("cached") else ""
            variant = e["variant"] + (f" (batch {e['batch']})" if "batch" in e else "")
            lines.append(f"| {variant} | {e['time_steps']} | {e['export_s']:.2f}{note} | {e['file_bytes'] / 1024:.0f} | {e['nodes']} |")
        lines.append("")
        for baseline, reason in r.get("baselines_unavailable", {}).items():
            lines.append(f"- no {baseline} baseline: {reason}")
        lines += _algorithm_lines(r["algorithms"])
        for e in r["exports"]:
            if e.get("waves"):
                lines.append(f"- `{GRAPH_VARIANT}` (T={e['time_steps']}, batch {e['batch']}): {'; '.join(e['waves'])}")
        lines.append("")
    return "\n".join(lines)


#: a speed-up over the naive export below this is explained when the bound caps it
LOW_SPEEDUP = 1.5


def _ceiling_lines(cells: list[dict]) -> list[str]:
    """Why a low speed-up is the most an exact export gets: the layers between the neurons set the time.

    Said for cells whose ``ceiling`` (naive / bound) is itself below :data:`LOW_SPEEDUP`.
    """
    capped = [c for c in cells if c["speedup_vs_naive"] is not None and c["speedup_vs_naive"] < LOW_SPEEDUP
              and c.get("ceiling_vs_naive") is not None and c["ceiling_vs_naive"] < LOW_SPEEDUP]
    if not capped:
        return []
    where = ", ".join(f"T={c['time_steps']} batch {c['batch']} ({c['ceiling_vs_naive']:.2f}x)" for c in capped)
    return [f"The `ceiling` is below {LOW_SPEEDUP}x at {where}: even with neurons that cost nothing, the "
            "same network with activations in their place (the bound) is only that much faster than the naive "
            "export, so its convolutions and matrix products, which an exact export must keep, set the time there.", ""]


def site_record(layer: str, algorithm) -> dict:
    """A layer's algorithm as the results file keeps it (``mode_reason``: an approximate mode's own part of ``reason``)."""
    record = {"name": layer, "algorithm": algorithm.name, "reason": algorithm.reason}
    if algorithm.mode_reason:
        record["mode_reason"] = algorithm.mode_reason
    return record


def _algorithm_lines(algorithms: dict[str, list[dict]]) -> list[str]:
    """The layers' algorithms and why: one line per choice, naming the variants and layers that made it.

    An approximate mode's line gives only its own reason (``mode_reason``): where it keeps a
    layer exact, the exact variant's line gives the exact reason.
    """
    by_choice = {}  # (variant, algorithm, reason) -> {layer: [T=..]}
    for key, sites in algorithms.items():
        variant, where = key.split("@", 1)
        for site in sites:
            reason = site.get("mode_reason") or site["reason"]
            by_choice.setdefault((variant, site["algorithm"], reason), {}).setdefault(site["name"], []).append(where)
    variants = {}  # (algorithm, reason, layers) -> [variant]
    for (variant, algorithm, reason), layers in by_choice.items():
        where = tuple((name, tuple(steps)) for name, steps in layers.items())
        variants.setdefault((algorithm, reason, where), []).append(variant)
    lines = []
    for (algorithm, reason, where), names in variants.items():
        steps = {s for _, s in where}
        layers = ", ".join(f"`{name}`" + ("" if len(steps) == 1 else f" ({', '.join(s)})") for name, s in where)
        if len(steps) == 1:
            layers += f" ({', '.join(next(iter(steps)))})"
        lines.append(f"- {', '.join(names)}: {layers}: {algorithm}, {reason}")
    return lines


def _fmt(value, suffix=""):
    return "-" if value is None else f"{value:.2f}{suffix}"


def plot(results: list[dict], path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    done = [r for r in results if not r.get("skipped")]
    if not done:
        return False
    batches = sorted({c["batch"] for r in done for c in r["cells"]})
    fig, axes = plt.subplots(len(done), len(batches), figsize=(5 * len(batches), 3.6 * len(done)), squeeze=False)
    for i, r in enumerate(done):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            cells = [c for c in r["cells"] if c["batch"] == batch]
            for variant in ("eager", "naive", "psu", "psu-psu", "psu-stochastic", "psu-cuda-graph", "bound"):
                pts = [(c["time_steps"], c["times_ms"][variant]) for c in cells if variant in c["times_ms"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=variant)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T (time steps)")
            ax.set_ylabel("ms per batch (median)")
            ax.set_title(f"{r['model'].split(':')[0].rsplit('.', 1)[-1]}  batch {batch}  ({r['provider']})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return True


def write_results(results: list[dict], out_dir, stem: str = "results") -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "plot": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(markdown(results) + "\n")
    if not plot(results, paths["plot"]):
        paths.pop("plot")
    return paths


# ----------------------------------------------------------------------------- CLI


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers") from None
    if not values or any(v <= 0 for v in values):
        raise click.BadParameter(f"{text!r}: expected positive integers")
    return values


@click.command("bench")
@click.argument("model")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="State dict for a module:factory MODEL.")
@click.option("--input-shape", required=True, help="One time step's sample shape, e.g. 1,28,28.")
@click.option("--time-steps", "time_steps", default="16,64,256", show_default=True, help="Comma-separated T values to sweep (a model that loops over one static input runs its own T: give that one).")
@click.option("--batch", "batches", default="1,32", show_default=True, help="Comma-separated batch sizes.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="onnxruntime provider (cuda is skipped cleanly when unavailable).")
@click.option("--threads", type=int, default=0, help="intra-op threads for onnxruntime and torch (0: their default).")
@click.option("--quick", is_flag=True, help="Smoke run: T=16, batch 1, few repetitions.")
@click.option("--no-eager", is_flag=True, help="Skip the PyTorch eager baseline (slow for large T).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Write results.json/.md/.png here.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Keep the naive exports here and reuse them in later runs (they take minutes at T in the hundreds); "
                   "keyed on the model's source or file, the weights, the shape, T and the torch version.")
def bench(model, weights, input_shape, time_steps, batches, provider, threads, quick, no_eager, out_dir, cache_dir):
    """Benchmark MODEL's conversion against PyTorch eager, the naive unrolled ONNX export and the ANN bound.

    \b
    Example:
      psu-export bench psu_export.models.ref_mlp:make_net --input-shape 784 --time-steps 16,64 --batch 1,32
    """
    steps, bs = _ints(time_steps), _ints(batches)
    kwargs = {}
    if quick:
        steps, bs = steps[:1] if time_steps != "16,64,256" else (16,), bs[:1]
        kwargs = {"min_runs": 3, "max_runs": 10, "cell_budget_s": 0.5}
    result = run_benchmark(model, _ints(input_shape), weights, steps, bs, provider, threads=threads, eager=not no_eager,
                           progress=lambda m: click.echo(m, err=True), shared_thread_pool=True, cache_dir=cache_dir, **kwargs)
    text = markdown([result])
    click.echo(text)
    if out_dir:
        paths = write_results([result], out_dir, "bench")
        click.echo(f"wrote {', '.join(str(p) for p in paths.values())}", err=True)
    if result.get("skipped"):
        sys.exit(0)
