"""scikit-learn's bundled datasets (no download): the 8 x 8 digits and the tabular sets."""

from __future__ import annotations

import torch

from dlfast.data.registry import DataUnavailableError


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8 x 8 handwritten digits (1797 images, no download): images
    (1797, 1, 8, 8) float32 scaled to [0, 1] and labels (1797,) int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataUnavailableError("the digits come with scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(bunch.target, dtype=torch.long)


TABULAR = ("iris", "wine", "breast_cancer")


def tabular(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One of scikit-learn's bundled tabular classification sets (no download): features (N, F)
    float32 as shipped (not standardised) and labels (N,) int64. name: iris (150 x 4, 3 classes),
    wine (178 x 13, 3 classes) or breast_cancer (569 x 30, 2 classes)."""
    if name not in TABULAR:
        raise ValueError(f"tabular(name): name must be one of {TABULAR}, got {name!r}")
    try:
        from sklearn import datasets
    except ImportError as exc:
        raise DataUnavailableError(f"{name} comes with scikit-learn: pip install scikit-learn") from exc
    bunch = getattr(datasets, f"load_{name}")()
    return torch.tensor(bunch.data, dtype=torch.float32), torch.tensor(bunch.target, dtype=torch.long)
