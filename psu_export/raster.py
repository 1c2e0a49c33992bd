"""Spike rasters: the original's spikes against the exported model's, per neuron layer.

One panel per layer (first sample of the batch, at most :data:`MAX_NEURONS` neurons):
time on x, neuron on y; a dot where both fire, a red cross where only one does.  Needs
matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UsageError

MAX_NEURONS = 128


def write_raster(path, reference: dict[str, torch.Tensor], converted: dict[str, torch.Tensor], title: str) -> Path:
    """Plot ``reference`` vs ``converted`` spikes (``{layer: [T, B, ...]}``) into ``path`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError(f"--raster needs matplotlib ({exc}); install it with: pip install 'psu-export[plot]'") from exc
    layers = [name for name in converted if name in reference]
    if not layers:
        raise UsageError("--raster: the exported model exposes no neuron layer to plot")
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 2.2 * len(layers)), squeeze=False)
    for ax, name in zip(axes[:, 0], layers):
        ref = reference[name][:, 0].reshape(reference[name].shape[0], -1)[:, :MAX_NEURONS] != 0
        got = converted[name][:, 0].reshape(converted[name].shape[0], -1)[:, :MAX_NEURONS] != 0
        both = (ref & got).nonzero()
        differ = (ref ^ got).nonzero()
        ax.scatter(both[:, 0], both[:, 1], s=4, c="black", marker="|", label="both fire")
        ax.scatter(differ[:, 0], differ[:, 1], s=18, c="red", marker="x", label=f"differ ({len(differ)})")
        ax.set_ylabel(f"{name}\nneuron")
        ax.set_xlim(-0.5, ref.shape[0] - 0.5)
        ax.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("time step")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
