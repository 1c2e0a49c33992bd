#!/usr/bin/env python
"""The reference benchmark suite (issue 5): psu-export vs PyTorch eager, the naive unrolled
ONNX export and the ANN bound, on the reference snnTorch MLP and conv net.

    python benchmarks/run_suite.py                 # full sweep, T in {16, 64, 256} x batch {1, 32} (~10 min on 2 cores)
    python benchmarks/run_suite.py --quick         # CI smoke (< 60 s): T=16, batch 1
    python benchmarks/run_suite.py --provider cuda # onnxruntime CUDA provider (skipped cleanly when unavailable)

Writes ``results.json``, ``results.md`` and ``results.png`` into ``--out``
(default ``benchmarks/results/``, with the provider in the file names).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

#: (factory, one step's input shape)
REFERENCE_MODELS = [
    ("psu_export.models.ref_mlp:make_net", (784,)),
    ("psu_export.models.ref_convnet:make_net", (1, 28, 28)),
]


def main(argv=None) -> int:
    from psu_export.bench import provider_available, run_benchmark, write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: T=16, batch 1, few repetitions (< 60 s)")
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--time-steps", default=None, help="comma-separated T values (default 16,64,256)")
    ap.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,32)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime/torch default)")
    ap.add_argument("--models", default=None, help="comma-separated subset of factories (default: all reference models)")
    ap.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager baseline")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--cache", default=str(HERE / "results" / ".cache"),
                    help="cache of the naive unrolled exports (minutes at T=256; their export time is kept); '' disables")
    args = ap.parse_args(argv)

    steps = tuple(int(v) for v in args.time_steps.split(",")) if args.time_steps else ((16,) if args.quick else (16, 64, 256))
    batches = tuple(int(v) for v in args.batch.split(",")) if args.batch else ((1,) if args.quick else (1, 32))
    timing = {"min_runs": 3, "max_runs": 10, "cell_budget_s": 0.3} if args.quick else {"min_runs": 7, "max_runs": 60, "cell_budget_s": 3.0}
    models = [m for m in REFERENCE_MODELS if not args.models or m[0] in args.models.split(",")]
    stem = ("quick" if args.quick else "results") + ("" if args.provider == "cpu" else f"_{args.provider}")
    if not provider_available(args.provider):
        print(f"provider {args.provider}: not available in this onnxruntime build; skipping (nothing measured)")
    results = []
    start = time.perf_counter()
    for factory, shape in models:
        print(f"== {factory}", flush=True)
        results.append(run_benchmark(factory, shape, None, steps, batches, args.provider, threads=args.threads,
                                     eager=not args.no_eager, cache_dir=args.cache or None, progress=lambda m: print("  " + m, flush=True),
                                     shared_thread_pool=True, **timing))
        if results[-1].get("skipped"):
            break
    for r in results:
        r["suite_seconds"] = round(time.perf_counter() - start, 1)
    paths = write_results(results, args.out, stem)
    print(Path(paths["markdown"]).read_text())
    print(f"suite took {time.perf_counter() - start:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
