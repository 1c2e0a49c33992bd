"""``psu-export calibrate``: fit the reset estimate of the approximate modes to the original.

``--reset psu|stochastic`` replaces the spikes in each subtract-reset layer's reset term by
``Z = sigmoid(a u + b)`` of the reset-free potential ``u`` (:mod:`psu_export.ops.reset`);
the paper's estimate is ``a = 1, b = 0``.  Calibration fits ``a`` and ``b`` per layer by
distillation against the original model's spikes on the user's data:

1. the data (``--data FILE.npz``: ``input`` and optional ``target``) is split along the
   batch into a fitting part and a held-out part (``--holdout``);
2. the original runs on the fitting part; each estimated layer's input currents and
   spikes are recorded (teacher forcing: every layer is fitted on the input the original
   gives it);
3. per layer, two fits from the paper's start: a logistic regression of the spikes on
   ``u`` (the estimate as the spike probability), then a few Adam steps that match the
   layer's spikes through the surrogate gradient of ``H(U - theta)``; the candidate
   (paper, logistic, matched) with the best fitting-part spike agreement is kept;
4. agreement with the original (per-layer spikes, outputs, argmax, accuracy on
   ``target``) is measured end to end on the held-out part before and after, and the
   calibrated model is written as ONNX (the fitted ``a``, ``b`` are initializers of each
   ``psu`` node and are recorded in the metadata, where ``psu-export verify`` reads them).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

from .cli import _finish_report, _prepare, _progress, console, handle_errors, model_options
from .cli import cli as _cli_group
from .errors import EXIT_OK, UsageError


# ------------------------------------------------------------------ data


def split_batch(x: torch.Tensor, target, holdout: float, seed: int, batch_dim: int):
    """(fit, held-out) parts of ``x`` (and ``target``) along the batch, seeded."""
    n = x.shape[batch_dim]
    if n < 2:
        raise UsageError(f"calibration needs at least 2 samples in --data (got {n}).")
    n_hold = min(n - 1, max(1, int(round(n * holdout))))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    hold, fit = order[:n_hold], order[n_hold:]
    pick = lambda idx: (x.index_select(batch_dim, idx), None if target is None else target[idx])  # noqa: E731
    return pick(fit), pick(hold)


def record_layers(conversion, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run the original on ``x``; per neuron layer, its input currents and spikes ``[T, B, ...]``."""
    from .capture import reset_neurons

    inputs: dict[str, list] = {n.name: [] for n in conversion.neurons}
    spikes: dict[str, list] = {n.name: [] for n in conversion.neurons}
    handles = []
    for n in conversion.neurons:
        def pre(module, args, _name=n.name):
            inputs[_name].append(args[0].detach().clone())

        def post(module, args, out, _name=n.name):
            spikes[_name].append((out[0] if isinstance(out, (tuple, list)) else out).detach().clone())

        handles += [n.module.register_forward_pre_hook(pre), n.module.register_forward_hook(post)]
    model = conversion.loaded.module
    reset_neurons(conversion.neurons)
    try:
        with torch.no_grad():
            conversion.layout.driver(model)(x)
    finally:
        for h in handles:
            h.remove()
        reset_neurons(conversion.neurons)
    return {n.name: (n.over_time(inputs[n.name]), n.over_time(spikes[n.name])) for n in conversion.neurons if inputs[n.name]}


# ------------------------------------------------------------------ fitting


def _layer_program(conversion, index: int):
    """(options with the pre-reset potential reported and no sampling, parameter dict) of site ``index``."""
    options = conversion.parallel.site_options[index]
    fit_options = dataclasses.replace(options, kind="ProbabilisticReset", membrane="pre", key_mul=1, key_add=0)
    params = {name: getattr(conversion.parallel, f"site{index}_{name}").detach().clone() for name in options.param_names}
    return fit_options, params


def _run_layer(options, params: dict, current: torch.Tensor, a, b, alpha: float = 4.0):
    from .ops.reset import run_reset_layer
    from .psu import SurrogateBuilder

    values = dict(params, prob_scale=a, prob_offset=b)
    out = run_reset_layer(SurrogateBuilder(alpha), current, [values[n] for n in options.param_names], options)
    return out[0], out[1]


