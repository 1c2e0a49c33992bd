"""The ``psu-export`` command line (DESIGN.md section 5)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click
from rich.console import Console

from .errors import EXIT_FAILURE, EXIT_OK, EXIT_PARITY, PsuExportError

# wide enough for the parity tables when the output is a file or a CI log
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _progress(message: str) -> None:
    console.print(f"[dim]…[/dim] {message}")


def handle_errors(func):
    """Turn PsuExportError into one readable paragraph and its exit code (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PsuExportError as exc:
            console.print(f"[bold red]error:[/bold red] {exc}", markup=True, highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)

    return wrapper


def model_options(func):
    func = click.option("--trust-model", is_flag=True, help="Allow unpickling arbitrary classes from a .pt model (runs code from the file).")(func)
    func = click.option("--input-kind", type=click.Choice(["auto", "sequence", "static", "step"]), default="auto", show_default=True,
                        help="How the model takes time: sequence [T,B,...], static [B,...] looped or repeated over T inside, or single step.")(func)
    func = click.option("--batch-first", is_flag=True, expose_value=False, callback=_remember,
                        help="The sequence is batch-first, [B, T, ...] (the model reads x[:, t]); found without the flag when the "
                             "model runs only that way. A single-step module's ONNX file then takes and returns [B, T, ...].")(func)
    func = click.option("--input-shape", help="One time step's sample shape, without batch and time, e.g. 1,28,28.")(func)
    func = click.option("--time-steps", "-T", type=int, default=25, show_default=True, help="Number of time steps T.")(func)
    func = click.option("--weights", type=click.Path(dir_okay=False), help="State dict for a module:factory MODEL.")(func)
    func = click.option("--nir-reset", type=click.Choice(["zero", "subtract"]), default="zero", show_default=True, expose_value=False,
                        callback=_remember, help="For a .nir MODEL: the reset after a spike (NIR cannot express subtract reset; zero is NIR's).")(func)
    func = click.option("--dt", type=float, default=None, expose_value=False, callback=_remember,
                        help="For a .nir MODEL: the forward-Euler time step (default 1e-4, what snnTorch and SpikingJelly export with).")(func)
    return func


def _remember(ctx, param, value):
    """Keep an option only _prepare reads (.nir, --batch-first) in the command's context, not as a parameter."""
    ctx.meta[f"psu_export.{param.name}"] = value
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="psu-export")
def cli():
    """Convert trained spiking neural networks into time-parallel ONNX, with parity reports.

    \b
    Example:
      psu-export convert psu_export.models.digits:make_net --weights models/digits_snn.pt \\
          digits.onnx --time-steps 16 --input-shape 64
    """


def _prepare(model, weights, time_steps, input_shape, input_kind, trust_model, data=None, onnx_path=None, mode="exact", seed=0, check=None):
    from .pipeline import prepare, sample_shape_from

    if not input_shape and not data and model.endswith(".nir"):
        from .nir_import import input_shape_of

        shape = input_shape_of(model)
        input_shape = ",".join(map(str, shape)) if shape else None
    shape = sample_shape_from(input_shape, onnx_path)
    meta = click.get_current_context().meta
    return prepare(model, weights, shape, time_steps, trust_model, input_kind, progress=_progress, mode=mode, seed=seed,
                   nir_dt=meta.get("psu_export.dt"), nir_reset=meta.get("psu_export.nir_reset") or "zero",
                   batch_first=bool(meta.get("psu_export.batch_first")), check=check)


def _finish_report(report, report_path) -> int:
    from .tables import print_report

    data = report.to_json()
    print_report(data, console)
    if report_path:
        report.write(report_path)
        console.print(f"report written to {report_path}")
    if report.provider_failed:
        return EXIT_FAILURE
    return EXIT_OK if report.passed else EXIT_PARITY


