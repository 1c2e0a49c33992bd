"""Readable tables (rich) for parity reports, neuron sites and converters."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.4f}%"


def _err(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def sites_table(sites: list[dict]) -> Table:
    table = Table(title="Neuron layers")
    for col in ("layer", "source", "reset", "timing", "compare", "algorithm", "why"):
        table.add_column(col)
    for s in sites:
        spec = s["spec"]
        table.add_row(s["name"], s["source_class"], spec["reset"], spec["reset_timing"], spec["compare"], s.get("algorithm", "-"), s.get("algorithm_reason", ""))
    return table


def report_tables(report: dict) -> list[Table]:
    """The parity report (its JSON form) as tables: per provider x layer / output."""
    rows = Table(title=f"Parity ({report['mode']} mode, T={report['time_steps']}, inputs {report['inputs']})")
    for col in ("compared", "kind", "name", "spike agreement", "float ties", "max abs error", "argmax agreement", "result"):
        rows.add_column(col)
    checks = [("original vs torch", report["rewrite"])] + [
        (f"original vs ort:{name}", summary) for name, summary in report["providers"].items()
    ]
    for label, summary in checks:
        if not summary["available"]:
            rows.add_row(label, "", "", "", "", "", "", "[red]FAILED[/red]: " + summary["error"] if summary["error"] else "[yellow]unavailable[/yellow]")
            continue
        if summary["error"]:
            rows.add_row(label, "", "", "", "", "", "", f"[red]FAILED[/red]: {summary['error']}")
            continue
        for kind, key in (("layer", "layers"), ("output", "outputs")):
            for c in summary[key]:
                result = "[green]PASSED[/green]" if c["passed"] else "[red]FAILED[/red]"
                rows.add_row(label, kind, c["name"], _pct(c["spike_agreement"]), str(c["float_ties"]), _err(c["max_abs_error"]), _pct(c["argmax_agreement"]), result)
        for c in summary.get("export_layers", []):
            result = "[green]PASSED[/green]" if c["passed"] else "[red]FAILED[/red]"
            rows.add_row(label.replace("original", "torch"), "layer", c["name"], _pct(c["spike_agreement"]), str(c["float_ties"]), _err(c["max_abs_error"]), "-", result)
    tables = [rows]
    if report.get("extra_time_steps"):
        extra = Table(title="Other sequence lengths (onnxruntime cpu)")
        for col in ("T", "spike agreement", "max abs error", "result"):
            extra.add_column(col)
        for e in report["extra_time_steps"]:
            extra.add_row(str(e["time_steps"]), _pct(e["spike_agreement"]), _err(e["max_abs_error"]), "[green]PASSED[/green]" if e["passed"] else "[red]FAILED[/red]")
        tables.append(extra)
    return tables


def print_report(report: dict, console: Console) -> None:
    for table in report_tables(report):
        console.print(table)
    for name, summary in report["providers"].items():
        if summary["error"]:
            console.print(f"[red]onnxruntime {name} failed:[/red] {summary['error']}", soft_wrap=True)
    for note in report.get("notes", []):
        console.print(f"note: {note}", soft_wrap=True)
    verdict = "[bold green]passed[/bold green]" if report["passed"] else "[bold red]FAILED[/bold red]"
    console.print(
        f"Parity {verdict}: spike agreement {_pct(report['spike_agreement'])}, "
        f"export spike agreement {_pct(report['export_spike_agreement'])}, max abs error {_err(report['max_abs_error'])}, "
        f"float ties {report['float_ties']} (differences after them: {report.get('after_tie', 0)})"
    )
