#!/usr/bin/env python
"""Which exact neuron algorithm is fastest on the CUDA provider? (issue 5, GPU target)

On the GPU the exact ``Scan`` costs one host round of onnxruntime's subgraph executor per
step and layer, so psu-export was only 1.6-1.9x faster than the naive export at T = 64.
This experiment times, at a fixed T, on device buffers (IOBinding, TF32 off):

- ``naive``: the unrolled ``torch.onnx.export`` of the original;
- ``scan``: psu-export's exact file (time-folded layers, one ``Scan`` per neuron layer);
- ``scan-one-product``: the same file without row blocks (:mod:`psu_export.synaptic`: a
  wide product over at least 4,096 rows runs as 8 row blocks, which paid on the CPU);
- ``unrolled``: the same file with every ``Scan`` unrolled over T, as ``convert --cuda-graph``
  builds it (:func:`psu_export.cuda_graph.static_build`: the same operations in the same
  order, the spike arithmetic folded exactly); chained layers run in waves
  (:mod:`psu_export.wavefront`), whose chunked products cuBLAS / cuDNN may round
  differently from the whole sequence's;
- ``unrolled-layers``: the same without the waves, the layers one after the other (the
  same floats as ``scan``);
- ``same floats as scan`` compares each with ``scan`` bit for bit;
- ``psu``: the time-parallel PSU reset mode (an approximation, for comparison);
- each of them again under a CUDA graph (``enable_cuda_graph``: one graph launch replaces
  the per-node kernel launches; onnxruntime refuses it for graphs with control flow).

    python benchmarks/cuda_algorithms.py prepare DIR      # here (CPU): write the ONNX files
                                                          # (the naive one from the suite's cache if there)
    python benchmarks/cuda_algorithms.py run DIR --out O  # on the CUDA machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MODELS = {"mlp": ("psu_export.models.ref_mlp:make_net", (784,)), "conv": ("psu_export.models.ref_convnet:make_net", (1, 28, 28))}


def prepare(folder: Path, steps: int, models, cache_dir: str | None) -> None:
    """Export the exact and psu-mode conversions, the exact one without row blocks, and the
    naive export of each reference model (copied from the suite's cache when it is there)."""
    import shutil

    from psu_export import pipeline
    from psu_export.bench import export_naive, naive_cache_path

    folder.mkdir(parents=True, exist_ok=True)
    for key in models:
        factory, shape = MODELS[key]
        for mode in ("exact", "psu"):
            conv = pipeline.prepare(factory, input_shape=shape, time_steps=steps, mode=mode)
            conv.export(folder / f"{key}_{'scan' if mode == 'exact' else mode}_T{steps}.onnx")
            if mode == "exact":
                conv.export(folder / f"{key}_scan-one-product_T{steps}.onnx", row_blocks=False)
        cached = naive_cache_path(cache_dir, factory, None, shape, steps)
        if cached is not None and cached.exists():
            shutil.copyfile(cached, folder / f"{key}_naive_T{steps}.onnx")
        else:
            export_naive(conv.loaded.module, conv.neurons, conv.layout, steps, folder / f"{key}_naive_T{steps}.onnx")
        print("prepared", key, flush=True)


def _runner(model, x, provider: str, cuda_graph: bool):
    """A :class:`GraphRunner` of ``model`` fixed to ``x``'s shape, and its session's load time."""
    from psu_export.cuda_graph import with_input_shape, with_static_output_shapes
    from psu_export.runtime import GraphRunner, make_session

    data = with_static_output_shapes(with_input_shape(model, x.shape)).SerializeToString()
    t0 = time.perf_counter()
    session = make_session(data, provider, cuda_graph=cuda_graph)
    return GraphRunner(session, x, device=provider), time.perf_counter() - t0


def run(folder: Path, steps: int, batches, rounds: int, out: Path, provider: str = "cuda", models=tuple(MODELS)) -> int:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from psu_export.cuda_graph import static_build
    from psu_export.runtime import provider_available, use_shared_thread_pool

    out.mkdir(parents=True, exist_ok=True)
    use_shared_thread_pool()
    if not provider_available(provider):
        print("CUDAExecutionProvider not available: nothing measured")
        return 0
    rows = []
    for key in models:
        shape = MODELS[key][1]
        for batch in batches:
            x = (np.random.default_rng(0).random((steps, batch, *shape)) < 0.3).astype(np.float32)
            files = {v: onnx.load(folder / f"{key}_{v}_T{steps}.onnx") for v in ("naive", "scan", "scan-one-product", "psu")}
            files["unrolled"] = static_build(files["scan"], x.shape, {})
            files["unrolled-layers"] = static_build(files["scan"], x.shape, {}, waves=False)
            runners, load_s, errors = {}, {}, {}
            for variant, model in files.items():
                for graph in (False, True) if provider == "cuda" else (False,):
                    name = variant + (" + CUDA graph" if graph else "")
                    try:
                        runner, load_s[name] = _runner(model, x, provider, graph)
                        runners[name] = runner.warm_up(5)
                    except Exception as exc:  # noqa: BLE001 - recorded in the report
                        errors[name] = str(exc).splitlines()[0][:200]
            times = {name: [] for name in runners}
            for _ in range(rounds):  # interleaved, on device buffers (no host copies)
                for name, r in runners.items():
                    t0 = time.perf_counter()
                    r.replay()
                    times[name].append(time.perf_counter() - t0)
            results = {}
            for name, r in runners.items():  # a replay that skipped work would leave the NaN
                r.clear_outputs()
                results[name] = r.run()
            reference = results.get("scan")
            naive_ms = float(np.median(times["naive"])) * 1e3 if "naive" in times else None
            for name, r in runners.items():
                ms = float(np.median(times[name])) * 1e3
                same = None
                if reference is not None and name.split(" ")[0] in ("scan", "scan-one-product", "unrolled", "unrolled-layers"):
                    same = all(np.array_equal(a, b) for a, b in zip(reference, results[name]))
                rows.append({"model": key, "T": steps, "batch": batch, "variant": name, "ms": round(ms, 4),
                             "speedup_vs_naive": round(naive_ms / ms, 2) if naive_ms else None,
                             "session_s": round(load_s[name], 2), "bit_identical_to_scan": same})
                print(rows[-1], flush=True)
            for name, err in errors.items():
                rows.append({"model": key, "T": steps, "batch": batch, "variant": name, "error": err})
                print(rows[-1], flush=True)
    (out / f"{provider}_algorithms.json").write_text(json.dumps({"onnxruntime": ort.__version__, "rounds": rounds, "rows": rows}, indent=1))
    lines = ["| model | T | batch | variant | ms (median) | vs naive | same floats as scan |", "|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['T']} | {r['batch']} | {r['variant']} | refused: {r['error']} | | |")
        else:
            lines.append(f"| {r['model']} | {r['T']} | {r['batch']} | {r['variant']} | {r['ms']:.3f} | {r['speedup_vs_naive']}x | "
                         f"{'' if r['bit_identical_to_scan'] is None else r['bit_identical_to_scan']} |")
    (out / f"{provider}_algorithms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["prepare", "run"])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--time-steps", type=int, default=64)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--provider", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of the script (no CUDA graphs)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--cache", default=str(HERE / "results" / ".cache"), help="prepare: the suite's cache of naive exports ('' disables)")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.action == "prepare":
        prepare(args.folder, args.time_steps, models, args.cache or None)
        return 0
    return run(args.folder, args.time_steps, [int(b) for b in args.batch.split(",")], args.rounds, args.out, args.provider, models)


if __name__ == "__main__":
    sys.exit(main())
