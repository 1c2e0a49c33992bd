"""The coverage table of README.md, generated from the converter registry.

Rows come from each converter's :meth:`~psu_export.converters.FrameworkConverter.coverage`
(neuron class x option -> exact / unsupported with the converter's reason), from the
hand-written loop rules of :mod:`psu_export.patterns`, and, for each exact row, the
algorithm :func:`psu_export.kernels.choose_algorithm` picks in each ``--reset`` mode.
Nothing here depends on which frameworks are installed (class names are known
statically), so the README block is the same everywhere::

    psu-export list-converters --markdown          # print the table
    python scripts/update_coverage.py              # rewrite README.md between the markers
    python scripts/update_coverage.py --check      # exit 1 when README.md is stale

``tests/test_coverage.py`` asserts that the README block equals :func:`readme_text`
(a ``## Coverage`` heading and :func:`markdown`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .converters import EXACT, CoverageRow, FrameworkConverter, converters, exact, spec_options, unsupported
from .kernels import APPROXIMATE_MODES, CLOSED_FORM_MAX_STEPS, choose_algorithm
from .spec import CHARGE_PARAMS, NeuronSpec

START = "<!-- coverage:start -->"
END = "<!-- coverage:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"

HEADING = "## Coverage"
HANDWRITTEN = "hand-written loop"

# --------------------------------------------------------------------- hand-written loops


def handwritten_rows() -> list[CoverageRow]:
    """The rules of :mod:`psu_export.patterns` (``lif``, ``integrator``), option by option.

    The exact forms are the ones ``patterns._charges`` / ``_sj_charges`` /
    ``_split_compare`` / ``_find_reset`` match; the refusals are its ``_Fail`` messages.
    """
    charge = "v = decay * v + x (either order of terms and factors; decay 1: v = v + x)"
    test = "spike test v > thr or v >= thr (also thr < v, v - thr > 0, heaviside(v - thr, 0 or 1), surrogate autograd functions)"
    sj = ("SpikingJelly-style charge v = v + (x - (v - v_rest)) / tau or v = v - (v - v_rest) / tau + x "
          "(or * inv_tau)")
    return [
        exact("lif", f"{charge}; {test}; subtract reset v = v - s * thr (or v -= s * thr)", spec_options("subtract")),
        exact("lif", f"{charge}; zero reset v = v * (1 - s), v = v - v * s, torch.where(s > 0, 0, v), v.masked_fill(s.bool(), 0) or v[s > 0] = 0 (in place too)", spec_options("zero", reset_form="product")),
        exact("lif", f"{charge}; no reset", spec_options("none")),
        exact("lif", f"{sj}; any of the resets", spec_options("subtract", charge="sj_decay_input")),
        exact("lif", "the reset written before the charge (v = v - s * thr at the top of the next step)"),
        exact("lif", "the spike tests the stored membrane, then the charge is reset by it (snnTorch tutorial 2: "
                     "spk = mem > thr; mem = beta * mem + x - spk * thr, bool spikes too; also snnTorch Leaky written by hand: "
                     "reset = mem > thr, that update, spk = mem > thr); subtract reset, or zero reset u * (1 - s)",
              spec_options("subtract", reset_timing="previous_step", spike_from="stored")),
        exact("lif", "the previous step's spike resets the charge, then the spike tests the reset membrane (snnTorch's "
                     "own order: mem = beta * mem + x - spk * thr; spk = mem > thr, spk 0 before the first step); "
                     "subtract reset, or zero reset u * (1 - s)",
              spec_options("subtract", reset_timing="previous_step")),
        exact("lif", "the previous step's spike zeroes the stored membrane before the charge (STBP, Wu et al. 2018: "
                     "mem = mem * decay * (1 - spike) + x; spike = mem > thr, spike 0 before the first step)",
              spec_options("zero", reset_timing="previous_step", zero_scope="membrane")),
        exact("lif", "a neuron module that loops over its whole input itself (TET's LIFSpike: for t in range(x.shape[1]): "
                     "mem = mem * tau + x[:, t]; ...; torch.stack(spikes, dim=1)), between layers folded over time"),
        exact("lif", "inside forward over a [T, B, ...] sequence, or over a static [B, ...] input repeated for a fixed T"),
        exact("integrator", "v = decay * v + x with no spike test (readouts; a plain acc = acc + x becomes a cumulative sum)", spec_options("none")),
        unsupported("lif", "a subtract reset that removes something other than the threshold",
                    "the subtract reset removes ..., not the threshold (NeuronSpec subtracts the threshold)"),
        unsupported("lif", "a threshold that depends on the input or on time", "the threshold is not a constant"),
        unsupported("lif", "heaviside(v - thr, values) with values other than 0 or 1", "heaviside with values other than 0 or 1 is not a spike test"),
        unsupported("lif", "decay, threshold, comparison or reset that differs between time steps", "differs between time steps"),
        unsupported("lif", "reset before the charge, with the pre-reset membrane used outside the neuron",
                    "the value carried is the pre-reset membrane; the spec reports the post-reset one"),
        unsupported("any", "any other value carried from one step to the next",
                    "not a recognised neuron: refused (exit 3) naming the node where matching stopped"),
    ]


# --------------------------------------------------------------------- reset modes


def _example_spec(options: dict, per_channel: bool = False) -> NeuronSpec:
    """A spec with the row's discrete options and ordinary parameter values."""
    decay = torch.full((3,), 0.9) if per_channel else torch.tensor(0.9)
    values = {"tau": 2.0, "inv_tau": 0.5, "v_rest": 0.0, "mem_gain": 0.1, "syn_gain": -0.2}
    extra = {name: values[name] for name in CHARGE_PARAMS[options["charge"]] if name != "decay"}
    return NeuronSpec(
        decay=decay, threshold=1.0, reset=options["reset"], reset_timing=options["reset_timing"], compare=options["compare"],
        charge=options["charge"], reset_form=options["reset_form"], zero_scope=options.get("zero_scope", "membrane"),
        syn_decay=0.8 if options["two_state"] else None, spike_from=options.get("spike_from", "updated"), **extra,
    )


