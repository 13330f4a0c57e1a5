"""Heatmap of a routing's per-unit weights (MoLE gates, Arrow's per-module means): units x adapters."""

from __future__ import annotations

from pathlib import Path

from ..errors import LoramuxError
from .routing import Routing


def plot_layer_weights(routing: Routing, path: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not routing.layers:
        raise LoramuxError(f"a {routing.router or 'sentence'}-level routing has no per-layer weights to plot "
                           f"(use --router mole or arrow)")
    adapters = list(routing.probabilities) or sorted({a for w in routing.layers.values() for a in w})
    units = list(routing.layers)
    grid = np.array([[routing.layers[u].get(a, 0.0) for a in adapters] for u in units])
    fig, ax = plt.subplots(figsize=(2 + 0.45 * len(adapters), 1.5 + 0.18 * len(units)))
    im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=max(1e-9, float(grid.max())))
    ax.set_xticks(range(len(adapters)), adapters, rotation=60, ha="right", fontsize=8)
    short = [u.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "") for u in units]
    ax.set_yticks(range(len(units)), short, fontsize=6 if len(units) > 40 else 8)
    fig.colorbar(im, ax=ax, label="mean weight over the prompt's tokens")
    ax.set_title(title or f"{routing.router}: weight per adapter and unit")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
