"""The pictures of `python -m dlfast train`: loss curves, image grids, 2-D point clouds.

matplotlib is optional (the `models` extra): without it nothing is drawn and each function says
so once, so a recipe still trains and prints its metric.
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import torch


@functools.cache
def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with one warning) if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no pictures (pip install matplotlib)", stacklevel=3)
        return None
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    print(f"wrote {path}")
    return path


def lines(
    path: Path,
    curves: dict[str, list[float] | tuple],
    xlabel: str = "step",
    ylabel: str = "loss",
    log: bool = False,
):
    """One line per named curve: a list of per-step values (plotted against the step, from 1)
    or an (x, y) pair; `log` for a log y axis. The loss curves of the training recipes."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        x, y = values if isinstance(values, tuple) else (range(1, len(values) + 1), values)
        ax.plot(x, y, label=name, linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if len(curves) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def image_grid(path: Path, rows: dict[str, torch.Tensor], columns: int | None = None):
    """A grid of grey images: one block of rows per named batch (N, 1, H, W) or (N, H, W) with
    values in [0, 1], labelled on the left; `columns` images per row (default: all of the first
    batch, at most 16)."""
    plt = _pyplot()
    if plt is None:
        return None
    batches = {name: t.detach().float().cpu().reshape(len(t), *t.shape[-2:]) for name, t in rows.items()}
    columns = columns or min(16, max(len(t) for t in batches.values()))
    layout = [(name, i) for name, t in batches.items() for i in range(math.ceil(len(t) / columns))]
    fig, axes = plt.subplots(len(layout), columns, figsize=(columns, len(layout)), squeeze=False)
    for r, (name, chunk) in enumerate(layout):
        images = batches[name][chunk * columns : (chunk + 1) * columns]
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c].numpy(), cmap="gray", vmin=0, vmax=1)
        if chunk == 0:
            axes[r][0].set_title(name, loc="left", fontsize=8)
    return _save(fig, path)


def point_clouds(path: Path, panels: dict[str, torch.Tensor], labels: torch.Tensor):
    """Scatter plots of (N, 2) points side by side, coloured by the (N,) class labels: e.g. what
    each layer of a narrow network makes of its input."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.4), squeeze=False)
    for ax, (name, points) in zip(axes[0], panels.items(), strict=True):
        p = points.detach().float().cpu()
        ax.scatter(p[:, 0], p[:, 1], c=labels.cpu(), s=2, cmap="coolwarm")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)