def exact_algorithms(options: dict) -> str:
    """``--reset exact``: the algorithm(s) ``choose_algorithm`` picks, over T and scalar / per-channel decay."""
    names = []
    for per_channel in (False, True):
        for steps in (CLOSED_FORM_MAX_STEPS, CLOSED_FORM_MAX_STEPS + 1):
            name = choose_algorithm(_example_spec(options, per_channel), steps).name
            if name not in names:
                names.append(name)
    if names == ["closed_form", "scan"]:
        return f"`closed_form` (scalar decay, T <= {CLOSED_FORM_MAX_STEPS}), else `scan`"
    return " / ".join(f"`{n}`" for n in names)


def _approximate(options: dict) -> tuple[list[str], str, str | None]:
    """(algorithm per approximate mode, notes, why the layer is kept exact or None)."""
    spec = _example_spec(options)
    picked = [choose_algorithm(spec, CLOSED_FORM_MAX_STEPS, mode) for mode in APPROXIMATE_MODES]
    exact_alg = choose_algorithm(spec, CLOSED_FORM_MAX_STEPS)
    if all(a.name == exact_alg.name for a in picked):
        return [], "", picked[0].mode_reason.removesuffix("; kept exact").removesuffix(" (exact)")
    return [a.name for a in picked], f" ({picked[0].caveat})" if picked[0].caveat else "", None


def approximate_algorithms(options: dict) -> str:
    """``--reset psu`` / ``stochastic``: the estimate's algorithm, or why the layer is kept exact."""
    names, notes, kept = _approximate(options)
    if kept is not None:
        return f"kept exact: {kept}"
    return " / ".join(f"`{n}`" for n in names) + notes


def _own_kernel(conv: FrameworkConverter) -> bool:
    return type(conv).site_kernel is not FrameworkConverter.site_kernel


# --------------------------------------------------------------------- tables


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _status(row: CoverageRow) -> str:
    return "exact" if row.status == EXACT else f"unsupported: {row.reason}"


def _rows_table(groups: list[tuple[str, list[CoverageRow], bool]]) -> list[str]:
    lines = [
        "| framework | neuron class | option | conversion | `--reset exact` | `--reset psu` / `stochastic` |",
        "|---|---|---|---|---|---|",
    ]
    for framework, rows, own_kernel in groups:
        for row in rows:
            if row.status != EXACT:
                modes = ("", "")
            elif own_kernel:
                modes = ("`psu_module` (the module's own dynamics)", "`psu_module` (the same, in every mode)")
            elif row.spec is None:
                modes = ("as the class's reset rows", "as the class's reset rows")
            else:
                modes = (exact_algorithms(row.spec), approximate_algorithms(row.spec))
            lines.append("| " + " | ".join(_cell(c) for c in (framework, row.neuron_class, row.option, _status(row), *modes)) + " |")
    return lines


def groups() -> list[tuple[str, list[CoverageRow], bool]]:
    """``(framework, rows, own kernel)`` for every registered converter, then the hand-written loops."""
    out = [(conv.name, conv.coverage(), _own_kernel(conv)) for conv in converters()]
    out.append((HANDWRITTEN, handwritten_rows(), False))
    return out