@cli.command()
@click.argument("model")
@click.argument("out", type=click.Path(dir_okay=False))
@model_options
@click.option("--reset", "reset_mode", type=click.Choice(["exact", "psu", "stochastic"]), default="exact", show_default=True,
              help="How neuron resets are computed: exact; psu = the paper's probabilistic reset (the spike-probability estimate "
                   "replaces the spikes in the reset term, approximate); stochastic = Bernoulli samples of it (seeded, reproducible).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the stochastic reset's RNG and of the synthetic verification inputs.")
@click.option("--data", type=click.Path(dir_okay=False), help="FILE.npz with array 'input' (and optional 'target') for verification.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the parity report as JSON.")
@click.option("--raster", type=click.Path(dir_okay=False), help="Write a PNG spike raster: original vs onnxruntime, per neuron layer.")
@click.option("--no-verify", is_flag=True, help="Skip the parity check after export.")
@click.option("--cuda-graph", is_flag=True,
              help="Build for onnxruntime's CUDA graphs (enable_cuda_graph): batch and T fixed, every neuron scan unrolled, "
                   "chained layers run in waves of time chunks; the same operations as the default build (see README, GPU).")
@click.option("--batch", type=int, default=1, show_default=True, help="The batch size of a --cuda-graph build.")
@handle_errors
def convert(model, out, weights, time_steps, input_shape, input_kind, trust_model, reset_mode, seed, data, report_path, raster, no_verify, cuda_graph, batch):
    """Rewrite MODEL into a time-parallel ONNX file OUT and check parity.

    MODEL is module:factory or path/to/file.py:factory (with --weights STATE_DICT), or a
    pickled .pt module.

    \b
    Example:
      psu-export convert mymodels:make_net --weights net.pt out.onnx --time-steps 25 --input-shape 1,28,28
    """
    from .errors import UsageError

    if not Path(out).resolve().parent.is_dir():
        raise UsageError(f"The output directory {Path(out).resolve().parent} does not exist; create it or choose another output path.")
    if batch < 1 or (batch != 1 and not cuda_graph):
        raise UsageError(f"--batch {batch}: the batch is fixed only by --cuda-graph builds, and must be at least 1.")
    from .pipeline import CheckInputs

    check = None if no_verify else CheckInputs(data, seed, batch if cuda_graph else None)
    conversion = _prepare(model, weights, time_steps, input_shape, input_kind, trust_model, data, mode=reset_mode, seed=seed, check=check)
    if data and conversion.check_run is None:  # (the probe's run loaded and took them already)
        from .verify import load_data

        load_data(data, conversion.layout)  # refuse bad data before writing anything
    _progress("exporting to ONNX")
    emitted = conversion.export(out, batch=batch, cuda_graph=True) if cuda_graph else conversion.export(out)
    described = (f"static build for CUDA graphs, input {list(conversion.layout.shape(batch))}" + "".join(f"; {w}" for w in emitted.waves)
                 if cuda_graph else "psu nodes: " + ", ".join(emitted.psu_nodes))
    console.print(f"wrote {emitted.path} ({emitted.node_count} nodes, {described})")
    if no_verify:
        sys.exit(EXIT_OK)
    _progress("verifying parity")
    report = conversion.verify(out, data=data, seed=seed, progress=_progress, raster=raster)
    sys.exit(_finish_report(report, report_path))


@cli.command()
@click.argument("model")
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@model_options
@click.option("--data", type=click.Path(dir_okay=False), help="FILE.npz with array 'input' (and optional 'target').")
@click.option("--batch", type=int, default=None, help="Batch size of the synthetic inputs  [default: 4, fewer past 25,000 steps (at most 100,000 sample-steps); a --cuda-graph build's own].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic inputs.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "all"]), default="all", show_default=True,
              help="onnxruntime provider(s); 'all' runs CUDA when available and lists it as unavailable otherwise.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the parity report as JSON.")