def fit_layer(conversion, index: int, current: torch.Tensor, target_spikes: torch.Tensor, steps: int = 150) -> dict:
    """Fit ``a``, ``b`` of one layer on teacher-forced ``current``; returns the chosen values and scores."""
    options, params = _layer_program(conversion, index)
    spike_scale = params["spike_scale"]
    fired = (target_spikes != 0).float()
    theta = params["threshold"]

    def agreement(a, b) -> float:
        with torch.no_grad():
            spikes, _ = _run_layer(options, params, current, torch.tensor(float(a)), torch.tensor(float(b)))
        return float(((spikes != 0).float() == fired).float().mean())

    candidates = {"paper": (1.0, 0.0)}
    # 1. logistic regression of the spikes on the reset-free potential u
    with torch.no_grad():
        zero_reset = dict(params, reset_scale=torch.zeros_like(params["reset_scale"]))
        _, u = _run_layer(options, zero_reset, current, torch.tensor(1.0), torch.tensor(0.0))
    a = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(0.0, requires_grad=True)
    lbfgs = torch.optim.LBFGS([a, b], lr=0.5, max_iter=60, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a * u + b, fired)
        loss.backward()
        return loss

    lbfgs.step(closure)
    if torch.isfinite(a) and torch.isfinite(b):
        candidates["logistic"] = (float(a.detach()), float(b.detach()))
    # 2. match the spikes themselves through the surrogate gradient, from the best so far
    start = max(candidates.values(), key=lambda ab: agreement(*ab))
    a = torch.tensor(start[0], requires_grad=True)
    b = torch.tensor(start[1], requires_grad=True)
    adam = torch.optim.Adam([a, b], lr=0.05)
    scale = torch.clamp(theta.abs(), min=1e-3)
    for _ in range(steps):
        adam.zero_grad()
        _, potential = _run_layer(options, params, current, a, b)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(8.0 * (potential - theta) / scale, fired)
        loss.backward()
        adam.step()
    if torch.isfinite(a) and torch.isfinite(b):
        candidates["matched"] = (float(a.detach()), float(b.detach()))
    scores = {name: agreement(*ab) for name, ab in candidates.items()}
    best = max(scores, key=scores.get)
    del spike_scale
    return {"prob_scale": candidates[best][0], "prob_offset": candidates[best][1], "chosen": best, "fit_agreement": scores}


# ------------------------------------------------------------------ evaluation


def evaluate(conversion, x: torch.Tensor, target) -> dict:
    """End-to-end agreement of the rewritten (approximate) model with the original on ``x``."""
    from .verify import _argmax_classes, run_original, run_parallel

    time_first = conversion.layout.batch_axis == 1
    ref_out, ref_layers = run_original(conversion.loaded.module, conversion.neurons, conversion.layout, x)
    par_out, par_layers = run_parallel(conversion.parallel, x)
    layers = {name: float(((ref_layers[name] != 0) == (par_layers[name] != 0)).float().mean()) for name in par_layers if name in ref_layers}
    result = {"layer_spike_agreement": layers, "spike_agreement": min(layers.values()) if layers else None}
    ref_classes, par_classes = _argmax_classes(ref_out[0], time_first), _argmax_classes(par_out[0], time_first)
    if ref_classes is not None:
        result["argmax_agreement"] = float((ref_classes == par_classes).float().mean())
        if target is not None and ref_classes.shape[0] == target.shape[0]:
            result["accuracy_original"] = float((ref_classes == target.long()).float().mean())
            result["accuracy_converted"] = float((par_classes == target.long()).float().mean())
    return result


def calibrate_conversion(conversion, x_fit: torch.Tensor, steps: int = 150, progress=None) -> dict[str, dict]:
    """Fit every estimated layer of ``conversion`` on ``x_fit`` and load the result into it."""
    sites = conversion.estimate_sites()
    if not sites:
        raise UsageError(
            f"--reset {conversion.mode}: no layer has an estimated reset (only subtract-reset leaky layers do; "
            "see `psu-export inspect` for each layer's algorithm), so there is nothing to calibrate."
        )
    recorded = record_layers(conversion, x_fit)
    fitted = {}
    for i in sites:
        name = conversion.sites[i].name
        if progress:
            progress(f"fitting the reset estimate of {name}")
        current, spikes = recorded[name]
        if current.shape != spikes.shape:  # a static current given once: the same at every step
            current = current.unsqueeze(0).expand(spikes.shape[0], *current.shape)
        fitted[name] = fit_layer(conversion, i, current, spikes, steps)
    conversion.set_reset_estimate({k: {"prob_scale": v["prob_scale"], "prob_offset": v["prob_offset"]} for k, v in fitted.items()})
    return fitted


# ------------------------------------------------------------------ command


@click.command()
@click.argument("model")
@click.argument("out", type=click.Path(dir_okay=False))
@model_options
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="FILE.npz with 'input' (and optional 'target'): the user's data, split into fitting and held-out parts.")
@click.option("--reset", "reset_mode", type=click.Choice(["psu", "stochastic"]), default="psu", show_default=True,
              help="The approximate reset mode to calibrate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and of the stochastic reset's RNG.")
