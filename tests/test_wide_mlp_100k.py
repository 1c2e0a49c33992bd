"""The suite's 784-1000-10 MLP converted at T = 100,000 within 2 GB (slow; a file of its own,
so that pytest-xdist runs it beside ``test_long_sequences.py``'s other 100,000-step tests)."""

from __future__ import annotations

import pytest

from conftest import convert_within_2gb


@pytest.mark.slow
def test_100k_steps_convert_the_wide_reference_mlp(tmp_path):
    """The suite's 784-1000-10 MLP at T = 100,000: ``psu-export convert`` with verify's
    synthetic checks (T, 1,000 and 100,064 steps) stays under 2 GB, the rewrite run in chunks
    of steps (1.80-1.84 GB measured; 2.47 GB when it ran whole), and every difference is a float
    tie or follows one."""
    report = convert_within_2gb(tmp_path, "psu_export.models.ref_mlp:make_net", tmp_path / "wide.onnx", "--input-shape", "784")
    assert report["passed"] and all(check["passed"] for check in report["extra_time_steps"]), report
    for run in (report["rewrite"], report["providers"]["cpu"]):
        assert all(c["mismatches"] == c["float_ties"] + c["after_tie"] for c in run["layers"]), run
