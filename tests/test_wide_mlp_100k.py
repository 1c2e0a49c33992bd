"""The suite's 784-1000-10 MLP converted at T = 100,000 within 2 GB (slow; a file of its own,
so that pytest-xdist can run it beside ``test_long_sequences.py``'s other 100,000-step tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import convert_within_2gb


@pytest.mark.slow
def test_100k_steps_convert_the_wide_reference_mlp(tmp_path):
    """The suite's 784-1000-10 MLP at T = 100,000: ``psu-export convert`` with its parity check
    on a 100,000-step input stays under 2 GB, the rewrite run in chunks of steps (1.80-1.84 GB
    measured with the synthetic checks, whose peak is the same run; 2.47 GB when the rewrite
    ran whole), and every difference is a float tie or follows one.  (``--data``: the
    synthetic checks would also run the original's loop at 100,064 steps, 1.5 minutes more.)
    Uniform inputs make a quarter of the hidden neurons fire a step."""
    x = torch.rand(100_000, 1, 784, generator=torch.Generator().manual_seed(100_000))
    np.savez(tmp_path / "data.npz", input=x.numpy())
    del x
    report = convert_within_2gb(tmp_path, "psu_export.models.ref_mlp:make_net", tmp_path / "wide.onnx",
                                "--input-shape", "784", "--data", str(tmp_path / "data.npz"))
    assert report["passed"], report
    for run in (report["rewrite"], report["providers"]["cpu"]):
        assert all(c["mismatches"] == c["float_ties"] + c["after_tie"] for c in run["layers"]), run