@click.option("--holdout", type=click.FloatRange(0.05, 0.95), default=0.3, show_default=True, help="Fraction of --data held out for the before/after comparison.")
@click.option("--steps", type=click.IntRange(0, 10_000), default=150, show_default=True, help="Optimizer steps of the spike-matching fit per layer.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the calibration (and parity) report as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the export parity check of the calibrated file.")
@handle_errors
def calibrate(model, out, weights, time_steps, input_shape, input_kind, trust_model, data, reset_mode, seed, holdout, steps, report_path, no_verify):
    """Fit the reset estimate of --reset psu|stochastic to the original's spikes; write OUT.

    Per layer, the scale and offset of the spike probability sigmoid(a u + b) are fitted by
    distillation against the original model's spikes on --data, then agreement and accuracy
    before and after are reported on the held-out part.

    \b
    Example:
      psu-export calibrate psu_export.models.digits:make_net --weights models/digits_snn.pt \\
          digits_psu.onnx --time-steps 16 --input-shape 64 --data train.npz --reset psu
    """
    from rich.table import Table

    from .verify import load_data

    if not Path(out).resolve().parent.is_dir():
        raise UsageError(f"The output directory {Path(out).resolve().parent} does not exist; create it or choose another output path.")
    conversion = _prepare(model, weights, time_steps, input_shape, input_kind, trust_model, data, mode=reset_mode, seed=seed)
    x, target = load_data(data, conversion.layout)
    batch_dim = conversion.layout.batch_axis
    (x_fit, _), (x_hold, t_hold) = split_batch(x, target, holdout, seed, batch_dim)
    _progress(f"calibrating on {x_fit.shape[batch_dim]} samples, {x_hold.shape[batch_dim]} held out")
    before = evaluate(conversion, x_hold, t_hold)
    fitted = calibrate_conversion(conversion, x_fit, steps, progress=_progress)
    after = evaluate(conversion, x_hold, t_hold)

    table = Table(title=f"Calibration of --reset {reset_mode} (held-out agreement with the original)")
    for col in ("metric", "paper estimate (a=1, b=0)", "calibrated"):
        table.add_column(col)
    for layer in after["layer_spike_agreement"]:
        table.add_row(f"spikes {layer}", _pct(before["layer_spike_agreement"].get(layer)), _pct(after["layer_spike_agreement"][layer]))
    for key in ("argmax_agreement", "accuracy_converted", "accuracy_original"):
        if key in after:
            table.add_row(key.replace("_", " "), _pct(before.get(key)), _pct(after.get(key)))
    console.print(table)
    for name, values in fitted.items():
        console.print(f"{name}: a={values['prob_scale']:.4g}, b={values['prob_offset']:.4g} ({values['chosen']})")
    _progress("exporting the calibrated model")
    calibration = {"mode": reset_mode, "seed": seed, "holdout": holdout, "fit_samples": int(x_fit.shape[batch_dim]),
                   "held_out_samples": int(x_hold.shape[batch_dim]), "layers": fitted, "before": before, "after": after}
    emitted = conversion.export(out, extra_metadata={"psu_export.calibration": json.dumps(calibration)})
    console.print(f"wrote {emitted.path} ({emitted.node_count} nodes, psu nodes: {', '.join(emitted.psu_nodes)})")
    if no_verify:
        if report_path:
            from .files import atomic_write_text

            atomic_write_text(report_path, json.dumps({"calibration": calibration}, indent=2))
        sys.exit(EXIT_OK)
    _progress("verifying export parity on the held-out data")
    with tempfile.TemporaryDirectory() as tmp:
        held = Path(tmp) / "held_out.npz"
        arrays = {"input": x_hold.numpy()}
        if t_hold is not None:
            arrays["target"] = t_hold.numpy()
        np.savez(held, **arrays)
        report = conversion.verify(out, data=str(held), providers=("cpu", "cuda"), seed=seed, progress=_progress)
    report.notes.append("calibration: " + json.dumps({k: calibration[k] for k in ("before", "after")}))
    code = _finish_report(report, None)
    if report_path:
        from .files import atomic_write_text

        atomic_write_text(report_path, json.dumps(dict(report.to_json(), calibration=calibration), indent=2))
        console.print(f"report written to {report_path}")
    sys.exit(code)


if "calibrate" not in _cli_group.commands:  # imported before psu_export.cli finished registering
    _cli_group.add_command(calibrate)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
