"""dlfast.nn drop-in layers and the converter."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tol

import dlfast


@pytest.mark.parametrize(
    "kwargs",
    [
        {"normalized_shape": 16},
        {"normalized_shape": (4, 8), "eps": 1e-6},
        {"normalized_shape": 16, "elementwise_affine": False},
        {"normalized_shape": 16, "bias": False},
        {"normalized_shape": 16, "dtype": torch.float64},
    ],
)
def test_layer_norm_is_a_drop_in(kwargs):
    ours, theirs = dlfast.nn.LayerNorm(**kwargs), torch.nn.LayerNorm(**kwargs)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
    assert repr(ours) == repr(theirs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, *ours.normalized_shape, dtype=kwargs.get("dtype", torch.float32))
    torch.testing.assert_close(ours(x), theirs(x), **tol(x.dtype))


def test_convert_a_transformer_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.TransformerEncoderLayer(
            d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        ),
        torch.nn.LayerNorm(32),
    )
    model.train()  # the eval fast path of TransformerEncoderLayer bypasses module forwards
    twin = copy.deepcopy(model)
    dlfast.nn.convert(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 3 and all(type(m) is dlfast.nn.LayerNorm for m in norms)
    assert model.state_dict().keys() == twin.state_dict().keys()

    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(model(x), twin(x), **tol(torch.float32))
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **tol(torch.float32), msg=name)

    dlfast.nn.revert(model)
    assert all(type(m) is torch.nn.LayerNorm for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


def test_convert_leaves_user_subclasses_alone():
    class MyNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(MyNorm(8))
    dlfast.nn.convert(model)
    assert type(model[0]) is MyNorm
