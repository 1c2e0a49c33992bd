"""The README coverage table is generated from the converter registry and cannot go stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from psu_export import coverage
from psu_export.converters import EXACT, UNSUPPORTED, converters

ROOT = Path(__file__).resolve().parent.parent
#: framework modules hidden to simulate a machine without them
FRAMEWORK_MODULES = ("snntorch", "spikingjelly", "spikingjelly.activation_based", "norse", "norse.torch", "nir")


def test_readme_block_is_the_generated_table():
    text = (ROOT / "README.md").read_text()
    assert text.count(coverage.START) == 1 and text.count(coverage.END) == 1
    assert coverage.readme_block(text) == coverage.readme_text(), (
        "README.md's coverage table is stale: run `python scripts/update_coverage.py`"
    )
    # the section sits before "## How it works"
    assert text.index(coverage.START) < text.index("## How it works")


def test_table_does_not_depend_on_installed_frameworks(monkeypatch):
    table = coverage.markdown()
    for name in FRAMEWORK_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    snntorch = next(c for c in converters() if c.name == "snntorch")
    assert snntorch.neuron_classes() == () and snntorch.unsupported_classes() == {}
    assert coverage.markdown() == table


def test_cli_prints_the_table():
    from psu_export.cli import cli

    result = CliRunner().invoke(cli, ["list-converters", "--markdown"])
    assert result.exit_code == 0, result.output
    assert result.output == coverage.markdown()


def test_every_converter_and_status_is_in_the_table():
    table = coverage.markdown()
    for conv in converters():
        rows = conv.coverage()
        assert rows, f"{conv.name}: coverage() is empty"
        assert all(r.status in (EXACT, UNSUPPORTED) for r in rows)
        assert all(r.reason for r in rows if r.status == UNSUPPORTED), f"{conv.name}: an unsupported row without a reason"
        for row in rows:
            assert f"| {conv.name} | {row.neuron_class} | {coverage._cell(row.option)} |" in table
    assert f"| {coverage.HANDWRITTEN} | lif |" in table and f"| {coverage.HANDWRITTEN} | integrator |" in table
    for mode in ("`exact` (default)", "`psu`", "`stochastic`"):
        assert f"| {mode} |" in table


def test_reset_mode_column_follows_choose_algorithm():
    from psu_export.converters import spec_options

    assert coverage.approximate_algorithms(spec_options("subtract", "previous_step")) == "`probabilistic_reset` / `stochastic_reset`"
    assert coverage.approximate_algorithms(spec_options("zero")).startswith("kept exact: ")
    assert "closed_form" in coverage.exact_algorithms(spec_options("none"))
    assert coverage.exact_algorithms(spec_options("subtract")) == "`scan`"


def test_update_script_rewrites_a_stale_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{coverage.START}\nold table\n{coverage.END}\n\n## How it works\n")
    script = ROOT / "scripts" / "update_coverage.py"
    check = subprocess.run([sys.executable, str(script), "--check", "--readme", str(readme)], capture_output=True, text=True)
    assert check.returncode == 1 and "stale" in check.stdout
    subprocess.run([sys.executable, str(script), "--readme", str(readme)], check=True, capture_output=True)
    assert coverage.readme_block(readme.read_text()) == coverage.readme_text()
    assert readme.read_text().endswith(f"{coverage.END}\n\n## How it works\n")
    check = subprocess.run([sys.executable, str(script), "--check", "--readme", str(readme)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


@pytest.mark.parametrize("conv", converters(), ids=lambda c: c.name)
def test_unsupported_classes_come_from_the_static_rows(conv):
    """unsupported_classes() (installed) is a subset of the coverage's refused classes (static)."""
    refused = {r.neuron_class: r.reason for r in conv.coverage() if r.status == UNSUPPORTED and r.option == "any"}
    for cls, why in conv.unsupported_classes().items():
        assert refused.get(cls.__name__) == why


def test_summary_table_names_classes_of_frameworks_not_imported(monkeypatch):
    """``list-converters`` takes its class columns from the static coverage rows: BrainCog,
    never imported by its converter, still lists its neurons (it showed '-' before)."""
    from psu_export.cli import cli

    for name in FRAMEWORK_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "braincog.base.node.node", raising=False)
    braincog = next(c for c in converters() if c.name == "braincog")
    ok, refused = coverage.class_names(braincog)
    assert ok == ["IFNode", "LIFNode", "PLIFNode"] and {"BaseNode", "BurstLIFNode"} <= set(refused)
    result = CliRunner().invoke(cli, ["list-converters"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "braincog" in line)
    assert "IFNode, LIFNode, PLIFNode" in row and "BurstLIFNode" in row
    assert "LIFCell" in next(line for line in result.output.splitlines() if "norse" in line)