def class_names(conv: FrameworkConverter) -> tuple[list[str], list[str]]:
    """The neuron classes ``conv`` converts exactly (at least one exact option) and the ones
    it refuses whatever the options, from its coverage rows: known statically, so the same
    whether or not the framework is installed or imported."""
    rows = conv.coverage()
    ok = list(dict.fromkeys(r.neuron_class for r in rows if r.status == EXACT))
    return ok, [c for c in dict.fromkeys(r.neuron_class for r in rows) if c not in ok]


def _names(where: dict[str, list[str]]) -> str:
    return "; ".join(f"{framework} {', '.join(dict.fromkeys(classes))}" for framework, classes in where.items())


def _mode_summary(all_groups) -> list[str]:
    estimated: dict[str, list[str]] = {}
    resets: list[str] = []
    kept: dict[str, dict[str, list[str]]] = {}
    own: dict[str, list[str]] = {}
    for framework, rows, own_kernel in all_groups:
        for row in rows:
            if row.status != EXACT:
                continue
            if own_kernel:
                own.setdefault(framework, []).append(row.neuron_class)
                continue
            if row.spec is None:
                continue
            _, _, why = _approximate(row.spec)
            if why is None:
                estimated.setdefault(framework, []).append(row.neuron_class)
                resets.append(row.spec["reset"])
            else:
                kept.setdefault(why, {}).setdefault(framework, []).append(row.neuron_class)
    which = " / ".join(dict.fromkeys(resets))
    lines = [
        "| `--reset` | algorithm | applies to |",
        "|---|---|---|",
        f"| `exact` (default) | `closed_form` (reset-free, scalar decay, T <= {CLOSED_FORM_MAX_STEPS}) or `scan` | every exact row, bit for bit |",
        f"| `psu` | `probabilistic_reset` (the paper's reset estimate; approximate) | the {which}-reset options of {_cell(_names(estimated))} |",
        "| `stochastic` | `stochastic_reset` (Bernoulli samples of the estimate from a seeded hash RNG; approximate) | the same layers |",
    ]
    for why, where in kept.items():
        lines.append(f"| `psu`, `stochastic` | kept exact: {_cell(why)} | {_cell(_names(where))} |")
    lines.append(f"| every mode | `psu_module` (the module's own dynamics, exactly) | {_cell(_names(own))} |")
    return lines


def markdown() -> str:
    """The whole coverage block (without the markers)."""
    all_groups = groups()
    lines = [
        "Generated from the converter registry by `psu-export list-converters --markdown` "
        "(`python scripts/update_coverage.py` rewrites this block; `tests/test_coverage.py` keeps it current).",
        "",
        "| framework | supported versions | converted exactly | refused |",
        "|---|---|---|---|",
    ]
    for conv in converters():
        ok, refused = class_names(conv)
        lines.append("| " + " | ".join(_cell(c) for c in (conv.name, conv.version_range, ", ".join(ok), ", ".join(refused) or "-")) + " |")
    lines.append(f"| {HANDWRITTEN} | torch.export | " + ", ".join(dict.fromkeys(r.neuron_class for r in handwritten_rows() if r.status == EXACT))
                 + " (rules of `psu_export/patterns.py`) | any other recurrence |")
    lines += ["", "Per class and option (an `unsupported` model is refused with exit code 3 and the reason):", ""]
    lines += _rows_table(all_groups)
    lines += ["", "Reset modes (`--reset`), from `kernels.choose_algorithm`:", ""]
    lines += _mode_summary(all_groups)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- README


def readme_text() -> str:
    """What goes between the README markers: a ``## Coverage`` section with :func:`markdown`."""
    return f"{HEADING}\n\n{markdown()}"


def readme_block(text: str) -> str:
    """The text between the coverage markers of ``text``."""
    try:
        start = text.index(START) + len(START)
        end = text.index(END, start)
    except ValueError:
        raise ValueError(f"README has no {START} ... {END} block") from None
    return text[start:end].strip("\n") + "\n"


def write_readme(path: Path = README, check: bool = False) -> bool:
    """Put :func:`readme_text` between the markers of ``path``; True when it changed (``check``: do not write)."""
    path = Path(path)
    text = path.read_text()
    block = readme_text()
    if readme_block(text) == block:
        return False
    if not check:
        start = text.index(START) + len(START)
        end = text.index(END, start)
        path.write_text(text[:start] + "\n" + block + text[end:])
    return True
