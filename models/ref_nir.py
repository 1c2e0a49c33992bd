"""A small reference NIR graph with every neuron node type psu-export converts.

``Input(16) -> Affine -> LIF -> Linear -> IF``, then two branches summed into ``Output``
(NIR sums the edges into one node): ``-> Linear -> CubaLIF -> Linear -> LI`` and
``-> Linear -> I`` (the reset-free ``LI`` / ``I`` output their membrane).
:func:`make_graph` returns the ``nir.NIRGraph``; :func:`write_graph` writes it as a
``.nir`` file; :func:`make_net` writes it to a temporary file and loads it the way
``psu-export convert graph.nir`` does::

    python -c "from psu_export.models.ref_nir import write_graph; write_graph('ref.nir')"
    psu-export convert ref.nir out.onnx --time-steps 8 --input-shape 16
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

FRAMEWORK = "nir"
SAMPLE = 16
DT = 1e-4
#: NIR node type -> factory of a reference model using it (read by tests/test_meta.py)
REFERENCE_MODELS = {kind: "make_net" for kind in ("LIF", "IF", "CubaLIF", "LI", "I")}


def make_graph():
    """The reference ``nir.NIRGraph`` (seeded weights; every spiking population fires on inputs in [0, 1))."""
    import nir

    rng = np.random.default_rng(0)
    h, k, out = 24, 12, 6
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    return nir.NIRGraph(
        nodes={
            "input": nir.Input(input_type={"input": np.array([SAMPLE])}),
            "fc1": nir.Affine(weight=f32(rng.uniform(-0.3, 1.0, (h, SAMPLE))), bias=f32(rng.uniform(0, 0.1, h))),
            "lif": nir.LIF(tau=np.full(h, 2e-3), r=np.ones(h), v_leak=np.zeros(h), v_threshold=np.full(h, 0.15)),
            "fc2": nir.Linear(weight=f32(rng.uniform(-0.2, 1.0, (k, h)))),
            "if1": nir.IF(r=np.full(k, 1 / DT), v_threshold=np.full(k, 1.5)),
            "fc3": nir.Linear(weight=f32(rng.uniform(0, 1.0, (out, k)))),
            "cuba": nir.CubaLIF(tau_syn=np.full(out, 1e-3), tau_mem=np.full(out, 2e-3), r=np.ones(out), v_leak=np.zeros(out),
                                v_threshold=np.full(out, 0.05), w_in=np.ones(out)),
            "fc4": nir.Linear(weight=f32(rng.uniform(0, 1.0, (out, out)))),
            "li": nir.LI(tau=np.full(out, 5e-3), r=np.ones(out), v_leak=np.zeros(out)),
            "fc5": nir.Linear(weight=f32(rng.uniform(0, 1.0, (out, k)))),
            "i": nir.I(r=np.ones(out)),
            "output": nir.Output(output_type={"output": np.array([out])}),
        },
        edges=[
            ("input", "fc1"), ("fc1", "lif"), ("lif", "fc2"), ("fc2", "if1"), ("if1", "fc3"), ("fc3", "cuba"),
            ("cuba", "fc4"), ("fc4", "li"), ("li", "output"), ("if1", "fc5"), ("fc5", "i"), ("i", "output"),
        ],
    )


def write_graph(path) -> Path:
    """Write :func:`make_graph` to ``path`` (a ``.nir`` file)."""
    import nir

    path = Path(path)
    nir.write(str(path), make_graph())
    return path


def make_net(dt: float = DT, reset: str = "zero"):
    """The graph written to a temporary ``.nir`` file and read back with :func:`psu_export.nir_import.load_nir`."""
    from psu_export.nir_import import load_nir

    with tempfile.TemporaryDirectory() as tmp:
        return load_nir(write_graph(Path(tmp) / "ref.nir"), dt, reset)