@click.option("--raster", type=click.Path(dir_okay=False), help="Write a PNG spike raster: original vs onnxruntime, per neuron layer.")
@handle_errors
def verify(model, onnx_file, weights, time_steps, input_shape, input_kind, trust_model, data, batch, seed, provider, report_path, raster):
    """Check that ONNX_FILE reproduces MODEL: original vs rewrite vs onnxruntime.

    \b
    Example:
      psu-export verify mymodels:make_net --weights net.pt out.onnx --report parity.json
    """
    from .errors import UsageError

    if batch is not None and batch < 1:
        raise UsageError(f"--batch must be at least 1 (got {batch}).")
    from .pipeline import CheckInputs, file_reset_mode

    mode, reset_seed, estimate = file_reset_mode(onnx_file)  # the file's --reset mode, seed and calibration
    conversion = _prepare(model, weights, time_steps, input_shape, input_kind, trust_model, data, onnx_file, mode=mode, seed=reset_seed,
                          check=CheckInputs(data, seed, batch))
    conversion.set_reset_estimate(estimate)
    providers = ("cpu", "cuda") if provider == "all" else (provider,)
    required = () if provider == "all" else (provider,)
    report = conversion.verify(onnx_file, data=data, batch=batch, providers=providers, required_providers=required, seed=seed, progress=_progress, raster=raster)
    sys.exit(_finish_report(report, report_path))


@cli.command()
@click.argument("model")
@model_options
@handle_errors
def inspect(model, weights, time_steps, input_shape, input_kind, trust_model):
    """Show MODEL's neuron layers, their exact specs and the chosen parallel algorithms.

    \b
    Example:
      psu-export inspect mymodels:make_net --weights net.pt --input-shape 1,28,28
    """
    from .tables import sites_table

    conversion = _prepare(model, weights, time_steps, input_shape, input_kind, trust_model)
    out = Console()
    out.print(f"input: {conversion.layout.kind} {conversion.layout.describe()}, T={conversion.layout.time_steps}, dynamic time: {conversion.layout.dynamic_time}, dynamic batch: {conversion.captured.dynamic_batch}")
    out.print(sites_table([site.to_json() for site in conversion.sites]))
    for site in conversion.sites:
        out.print(f"{site.name}: " + json.dumps(site.spec.to_json()))


@cli.command("list-converters")
@click.option("--markdown", is_flag=True, help="Print the coverage table (framework x neuron class x option) as Markdown, as in README.md.")
def list_converters(markdown):
    """List the framework converters, their versions and the neuron classes they handle.

    \b
    Example:
      psu-export list-converters
      psu-export list-converters --markdown
    """
    if markdown:
        from .coverage import markdown as coverage_markdown

        click.echo(coverage_markdown(), nl=False)
        return
    from rich.table import Table

    from .converters import converters
    from .coverage import class_names

    table = Table(title="Converters")
    for col in ("framework", "supported versions", "installed", "neuron classes", "refused (with reason)"):
        table.add_column(col)
    for conv in converters():
        version = conv.installed_version()
        classes, refused = class_names(conv)
        table.add_row(conv.name, conv.version_range, version or "no", ", ".join(classes) or "-", ", ".join(refused) or "-")
    Console().print(table)


def _register_optional_commands() -> None:
    from .deploy import deploy, serve_command

    cli.add_command(deploy)
    cli.add_command(serve_command)


_register_optional_commands()

from .bench import bench as _bench_command  # noqa: E402

cli.add_command(_bench_command)



def _register_calibrate() -> None:
    """``psu-export calibrate`` (psu_export/calibrate.py, which imports this module's helpers)."""
    module = sys.modules.get(f"{__package__}.calibrate")
    if module is not None and not hasattr(module, "calibrate"):
        return  # calibrate.py is being imported first and registers itself when defined
    from .calibrate import calibrate as command

    cli.add_command(command)


_register_calibrate()


def main():
    cli(prog_name="psu-export")


if __name__ == "__main__":
    main()
