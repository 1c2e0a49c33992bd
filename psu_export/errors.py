"""Errors with the exit codes of the command-line contract (DESIGN.md section 5).

Every error a user can cause is one of these; the CLI prints ``str(error)`` as one
paragraph (no traceback) and exits with ``error.exit_code``.

=====  ==========================================================
code   meaning
=====  ==========================================================
0      passed
1      parity below tolerance (the ONNX file is still written)
2      usage error: bad arguments, unreadable or unsuitable files
3      model not convertible (one reason per neuron layer)
4      capture, export or runtime failure
=====  ==========================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PARITY = 1
EXIT_USAGE = 2
EXIT_NOT_CONVERTIBLE = 3
EXIT_FAILURE = 4


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """``"TypeName: first line of the message"`` (cut to ``limit`` characters), for reports."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:limit]}"


class PsuExportError(Exception):
    """Base class: a failure with a user-facing message and an exit code."""

    exit_code = EXIT_FAILURE


class UsageError(PsuExportError):
    """Bad arguments or input files (exit code 2)."""

    exit_code = EXIT_USAGE


class NotConvertibleError(PsuExportError):
    """The model contains layers that cannot be converted faithfully (exit code 3).

    ``reasons`` maps a layer name (or graph location) to a human-readable reason.
    """

    exit_code = EXIT_NOT_CONVERTIBLE

    def __init__(self, reasons: dict[str, str], headline: str = "The model cannot be converted faithfully:"):
        self.reasons = dict(reasons)
        lines = [headline] + [f"  - {name}: {why}" for name, why in self.reasons.items()]
        super().__init__("\n".join(lines))


class CaptureError(PsuExportError):
    """The model could not be captured, exported or run (exit code 4)."""

    exit_code = EXIT_FAILURE
