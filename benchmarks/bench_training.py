"""Training speed: forward + backward of PSU / IPSU / RPSU vs a sequential snnTorch ``Leaky`` loop.

Each candidate is one layer ``Linear(N, N)`` (applied once to the whole ``[T, B, N]``
sequence, the same for every candidate) followed by the neuron over ``[T, B, N]``; one
training step is forward, a fixed random readout of the spikes as the loss, and backward.
snnTorch's ``Leaky`` runs its Python loop over time (``spk, mem = lif(cur[t], mem)``);
the PSU family runs every step at once (:mod:`psu_export.psu`).

The candidates are timed interleaved (each repeat runs every candidate once, in a rotating
order) and the median of the repeats is reported, with the speed-up over snnTorch computed
from medians of the same run.  Not a test; run it by hand::

    python benchmarks/bench_training.py                       # CPU, writes results/training_cpu.{md,json}
    python benchmarks/bench_training.py --device cuda         # results/training_cuda.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class Layer(nn.Module):
    def __init__(self, features: int, neuron: str, steps: int):
        super().__init__()
        from psu_export.psu import IPSU, PSU, RPSU

        self.fc = nn.Linear(features, features)
        self.kind = neuron
        if neuron == "snntorch.Leaky":
            import snntorch as snn

            self.neuron = snn.Leaky(beta=0.5, threshold=0.5)  # tau = 2: the PSU's decay 1 - 1/tau
        else:
            make = {"PSU": lambda: PSU(2.0, 0.5), "IPSU": lambda: IPSU(steps, 2.0, 0.5, init="lif"), "RPSU": lambda: RPSU(steps, 2.0, 0.5)}
            self.neuron = make[neuron]()

    def forward(self, x):
        cur = self.fc(x) * 2.0
        if self.kind != "snntorch.Leaky":
            return self.neuron(cur)
        mem = self.neuron.init_leaky()
        spikes = []
        for t in range(cur.shape[0]):
            spk, mem = self.neuron(cur[t], mem)
            spikes.append(spk)
        return torch.stack(spikes)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(layer: Layer, x, readout, device) -> float:
    _sync(device)
    start = time.perf_counter()
    layer.zero_grad(set_to_none=True)
    spikes = layer(x)
    loss = (spikes * readout).sum()
    loss.backward()
    _sync(device)
    return time.perf_counter() - start


def run(steps_list, batch, features, repeats, warmup, device) -> list[dict]:
    candidates = ("snntorch.Leaky", "PSU", "IPSU", "RPSU")
    rows = []
    for steps in steps_list:
        torch.manual_seed(steps)
        x = torch.rand(steps, batch, features, device=device)
        readout = torch.randn(steps, batch, features, device=device)
        layers = {name: Layer(features, name, steps).to(device) for name in candidates}
        times = {name: [] for name in candidates}
        for i in range(warmup + repeats):
            order = candidates[i % len(candidates):] + candidates[: i % len(candidates)]
            for name in order:
                elapsed = train_step(layers[name], x, readout, device)
                if i >= warmup:
                    times[name].append(elapsed)
        base = statistics.median(times["snntorch.Leaky"])
        for name in candidates:
            median = statistics.median(times[name])
            rows.append({"T": steps, "neuron": name, "median_ms": 1e3 * median, "min_ms": 1e3 * min(times[name]),
                         "speedup_vs_snntorch": base / median, "repeats": repeats})
        print(f"T={steps}: " + ", ".join(f"{r['neuron']} {r['median_ms']:.2f} ms ({r['speedup_vs_snntorch']:.2f}x)" for r in rows if r["T"] == steps), flush=True)
    return rows


def markdown(rows, env) -> str:
    lines = [
        f"# Training step (forward + backward): PSU family vs snnTorch Leaky loop ({env['device']})",
        "",
        f"Layer: Linear({env['features']}, {env['features']}) on the whole sequence + neuron over [T, B={env['batch']}, N={env['features']}]; "
        f"median of {env['repeats']} interleaved repeats after {env['warmup']} warm-ups. "
        f"torch {env['torch']}, {env['threads']} thread(s), {env['machine']}.",
        "",
        "| T | snnTorch Leaky loop (ms) | PSU (ms) | IPSU (ms) | RPSU (ms) | PSU speed-up | IPSU speed-up | RPSU speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for steps in sorted({r["T"] for r in rows}):
        by = {r["neuron"]: r for r in rows if r["T"] == steps}
        lines.append(
            f"| {steps} | {by['snntorch.Leaky']['median_ms']:.2f} | {by['PSU']['median_ms']:.2f} | {by['IPSU']['median_ms']:.2f} | "
            f"{by['RPSU']['median_ms']:.2f} | {by['PSU']['speedup_vs_snntorch']:.2f}x | {by['IPSU']['speedup_vs_snntorch']:.2f}x | "
            f"{by['RPSU']['speedup_vs_snntorch']:.2f}x |"
        )
    lines += ["", "Speed-up = snnTorch median / candidate median, from the same run."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="8,32,128", help="comma-separated T values")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps_list = [int(s) for s in args.steps.split(",") if s.strip()]
    rows = run(steps_list, args.batch, args.features, args.repeats, args.warmup, device)
    env = {
        "device": args.device if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores" + (f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""),
        "batch": args.batch, "features": args.features, "repeats": args.repeats, "warmup": args.warmup, "python": sys.version.split()[0],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"training_{device.type}"
    (args.out / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    (args.out / f"{name}.md").write_text(markdown(rows, env))
    print(markdown(rows, env))


if __name__ == "__main__":
    main()
